"""Building blocks shared by both models: logical axis names, the one way parameters are annotated
with them, activation constraints, PyTorch-exact LayerNorm, dropout, feed-forward, self-attention
and the stacked layers (`stack` builds them, `scan` runs them).

Every parameter is created through `with_axes(init, names)` (or `param`, which calls it): the
logical names travel as the variable's `out_sharding` metadata, and the one rules table in the
experiment config maps them onto mesh axes (`scfm_jax.train.partitioning`). Parameters are never
sharded as they are created (the train code places the whole state with a jitted init), so models
build the same with or without a mesh. Activations are pinned at block boundaries with `constrain`,
a no-op unless rules are active (`nnx.logical_axis_rules(...)`) and a mesh is set.
"""
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from scfm_jax.errors import UsageError
from scfm_jax.models import attention as attention_impls
from scfm_jax.models import favor_pallas, performer

# Logical axis names used by the models. Every name must appear in a config's rules table.
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
HEAD_DIM = "head_dim"
GENES = "genes"
TABLE_EMBED = "table_embed"  # the embed dimension of the gene table (its rows cannot be split)
VOCAB = "vocab"
BINS = "bins"
FEATURES = "features"
LAYERS = "layers"  # the leading axis of stacked layer parameters
AXIS_NAMES = (BATCH, LENGTH, EMBED, MLP, HEADS, HEAD_DIM, GENES, TABLE_EMBED, VOCAB, BINS,
              FEATURES, LAYERS)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
}

LAYER_NORM_EPSILON = 1e-5  # PyTorch's default, used by both original models (Flax's is 1e-6)
ATTENTION_KINDS = ("performer", "dot_product")


# The field of every `config.model` that is not architecture: which model it is.
MODEL_NAME_FIELD = "name"


def config_fields(cls, section: Mapping[str, Any], where: str, *, not_architecture=()
                  ) -> dict[str, Any]:
    """The values of `section` (a ConfigDict or mapping) for the fields of dataclass `cls`.

    A key that is not a field of `cls` (a misspelt `--config.model.n_heads=8`) is a UsageError
    naming `where` and the known fields, rather than a setting silently ignored. `name` and
    `not_architecture` (keys read by training, e.g. how often buffers are refreshed) pass.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - known - {MODEL_NAME_FIELD, *not_architecture})
    if unknown:
        raise UsageError(f"{where} has unknown field(s) {unknown}; known: {sorted(known)}")
    return {name: section[name] for name in known if name in section}


def with_axes(init: Callable, names: Sequence[str | None]) -> Callable:
    """`init` whose value carries the logical axis `names` (one per dimension)."""
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], names: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
    """A parameter of `shape` drawn by `init`, annotated with logical axis `names`."""
    return nnx.Param(with_axes(init, names)(rngs.params(), tuple(shape), dtype))


def torch_linear_init() -> Callable:
    """uniform(+-1/sqrt(fan_in)), the scale of torch.nn.Linear's default init."""
    return nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; identity without rules or mesh.

    A mesh axis goes to the first dimension that claims it (Flax's rule resolution): activations
    are ("batch", ..., "embed") and, under FSDP, both batch and embed map to `fsdp`; the
    activation keeps it on the batch.
    """
    rules = nn.get_logical_axis_rules()
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, nn.logical_to_mesh_axes(tuple(names), rules))


def gathered(table: jax.Array) -> jax.Array:
    """A parameter whole on every device, for a lookup (as FSDP gathers a weight for its matmul).

    A gene table split on its embed dimension would otherwise make the lookup's [B, L, D] output
    split on D, and the step all-gathers that activation back onto the batch split (on the 1B
    config: 3.8 GB per chip and micro-batch, where the table is 0.1 GB).
    """
    return constrain(table, (None,) * table.ndim)


def layer_norm(width: int, *, rngs: nnx.Rngs, use_bias: bool = True, dtype=None,
               param_dtype=jnp.float32) -> nnx.LayerNorm:
    """LayerNorm as in PyTorch: eps 1e-5, exact two-pass variance, scale/bias on `embed`."""
    return nnx.LayerNorm(
        width, epsilon=LAYER_NORM_EPSILON, use_fast_variance=False, use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype,
        scale_init=with_axes(nnx.initializers.ones_init(), (EMBED,)),
        bias_init=with_axes(nnx.initializers.zeros_init(), (EMBED,)),
        rngs=rngs)


def linear(in_features: int, out_features: int, names: tuple[str | None, str | None], *,
           rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Linear:
    """nnx.Linear with torch's default init scale, kernel annotated `names`, bias `names[1]`."""
    return nnx.Linear(in_features, out_features, dtype=dtype, rngs=rngs,
                      kernel_init=with_axes(torch_linear_init(), names),
                      bias_init=with_axes(nnx.initializers.zeros_init(), names[1:]))


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout from an explicit key."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def check_remat_policy(policy: str) -> str:
    if policy not in REMAT_POLICIES:
        raise UsageError(f"model.remat_policy must be one of {tuple(REMAT_POLICIES)}, "
                         f"got {policy!r}")
    return policy


class FeedForward(nnx.Module):
    """Dense -> activation -> Dense, kernels (embed, mlp) / (mlp, embed)."""

    def __init__(self, width: int, mlp_dim: int, activation, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.activation = activation
        self.w1 = linear(width, mlp_dim, (EMBED, MLP), dtype=dtype, rngs=rngs)
        self.w2 = linear(mlp_dim, width, (MLP, EMBED), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, dropout_rate: float = 0.0,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        hidden = self.activation(self.w1(x))
        if dropout_key is not None and dropout_rate > 0:
            hidden = dropout(hidden, dropout_rate, dropout_key)
        return self.w2(hidden)


def masked_softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_lengths: jax.Array, *,
                             dropout_rate: float = 0.0, dropout_key: jax.Array | None = None
                             ) -> jax.Array:
    """Exact softmax attention over the first `key_lengths[b]` keys; [B, L, H, d] in and out.

    The softmax is normalised after the value product (one pass less over the [B, H, L, L]
    weights, which dominate the encoder's time on CPUs); dropout, when on, hits the weights.
    """
    length = k.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k,
                        preferred_element_type=jnp.float32)
    valid = jnp.arange(length)[None, None, None, :] < key_lengths[:, None, None, None]
    # finite, so a row without keys (a cell whose every token is masked) averages instead of NaN
    logits = jnp.where(valid, logits, -1e30)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    total = jnp.sum(weights, axis=-1)
    if dropout_key is not None and dropout_rate > 0:
        weights = dropout(weights, dropout_rate, dropout_key)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return (out / jnp.transpose(total, (0, 2, 1))[..., None]).astype(v.dtype)


class SelfAttention(nnx.Module):
    """Multi-head self-attention: exact dot-product (masked by key lengths) or FAVOR+."""

    def __init__(self, width: int, heads: int, head_dim: int, *, attention: str = "performer",
                 num_features: int = 0, stabilizer_scope: str = "cell", chunk_size: int = 2048,
                 attention_impl: str = "auto", dtype=jnp.float32, rngs: nnx.Rngs):
        if attention not in ATTENTION_KINDS:
            raise UsageError(f"decoder.attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if stabilizer_scope not in performer.STABILIZER_SCOPES:
            raise UsageError(f"decoder.stabilizer_scope must be one of "
                             f"{performer.STABILIZER_SCOPES}, got {stabilizer_scope!r}")
        self.attention, self.stabilizer_scope, self.chunk_size = attention, stabilizer_scope, chunk_size
        self.attention_impl = attention_impls.check_implementation(attention_impl)
        self.heads, self.head_dim = heads, head_dim
        init, zeros = torch_linear_init(), nnx.initializers.zeros_init()

        def head_projection():
            return nnx.LinearGeneral(
                width, (heads, head_dim), dtype=dtype, rngs=rngs,
                kernel_init=with_axes(init, (EMBED, HEADS, HEAD_DIM)),
                bias_init=with_axes(zeros, (HEADS, HEAD_DIM)))

        self.query, self.key, self.value = head_projection(), head_projection(), head_projection()
        self.out = nnx.LinearGeneral(
            (heads, head_dim), width, axis=(-2, -1), dtype=dtype, rngs=rngs,
            kernel_init=with_axes(init, (HEADS, HEAD_DIM, EMBED)),
            bias_init=with_axes(zeros, (EMBED,)))
        if attention == "performer":
            rows = performer.num_random_features(head_dim, num_features)
            self.projection = performer.ProjectionMatrix(with_axes(
                lambda key, shape, dtype: performer.gaussian_orthogonal_random_matrix(key, *shape),
                (FEATURES, HEAD_DIM))(rngs.params(), (rows, head_dim), jnp.float32))
        else:
            self.projection = None

    def __call__(self, x: jax.Array, *, stabilizer_scope: str | None = None,
                 key_lengths: jax.Array | None = None, dropout_rate: float = 0.0,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """`key_lengths` [B]: only the first n keys of each row are attended, with dropout on the
        attention weights as torch's MultiheadAttention (dot-product only)."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.attention == "performer":
            if key_lengths is not None:
                raise ValueError("performer attention has no key mask (as in the original decoder)")
            # the Pallas kernel where the implementation resolves to "pallas"; the XLA scan otherwise
            pallas = attention_impls.resolve_implementation(self.attention_impl, q.dtype) == "pallas"
            favor = functools.partial(
                favor_pallas.favor_attention if pallas else performer.favor_attention,
                stabilizer_scope=stabilizer_scope or self.stabilizer_scope,
                chunk_size=self.chunk_size)
            if pallas:   # per device: XLA cannot partition a kernel (the "batch" stabiliser
                # scope's max is then per device's cells, which cancels in the normalisation)
                axes = (attention_impls.ACTIVATION_AXES,) * 3 + (None,)
                attended = attention_impls.per_device(
                    favor, (q, k, v, self.projection.get_value()), axes)
            else:
                attended = favor(q, k, v, self.projection.get_value())
        else:
            attended = attention_impls.dot_product_attention(
                q, k, v, key_lengths=key_lengths, implementation=self.attention_impl,
                dropout_rate=dropout_rate, dropout_key=dropout_key)
        return self.out(attended)


def stack(make: Callable[[], nnx.Module], depth: int) -> nnx.Module:
    """`depth` modules from `make()`, built in order, stored as ONE module whose variables carry a
    leading `layers` axis (the scan-over-layers layout of MaxText and the NNX scan example).

    `scan` runs it; the parameters stay stacked in the train state, so no step copies them.
    """
    modules = [make() for _ in range(depth)]
    graphdef, state = nnx.split(modules[0])
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                           state, *[nnx.split(module)[1] for module in modules[1:]])
    stacked = nnx.spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: LAYERS})
    return nnx.merge(graphdef, stacked)


def depth(stacked: nnx.Module) -> int:
    """The number of layers of a `stack`."""
    return int(jax.tree.leaves(nnx.state(stacked))[0].shape[0])


def scan(stacked: nnx.Module, carry: Any,
         step: Callable[[nnx.Module, Any, jax.Array, Any], tuple[Any, Any]], remat_policy: str,
         per_layer: Any = None, unroll: bool = False) -> tuple[Any, Any]:
    """`carry, out = step(layer, carry, index, per_layer[index])` through a `stack`'s layers.

    One `lax.scan` whatever the remat policy (so the program holds one layer's code); with a
    policy other than "none" the step is checkpointed and the backward pass recomputes one layer
    at a time. (Per-layer `jax.checkpoint` in an unrolled loop saved no memory on XLA:CPU: its
    scheduler hoisted every recomputation.) Returns the final carry and the outputs stacked on a
    leading layer axis; `step` must not mutate the layer. `unroll` (a model config's
    `unroll_layers`) unrolls the loop so XLA's cost analysis, which counts a loop body once, sees
    every layer: for counting FLOPs, not for running.
    """
    policy = check_remat_policy(remat_policy)
    graphdef, state = nnx.split(stacked)
    count = depth(stacked)

    def body(carry, inputs):
        layer_state, index, layer_inputs = inputs
        return step(nnx.merge(graphdef, layer_state), carry, index, layer_inputs)

    if policy != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=False)
    return jax.lax.scan(body, carry, (state, jnp.arange(count, dtype=jnp.int32), per_layer),
                        unroll=count if unroll else 1)
