"""FAVOR+ attention of the performer decoder as two fused Pallas kernels (TPU Mosaic / GPU Triton).

The math is `scfm_jax.models.performer.favor_attention` (the XLA reference and the CPU path):

  key pass    per (cell, head): the feature map of each key chunk, its stabiliser (an online max of
              the chunk's feature logits), and the float32 K^T V and key-sum accumulation, rescaled
              whenever the max grows; one kernel, the keys read once.
  combine     (XLA, [B, H, m] sized) per-head states rescaled to the cell's (`"cell"`) or the
              batch's (`"batch"`) max over heads, then the +1e-4 terms of performer_pytorch.
  query pass  the query feature map, the numerator phi(q) C and the normaliser phi(q) n and their
              quotient, fused per query chunk.

Variants: "mosaic" walks the key chunks as the innermost ("arbitrary") grid axis with the state in
the resident output blocks, as TPU reductions are written; "triton" runs one program per (cell,
head) that loops over the chunks (Triton grids have no sequential axis). Feature and (Triton) head
dimensions are zero-padded to the hardware's tile sizes and masked. On CPU the kernels run in
Pallas interpret mode, which is how they are tested.

Gradients: a custom VJP whose backward pass is the reference's (checkpointed chunk scan, memory
linear in L), so the kernels change the forward pass only.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from scfm_jax.models import performer
from scfm_jax.models.attention import target_platform

VARIANTS = ("mosaic", "triton")
_HIGHEST = jax.lax.Precision.HIGHEST
_LANES = 128  # TPU lane width: the minor dimension of every Mosaic block is a multiple of it


def default_variant() -> str:
    return "triton" if target_platform() in ("gpu", "cuda", "rocm") else "mosaic"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _dot(a, b, contract=((1,), (1,))):
    """a . b accumulated in float32: float32 operands at full precision, 16-bit ones (bfloat16
    values) on the matrix unit's native path (Mosaic has no fp32 contraction of bf16 operands)."""
    full = a.dtype == jnp.float32 and b.dtype == jnp.float32
    precision = _HIGHEST if full else jax.lax.Precision.DEFAULT   # explicit: not the config's
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _feature_logits(x, projection, head_dim):
    """u = (c x) P^T [C, m] and |c x|^2 / 2 [C, 1] for a chunk x [C, d] (c = d^-1/4), float32."""
    x = x.astype(jnp.float32)
    normalizer = head_dim ** -0.25
    logits = _dot(normalizer * x, projection.astype(jnp.float32))
    half_norm = 0.5 * normalizer ** 2 * jnp.sum(x * x, axis=-1, keepdims=True)
    return logits, half_norm


def _key_chunk(k, v, projection, start, state, *, length, num_features, head_dim):
    """One key chunk into (kv [m, d], key sum [1, m], running max [1, lanes])."""
    kv, k_sum, running_max = state
    logits, half_norm = _feature_logits(k, projection, head_dim)
    rows = start + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    logits = jnp.where((rows < length) & (cols < num_features), logits, -jnp.inf)
    chunk_max = jnp.max(jnp.max(logits, axis=1, keepdims=True), axis=0, keepdims=True)  # [1, 1]
    new_max = jnp.maximum(running_max, chunk_max)
    # every lane holds the max; a lane reduction, not a slice, takes it (Triton lowers no slices)
    new_scalar = jnp.max(new_max, axis=1, keepdims=True)
    rescale = jnp.exp(jnp.max(running_max, axis=1, keepdims=True) - new_scalar)
    features = jnp.exp(logits - half_norm - new_scalar)
    kv = kv * rescale + _dot(features.astype(v.dtype), v, ((0,), (0,)))
    k_sum = k_sum * rescale + jnp.sum(features, axis=0, keepdims=True)
    return kv, k_sum, new_max


def _query_chunk(q, projection, context, normalizer, *, num_features, head_dim, ratio):
    logits, half_norm = _feature_logits(q, projection, head_dim)
    cols = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    real = cols < num_features
    row_max = jnp.max(jnp.where(real, logits, -jnp.inf), axis=1, keepdims=True)
    features = jnp.where(real, ratio * (jnp.exp(logits - half_norm - row_max)
                                        + performer.FEATURE_EPSILON), 0.0)
    numerator = _dot(features, context, ((1,), (0,)))
    denominator = jnp.sum(features * normalizer, axis=1, keepdims=True)
    return numerator / denominator


def _key_pass(k, v, projection, *, chunk, length, num_features, head_dim, variant, interpret):
    """[B, H, Lp, dp] keys/values -> kv [B, H, mp, dp], key sum [B, H, 1, mp], max [B, H, 1, lanes]."""
    batch, heads, padded_length, dp = k.shape
    mp = projection.shape[0]
    num_chunks = padded_length // chunk
    body = functools.partial(_key_chunk, length=length, num_features=num_features,
                             head_dim=head_dim)
    out_shape = (jax.ShapeDtypeStruct((batch, heads, mp, dp), jnp.float32),
                 jax.ShapeDtypeStruct((batch, heads, 1, mp), jnp.float32),
                 jax.ShapeDtypeStruct((batch, heads, 1, _LANES), jnp.float32))
    if variant == "mosaic":
        def kernel(k_ref, v_ref, p_ref, kv_ref, sum_ref, max_ref):
            c = pl.program_id(2)

            @pl.when(c == 0)
            def _():
                kv_ref[...] = jnp.zeros_like(kv_ref)
                sum_ref[...] = jnp.zeros_like(sum_ref)
                max_ref[...] = jnp.full_like(max_ref, -jnp.inf)

            state = body(k_ref[...], v_ref[...], p_ref[...], c * chunk,
                         (kv_ref[...], sum_ref[...], max_ref[...]))
            kv_ref[...], sum_ref[...], max_ref[...] = state

        from jax.experimental.pallas import tpu as pltpu
        chunk_spec = pl.BlockSpec((None, None, chunk, dp), lambda b, h, c: (b, h, c, 0))
        state_spec = lambda *shape: pl.BlockSpec((None, None) + shape, lambda b, h, c: (b, h, 0, 0))
        return pl.pallas_call(
            kernel, grid=(batch, heads, num_chunks), out_shape=out_shape,
            in_specs=[chunk_spec, chunk_spec, pl.BlockSpec((mp, dp), lambda b, h, c: (0, 0))],
            out_specs=(state_spec(mp, dp), state_spec(1, mp), state_spec(1, _LANES)),
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret, name="favor_key_pass")(k, v, projection)

    def kernel(k_ref, v_ref, p_ref, kv_ref, sum_ref, max_ref):
        projection = p_ref[...]

        def step(c, state):
            rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
            return body(k_ref[rows, :], v_ref[rows, :], projection, c * chunk, state)

        initial = (jnp.zeros((mp, dp), jnp.float32), jnp.zeros((1, mp), jnp.float32),
                   jnp.full((1, _LANES), -jnp.inf, jnp.float32))
        kv_ref[...], sum_ref[...], max_ref[...] = jax.lax.fori_loop(0, num_chunks, step, initial)

    from jax.experimental.pallas import triton as pltriton
    whole = pl.BlockSpec((None, None, padded_length, dp), lambda b, h: (b, h, 0, 0))
    state_spec = lambda *shape: pl.BlockSpec((None, None) + shape, lambda b, h: (b, h, 0, 0))
    return pl.pallas_call(
        kernel, grid=(batch, heads), out_shape=out_shape,
        in_specs=[whole, whole, pl.BlockSpec((mp, dp), lambda b, h: (0, 0))],
        out_specs=(state_spec(mp, dp), state_spec(1, mp), state_spec(1, _LANES)),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="favor_key_pass")(k, v, projection)


def _query_pass(q, projection, context, normalizer, *, chunk, num_features, head_dim, ratio,
                out_dtype, variant, interpret):
    batch, heads, padded_length, dp = q.shape
    mp = projection.shape[0]
    body = functools.partial(_query_chunk, num_features=num_features, head_dim=head_dim,
                             ratio=ratio)

    def kernel(q_ref, p_ref, context_ref, normalizer_ref, out_ref):
        out_ref[...] = body(q_ref[...], p_ref[...], context_ref[...],
                            normalizer_ref[...]).astype(out_ref.dtype)

    chunk_spec = pl.BlockSpec((None, None, chunk, dp), lambda b, h, c: (b, h, c, 0))
    if variant == "mosaic":
        from jax.experimental.pallas import tpu as pltpu
        params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
    else:
        from jax.experimental.pallas import triton as pltriton
        params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(
        kernel, grid=(batch, heads, padded_length // chunk),
        out_shape=jax.ShapeDtypeStruct(q.shape, out_dtype),
        in_specs=[chunk_spec, pl.BlockSpec((mp, dp), lambda b, h, c: (0, 0)),
                  pl.BlockSpec((None, None, mp, dp), lambda b, h, c: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, 1, mp), lambda b, h, c: (b, h, 0, 0))],
        out_specs=chunk_spec, compiler_params=params, interpret=interpret,
        name="favor_query_pass")(q, projection, context, normalizer)


def _forward(query, key, value, projection, stabilizer_scope, chunk_size, variant, interpret):
    batch, length, heads, head_dim = query.shape
    num_features = projection.shape[0]
    if variant == "mosaic":
        chunk = min(_round_up(chunk_size, 8), _round_up(length, 8))
        mp, dp = _round_up(num_features, _LANES), head_dim
    else:  # Triton tiles are powers of two
        chunk = min(pl.next_power_of_2(chunk_size), pl.next_power_of_2(length))
        mp, dp = pl.next_power_of_2(num_features), pl.next_power_of_2(head_dim)
    padded_length = _round_up(length, chunk)

    def heads_major(x):  # [B, L, H, d] -> [B, H, Lp, dp], zero-padded
        x = jnp.transpose(x, (0, 2, 1, 3))
        return jnp.pad(x, [(0, 0), (0, 0), (0, padded_length - length), (0, dp - head_dim)])

    padded_projection = jnp.pad(projection.astype(jnp.float32),
                                [(0, mp - num_features), (0, dp - head_dim)])
    kv, k_sum, head_max = _key_pass(
        heads_major(key), heads_major(value), padded_projection, chunk=chunk, length=length,
        num_features=num_features, head_dim=head_dim, variant=variant, interpret=interpret)
    head_max = head_max[..., 0, 0]  # [B, H]
    reference_max = jnp.max(head_max, axis=1, keepdims=True)
    if stabilizer_scope == "batch":
        reference_max = jnp.max(reference_max, keepdims=True)
    shift = jnp.exp(head_max - reference_max)[:, :, None, None]
    ratio = num_features ** -0.5
    real_features = (jnp.arange(mp) < num_features)[:, None]
    value_sum = jnp.pad(jnp.sum(value.astype(jnp.float32), axis=1), [(0, 0), (0, 0),
                                                                    (0, dp - head_dim)])
    context = jnp.where(real_features, ratio * (kv * shift + performer.FEATURE_EPSILON
                                                * value_sum[:, :, None, :]), 0.0)
    normalizer = jnp.where(real_features[:, 0], ratio * (k_sum * shift
                                                         + performer.FEATURE_EPSILON * length), 0.0)
    out = _query_pass(heads_major(query), padded_projection, context, normalizer, chunk=chunk,
                      num_features=num_features, head_dim=head_dim, ratio=ratio,
                      out_dtype=query.dtype, variant=variant, interpret=interpret)
    return jnp.transpose(out[:, :, :length, :head_dim], (0, 2, 1, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _favor(query, key, value, projection, stabilizer_scope, chunk_size, variant, interpret):
    return _forward(query, key, value, projection, stabilizer_scope, chunk_size, variant,
                    interpret)


def _favor_fwd(query, key, value, projection, stabilizer_scope, chunk_size, variant, interpret):
    out = _forward(query, key, value, projection, stabilizer_scope, chunk_size, variant, interpret)
    return out, (query, key, value, projection)


def _favor_bwd(stabilizer_scope, chunk_size, variant, interpret, residuals, d_out):
    reference = functools.partial(performer.favor_attention, stabilizer_scope=stabilizer_scope,
                                  chunk_size=chunk_size)
    return jax.vjp(reference, *residuals)[1](d_out)


_favor.defvjp(_favor_fwd, _favor_bwd)


def favor_attention(query: jax.Array, key: jax.Array, value: jax.Array, projection: jax.Array, *,
                    stabilizer_scope: str = "cell", chunk_size: int = 2048,
                    variant: str | None = None, interpret: bool | None = None) -> jax.Array:
    """`performer.favor_attention` through the Pallas kernels; [B, L, H, d] in and out.

    `variant`: "mosaic" (TPU) or "triton" (GPU), default by platform; `interpret`: run in Pallas
    interpret mode (default: on platforms other than TPU and GPU).
    """
    if stabilizer_scope not in performer.STABILIZER_SCOPES:
        raise ValueError(f"stabilizer_scope must be one of {performer.STABILIZER_SCOPES}, "
                         f"got {stabilizer_scope!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    variant = variant or default_variant()
    if variant not in VARIANTS:
        raise ValueError(f"FAVOR+ kernel variant must be one of {VARIANTS}, got {variant!r}")
    if interpret is None:
        interpret = target_platform() not in ("tpu", "gpu", "cuda", "rocm")
    return _favor(query, key, value, projection, stabilizer_scope, chunk_size, variant,
                  bool(interpret))
