"""The Pallas FAVOR+ kernels (both variants, Pallas interpret mode on CPU) against the XLA
reference `performer.favor_attention`: forward within 1e-5, gradients within 1e-4, over chunk sizes
that do and do not divide the length, several chunks and one, and both stabiliser scopes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scfm_jax.models import favor_pallas, performer


def _inputs(length=75, batch=2, heads=2, head_dim=12, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    shape = (batch, length, heads, head_dim)
    q, k, v, w = (jax.random.normal(key, shape) for key in keys[:4])
    # cells and positions on different key scales: the stabiliser differs per cell and grows
    # from chunk to chunk, so both scopes and the online rescaling are exercised
    k = k * jnp.linspace(0.3, 1.5, length)[None, :, None, None] * jnp.array([1.0, 2.5])[:batch,
                                                                                      None, None, None]
    projection = performer.gaussian_orthogonal_random_matrix(
        keys[4], performer.num_random_features(head_dim), head_dim)
    return q, k, v, w, projection


def _check(variant, scope, chunk_size, inputs, grads=True):
    q, k, v, w, projection = inputs

    def run(fn):
        return fn(q, k, v, projection, stabilizer_scope=scope, chunk_size=chunk_size)

    kernel = lambda *a, **kw: favor_pallas.favor_attention(*a, variant=variant, interpret=True, **kw)
    np.testing.assert_allclose(run(kernel), run(performer.favor_attention), atol=1e-5, rtol=0)
    if grads:
        def grad(fn):
            loss = lambda q, k, v: jnp.sum(fn(q, k, v, projection, stabilizer_scope=scope,
                                              chunk_size=chunk_size) * w)
            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        for got, want in zip(grad(kernel), grad(performer.favor_attention)):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant, chunk_size", [("mosaic", 16), ("mosaic", 40), ("mosaic", 2048),
                                                 ("triton", 16), ("triton", 2048)])
@pytest.mark.parametrize("scope", ["cell", "batch"])
def test_kernel_matches_reference(variant, chunk_size, scope):
    # gradients: the custom VJP is shared by the variants, so one chunking checks it per scope
    _check(variant, scope, chunk_size, _inputs(), grads=(variant, chunk_size) == ("mosaic", 16))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mosaic", "triton"])
@pytest.mark.parametrize("scope", ["cell", "batch"])
def test_kernel_at_the_decoder_length(variant, scope):
    # 19,264 genes + T + S: the length of the released model's decoder, odd and prime to 2048
    _check(variant, scope, 2048, _inputs(length=19_266, heads=1, head_dim=16))


def test_bad_arguments_fail_clearly():
    q, k, v, _, projection = _inputs(length=8)
    with pytest.raises(ValueError, match="stabilizer_scope"):
        favor_pallas.favor_attention(q, k, v, projection, stabilizer_scope="global")
    with pytest.raises(ValueError, match="variant"):
        favor_pallas.favor_attention(q, k, v, projection, variant="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        favor_pallas.favor_attention(q, k, v, projection, chunk_size=0)
