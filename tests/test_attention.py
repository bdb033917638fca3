"""The attention implementations against today's reference functions: scFoundation's masked softmax
(`layers.masked_softmax_attention`) and scMulan's causal `jax.nn.dot_product_attention`;
values, gradients, dropout, the platform choice of "auto" and the blockwise path's memory."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scfm_jax.models import attention, layers

LENGTHS = (37, 11, 1, 0)  # a full row, partial rows, one key, and a row without keys


def _qkv(seed=0, batch=4, length=37, heads=3, head_dim=8):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (batch, length, heads, head_dim)
    return tuple(jax.random.normal(key, shape) for key in keys)


def _masked_reference(q, k, v, lengths, **kwargs):
    return layers.masked_softmax_attention(q, k, v, lengths, **kwargs)


def _causal_reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("impl, block_size", [("xla", 512), ("blockwise", 8), ("blockwise", 16),
                                              ("blockwise", 512), ("auto", 512)])
def test_key_padding_matches_masked_softmax(impl, block_size):
    q, k, v, _ = _qkv()
    lengths = jnp.array(LENGTHS)
    out = attention.dot_product_attention(q, k, v, key_lengths=lengths, implementation=impl,
                                          block_size=block_size)
    np.testing.assert_allclose(out, _masked_reference(q, k, v, lengths), atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_size", [8, 13, 37])
def test_causal_matches_dot_product_attention(block_size):
    q, k, v, _ = _qkv(1)
    out = attention.dot_product_attention(q, k, v, is_causal=True, implementation="blockwise",
                                          block_size=block_size)
    np.testing.assert_allclose(out, _causal_reference(q, k, v), atol=1e-5, rtol=0)


def _grads(fn, q, k, v, w):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)


def _blockwise_and_reference(causal):
    """(reference attention, blockwise attention with 8-wide blocks) on the test's lengths."""
    lengths = jnp.array(LENGTHS)
    if causal:
        reference, kwargs = _causal_reference, dict(is_causal=True)
    else:
        reference = functools.partial(_masked_reference, lengths=lengths)
        kwargs = dict(key_lengths=lengths)
    return reference, functools.partial(attention.dot_product_attention,
                                        implementation="blockwise", block_size=8, **kwargs)


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_gradients_match_reference(causal):
    q, k, v, w = _qkv(2)
    reference, blockwise = _blockwise_and_reference(causal)
    for got, want in zip(_grads(blockwise, q, k, v, w), _grads(reference, q, k, v, w)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_pallas_tpu_kernel_in_interpret_mode():
    q, k, v, _ = _qkv(3, batch=2, length=150, heads=2)
    lengths = jnp.array([150, 77])
    out = attention.dot_product_attention(q, k, v, key_lengths=lengths, implementation="pallas")
    np.testing.assert_allclose(out, _masked_reference(q, k, v, lengths), atol=1e-5, rtol=0)
    causal = attention.dot_product_attention(q, k, v, is_causal=True, implementation="pallas")
    np.testing.assert_allclose(causal, _causal_reference(q, k, v), atol=1e-5, rtol=0)


def test_pallas_triton_kernel_in_interpret_mode():
    q, k, v, _ = _qkv(4, batch=2, length=150, heads=2, head_dim=16)
    lengths = jnp.array([150, 77])
    out = attention._pallas_attention(q, k, v, lengths, False, variant="triton", interpret=True)
    reference = _masked_reference(q, k, v, lengths)
    # one segment array for queries and keys: only the real query rows are comparable
    for row, n in enumerate(lengths.tolist()):
        np.testing.assert_allclose(out[row, :n], reference[row, :n], atol=1e-5, rtol=0)


def test_xla_dropout_is_the_reference_dropout():
    q, k, v, _ = _qkv(5)
    lengths, key = jnp.array(LENGTHS), jax.random.key(7)
    out = attention.dot_product_attention(q, k, v, key_lengths=lengths, implementation="xla",
                                          dropout_rate=0.3, dropout_key=key)
    np.testing.assert_array_equal(out, _masked_reference(q, k, v, lengths, dropout_rate=0.3,
                                                         dropout_key=key))


def test_blockwise_dropout_gradient_and_expectation():
    q, k, v, w = _qkv(6, batch=2, length=20, heads=2)
    lengths = jnp.array([20, 9])
    key = jax.random.key(8)
    dropped = functools.partial(attention.dot_product_attention, key_lengths=lengths,
                                implementation="blockwise", block_size=8, dropout_rate=0.25)
    # the custom VJP replays the forward's dropout masks: it equals autodiff of the dense math
    # under the same per-block masks
    blocks = -(-20 // 8)
    keep = jnp.concatenate([jnp.concatenate(
        [attention._keep_mask(key, i, j, blocks, 0.25, (2, 2, 8, 8)) for j in range(blocks)],
        axis=-1) for i in range(blocks)], axis=-2)[..., :20, :20]

    def forward(q, k, v):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k)
        logits = jnp.where(jnp.arange(20)[None, None, None] < lengths[:, None, None, None],
                           logits, attention.MASK_VALUE)
        weights = jax.nn.softmax(logits, axis=-1) * keep
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    for got, want in zip(_grads(lambda *a: dropped(*a, dropout_key=key), q, k, v, w),
                         _grads(forward, q, k, v, w)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # inverted dropout is unbiased: the mean over many keys approaches the undropped output
    draws = jax.vmap(lambda key: dropped(q, k, v, dropout_key=key))(
        jax.random.split(jax.random.key(9), 400))
    exact = _masked_reference(q, k, v, lengths)
    assert not np.allclose(draws[0], exact, atol=1e-3)
    np.testing.assert_allclose(jnp.mean(draws, axis=0), exact, atol=0.06)


def test_auto_picks_by_platform_and_bad_names_fail():
    pick = attention.resolve_implementation
    assert pick("auto", jnp.float32, platform="cpu") == "blockwise"
    assert pick("auto", jnp.float32, platform="tpu") == "pallas"
    assert pick("auto", jnp.bfloat16, platform="gpu") == "cudnn"
    assert pick("auto", jnp.float32, platform="gpu") == "blockwise"  # cuDNN has no float32
    assert pick("auto", jnp.bfloat16, platform="tpu", dropout=True) == "blockwise"
    assert pick("xla", jnp.float32, platform="tpu") == "xla"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        pick("flash", jnp.float32)
    q, k, v, _ = _qkv()
    with pytest.raises(ValueError, match="dropout is implemented by"):
        attention.dot_product_attention(q, k, v, implementation="pallas", dropout_rate=0.1,
                                        dropout_key=jax.random.key(0))


def _temp_bytes(impl, length, remat_policy=None):
    q = jax.ShapeDtypeStruct((1, length, 1, 8), jnp.float32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)

    def attend(q, k, v, lengths):
        return attention.dot_product_attention(q, k, v, key_lengths=lengths, implementation=impl,
                                               block_size=256)

    if remat_policy is not None:  # as the models' layer scan under model.remat_policy
        attend = jax.checkpoint(attend, policy=layers.REMAT_POLICIES[remat_policy])

    def loss(q, k, v, lengths):
        return jnp.sum(attend(q, k, v, lengths))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(q, q, q, lengths).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_gradient_memory_is_linear_in_length():
    # the [L, L] float32 weights of one head are 4 L^2 bytes: 64 MiB at L = 4096
    length = 4096
    dense, blockwise = _temp_bytes("xla", length), _temp_bytes("blockwise", length)
    assert dense > 4 * length ** 2
    assert blockwise < 4 * length ** 2 / 16
    assert _temp_bytes("blockwise", 2 * length) < 2.5 * blockwise
    # a remat policy that saves matmul outputs must not keep the forward's block products
    for policy in ("dots", "full"):
        assert _temp_bytes("blockwise", length, policy) < 4 * length ** 2 / 16, policy


def test_pallas_tpu_kernel_gradients_in_interpret_mode():
    q, k, v, w = _qkv(10, batch=2, length=150, heads=2)
    lengths = jnp.array([150, 77])
    pallas = functools.partial(attention.dot_product_attention, key_lengths=lengths,
                               implementation="pallas")
    reference = functools.partial(_masked_reference, lengths=lengths)
    for got, want in zip(_grads(pallas, q, k, v, w), _grads(reference, q, k, v, w)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_cpu_blockwise_tile_does_not_grow_with_the_batch():
    """On a CPU the blockwise path keeps each block pair's logits tile cache-sized whatever the
    batch (smaller blocks, a few cells per pass): the 512-block, whole-batch tiling of before
    compiled a batch of 32 cells x 12 heads to [32, 12, 512, 512] f32 tiles (400 MB)."""
    import re

    assert jax.default_backend() == "cpu"
    shape = jax.ShapeDtypeStruct((32, 512, 12, 16), jnp.float32)
    lengths = jax.ShapeDtypeStruct((32,), jnp.int32)
    attend = jax.jit(lambda q, k, v, n: attention.dot_product_attention(
        q, k, v, key_lengths=n, implementation="blockwise"))
    program = attend.lower(shape, shape, shape, lengths).compile().as_text()
    largest = max(np.prod([int(d) for d in dims.split(",")]) for dims in
                  re.findall(r"f32\[(\d+(?:,\d+)+)\]", program))
    assert largest <= 32 * 512 * 12 * 16, f"a {largest:,}-element tensor in the program"
    assert "f32[2,12,128,128]" in program    # 2 cells x 12 heads x 128 x 128: 1.5 MB
    assert attention._cells_per_pass(32, 12 * 128 * 128 * 4) == 2
    assert attention._cells_per_pass(7, 12 * 128 * 128 * 4) == 1
    assert attention._cells_per_pass(1, 1) == 1


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_in_several_passes_matches_reference(monkeypatch, causal):
    """A tile budget of one cell: the cells pass one at a time (`lax.map`); values and gradients
    are the reference's."""
    monkeypatch.setattr(attention, "CPU_TILE_BYTES", 1)
    q, k, v, w = _qkv(9)
    reference, blockwise = _blockwise_and_reference(causal)
    program = jax.jit(blockwise).lower(q, k, v).as_text()
    assert "tensor<4x1x37x3x8xf32>" in program   # the batch split into 4 passes of one cell
    np.testing.assert_allclose(blockwise(q, k, v), reference(q, k, v), atol=1e-5, rtol=0)
    for got, want in zip(_grads(blockwise, q, k, v, w), _grads(reference, q, k, v, w)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
