"""scFoundation (xTrimoGene "MaeAutobin") in Flax NNX, exact to the released PyTorch code.

The model (SPEC.md I.4): an auto-discretisation value embedding plus a learned gene table; a
post-norm ReLU transformer encoder over the expressed, unmasked genes only (padded to a bucket
length, key padding by per-cell lengths); the encoder outputs scattered back to their gene
positions over the full sequence (num_genes genes, then the depth tokens T and S), the gene table
added a second time, `decoder_embed`; a pre-norm performer decoder with exact GELU; two final
LayerNorms; the expression head.

Also here, on the device and jit-able with fixed shapes, the input functions that turn the data
pipeline's sparse batches (`gene_ids` [B, K] padded with -1, raw `counts` [B, K], `total_counts`
[B], `num_nonzero` [B]) into model inputs: `inference_inputs` (normalisation and the T/S tokens of
`get_embedding.py`) and `pretraining_inputs` (read-depth-aware downsampling and masking), and the
masked-MSE `pretraining_loss` the train loop differentiates.
"""
import re

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from scfm_jax.models import layers
from scfm_jax.models.performer import (FeedForward, PerformerLayer, SelfAttention, dropout,
                                       redraw_features)

__all__ = ["ScFoundation", "inference_inputs", "pretraining_inputs", "pretraining_loss",
           "pool_cell_embeddings", "inputs_from_dense_values", "masked_mse", "redraw_features",
           "depth_tokens"]

NORMALIZATION_TARGET = 1e4  # get_embedding.py: log1p(x / total * 1e4)
OUTPUTS = ("expression", "embedding")


def _torch_linear_init():
    """uniform(+-1/sqrt(fan_in)), the scale of torch.nn.Linear's default init."""
    return nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class AutoDiscretizationEmbedding(nnx.Module):
    """Scalar expression value -> soft mixture of `bin_num` learned bin vectors.

    Exact input values `mask_value` / `pad_value` select their own vectors instead.
    """

    def __init__(self, width: int, bin_num: int, *, bin_alpha: float, mask_value: float,
                 pad_value: float, dtype=jnp.float32, rngs: nnx.Rngs):
        self.bin_alpha, self.mask_value, self.pad_value, self.dtype = (
            bin_alpha, mask_value, pad_value, dtype)
        self.mlp = nnx.Linear(1, bin_num, rngs=rngs, dtype=jnp.float32,
                              kernel_init=nnx.with_partitioning(_torch_linear_init(), (None, "bins")),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("bins",)))
        self.mlp2 = nnx.Linear(bin_num, bin_num, rngs=rngs, dtype=jnp.float32,
                               kernel_init=nnx.with_partitioning(_torch_linear_init(), ("bins", None)),
                               bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                                               (None,)))
        normal = nnx.initializers.normal(1.0)  # torch.nn.Embedding's N(0, 1)
        self.emb = nnx.Param(normal(rngs.params(), (bin_num, width)),
                             out_sharding=("bins", layers.EMBED))
        self.emb_mask = nnx.Param(normal(rngs.params(), (1, width)), out_sharding=(None, layers.EMBED))
        self.emb_pad = nnx.Param(normal(rngs.params(), (1, width)), out_sharding=(None, layers.EMBED))

    def __call__(self, values: jax.Array) -> jax.Array:
        values = values.astype(jnp.float32)
        hidden = jax.nn.leaky_relu(self.mlp(values[..., None]), negative_slope=0.1)
        weights = jax.nn.softmax(self.bin_alpha * hidden + self.mlp2(hidden), axis=-1)
        embedded = jnp.einsum("...k,kd->...d", weights.astype(self.dtype),
                              self.emb.get_value().astype(self.dtype))
        embedded = jnp.where((values == self.mask_value)[..., None],
                             self.emb_mask.get_value()[0].astype(self.dtype), embedded)
        return jnp.where((values == self.pad_value)[..., None],
                         self.emb_pad.get_value()[0].astype(self.dtype), embedded)


class EncoderLayer(nnx.Module):
    """torch.nn.TransformerEncoderLayer, post-norm, ReLU: LN(x + MHA(x)), LN(x + FF(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, dropout_rate: float, dtype,
                 rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"encoder.width {width} is not divisible by encoder.heads {heads}")
        self.dropout_rate = dropout_rate
        self.attention = SelfAttention(width, heads, width // heads, attention="dot_product",
                                       dtype=dtype, rngs=rngs)
        self.norm1 = layers.layer_norm(width, dtype=dtype, rngs=rngs)
        self.feed_forward = FeedForward(width, mlp_dim, jax.nn.relu, dtype=dtype, rngs=rngs)
        self.norm2 = layers.layer_norm(width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, lengths: jax.Array,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        keys = (jax.random.split(dropout_key, 4) if dropout_key is not None and self.dropout_rate > 0
                else (None,) * 4)
        attended = self.attention(x, key_lengths=lengths, dropout_rate=self.dropout_rate,
                                  dropout_key=keys[3])
        if keys[0] is not None:
            attended = dropout(attended, self.dropout_rate, keys[0])
        x = self.norm1(x + attended)
        fed = self.feed_forward(x, dropout_rate=self.dropout_rate, dropout_key=keys[1])
        if keys[2] is not None:
            fed = dropout(fed, self.dropout_rate, keys[2])
        x = self.norm2(x + fed)
        return layers.constrain(x, (layers.BATCH, layers.LENGTH, layers.EMBED))


class ScFoundation(nnx.Module):
    """xTrimoGene / MaeAutobin built from `config.model` (see configs/scfoundation_tiny.py)."""

    def __init__(self, model_config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        config = model_config
        if config.num_genes <= 0:
            raise ValueError(f"model.num_genes must be set (> 0) before building the model, got "
                             f"{config.num_genes}; it is the vocabulary size (19264 for the "
                             "released scFoundation)")
        self.num_genes = int(config.num_genes)
        self.seq_len = self.num_genes + 2          # genes, then T, then S
        self.mask_value, self.pad_value = float(config.mask_value), float(config.pad_value)
        self.remat_policy = layers.check_remat_policy(config.remat_policy)
        self.dtype = dtype = jnp.dtype(config.dtype)
        enc, dec = config.encoder, config.decoder
        self.encoder_dropout = float(enc.dropout)
        self.token_emb = AutoDiscretizationEmbedding(
            enc.width, config.bin_num, bin_alpha=config.bin_alpha, mask_value=self.mask_value,
            pad_value=self.pad_value, dtype=dtype, rngs=rngs)
        # seq_len + 1 rows: the last one is the padding gene id of the original
        self.pos_emb = nnx.Embed(
            self.seq_len + 1, enc.width, dtype=dtype, rngs=rngs,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0),
                                                 (layers.GENES, layers.EMBED)))
        self.encoder_layers = nnx.List([
            EncoderLayer(enc.width, enc.heads, enc.mlp_dim, dropout_rate=self.encoder_dropout,
                         dtype=dtype, rngs=rngs) for _ in range(enc.depth)])
        self.encoder_norm = layers.layer_norm(enc.width, dtype=dtype, rngs=rngs)
        self.decoder_embed = nnx.Linear(
            enc.width, dec.width, dtype=dtype, rngs=rngs,
            kernel_init=nnx.with_partitioning(_torch_linear_init(), (layers.EMBED, None)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)))
        self.decoder_layers = nnx.List([
            PerformerLayer(dec.width, dec.heads, dec.head_dim, dec.mlp_dim,
                           attention=dec.attention, num_features=dec.num_features,
                           stabilizer_scope=dec.stabilizer_scope, chunk_size=dec.chunk_size,
                           dtype=dtype, rngs=rngs) for _ in range(dec.depth)])
        self.decoder_norm = layers.layer_norm(dec.width, dtype=dtype, rngs=rngs)
        self.norm = layers.layer_norm(dec.width, dtype=dtype, rngs=rngs)
        self.to_final = nnx.Linear(
            dec.width, 1, dtype=dtype, rngs=rngs,
            kernel_init=nnx.with_partitioning(_torch_linear_init(), (layers.EMBED, None)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)))

    def encode(self, values: jax.Array, gene_ids: jax.Array, padding_mask: jax.Array, *,
               dropout_key: jax.Array | None = None) -> jax.Array:
        """Encoder over left-aligned tokens: values/gene_ids [B, N], padding_mask True at pads.

        Pads must follow the real tokens of each row (as `inference_inputs` lays them out); the
        per-cell length is the number of non-pad entries. Returns [B, N, encoder width].
        """
        lengths = jnp.sum(~padding_mask, axis=-1).astype(jnp.int32)
        gene_ids = jnp.where(padding_mask, self.seq_len, gene_ids)
        x = self.token_emb(values) + self.pos_emb(gene_ids)
        x = layers.constrain(x, (layers.BATCH, layers.LENGTH, layers.EMBED))

        def step(layer, x, index):
            layer_key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            return layer(x, lengths, layer_key), None

        x, _ = layers.apply_layers(self.encoder_layers, x, step, self.remat_policy)
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
        x = self.token_emb(decoder_values)
        targets = jnp.where(padding_mask, self.seq_len, gene_ids)  # out of range: dropped
        rows = jnp.arange(batch)[:, None]
        x = x.at[rows, targets].set(encoded.astype(x.dtype), mode="drop")
        x = x + self.pos_emb(jnp.arange(self.seq_len))[None]
        x = self.decoder_embed(x)
        x = layers.constrain(x, (layers.BATCH, layers.LENGTH, layers.EMBED))
        x, _ = layers.apply_layers(
            self.decoder_layers, x,
            lambda layer, x, _: (layer(x, stabilizer_scope=stabilizer_scope), None),
            self.remat_policy)
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

    def cell_embeddings(self, encoder_values: jax.Array, encoder_gene_ids: jax.Array,
                        encoder_padding_mask: jax.Array, *, pool: str = "all") -> jax.Array:
        """Encoder-only cell embeddings, pooled as get_embedding.py (see pool_cell_embeddings)."""
        encoded = self.encode(encoder_values, encoder_gene_ids, encoder_padding_mask)
        lengths = jnp.sum(~encoder_padding_mask, axis=-1)
        return pool_cell_embeddings(encoded, lengths, pool)


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


# ----------------------------------------------------------------------------------- inputs

_TGTHIGHRES = re.compile(r"^([tfa])(\d+(?:\.\d*)?|\.\d+)$")


def parse_tgthighres(tgthighres: str) -> tuple[str, float]:
    """`t4` -> ("t", 4.0); the prefixes of get_embedding.py: t (target), f (fold), a (addition)."""
    match = _TGTHIGHRES.match(tgthighres)
    if not match:
        raise ValueError(f"tgthighres must be t<number>, f<number> or a<number> (e.g. t4, f1, a5), "
                         f"got {tgthighres!r}")
    return match.group(1), float(match.group(2))


def depth_tokens(total: jax.Array, tgthighres: str = "t4", *, log_total: bool = True
                 ) -> tuple[jax.Array, jax.Array]:
    """(T, S) for per-cell totals [B]: S = log10(total); T per `tgthighres`.

    `log_total=False` is the bulk/pre-normalised quirk of the original: T = S = total.
    """
    total = total.astype(jnp.float32)
    if not log_total:
        return total, total
    kind, amount = parse_tgthighres(tgthighres)
    s = jnp.log10(total)
    if kind == "t":
        t = jnp.full_like(s, amount)
    elif kind == "f":
        t = jnp.log10(total * amount)
    else:
        t = s + amount
    return t, s


def _normalize(counts: jax.Array, total: jax.Array) -> jax.Array:
    return jnp.log1p(counts / total[:, None] * NORMALIZATION_TARGET)


def _encoder_tokens(values, gene_ids, keep, *, seq_len: int, pad_value: float):
    """Left-compact the kept entries of [B, N] in order; pads get `pad_value` / gene `seq_len`."""
    batch, width = values.shape
    slots = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, width)
    rows = jnp.arange(batch)[:, None]
    enc_values = jnp.full((batch, width), pad_value, jnp.float32).at[rows, slots].set(
        values, mode="drop")
    enc_ids = jnp.full((batch, width), seq_len, jnp.int32).at[rows, slots].set(
        gene_ids.astype(jnp.int32), mode="drop")
    lengths = jnp.sum(keep, axis=1).astype(jnp.int32)
    padding = jnp.arange(width)[None, :] >= lengths[:, None]
    return enc_values, enc_ids, padding, lengths


def _dense(gene_ids, values, *, seq_len: int) -> jax.Array:
    """Scatter sparse [B, K] values (gene id -1: pad) into [B, seq_len]."""
    batch = gene_ids.shape[0]
    targets = jnp.where(gene_ids >= 0, gene_ids, seq_len)
    return jnp.zeros((batch, seq_len), jnp.float32).at[
        jnp.arange(batch)[:, None], targets].set(values, mode="drop")


def _assemble(gene_ids, gene_values, encoder_keep, t, s, *, num_genes: int, pad_value: float,
              decoder_values=None) -> dict[str, jax.Array]:
    """Encoder tokens = kept genes then T, S (each only when > 0, as the original's value > 0)."""
    seq_len = num_genes + 2
    batch = gene_ids.shape[0]
    values = jnp.concatenate([gene_values, t[:, None], s[:, None]], axis=1)
    ids = jnp.concatenate([jnp.where(gene_ids >= 0, gene_ids, seq_len).astype(jnp.int32),
                           jnp.full((batch, 1), num_genes, jnp.int32),
                           jnp.full((batch, 1), num_genes + 1, jnp.int32)], axis=1)
    keep = jnp.concatenate([encoder_keep, t[:, None] > 0, s[:, None] > 0], axis=1)
    enc_values, enc_ids, padding, lengths = _encoder_tokens(values, ids, keep, seq_len=seq_len,
                                                            pad_value=pad_value)
    if decoder_values is None:
        decoder_values = _dense(gene_ids, gene_values, seq_len=seq_len)
    decoder_values = decoder_values.at[:, num_genes].set(t).at[:, num_genes + 1].set(s)
    return dict(encoder_values=enc_values, encoder_gene_ids=enc_ids, encoder_padding_mask=padding,
                encoder_lengths=lengths, decoder_values=decoder_values)


def inference_inputs(batch, *, num_genes: int, tgthighres: str = "t4", normalize: bool = True,
                     log_total: bool = True, pad_value: float = 103.0) -> dict[str, jax.Array]:
    """Model inputs of get_embedding.py from a sparse batch (jit-able, fixed shapes).

    `batch`: `gene_ids` [B, K] (pad -1), `counts` [B, K], `total_counts` [B]. With `normalize`,
    gene values are log1p(counts / total * 1e4) (pre_normalized F); otherwise `counts` are taken as
    already-normalised values. T and S come from `total_counts` (see `depth_tokens`).
    Returns `encoder_values/gene_ids/padding_mask/lengths` [B, K + 2] and `decoder_values`
    [B, num_genes + 2].
    """
    gene_ids = jnp.asarray(batch["gene_ids"])
    valid = gene_ids >= 0
    counts = jnp.where(valid, jnp.asarray(batch["counts"], jnp.float32), 0.0)
    total = jnp.asarray(batch["total_counts"], jnp.float32)
    values = _normalize(counts, total) if normalize else counts
    values = jnp.where(valid, values, 0.0)
    t, s = depth_tokens(total, tgthighres, log_total=log_total)
    return _assemble(gene_ids, values, valid & (values > 0), t, s, num_genes=num_genes,
                     pad_value=pad_value)


def inputs_from_dense_values(values: jax.Array, *, num_genes: int, mask_value: float = 102.0,
                             pad_value: float = 103.0) -> dict[str, jax.Array]:
    """Model inputs from full decoder values [B, num_genes + 2] (T, S last, masks = mask_value).

    The encoder gets the positions that are > 0 and not masked, in order (the original's
    `encoder_labels`), padded to num_genes + 2.
    """
    values = jnp.asarray(values, jnp.float32)
    batch, seq_len = values.shape
    if seq_len != num_genes + 2:
        raise ValueError(f"values have {seq_len} positions, expected num_genes + 2 = {num_genes + 2}")
    keep = (values > 0) & (values != mask_value)
    ids = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), values.shape)
    enc_values, enc_ids, padding, lengths = _encoder_tokens(values, ids, keep, seq_len=seq_len,
                                                            pad_value=pad_value)
    return dict(encoder_values=enc_values, encoder_gene_ids=enc_ids, encoder_padding_mask=padding,
                encoder_lengths=lengths, decoder_values=values)


def pretraining_inputs(batch, key: jax.Array, *, num_genes: int,
                       objective: ml_collections.ConfigDict, mask_value: float = 102.0,
                       pad_value: float = 103.0):
    """Read-depth-aware downsampling and masking (SPEC.md I.3) on the device.

    A fraction `objective.downsample_fraction` of the cells whose total is at least
    `downsample_min_total` is binomially thinned, each count kept with a probability drawn
    uniformly in [downsample_rate_low, downsample_rate_high] per cell. The thinned total adds the
    expected thinned share of the counts the sparse row does not carry (cells subsampled to
    `data.max_nonzero` genes). T = log10(original total), S = log10(thinned total). Then
    `value_mask_prob` of the non-zero genes and `zero_mask_prob` of the zero genes (T and S never)
    are masked independently per position: value `mask_value` in the decoder, absent from the
    encoder. Targets: the normalised values of the original cell.

    Returns (model inputs as `inference_inputs`, targets [B, L], loss mask [B, L], thinned [B]).
    """
    seq_len = num_genes + 2
    gene_ids = jnp.asarray(batch["gene_ids"])
    valid = gene_ids >= 0
    counts = jnp.where(valid, jnp.asarray(batch["counts"], jnp.float32), 0.0)
    total = jnp.asarray(batch["total_counts"], jnp.float32)
    cells = total.shape[0]
    select_key, rate_key, thin_key, mask_key = jax.random.split(key, 4)

    thinned_cell = ((total >= objective.downsample_min_total)
                    & (jax.random.uniform(select_key, (cells,)) < objective.downsample_fraction))
    rate = jax.random.uniform(rate_key, (cells,), minval=objective.downsample_rate_low,
                              maxval=objective.downsample_rate_high)
    rate = jnp.where(thinned_cell, rate, 1.0)
    thinned = jax.random.binomial(thin_key, counts, rate[:, None]).astype(jnp.float32)
    thinned = jnp.where(valid, thinned, 0.0)
    unseen = jnp.maximum(total - jnp.sum(counts, axis=1), 0.0)
    thinned_total = jnp.where(thinned_cell, jnp.sum(thinned, axis=1) + rate * unseen, total)

    safe_thinned_total = jnp.where(thinned_total > 0, thinned_total, 1.0)
    input_values = jnp.where(thinned > 0, _normalize(thinned, safe_thinned_total), 0.0)
    target_values = jnp.where(valid & (counts > 0), _normalize(counts, total), 0.0)
    dense_inputs = _dense(gene_ids, input_values, seq_len=seq_len)
    targets = _dense(gene_ids, target_values, seq_len=seq_len)

    is_gene = jnp.arange(seq_len) < num_genes
    draws = jax.random.uniform(mask_key, (cells, seq_len))
    masked = is_gene & jnp.where(dense_inputs > 0, draws < objective.value_mask_prob,
                                 draws < objective.zero_mask_prob)
    decoder_values = jnp.where(masked, mask_value, dense_inputs)
    masked_sparse = jnp.take_along_axis(masked, jnp.where(valid, gene_ids, 0), axis=1)
    t = jnp.log10(total)
    s = jnp.log10(thinned_total)
    inputs = _assemble(gene_ids, input_values, valid & (input_values > 0) & ~masked_sparse, t, s,
                       num_genes=num_genes, pad_value=pad_value, decoder_values=decoder_values)
    targets = targets.at[:, num_genes].set(t).at[:, num_genes + 1].set(s)
    return inputs, targets, masked, thinned_cell


def masked_mse(predictions: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared error over the masked positions of the whole batch (0 when none)."""
    mask = mask.astype(jnp.float32)
    errors = jnp.square(predictions.astype(jnp.float32) - targets.astype(jnp.float32)) * mask
    return jnp.sum(errors) / jnp.maximum(jnp.sum(mask), 1.0)


def pretraining_loss(model: ScFoundation, batch, key: jax.Array,
                     objective_config: ml_collections.ConfigDict):
    """Masked-regression loss of a pipeline batch and its metrics (scalars).

    Draws everything (downsampling, masks, encoder dropout) from `key`.
    """
    input_key, dropout_key = jax.random.split(key)
    inputs, targets, mask, thinned = pretraining_inputs(
        batch, input_key, num_genes=model.num_genes, objective=objective_config,
        mask_value=model.mask_value, pad_value=model.pad_value)
    predictions = model(inputs["encoder_values"], inputs["encoder_gene_ids"],
                        inputs["encoder_padding_mask"], inputs["decoder_values"],
                        output="expression",
                        dropout_key=dropout_key if model.encoder_dropout > 0 else None)
    loss = masked_mse(predictions, targets, mask)
    nonzero = mask & (targets > 0)
    metrics = {
        "loss": loss,
        "masked_positions": jnp.sum(mask).astype(jnp.float32),
        "mse_nonzero_targets": masked_mse(predictions, targets, nonzero),
        "mse_zero_targets": masked_mse(predictions, targets, mask & ~nonzero),
        "downsampled_cells": jnp.mean(thinned.astype(jnp.float32)),
        "encoder_tokens": jnp.mean(inputs["encoder_lengths"].astype(jnp.float32)),
    }
    return loss, metrics
