"""scFoundation (xTrimoGene "MaeAutobin") in Flax NNX, exact to the released PyTorch code.

The model (SPEC.md I.4): an auto-discretisation value embedding plus a learned gene table; a
post-norm ReLU transformer encoder over the expressed, unmasked genes only (padded to a bucket
length, key padding by per-cell lengths); the encoder outputs scattered back to their gene
positions over the full sequence (num_genes genes, then the depth tokens T and S), the gene table
added a second time, `decoder_embed`; a pre-norm performer decoder with exact GELU; two final
LayerNorms; the expression head.

The architecture is described by `ScFoundationConfig`, built from an experiment's `config.model`
by `ScFoundationConfig.from_config`. What turns data into model inputs and losses is in
`scfm_jax.objectives.scfoundation`.
"""
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from scfm_jax.errors import UsageError
from scfm_jax.models import attention as attention_impls
from scfm_jax.models import layers, performer
from scfm_jax.models.layers import BATCH, BINS, EMBED, GENES, LENGTH, MLP, TABLE_EMBED

__all__ = ["ScFoundation", "ScFoundationConfig", "EncoderConfig", "DecoderConfig",
           "pool_cell_embeddings"]

OUTPUTS = ("expression", "embedding")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    width: int
    depth: int
    heads: int
    mlp_dim: int
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    width: int
    depth: int
    heads: int
    head_dim: int
    mlp_dim: int
    attention: str = "performer"     # or "dot_product" (exact softmax attention)
    num_features: int = 0            # 0: int(head_dim * ln(head_dim)), as the original
    stabilizer_scope: str = "cell"   # "batch" reproduces the original's batch-wide key max
    chunk_size: int = 2048           # genes per chunk of the linear-attention scan


# A field of `config.model.decoder` that configures training, not the architecture.
_NOT_ARCHITECTURE = ("redraw_interval",)


def _fields(cls, section: Mapping[str, Any], where: str) -> dict[str, Any]:
    return layers.config_fields(cls, section, where, not_architecture=_NOT_ARCHITECTURE)


@dataclasses.dataclass(frozen=True)
class ScFoundationConfig:
    """The architecture fields of an experiment's `config.model` (frozen, hashable, validated)."""
    num_genes: int
    encoder: EncoderConfig
    decoder: DecoderConfig
    bin_num: int = 100
    bin_alpha: float = 1.0
    mask_value: float = 102.0   # exact input values that select the mask / pad embeddings
    pad_value: float = 103.0
    dtype: str = "float32"      # compute dtype; parameters stay float32
    remat_policy: str = "none"
    attention_impl: str = "auto"  # both attentions: see scfm_jax.models.attention
    unroll_layers: bool = False   # unroll the layer scans (FLOP counting; see layers.scan)

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any]) -> "ScFoundationConfig":
        """The dataclass for `config.model` (a ConfigDict or any mapping), checked."""
        if isinstance(model_config, cls):
            return model_config
        values = _fields(cls, model_config, "config.model")
        values["encoder"] = EncoderConfig(**_fields(EncoderConfig, model_config["encoder"],
                                                    "config.model.encoder"))
        values["decoder"] = DecoderConfig(**_fields(DecoderConfig, model_config["decoder"],
                                                    "config.model.decoder"))
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.num_genes is None or self.num_genes <= 0:
            raise UsageError(f"model.num_genes must be set (> 0) before building the model, got "
                             f"{self.num_genes}; it is the vocabulary size (19264 for the "
                             "released scFoundation)")
        enc, dec = self.encoder, self.decoder
        if enc.width % enc.heads:
            raise UsageError(f"encoder.width {enc.width} is not divisible by encoder.heads "
                             f"{enc.heads}")
        if min(enc.depth, dec.depth) < 1:
            raise UsageError(f"encoder.depth and decoder.depth must be >= 1, got {enc.depth}, "
                             f"{dec.depth}")
        if dec.attention not in layers.ATTENTION_KINDS:
            raise UsageError(f"decoder.attention must be one of {layers.ATTENTION_KINDS}, got "
                             f"{dec.attention!r}")
        if dec.stabilizer_scope not in performer.STABILIZER_SCOPES:
            raise UsageError(f"decoder.stabilizer_scope must be one of "
                             f"{performer.STABILIZER_SCOPES}, got {dec.stabilizer_scope!r}")
        if dec.chunk_size <= 0:
            raise UsageError(f"decoder.chunk_size must be positive, got {dec.chunk_size}")
        performer.num_random_features(dec.head_dim, dec.num_features)
        layers.check_remat_policy(self.remat_policy)
        attention_impls.check_implementation(self.attention_impl)
        jnp.dtype(self.dtype)

    @property
    def seq_len(self) -> int:
        return self.num_genes + 2  # genes, then T, then S

    def to_dict(self) -> dict[str, Any]:
        """The `config.model` fields of this architecture (nested dicts)."""
        return dict(name="scfoundation", **dataclasses.asdict(self))


class AutoDiscretizationEmbedding(nnx.Module):
    """Scalar expression value -> soft mixture of `bin_num` learned bin vectors.

    Exact input values `mask_value` / `pad_value` select their own vectors instead.
    """

    def __init__(self, width: int, bin_num: int, *, bin_alpha: float, mask_value: float,
                 pad_value: float, dtype=jnp.float32, rngs: nnx.Rngs):
        self.bin_alpha, self.mask_value, self.pad_value, self.dtype = (
            bin_alpha, mask_value, pad_value, dtype)
        self.mlp = layers.linear(1, bin_num, (None, BINS), rngs=rngs)
        self.mlp2 = layers.linear(bin_num, bin_num, (BINS, None), rngs=rngs)
        normal = nnx.initializers.normal(1.0)  # torch.nn.Embedding's N(0, 1)
        self.emb = layers.param(rngs, normal, (bin_num, width), (BINS, EMBED))
        self.emb_mask = layers.param(rngs, normal, (1, width), (None, EMBED))
        self.emb_pad = layers.param(rngs, normal, (1, width), (None, EMBED))

    def __call__(self, values: jax.Array) -> jax.Array:
        values = values.astype(jnp.float32)
        hidden = jax.nn.leaky_relu(self.mlp(values[..., None]), negative_slope=0.1)
        weights = jax.nn.softmax(self.bin_alpha * hidden + self.mlp2(hidden), axis=-1)
        embedded = jnp.einsum("...k,kd->...d", weights.astype(self.dtype),
                              layers.gathered(self.emb.get_value()).astype(self.dtype))
        embedded = jnp.where((values == self.mask_value)[..., None],
                             layers.gathered(self.emb_mask.get_value())[0].astype(self.dtype),
                             embedded)
        return jnp.where((values == self.pad_value)[..., None],
                         layers.gathered(self.emb_pad.get_value())[0].astype(self.dtype), embedded)


class EncoderLayer(nnx.Module):
    """torch.nn.TransformerEncoderLayer, post-norm, ReLU: LN(x + MHA(x)), LN(x + FF(x))."""

    def __init__(self, config: EncoderConfig, *, dtype, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        width = config.width
        self.dropout_rate = float(config.dropout)
        self.attention = layers.SelfAttention(width, config.heads, width // config.heads,
                                              attention="dot_product",
                                              attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.norm1 = layers.layer_norm(width, dtype=dtype, rngs=rngs)
        self.feed_forward = layers.FeedForward(width, config.mlp_dim, jax.nn.relu, dtype=dtype,
                                               rngs=rngs)
        self.norm2 = layers.layer_norm(width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, lengths: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        keys = (jax.random.split(dropout_key, 4) if dropout_key is not None and self.dropout_rate > 0
                else (None,) * 4)
        attended = self.attention(x, key_lengths=lengths, dropout_rate=self.dropout_rate,
                                  dropout_key=keys[3])
        if keys[0] is not None:
            attended = layers.dropout(attended, self.dropout_rate, keys[0])
        x = self.norm1(x + attended)
        fed = self.feed_forward(x, dropout_rate=self.dropout_rate, dropout_key=keys[1])
        if keys[2] is not None:
            fed = layers.dropout(fed, self.dropout_rate, keys[2])
        x = self.norm2(x + fed)
        return layers.constrain(x, (BATCH, LENGTH, EMBED))


def exact_gelu(x: jax.Array) -> jax.Array:
    """GELU with erf, as torch.nn.GELU() (not the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


class PerformerLayer(nnx.Module):
    """Pre-norm decoder layer: x + attn(LN(x)), then x + FF(LN(x)) with exact GELU."""

    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, attention_impl: str = "auto",
                 rngs: nnx.Rngs):
        width = config.width
        self.attention_norm = layers.layer_norm(width, dtype=dtype, rngs=rngs)
        self.attention = layers.SelfAttention(
            width, config.heads, config.head_dim, attention=config.attention,
            num_features=config.num_features, stabilizer_scope=config.stabilizer_scope,
            chunk_size=config.chunk_size, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.feed_forward_norm = layers.layer_norm(width, dtype=dtype, rngs=rngs)
        self.feed_forward = layers.FeedForward(width, config.mlp_dim, exact_gelu, dtype=dtype,
                                               rngs=rngs)

    def __call__(self, x: jax.Array, *, stabilizer_scope: str | None = None) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), stabilizer_scope=stabilizer_scope)
        x = x + self.feed_forward(self.feed_forward_norm(x))
        return layers.constrain(x, (BATCH, LENGTH, EMBED))


class ScFoundation(nnx.Module):
    """xTrimoGene / MaeAutobin. `model_config`: a `ScFoundationConfig` or `config.model`."""

    def __init__(self, model_config: ScFoundationConfig | Mapping[str, Any], *, rngs: nnx.Rngs):
        self.cfg = cfg = ScFoundationConfig.from_config(model_config)
        self.num_genes = cfg.num_genes
        self.seq_len = cfg.seq_len
        self.mask_value, self.pad_value = float(cfg.mask_value), float(cfg.pad_value)
        self.dtype = dtype = jnp.dtype(cfg.dtype)
        enc, dec = cfg.encoder, cfg.decoder
        self.encoder_dropout = float(enc.dropout)
        self.token_emb = AutoDiscretizationEmbedding(
            enc.width, cfg.bin_num, bin_alpha=cfg.bin_alpha, mask_value=self.mask_value,
            pad_value=self.pad_value, dtype=dtype, rngs=rngs)
        # seq_len + 1 rows: the last one is the padding gene id of the original
        self.pos_emb = nnx.Embed(
            self.seq_len + 1, enc.width, dtype=dtype, rngs=rngs,
            embedding_init=layers.with_axes(nnx.initializers.normal(1.0), (GENES, TABLE_EMBED)))
        self.encoder_layers = layers.stack(
            lambda: EncoderLayer(enc, dtype=dtype, attention_impl=cfg.attention_impl, rngs=rngs),
            enc.depth)
        self.encoder_norm = layers.layer_norm(enc.width, dtype=dtype, rngs=rngs)
        # [encoder width, decoder width]: split on both parameter axes, as a feed-forward kernel
        self.decoder_embed = layers.linear(enc.width, dec.width, (EMBED, MLP), dtype=dtype,
                                           rngs=rngs)
        self.decoder_layers = layers.stack(
            lambda: PerformerLayer(dec, dtype=dtype, attention_impl=cfg.attention_impl, rngs=rngs),
            dec.depth)
        self.decoder_norm = layers.layer_norm(dec.width, dtype=dtype, rngs=rngs)
        self.norm = layers.layer_norm(dec.width, dtype=dtype, rngs=rngs)
        self.to_final = layers.linear(dec.width, 1, (EMBED, None), dtype=dtype, rngs=rngs)

    def position_table(self) -> jax.Array:
        """The gene (position) embedding table, whole on every device, in the compute dtype."""
        return layers.gathered(self.pos_emb.embedding.get_value()).astype(self.dtype)

    def encode(self, values: jax.Array, gene_ids: jax.Array, padding_mask: jax.Array, *,
               dropout_key: jax.Array | None = None) -> jax.Array:
        """Encoder over left-aligned tokens: values/gene_ids [B, N], padding_mask True at pads.

        Pads must follow the real tokens of each row (as the objective's input functions lay
        them out); the per-cell length is the number of non-pad entries. Returns
        [B, N, encoder width].
        """
        lengths = jnp.sum(~padding_mask, axis=-1).astype(jnp.int32)
        gene_ids = jnp.where(padding_mask, self.seq_len, gene_ids)
        x = self.token_emb(values) + jnp.take(self.position_table(), gene_ids, axis=0)
        x = layers.constrain(x, (BATCH, LENGTH, EMBED))

        def step(layer, x, index, _):
            layer_key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            return layer(x, lengths, layer_key), None

        x, _ = layers.scan(self.encoder_layers, x, step, self.cfg.remat_policy,
                           unroll=self.cfg.unroll_layers)
        return self.encoder_norm(x)

    def decode(self, encoded: jax.Array, gene_ids: jax.Array, padding_mask: jax.Array,
               decoder_values: jax.Array, *, output: str = "expression",
               stabilizer_scope: str | None = None) -> jax.Array:
        """Decoder over all seq_len positions of `decoder_values` [B, seq_len].

        `encoded` [B, N, D] overwrites the value embedding at `gene_ids` (pads ignored). Returns the
        predicted expression [B, seq_len] (`output="expression"`) or the final-norm embeddings
        [B, seq_len, decoder width] (`"embedding"`).
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        batch = decoder_values.shape[0]
        x = layers.constrain(self.token_emb(decoder_values), (BATCH, LENGTH, EMBED))
        targets = jnp.where(padding_mask, self.seq_len, gene_ids)  # out of range: dropped
        rows = jnp.arange(batch)[:, None]
        x = x.at[rows, targets].set(encoded.astype(x.dtype), mode="drop")
        x = x + self.position_table()[None, :self.seq_len]   # every position, in order
        x = self.decoder_embed(layers.constrain(x, (BATCH, LENGTH, EMBED)))
        x = layers.constrain(x, (BATCH, LENGTH, EMBED))
        x, _ = layers.scan(
            self.decoder_layers, x,
            lambda layer, x, *_: (layer(x, stabilizer_scope=stabilizer_scope), None),
            self.cfg.remat_policy, unroll=self.cfg.unroll_layers)
        x = self.norm(self.decoder_norm(x))
        if output == "embedding":
            return x
        return self.to_final(x)[..., 0]

    def __call__(self, encoder_values: jax.Array, encoder_gene_ids: jax.Array,
                 encoder_padding_mask: jax.Array, decoder_values: jax.Array, *,
                 output: str = "expression", stabilizer_scope: str | None = None,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """Full forward: encoder, then decoder over [B, num_genes + 2] positions."""
        encoded = self.encode(encoder_values, encoder_gene_ids, encoder_padding_mask,
                              dropout_key=dropout_key)
        return self.decode(encoded, encoder_gene_ids, encoder_padding_mask, decoder_values,
                           output=output, stabilizer_scope=stabilizer_scope)


def pool_cell_embeddings(encoded: jax.Array, lengths: jax.Array, pool: str = "all") -> jax.Array:
    """Per-cell pooling of encoder outputs [B, N, D] with valid lengths [B] (float32 out).

    `all`: [last token (S), second-to-last (T), max over the others, mean over the others] -> 4D;
    `max`: max over all valid tokens -> D. As the original, the last two tokens are taken as S and
    T whatever they are (a T or S that is <= 0 is never an encoder token).
    """
    encoded = encoded.astype(jnp.float32)
    positions = jnp.arange(encoded.shape[1])[None, :, None]
    lengths = lengths.astype(jnp.int32)[:, None, None]
    if pool == "max":
        return jnp.max(jnp.where(positions < lengths, encoded, -jnp.inf), axis=1)
    if pool != "all":
        raise ValueError(f"pool must be 'all' or 'max', got {pool!r}")
    genes = positions < lengths - 2
    last = jnp.take_along_axis(encoded, lengths - 1, axis=1)[:, 0]
    second_last = jnp.take_along_axis(encoded, lengths - 2, axis=1)[:, 0]
    gene_max = jnp.max(jnp.where(genes, encoded, -jnp.inf), axis=1)
    gene_mean = jnp.sum(jnp.where(genes, encoded, 0.0), axis=1) / (lengths[:, 0] - 2)
    return jnp.concatenate([last, second_last, gene_max, gene_mean], axis=-1)
