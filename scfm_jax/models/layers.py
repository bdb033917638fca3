"""Building blocks shared by both models: logical sharding constraints and reference LayerNorm.

Parameters carry logical axis names (`nnx.with_partitioning(init, ("embed", "mlp"))`); the one
rules table in the experiment config maps them onto mesh axes (see `scfm_jax.train.partitioning`).
Activations are pinned at block boundaries with `constrain`, which is a no-op unless rules are
active (`nnx.logical_axis_rules(...)`) and a mesh is set, so the same model code runs unsharded in
tests and analysis.
"""
from collections.abc import Sequence

import jax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec

# Logical names used by the models. Every name must appear in a config's rules table.
BATCH, LENGTH, EMBED, MLP, HEADS, HEAD_DIM, GENES, VOCAB = (
    "batch", "length", "embed", "mlp", "heads", "head_dim", "genes", "vocab")

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
