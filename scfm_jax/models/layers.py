"""Building blocks shared by both models: logical sharding constraints, reference LayerNorm and
the rematerialised layer stack.

Parameters carry logical axis names (`nnx.with_partitioning(init, ("embed", "mlp"))`); the one
rules table in the experiment config maps them onto mesh axes (see `scfm_jax.train.partitioning`).
Activations are pinned at block boundaries with `constrain`, which is a no-op unless rules are
active (`nnx.logical_axis_rules(...)`) and a mesh is set, so the same model code runs unsharded in
tests and analysis.
"""
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec

# Logical names used by the models. Every name must appear in a config's rules table.
BATCH, LENGTH, EMBED, MLP, HEADS, HEAD_DIM, GENES, VOCAB = (
    "batch", "length", "embed", "mlp", "heads", "head_dim", "genes", "vocab")

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
}

LAYER_NORM_EPSILON = 1e-5  # PyTorch's default, used by both original models (Flax's is 1e-6)


def logical_to_spec(names: Sequence[str | None]) -> PartitionSpec:
    """The mesh PartitionSpec for logical axis names under the active rules.

    A mesh axis is used by the first dimension that claims it: activations are
    ("batch", ..., "embed") and, under FSDP, both batch and the parameters' embed dimension map to
    `fsdp`; the activation keeps it on the batch.
    """
    rules = core_spmd.get_logical_axis_rules()
    used, spec = set(), []
    for target in core_spmd.from_sharding_rules(tuple(names), rules):
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(axis for axis in axes if axis not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; identity without rules or mesh."""
    if not core_spmd.get_logical_axis_rules():
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def layer_norm(width: int, *, rngs: nnx.Rngs, use_bias: bool = True, dtype=None,
               param_dtype=jax.numpy.float32) -> nnx.LayerNorm:
    """LayerNorm as in PyTorch: eps 1e-5, exact two-pass variance, scale/bias sharded on `embed`."""
    return nnx.LayerNorm(
        width, epsilon=LAYER_NORM_EPSILON, use_fast_variance=False, use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (EMBED,)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (EMBED,)),
        rngs=rngs)


def check_remat_policy(policy: str) -> str:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat_policy must be one of {tuple(REMAT_POLICIES)}, "
                         f"got {policy!r}")
    return policy


def apply_layers(layer_list: Sequence[nnx.Module], carry: Any,
                 step: Callable[[nnx.Module, Any, jax.Array], tuple[Any, Any]],
                 remat_policy: str) -> tuple[Any, list]:
    """`carry, out = step(layer, carry, index)` through the layers in order; (carry, [out, ...]).

    With remat policy "none" this is a Python loop. Otherwise the layers' variables are stacked
    and the layers run as one `lax.scan` of a checkpointed step, so the backward pass recomputes
    one layer at a time. (Per-layer `jax.checkpoint` in an unrolled loop saved no memory on
    XLA:CPU: its scheduler hoisted every recomputation, 21.5 GB of temporaries for one 100M cell
    under both "full" and "none".) The layers keep their own parameters, so checkpoints and
    weight import are the same either way; `step` must not mutate the layer.
    """
    policy = check_remat_policy(remat_policy)
    if policy == "none" or len(layer_list) <= 1:
        outputs = []
        for index, layer in enumerate(layer_list):
            carry, output = step(layer, carry, jnp.asarray(index, jnp.int32))
            outputs.append(output)
        return carry, outputs
    graphdef, *_ = nnx.split(layer_list[0])
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                           *[nnx.split(layer)[1] for layer in layer_list])

    def body(carry, inputs):
        state, index = inputs
        return step(nnx.merge(graphdef, state), carry, index)

    body = jax.checkpoint(body, policy=REMAT_POLICIES[policy], prevent_cse=False)
    carry, stacked_outputs = jax.lax.scan(
        body, carry, (stacked, jnp.arange(len(layer_list), dtype=jnp.int32)))
    return carry, [jax.tree.map(lambda leaf, i=i: leaf[i], stacked_outputs)
                   for i in range(len(layer_list))]
