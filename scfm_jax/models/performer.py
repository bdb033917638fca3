"""Performer (FAVOR+) attention, the linear attention of scFoundation's decoder.

FAVOR+ approximates softmax attention with positive orthogonal random features (Choromanski et
al. 2021), in the variant of `performer_pytorch` that scFoundation ships (SPEC.md I.4(f)): with
d = head_dim, m random features, projection P [m, d], c = d^-1/4 and u = (c x) P^T,

    phi(q) = m^-1/2 (exp(u_q - |c q|^2/2 - max_features u_q) + 1e-4)
    phi(k) = m^-1/2 (exp(u_k - |c k|^2/2 - M) + 1e-4)
    out    = phi(q) (phi(k)^T v) / (phi(q) sum_L phi(k))

where the key stabiliser M is a max over every key logit of one cell (`stabilizer_scope="cell"`)
or of the whole batch (`"batch"`, what the original computes). Keys are consumed in chunks along
the gene axis with an online max (the accumulated state is rescaled whenever the max grows), so
memory is linear in the number of genes and exactly the same numbers come out as with one chunk.
The key-value state and the normaliser are accumulated in float32 whatever the compute dtype.

The projection matrix is a `ProjectionMatrix` variable, not a `Param`: optimisers skip it, it is
saved with the model, and it changes only when `redraw_features` draws a new one from a key.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from scfm_jax.errors import UsageError

FEATURE_EPSILON = 1e-4  # the "+1e-4" of performer_pytorch's softmax_kernel
STABILIZER_SCOPES = ("cell", "batch")


class ProjectionMatrix(nnx.Variable):
    """A performer layer's random feature directions [features, head_dim]; saved, not trained."""


def num_random_features(head_dim: int, num_features: int = 0) -> int:
    """The feature count: `num_features`, or the original's default int(d ln d) (266 at d=64)."""
    if num_features < 0:
        raise UsageError(f"num_features must be >= 0 (0: int(head_dim * ln(head_dim))), "
                         f"got {num_features}")
    return num_features or int(head_dim * math.log(head_dim))


def gaussian_orthogonal_random_matrix(key: jax.Array, num_rows: int, num_cols: int) -> jax.Array:
    """Orthogonal random features as performer_pytorch draws them (`scaling=0`).

    Stacked blocks of QR-orthogonalised Gaussian matrices (transposed), cut to `num_rows`, each
    row rescaled by the norm of an independent N(0, I) vector so rows are marginally Gaussian.
    """
    num_blocks = -(-num_rows // num_cols)
    block_key, norm_key = jax.random.split(key)
    blocks = jax.random.normal(block_key, (num_blocks, num_cols, num_cols), jnp.float32)
    # One QR per block: jaxlib's CPU LAPACK kernel spreads a *batched* QR over XLA's intra-op
    # thread pool, and inside a jitted init that wait can deadlock (seen with jaxlib 0.10.2 on
    # 2 cores: every thread parked, forever). Unbatched calls run inline; the values are the same.
    q = jnp.stack([jnp.linalg.qr(block)[0] for block in blocks])
    matrix = jnp.swapaxes(q, 1, 2).reshape(num_blocks * num_cols, num_cols)[:num_rows]
    multiplier = jnp.linalg.norm(
        jax.random.normal(norm_key, (num_rows, num_cols), jnp.float32), axis=1)
    return multiplier[:, None] * matrix


def iid_gaussian_random_matrix(key: jax.Array, num_rows: int, num_cols: int) -> jax.Array:
    """Independent N(0, I) feature directions (the non-orthogonal FAVOR+ baseline)."""
    return jax.random.normal(key, (num_rows, num_cols), jnp.float32)


def _feature_logits(x: jax.Array, projection: jax.Array) -> tuple[jax.Array, jax.Array]:
    """u = (c x) P^T [B, C, H, m] and |c x|^2 / 2 [B, C, H, 1], in float32."""
    x = x.astype(jnp.float32)
    normalizer = x.shape[-1] ** -0.25
    logits = jnp.einsum("bchd,md->bchm", normalizer * x, projection.astype(jnp.float32))
    half_norm = 0.5 * normalizer ** 2 * jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return logits, half_norm


def _split_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """[B, L, ...] -> [num_chunks, B, chunk, ...], zero-padded at the end of the gene axis."""
    length = x.shape[1]
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], num_chunks, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def favor_attention(query: jax.Array, key: jax.Array, value: jax.Array, projection: jax.Array, *,
                    stabilizer_scope: str = "cell", chunk_size: int = 2048) -> jax.Array:
    """Non-causal FAVOR+ attention over [B, L, H, d] inputs; returns [B, L, H, d].

    No mask: like the original decoder, every position attends to every position.
    """
    if stabilizer_scope not in STABILIZER_SCOPES:
        raise UsageError(f"stabilizer_scope must be one of {STABILIZER_SCOPES}, "
                         f"got {stabilizer_scope!r}")
    if chunk_size <= 0:
        raise UsageError(f"chunk_size must be positive, got {chunk_size}")
    batch, length, heads, head_dim = query.shape
    num_features = projection.shape[0]
    ratio = num_features ** -0.5
    chunk_size = min(chunk_size, length)
    keys, values = _split_chunks(key, chunk_size), _split_chunks(value, chunk_size)
    valid = _split_chunks(jnp.ones((1, length), jnp.bool_), chunk_size)[:, :, :, None, None]

    def accumulate(state, chunk):
        kv, k_sum, running_max = state
        k_chunk, v_chunk, valid_chunk = chunk
        logits, half_norm = _feature_logits(k_chunk, projection)
        logits = jnp.where(valid_chunk, logits, -jnp.inf)
        # The stabiliser cancels between numerator and denominator except through the +1e-4
        # term; like FAVOR+'s, it is a constant for differentiation.
        chunk_max = jax.lax.stop_gradient(jnp.max(logits, axis=(1, 2, 3)))
        new_max = jnp.maximum(running_max, chunk_max)
        rescale = jnp.exp(running_max - new_max)[:, None, None, None]
        features = jnp.exp(logits - half_norm - new_max[:, None, None, None])
        kv = kv * rescale + jnp.einsum("bchm,bchd->bhmd", features.astype(v_chunk.dtype), v_chunk,
                                       preferred_element_type=jnp.float32)
        k_sum = k_sum * rescale[..., 0] + jnp.sum(features, axis=1)
        return (kv, k_sum, new_max), None

    initial = (jnp.zeros((batch, heads, num_features, head_dim), jnp.float32),
               jnp.zeros((batch, heads, num_features), jnp.float32),
               jnp.full((batch,), -jnp.inf, jnp.float32))
    # With several chunks the bodies are checkpointed: the backward pass recomputes a chunk's
    # random features instead of keeping [chunks, B, chunk, H, m] of them (m = 266 > d = 64).
    def per_chunk(body):
        return jax.checkpoint(body, prevent_cse=False) if keys.shape[0] > 1 else body

    (kv, k_sum, cell_max), _ = jax.lax.scan(per_chunk(accumulate), initial,
                                            (keys, values, valid))
    if stabilizer_scope == "batch":
        shift = jnp.exp(cell_max - jnp.max(cell_max))
        kv, k_sum = kv * shift[:, None, None, None], k_sum * shift[:, None, None]
    value_sum = jnp.sum(value.astype(jnp.float32), axis=1)  # [B, H, d]
    context = ratio * (kv + FEATURE_EPSILON * value_sum[:, :, None, :])
    normalizer = ratio * (k_sum + FEATURE_EPSILON * length)

    def attend(q_chunk):
        logits, half_norm = _feature_logits(q_chunk, projection)
        features = ratio * (jnp.exp(logits - half_norm - jnp.max(logits, axis=-1, keepdims=True))
                            + FEATURE_EPSILON)
        numerator = jnp.einsum("bchm,bhmd->bchd", features, context)
        denominator = jnp.einsum("bchm,bhm->bch", features, normalizer)
        return (numerator / denominator[..., None]).astype(query.dtype)

    out = jax.lax.map(per_chunk(attend), _split_chunks(query, chunk_size))
    return jnp.moveaxis(out, 0, 1).reshape(batch, -1, heads, head_dim)[:, :length]


def redraw_features(model: nnx.Module, key: jax.Array) -> None:
    """Replace every ProjectionMatrix in `model` by fresh orthogonal draws from `key`.

    Each layer's matrix gets `fold_in(key, i)`, i counting layers in graph order (a stacked
    matrix [layers, features, head_dim] holds consecutive ones), so the result depends on the key
    only.
    """
    index = 0
    for _, variable in nnx.iter_graph(model):
        if not isinstance(variable, ProjectionMatrix):
            continue
        value = variable.get_value()
        matrices = value.reshape(-1, *value.shape[-2:])
        # one draw per layer in a Python loop: a vmapped QR is a batched one (see above)
        draws = [gaussian_orthogonal_random_matrix(jax.random.fold_in(key, index + i),
                                                   *matrices.shape[1:])
                 for i in range(matrices.shape[0])]
        index += len(draws)
        variable.set_value(jnp.stack(draws).reshape(value.shape))
