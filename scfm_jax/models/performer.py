"""Performer (FAVOR+) attention and the pre-norm performer layer of scFoundation's decoder.

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

from scfm_jax.models import layers

FEATURE_EPSILON = 1e-4  # the "+1e-4" of performer_pytorch's softmax_kernel
STABILIZER_SCOPES = ("cell", "batch")
ATTENTION_KINDS = ("performer", "dot_product")


class ProjectionMatrix(nnx.Variable):
    """A performer layer's random feature directions [features, head_dim]; saved, not trained."""


def num_random_features(head_dim: int, num_features: int = 0) -> int:
    """The feature count: `num_features`, or the original's default int(d ln d) (266 at d=64)."""
    if num_features < 0:
        raise ValueError(f"num_features must be >= 0 (0: int(head_dim * ln(head_dim))), "
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
        raise ValueError(f"stabilizer_scope must be one of {STABILIZER_SCOPES}, "
                         f"got {stabilizer_scope!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
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


class SelfAttention(nnx.Module):
    """Multi-head self-attention of a performer layer: FAVOR+ or exact dot-product."""

    def __init__(self, width: int, heads: int, head_dim: int, *, attention: str = "performer",
                 num_features: int = 0, stabilizer_scope: str = "cell", chunk_size: int = 2048,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"decoder.attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if stabilizer_scope not in STABILIZER_SCOPES:
            raise ValueError(f"decoder.stabilizer_scope must be one of {STABILIZER_SCOPES}, "
                             f"got {stabilizer_scope!r}")
        self.attention, self.stabilizer_scope, self.chunk_size = attention, stabilizer_scope, chunk_size
        self.heads, self.head_dim = heads, head_dim
        # LinearGeneral initialises a flat [in, out] kernel and reshapes it, so the torch-like
        # uniform(+-1/sqrt(fan_in)) init is plain; the logical names go on as metadata.
        init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        zeros = nnx.initializers.zeros_init()

        def head_projection():
            return nnx.LinearGeneral(
                width, (heads, head_dim), kernel_init=init, bias_init=zeros, dtype=dtype,
                kernel_metadata={"out_sharding": (layers.EMBED, layers.HEADS, layers.HEAD_DIM)},
                bias_metadata={"out_sharding": (layers.HEADS, layers.HEAD_DIM)}, rngs=rngs)

        self.query, self.key, self.value = head_projection(), head_projection(), head_projection()
        self.out = nnx.LinearGeneral(
            (heads, head_dim), width, axis=(-2, -1), kernel_init=init, bias_init=zeros, dtype=dtype,
            kernel_metadata={"out_sharding": (layers.HEADS, layers.HEAD_DIM, layers.EMBED)},
            bias_metadata={"out_sharding": (layers.EMBED,)}, rngs=rngs)
        if attention == "performer":
            rows = num_random_features(head_dim, num_features)
            self.projection = ProjectionMatrix(
                gaussian_orthogonal_random_matrix(rngs.params(), rows, head_dim),
                out_sharding=("features", layers.HEAD_DIM))
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
            attended = favor_attention(q, k, v, self.projection.get_value(),
                                       stabilizer_scope=stabilizer_scope or self.stabilizer_scope,
                                       chunk_size=self.chunk_size)
        elif key_lengths is not None:
            attended = masked_softmax_attention(q, k, v, key_lengths, dropout_rate=dropout_rate,
                                                dropout_key=dropout_key)
        else:
            attended = jax.nn.dot_product_attention(q, k, v)
        return self.out(attended)


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


class FeedForward(nnx.Module):
    """Dense -> activation -> Dense, kernels sharded (embed, mlp) / (mlp, embed)."""

    def __init__(self, width: int, mlp_dim: int, activation, *, dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        self.activation = activation
        self.w1 = nnx.Linear(
            width, mlp_dim, dtype=dtype, rngs=rngs,
            kernel_init=nnx.with_partitioning(init, (layers.EMBED, layers.MLP)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (layers.MLP,)))
        self.w2 = nnx.Linear(
            mlp_dim, width, dtype=dtype, rngs=rngs,
            kernel_init=nnx.with_partitioning(init, (layers.MLP, layers.EMBED)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (layers.EMBED,)))

    def __call__(self, x: jax.Array, *, dropout_rate: float = 0.0,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        hidden = self.activation(self.w1(x))
        if dropout_key is not None and dropout_rate > 0:
            hidden = dropout(hidden, dropout_rate, dropout_key)
        return self.w2(hidden)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout from an explicit key."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def exact_gelu(x: jax.Array) -> jax.Array:
    """GELU with erf, as torch.nn.GELU() (not the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


class PerformerLayer(nnx.Module):
    """Pre-norm layer: x + attn(LN(x)), then x + FF(LN(x)) with exact GELU."""

    def __init__(self, width: int, heads: int, head_dim: int, mlp_dim: int, *,
                 attention: str = "performer", num_features: int = 0,
                 stabilizer_scope: str = "cell", chunk_size: int = 2048, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.attention_norm = layers.layer_norm(width, dtype=dtype, rngs=rngs)
        self.attention = SelfAttention(width, heads, head_dim, attention=attention,
                                       num_features=num_features, stabilizer_scope=stabilizer_scope,
                                       chunk_size=chunk_size, dtype=dtype, rngs=rngs)
        self.feed_forward_norm = layers.layer_norm(width, dtype=dtype, rngs=rngs)
        self.feed_forward = FeedForward(width, mlp_dim, exact_gelu, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, stabilizer_scope: str | None = None) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), stabilizer_scope=stabilizer_scope)
        x = x + self.feed_forward(self.feed_forward_norm(x))
        return layers.constrain(x, (layers.BATCH, layers.LENGTH, layers.EMBED))


def redraw_features(model: nnx.Module, key: jax.Array) -> None:
    """Replace every ProjectionMatrix in `model` by a fresh orthogonal draw from `key`.

    Each matrix gets `fold_in(key, i)` in graph order, so the result depends on the key only.
    """
    for index, (_, variable) in enumerate(
            (path, node) for path, node in nnx.iter_graph(model)
            if isinstance(node, ProjectionMatrix)):
        rows, cols = variable.get_value().shape
        variable.set_value(gaussian_orthogonal_random_matrix(jax.random.fold_in(key, index),
                                                             rows, cols))
