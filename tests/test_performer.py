"""FAVOR+ performer attention: convergence to softmax attention, chunking, stabiliser scopes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scfm_jax.models import layers, performer
from scfm_jax.models.scfoundation import DecoderConfig, PerformerLayer


def _reference_favor(q, k, v, projection, scope):
    """performer_pytorch's softmax_kernel + linear_attention, written out in float64 numpy."""
    q, k, v, projection = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) if a.ndim == 4
                           else np.asarray(a, np.float64) for a in (q, k, v, projection))
    c = q.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5

    def logits(x):
        return np.einsum("bhld,md->bhlm", c * x, projection), 0.5 * c**2 * np.sum(x**2, -1)[..., None]

    uq, dq = logits(q)
    uk, dk = logits(k)
    phi_q = ratio * (np.exp(uq - dq - uq.max(-1, keepdims=True)) + 1e-4)
    key_max = uk.max() if scope == "batch" else uk.max(axis=(1, 2, 3), keepdims=True)
    phi_k = ratio * (np.exp(uk - dk - key_max) + 1e-4)
    out = np.einsum("bhlm,bhmd->bhld", phi_q, np.einsum("bhlm,bhld->bhmd", phi_k, v))
    out /= np.einsum("bhlm,bhm->bhl", phi_q, phi_k.sum(2))[..., None]
    return out.transpose(0, 2, 1, 3)


def _qkv(seed, batch=3, length=50, heads=2, head_dim=8, scale=1.0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    shape = (batch, length, heads, head_dim)
    return (scale * jax.random.normal(kq, shape), scale * jax.random.normal(kk, shape),
            jax.random.normal(kv, shape))


@pytest.mark.parametrize("scope", ["cell", "batch"])
def test_favor_matches_reference_formula(scope):
    q, k, v = _qkv(0)
    projection = performer.gaussian_orthogonal_random_matrix(jax.random.key(1), 16, 8)
    out = performer.favor_attention(q, k, v, projection, stabilizer_scope=scope, chunk_size=2048)
    np.testing.assert_allclose(out, _reference_favor(q, k, v, projection, scope), atol=2e-6)


@pytest.mark.parametrize("scope", ["cell", "batch"])
def test_chunked_equals_unchunked(scope):
    # keys spread over very different scales, so the running max changes from chunk to chunk
    q, k, v = _qkv(2, scale=1.5)
    k = k * jnp.linspace(0.2, 2.0, k.shape[1])[None, :, None, None]
    projection = performer.gaussian_orthogonal_random_matrix(jax.random.key(3), 16, 8)
    whole = performer.favor_attention(q, k, v, projection, stabilizer_scope=scope, chunk_size=50)
    for chunk in (1, 7, 16, 49):
        chunked = performer.favor_attention(q, k, v, projection, stabilizer_scope=scope,
                                            chunk_size=chunk)
        np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6, err_msg=f"chunk {chunk}")


def test_chunked_gradients_match_and_features_are_not_kept_per_chunk():
    q, k, v = _qkv(4, batch=1, length=4096, heads=2, head_dim=8)
    projection = performer.gaussian_orthogonal_random_matrix(jax.random.key(3), 64, 8)

    def loss(q, k, v, chunk_size):
        out = performer.favor_attention(q, k, v, projection, chunk_size=chunk_size)
        return jnp.sum(jnp.sin(out))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grad(q, k, v, 256), grad(q, k, v, 4096))
    # a feature map [B, L, H, m] in float32 is 2 MB here; with the features of every chunk kept
    # for the backward pass XLA planned 11.3 MB of temporaries, with checkpointed chunks 1.6 MB
    feature_map_bytes = 4096 * 2 * 64 * 4
    compiled = grad.lower(q, k, v, 256).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 2 * feature_map_bytes


def test_cell_scope_is_independent_of_batch_mates():
    q, k, v = _qkv(4)
    projection = performer.gaussian_orthogonal_random_matrix(jax.random.key(5), 16, 8)
    # Batch mate with large keys: it dominates a batch-wide max.
    k = k.at[1].multiply(4.0)
    alone = performer.favor_attention(q[:1], k[:1], v[:1], projection, stabilizer_scope="cell")
    together = performer.favor_attention(q, k, v, projection, stabilizer_scope="cell")
    np.testing.assert_allclose(together[:1], alone, rtol=1e-6, atol=1e-7)
    together_batch = performer.favor_attention(q, k, v, projection, stabilizer_scope="batch")
    assert np.abs(np.asarray(together_batch[:1] - alone)).max() > 1e-4
    # With one cell per batch the two scopes agree.
    alone_batch = performer.favor_attention(q[:1], k[:1], v[:1], projection,
                                            stabilizer_scope="batch")
    np.testing.assert_allclose(alone_batch, alone, rtol=1e-6, atol=1e-7)


@functools.partial(jax.jit, static_argnames=("num_features", "orthogonal"))
def _projections(keys, num_features, orthogonal):
    draw = (performer.gaussian_orthogonal_random_matrix if orthogonal
            else performer.iid_gaussian_random_matrix)
    return jax.vmap(lambda key: draw(key, num_features, 16))(keys)


@jax.jit
def _mean_relative_error(q, k, v, projections):
    """Mean over samples of the RMS error of FAVOR+ relative to exact softmax attention."""
    def one(args):
        q, k, v, projection = args
        out = performer.favor_attention(q, k, v, projection)
        exact = jax.nn.dot_product_attention(q, k, v)
        return jnp.sqrt(jnp.mean(jnp.square(out - exact)) / jnp.mean(jnp.square(exact)))

    return jnp.mean(jax.vmap(one)((q, k, v, projections)))


def test_error_against_softmax_attention_falls_like_inverse_sqrt_features():
    samples = 32
    kq, kk, kv, kp = jax.random.split(jax.random.key(6), 4)
    shape = (samples, 1, 128, 2, 16)
    q, k = 0.5 * jax.random.normal(kq, shape), 0.5 * jax.random.normal(kk, shape)
    v = jax.random.normal(kv, shape)
    keys = jax.random.split(kp, samples)
    features = np.array([16, 64, 256, 1024])
    # The first m rows of a draw of 1024 are distributed as a draw of m rows (blocks of 16).
    draws = {orthogonal: _projections(keys, 1024, orthogonal) for orthogonal in (True, False)}
    errors = {orthogonal: np.array([
        float(_mean_relative_error(q, k, v, draws[orthogonal][:, :m])) for m in features])
        for orthogonal in (True, False)}
    for orthogonal, err in errors.items():
        assert np.all(np.diff(err) < 0), err
        slope = np.polyfit(np.log(features), np.log(err), 1)[0]
        # m^-1/2, flattened a little at large m by the +1e-4 term of the kernel
        assert -0.65 < slope < -0.33, (orthogonal, slope, err)
    assert np.mean(errors[True] / errors[False]) < 1.05, errors


def test_dot_product_alternative_is_exact_attention():
    layer = layers.SelfAttention(12, 3, 4, attention="dot_product", rngs=nnx.Rngs(0))
    assert layer.projection is None
    x = jax.random.normal(jax.random.key(7), (2, 9, 12))
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    expected = layer.out(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v))
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_orthogonal_features_and_redraw():
    matrix = np.asarray(performer.gaussian_orthogonal_random_matrix(jax.random.key(8), 20, 8))
    assert matrix.shape == (20, 8)
    for block in (matrix[:8], matrix[8:16]):
        directions = block / np.linalg.norm(block, axis=1, keepdims=True)
        np.testing.assert_allclose(directions @ directions.T, np.eye(8), atol=1e-5)
    assert performer.num_random_features(64) == 266
    assert performer.num_random_features(8) == 16

    decoder = DecoderConfig(width=16, depth=2, heads=2, head_dim=8, mlp_dim=32)
    stack = nnx.List([PerformerLayer(decoder, rngs=nnx.Rngs(i)) for i in range(2)])
    assert not jax.tree.leaves(nnx.state(stack, performer.ProjectionMatrix).filter(nnx.Param))
    params_before = nnx.state(stack, nnx.Param)
    performer.redraw_features(stack, jax.random.key(9))
    first = [np.asarray(layer.attention.projection.get_value()) for layer in stack]
    assert not np.allclose(first[0], first[1])
    performer.redraw_features(stack, jax.random.key(9))
    np.testing.assert_array_equal(stack[0].attention.projection.get_value(), first[0])
    performer.redraw_features(stack, jax.random.key(10))
    assert not np.allclose(stack[0].attention.projection.get_value(), first[0])
    jax.tree.map(np.testing.assert_array_equal, params_before, nnx.state(stack, nnx.Param))

    # the stored layout (layers stacked on a leading axis) gets the very same draws per layer
    rngs = nnx.Rngs(0)
    stacked = layers.stack(lambda: PerformerLayer(decoder, rngs=rngs), 2)
    assert stacked.attention.projection.get_value().shape == (2,) + first[0].shape
    performer.redraw_features(stacked, jax.random.key(9))
    np.testing.assert_array_equal(stacked.attention.projection.get_value(), np.stack(first))


def _equations(jaxpr):
    for equation in jaxpr.eqns:
        yield equation
        for param in equation.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _equations(getattr(inner, "jaxpr", inner))


def test_orthogonal_draw_uses_unbatched_qr_only():
    """A batched QR inside a jitted init deadlocked XLA:CPU (jaxlib 0.10.2): keep each QR 2-D,
    with the same blocks a batched QR gives."""
    key = jax.random.key(11)
    closed = jax.make_jaxpr(lambda k: performer.gaussian_orthogonal_random_matrix(k, 266, 64))(key)
    qr_shapes = [eq.invars[0].aval.shape for eq in _equations(closed.jaxpr)
                 if eq.primitive.name == "qr"]
    assert qr_shapes == [(64, 64)] * 5
    block_key, norm_key = jax.random.split(key)
    batched_q = np.asarray(jnp.linalg.qr(jax.random.normal(block_key, (5, 64, 64)))[0])
    norms = np.linalg.norm(np.asarray(jax.random.normal(norm_key, (266, 64))), axis=1)
    expected = norms[:, None] * np.swapaxes(batched_q, 1, 2).reshape(320, 64)[:266]
    np.testing.assert_allclose(jax.jit(performer.gaussian_orthogonal_random_matrix,
                                       static_argnums=(1, 2))(key, 266, 64), expected,
                               rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused():
    q, k, v = _qkv(0, batch=1, length=4)
    projection = performer.gaussian_orthogonal_random_matrix(jax.random.key(0), 16, 8)
    with pytest.raises(ValueError, match="stabilizer_scope"):
        performer.favor_attention(q, k, v, projection, stabilizer_scope="global")
    with pytest.raises(ValueError, match="attention"):
        layers.SelfAttention(8, 2, 4, attention="linear", rngs=nnx.Rngs(0))
