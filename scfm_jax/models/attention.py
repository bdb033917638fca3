"""Exact softmax attention for both models, with a choice of implementation.

`dot_product_attention(q, k, v, key_lengths=..., is_causal=..., implementation=...)` computes
softmax(q k^T / sqrt(d)) v over [B, L, H, d] inputs, attending only the first `key_lengths[b]`
keys of row b (every query row attends, pads included, as the hand-written masked softmax of
scFoundation's encoder did) and, with `is_causal`, only keys at or before the query (scMulan).

Implementations (`model.attention_impl`):
  "xla"        `jax.nn.dot_product_attention` (XLA ops; memory quadratic in L)
  "cudnn"      the same call with cuDNN flash attention (NVIDIA GPUs, float16/bfloat16)
  "pallas"     the Pallas flash-attention kernels that ship with JAX: TPU (Mosaic) on TPU, Triton on
               GPU; on CPU the TPU kernel runs in Pallas interpret mode (slow: for checking only)
  "blockwise"  an online-softmax over query and key blocks under `lax.map`/`lax.scan` with a
               flash-attention custom VJP: memory linear in L in the forward and the backward pass
  "auto"       by platform: blockwise on CPU, pallas on TPU, cudnn on GPU for 16-bit inputs
               (blockwise otherwise); blockwise whenever attention dropout is on.

Rows whose every key is masked average all L values (a finite mask value), as the reference did.
"""
import contextlib
import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from scfm_jax.errors import UsageError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas", "blockwise")
MASK_VALUE = -1e30  # finite, so a row without keys averages instead of NaN
DEFAULT_BLOCK_SIZE = 512
# On a CPU the blockwise path's [cells, heads, block, block] logits tile is written, read for the
# max, exponentiated and read by the value product: it must stay in the core's cache, or every
# block pair streams through memory (at block 512 a cell's tile is 12.6 MB for 12 heads, and a
# batch of 32 multiplies it by 32). So on a CPU the blocks are smaller and the cells of a batch
# pass a few at a time: bench_embed's per-cell time then no longer grows with the batch.
CPU_BLOCK_SIZE = 128
CPU_TILE_BYTES = 2 << 20


def target_platform() -> str:
    """The platform the code is traced for: that of the mesh set by `jax.set_mesh` (the train
    loop, `scfm-jax plan` over a TPU topology from a CPU host), else JAX's default backend. So a
    deviceless TPU plan compiles the kernels a TPU would run, not the host's."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


# The logical axes of the [B, L, H, d] activations attention reads and writes.
ACTIVATION_AXES = ("batch", "length", "heads", "head_dim")


def per_device(fn: Callable, arrays: Sequence[jax.Array],
               axes: Sequence[Sequence[str | None] | None]) -> jax.Array:
    """`fn(*arrays)` on each device's shard of the arrays (`jax.shard_map`), split as their logical
    `axes` say under the current rules (None: replicated); the output is split as the first array.

    A Pallas kernel is a custom call that XLA cannot partition ("Mosaic kernels cannot be
    automatically partitioned"), so on a mesh of more than one device the kernels run per shard:
    attention is independent per cell and per head, and a dimension the mesh does not divide stays
    whole. Without rules or a multi-device mesh this is `fn(*arrays)`.
    """
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh is None or mesh.empty or mesh.size == 1:
        return fn(*arrays)

    def spec(array, names):
        if names is None:
            return PartitionSpec()
        entries = []
        for size, entry in zip(array.shape, nn.logical_to_mesh_axes(tuple(names), rules)):
            mesh_axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
            split = math.prod(mesh.shape[a] for a in mesh_axes)
            entries.append(entry if mesh_axes and size % split == 0 else None)
        return PartitionSpec(*entries)

    specs = tuple(spec(a, n) for a, n in zip(arrays, axes))
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0],
                         check_vma=False)(*arrays)


def check_implementation(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise UsageError(f"model.attention_impl must be one of {IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    return implementation


def resolve_implementation(implementation: str, dtype, *, dropout: bool = False,
                           platform: str | None = None) -> str:
    """The implementation "auto" stands for on `platform` (default: `target_platform()`)."""
    check_implementation(implementation)
    if implementation != "auto":
        return implementation
    platform = platform or target_platform()
    if dropout or platform == "cpu":
        return "blockwise"
    if platform == "tpu":
        return "pallas"
    if platform in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16):
        return "cudnn"
    return "blockwise"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          key_lengths: jax.Array | None = None, is_causal: bool = False,
                          implementation: str = "auto", dropout_rate: float = 0.0,
                          dropout_key: jax.Array | None = None,
                          block_size: int | None = None) -> jax.Array:
    """Softmax attention over [B, L, H, d] q and [B, S, H, d] k, v; returns [B, L, H, d].

    `key_lengths` [B]: row b attends its first key_lengths[b] keys. Dropout (rate > 0 with a key)
    hits the attention weights, as torch's MultiheadAttention; only "xla" and "blockwise" have it.
    `block_size`: query/key block of the blockwise path (its memory is ~B*H*block^2 floats;
    default DEFAULT_BLOCK_SIZE, or CPU_BLOCK_SIZE on a CPU, where the cells also pass a few at a
    time so each block pair's tile stays under CPU_TILE_BYTES).
    """
    dropout = dropout_key is not None and dropout_rate > 0
    impl = resolve_implementation(implementation, q.dtype, dropout=dropout)
    if dropout and impl not in ("xla", "blockwise"):
        raise ValueError(f"attention dropout is implemented by 'xla' and 'blockwise', not {impl!r}")
    if key_lengths is not None:
        key_lengths = jnp.asarray(key_lengths, jnp.int32)
    if impl == "xla":
        if dropout:
            return _dense_attention(q, k, v, key_lengths, is_causal, dropout_rate, dropout_key)
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                            key_value_seq_lengths=key_lengths, implementation="xla")
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                            key_value_seq_lengths=key_lengths,
                                            implementation="cudnn")
    if impl == "pallas":
        if key_lengths is None:   # every key: the lengths the kernel would assume
            key_lengths = jnp.full((q.shape[0],), k.shape[1], jnp.int32)
        return per_device(lambda q, k, v, n: _pallas_attention(q, k, v, n, is_causal),
                          (q, k, v, key_lengths), (ACTIVATION_AXES,) * 3 + (("batch",),))
    cpu = target_platform() == "cpu"
    if block_size is None:
        block_size = CPU_BLOCK_SIZE if cpu else DEFAULT_BLOCK_SIZE
    if block_size <= 0:
        raise ValueError(f"attention block_size must be positive, got {block_size}")
    if key_lengths is None:
        key_lengths = jnp.full((q.shape[0],), k.shape[1], jnp.int32)
    if not dropout:
        dropout_rate, dropout_key = 0.0, jax.random.key(0)
    block_q, block_k = min(block_size, q.shape[1]), min(block_size, k.shape[1])
    def attend(q, k, v, key_lengths, dropout_key):
        return _blockwise(q, k, v, key_lengths, dropout_key, is_causal, float(dropout_rate),
                          block_q, block_k)

    batch = q.shape[0]
    cells = _cells_per_pass(batch, q.shape[2] * block_q * block_k * 4) if cpu else batch
    if cells == batch:
        return attend(q, k, v, key_lengths, dropout_key)
    passes = batch // cells
    split = lambda x: x.reshape(passes, cells, *x.shape[1:])
    keys = jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(jnp.arange(passes))
    out = jax.lax.map(lambda a: attend(*a), (split(q), split(k), split(v), split(key_lengths), keys))
    return out.reshape(q.shape)


def _cells_per_pass(batch: int, tile_bytes_per_cell: int) -> int:
    """The largest divisor of `batch` whose block-pair tile fits CPU_TILE_BYTES (at least 1)."""
    most = max(1, CPU_TILE_BYTES // tile_bytes_per_cell)
    return max(c for c in range(1, min(batch, most) + 1) if batch % c == 0)


def _dense_attention(q, k, v, key_lengths, is_causal, dropout_rate, dropout_key):
    """The [B, H, L, S] reference with dropout on the weights, normalised after the value product."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k,
                        preferred_element_type=jnp.float32)
    logits = jnp.where(_valid(jnp.arange(q.shape[1]), jnp.arange(k.shape[1]), key_lengths,
                              is_causal), logits, MASK_VALUE)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    total = jnp.sum(weights, axis=-1)
    weights = _drop(weights, dropout_rate, dropout_key)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return (out / jnp.transpose(total, (0, 2, 1))[..., None]).astype(v.dtype)


def _valid(q_pos, k_pos, key_lengths, is_causal):
    """[B or 1, 1, bq, bk] mask of the keys each query may attend."""
    valid = jnp.ones((1, 1, q_pos.shape[0], k_pos.shape[0]), jnp.bool_)
    if key_lengths is not None:
        valid = valid & (k_pos[None, None, None, :] < key_lengths[:, None, None, None])
    if is_causal:
        valid = valid & (k_pos[None, None, None, :] <= q_pos[None, None, :, None])
    return valid


def _drop(weights, rate, key):
    if key is None or rate <= 0:
        return weights
    keep = jax.random.bernoulli(key, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0)


# ------------------------------------------------------------------------------------ pallas

def _pallas_attention(q, k, v, key_lengths, is_causal, *, variant=None, interpret=None):
    """The Pallas flash-attention kernel of the platform ("mosaic" on TPU and CPU, "triton" on GPU),
    inputs padded to its block multiple, keys masked past `key_lengths` [B]; interpret mode off
    TPU and GPU."""
    platform = target_platform()
    variant = variant or ("triton" if platform in ("gpu", "cuda", "rocm") else "mosaic")
    interpret = platform not in ("tpu", "gpu", "cuda", "rocm") if interpret is None else interpret
    batch, length, _, head_dim = q.shape
    kv_length = k.shape[1]
    block = 128
    pad_q, pad_k = -length % block, -kv_length % block
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n), (0, 0), (0, 0)])
    kv_segment = (jnp.arange(kv_length + pad_k)[None] < key_lengths[:, None]).astype(jnp.int32)
    scale = head_dim ** -0.5
    if variant == "triton":
        from jax.experimental.pallas.ops.gpu import attention as gpu_attention
        if length != kv_length:
            raise ValueError("the Triton attention kernel needs queries and keys of one length")
        # The Triton kernel takes one segment array for queries and keys: pad queries attend
        # the pad keys here (their outputs differ from the other paths; the models never read them).
        out = gpu_attention.mha(pad(q, pad_q), pad(k, pad_k), pad(v, pad_k), kv_segment,
                                sm_scale=scale, causal=is_causal, interpret=interpret)
        return out[:, :length]
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_attention
    to_heads = lambda x, n: jnp.transpose(pad(x, n), (0, 2, 1, 3))
    segments = tpu_attention.SegmentIds(q=jnp.ones((batch, length + pad_q), jnp.int32),
                                        kv=kv_segment)
    sizes = tpu_attention.BlockSizes(
        block_q=block, block_k_major=block, block_k=block, block_b=1,
        block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
        block_k_major_dq=block, block_k_dq=block, block_q_dq=block)
    def call(q, k, v, segments):
        return tpu_attention.flash_attention(q, k, v, segment_ids=segments, causal=is_causal,
                                             sm_scale=scale, block_sizes=sizes)

    args = (to_heads(q, pad_q), to_heads(k, pad_k), to_heads(v, pad_k), segments)
    half = jnp.dtype(q.dtype).itemsize == 2
    if not (interpret or half):
        out = call(*args)
    else:
        out = _within(functools.partial(_kernel_context, interpret, half), call)(*args)
    return jnp.transpose(out, (0, 2, 1, 3))[:, :length]


def _kernel_context(interpret: bool, half: bool) -> contextlib.ExitStack:
    """TPU interpret mode (off TPU), and for 16-bit inputs the default matmul precision: the
    kernel's dots take the config's precision, and Mosaic refuses bf16 operands at "highest"."""
    from jax.experimental.pallas import tpu as pltpu

    stack = contextlib.ExitStack()
    if interpret:
        stack.enter_context(pltpu.force_tpu_interpret_mode())
    if half:
        stack.enter_context(jax.default_matmul_precision("default"))
    return stack


def _within(context, fn):
    """`fn(q, k, v, segments)` with its kernels, the backward ones included, traced in `context()`.

    The kernel's backward is traced when the gradient is taken, outside any `with` around the
    forward call, so the VJP re-enters the context itself."""
    @jax.custom_vjp
    def wrapped(q, k, v, segments):
        with context():
            return fn(q, k, v, segments)

    def forward(q, k, v, segments):
        with context():
            out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, segments), q, k, v)
        return out, pullback

    def backward(pullback, d_out):
        with context():
            return (*pullback(d_out), None)

    wrapped.defvjp(forward, backward)
    return wrapped


# --------------------------------------------------------------------------------- blockwise

def _blocks(x, block):
    """[B, L, ...] -> [L / block, B, block, ...], zero-padded at the end of L."""
    pad = -x.shape[1] % block
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def _unblocks(x, length):
    """Inverse of `_blocks`: [n, B, block, ...] -> [B, length, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


class _Tiling:
    """Positions and masks of one (query block, key block) pair."""

    def __init__(self, q_index, k_index, block_q, block_k, kv_length, key_lengths, is_causal):
        self.q_pos = q_index * block_q + jnp.arange(block_q)
        self.k_pos = k_index * block_k + jnp.arange(block_k)
        self.in_range = (self.k_pos < kv_length)[None, None, None, :]
        self.valid = _valid(self.q_pos, self.k_pos, key_lengths, is_causal)
        # a causal key block entirely after the query block contributes nothing
        self.skip = (k_index * block_k > q_index * block_q + block_q - 1) if is_causal else False

    def logits(self, q_block, k_block):
        s = jnp.einsum("bqhd,bkhd->bhqk", q_block, k_block, preferred_element_type=jnp.float32)
        return jnp.where(self.valid, s, MASK_VALUE)


def _keep_mask(dropout_key, q_index, k_index, num_k_blocks, rate, shape):
    """1/(1-rate) where a weight is kept, 0 where dropped; one fold of the key per block pair."""
    key = jax.random.fold_in(dropout_key, q_index * num_k_blocks + k_index)
    return jnp.where(jax.random.bernoulli(key, 1.0 - rate, shape), 1.0 / (1.0 - rate), 0.0)


def _skip_or(skip, compute, carry):
    if skip is False:
        return compute(carry)
    return jax.lax.cond(skip, lambda c: c, compute, carry)


def _forward(q, k, v, key_lengths, dropout_key, is_causal, rate, block_q, block_k):
    """Online softmax: (out [B, L, H, d], (row max, row sum) [B, H, L] each, float32).

    The max and the sum are kept apart: for a row without keys the max is MASK_VALUE, which would
    absorb log(sum) in a logsumexp."""
    batch, length, heads, head_dim = q.shape
    kv_length = k.shape[1]
    qs = _blocks(q * jnp.asarray(head_dim ** -0.5, q.dtype), block_q)
    ks, vs = _blocks(k, block_k), _blocks(v, block_k)
    num_k = ks.shape[0]

    def query_block(inputs):
        i, q_block = inputs

        def key_block(carry, inputs):
            j, k_block, v_block = inputs
            tiling = _Tiling(i, j, block_q, block_k, kv_length, key_lengths, is_causal)

            def compute(carry):
                running_max, total, acc = carry
                s = tiling.logits(q_block, k_block)
                new_max = jnp.maximum(running_max,
                                      jnp.max(jnp.where(tiling.in_range, s, -jnp.inf), axis=-1))
                p = jnp.where(tiling.in_range, jnp.exp(s - new_max[..., None]), 0.0)
                rescale = jnp.exp(running_max - new_max)
                total = total * rescale + jnp.sum(p, axis=-1)
                if rate > 0:
                    p = p * _keep_mask(dropout_key, i, j, num_k, rate, p.shape)
                acc = acc * jnp.transpose(rescale, (0, 2, 1))[..., None] + jnp.einsum(
                    "bhqk,bkhd->bqhd", p.astype(v.dtype), v_block,
                    preferred_element_type=jnp.float32)
                return new_max, total, acc

            return _skip_or(tiling.skip, compute, carry), None

        initial = (jnp.full((batch, heads, block_q), -jnp.inf, jnp.float32),
                   jnp.zeros((batch, heads, block_q), jnp.float32),
                   jnp.zeros((batch, block_q, heads, head_dim), jnp.float32))
        (running_max, total, acc), _ = jax.lax.scan(key_block, initial,
                                                    (jnp.arange(num_k), ks, vs))
        out = acc / jnp.transpose(total, (0, 2, 1))[..., None]
        return out.astype(v.dtype), jnp.stack([running_max, total], axis=-1)

    # A while loop, not a scan: an enclosing remat policy that saves matmul outputs ("dots")
    # would keep a scan's per-block products for the backward pass (L x S floats); a while loop
    # is recomputed whole, and the custom VJP needs none of its insides.
    def store(i, outputs):
        out, stats = query_block((i, qs[i]))
        return outputs[0].at[i].set(out), outputs[1].at[i].set(stats)

    num_q = qs.shape[0]
    outputs = (jnp.zeros(qs.shape, v.dtype), jnp.zeros((num_q, batch, heads, block_q, 2),
                                                       jnp.float32))
    out, stats = jax.lax.while_loop(lambda c: c[0] < num_q,
                                    lambda c: (c[0] + 1, *store(c[0], c[1:])),
                                    (jnp.asarray(0, jnp.int32), *outputs))[1:]
    return _unblocks(out, length), _unblocks(jnp.moveaxis(stats, 3, 2), length)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _blockwise(q, k, v, key_lengths, dropout_key, is_causal, rate, block_q, block_k):
    return _forward(q, k, v, key_lengths, dropout_key, is_causal, rate, block_q, block_k)[0]


def _blockwise_fwd(q, k, v, key_lengths, dropout_key, is_causal, rate, block_q, block_k):
    out, stats = _forward(q, k, v, key_lengths, dropout_key, is_causal, rate, block_q, block_k)
    return out, (q, k, v, key_lengths, dropout_key, out, stats)


def _blockwise_bwd(is_causal, rate, block_q, block_k, residuals, d_out):
    """Flash-attention backward: the weights of each block pair are recomputed from the saved row
    max and sum, so nothing of size L x S is kept."""
    q, k, v, key_lengths, dropout_key, out, stats = residuals
    length, head_dim = q.shape[1], q.shape[3]
    kv_length = k.shape[1]
    scale = head_dim ** -0.5
    # D_i = sum_d dO_i O_i = sum_j P_ij dP_ij, the softmax Jacobian's row term
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, L, H]
    qs = _blocks(q * jnp.asarray(scale, q.dtype), block_q)
    dos, deltas = _blocks(d_out, block_q), _blocks(delta, block_q)
    # max and 1 / sum per row; rows padded onto the last block get 1 / sum = 0, so p = 0 there
    statss = _blocks(jnp.stack([stats[..., 0], 1.0 / stats[..., 1]], axis=-1), block_q)
    ks, vs = _blocks(k, block_k), _blocks(v, block_k)
    num_q, num_k = qs.shape[0], ks.shape[0]

    def key_block(dq_all, inputs):
        j, k_block, v_block = inputs

        def query_block(carry, inputs):
            i, q_block, do_block, stats_block, delta_block, dq_block = inputs
            tiling = _Tiling(i, j, block_q, block_k, kv_length, key_lengths, is_causal)

            def compute(state):
                (dk, dv), dq_block = state
                s = tiling.logits(q_block, k_block)
                row_max, inverse_sum = (jnp.transpose(stats_block[..., n], (0, 2, 1))[..., None]
                                        for n in range(2))
                p = jnp.where(tiling.in_range, jnp.exp(s - row_max) * inverse_sum, 0.0)
                dp = jnp.einsum("bqhd,bkhd->bhqk", do_block, v_block,
                                preferred_element_type=jnp.float32)
                if rate > 0:
                    keep = _keep_mask(dropout_key, i, j, num_k, rate, p.shape)
                    dropped, dp = p * keep, dp * keep
                else:
                    dropped = p
                dv = dv + jnp.einsum("bhqk,bqhd->bkhd", dropped.astype(do_block.dtype), do_block,
                                     preferred_element_type=jnp.float32)
                ds = p * (dp - jnp.transpose(delta_block, (0, 2, 1))[..., None])
                ds = jnp.where(tiling.valid & tiling.in_range, ds, 0.0)
                dq_block = dq_block + scale * jnp.einsum(
                    "bhqk,bkhd->bqhd", ds.astype(k_block.dtype), k_block,
                    preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("bhqk,bqhd->bkhd", ds.astype(q_block.dtype), q_block,
                                     preferred_element_type=jnp.float32)
                return (dk, dv), dq_block

            carry, dq_block = _skip_or(tiling.skip, compute, (carry, dq_block))
            return carry, dq_block

        zeros = jnp.zeros(k_block.shape, jnp.float32)
        (dk, dv), dq_all = jax.lax.scan(query_block, (zeros, zeros),
                                        (jnp.arange(num_q), qs, dos, statss, deltas, dq_all))
        return dq_all, (dk, dv)

    dq_all = jnp.zeros(qs.shape, jnp.float32)
    dq_all, (dks, dvs) = jax.lax.scan(key_block, dq_all, (jnp.arange(num_k), ks, vs))
    return (_unblocks(dq_all, length).astype(q.dtype), _unblocks(dks, kv_length).astype(k.dtype),
            _unblocks(dvs, kv_length).astype(v.dtype), None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
