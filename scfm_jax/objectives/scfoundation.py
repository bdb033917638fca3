"""scFoundation's inputs and pretraining objective, on the device and jit-able with fixed shapes.

The data pipeline's sparse batches (`gene_ids` [B, K] padded with -1, raw `counts` [B, K],
`total_counts` [B], `num_nonzero` [B]) become model inputs here: `inference_inputs` (normalisation
and the T/S tokens of `get_embedding.py`) and `pretraining_inputs` (read-depth-aware downsampling
and masking); `pretraining_loss` is the masked MSE the train loop differentiates, `embed_cells` the
cell embedding, and `OBJECTIVE` what training, the plan and inference need from scFoundation.
"""
import re

import jax
import jax.numpy as jnp
import ml_collections

from scfm_jax.errors import CheckpointError, UsageError
from scfm_jax.data.vocabulary import Vocabulary, load_vocabulary
from scfm_jax.models import performer
from scfm_jax.models.scfoundation import ScFoundation, pool_cell_embeddings
from scfm_jax.objectives.objective import Objective, OfficialCheckpoint, OfficialModel

NORMALIZATION_TARGET = 1e4  # get_embedding.py: log1p(x / total * 1e4)

_TGTHIGHRES = re.compile(r"^([tfa])(\d+(?:\.\d*)?|\.\d+)$")


def parse_tgthighres(tgthighres: str) -> tuple[str, float]:
    """`t4` -> ("t", 4.0); the prefixes of get_embedding.py: t (target), f (fold), a (addition)."""
    match = _TGTHIGHRES.match(tgthighres)
    if not match:
        raise UsageError(f"tgthighres must be t<number>, f<number> or a<number> (e.g. t4, f1, a5), "
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


def resolve_config(config: ml_collections.ConfigDict, store) -> ml_collections.ConfigDict:
    """A copy of the config whose `model.num_genes` is the store's vocabulary size (-1) or checked
    against it."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.model.num_genes in (-1, None):
        config.model.num_genes = len(store.vocabulary)
    elif config.model.num_genes != len(store.vocabulary):
        raise UsageError(
            f"config.model.num_genes={config.model.num_genes} but the store {config.data.store} "
            f"has a {len(store.vocabulary)}-gene vocabulary ({store.vocabulary.name}); set "
            f"--config.model.num_genes=-1 to take the store's")
    return config


def redraw_interval(model_config) -> int:
    """Train steps between redraws of the performer's random features (0: never)."""
    decoder = model_config.decoder
    if decoder.get("attention") != "performer":
        return 0
    return int(decoder.get("redraw_interval", 0))


def plan_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config as a plan compiles it: only `model.num_genes` comes from a store, and a plan needs
    it set."""
    if config.model.get("num_genes") in (-1, None):
        raise UsageError("config.model.num_genes is -1 (taken from a store): pass "
                         "--config.model.num_genes=N (19264 for the released vocabulary)")
    return ml_collections.ConfigDict(config.to_dict())


def embed_cells(model: ScFoundation, batch, objective_config=None) -> jax.Array:
    """Cell embeddings [B, 4 * width] of a pipeline batch as get_embedding.py computes them (raw
    counts normalised, T = 4, S = log10 of the total; pooling `all`)."""
    inputs = inference_inputs(batch, num_genes=model.num_genes, pad_value=model.pad_value)
    encoded = model.encode(inputs["encoder_values"], inputs["encoder_gene_ids"],
                           inputs["encoder_padding_mask"])
    return pool_cell_embeddings(encoded, inputs["encoder_lengths"])


OFFICIAL_GENES = 19264   # genes of the released checkpoints (the "scfoundation" vocabulary)


def official_vocabulary(vocabulary, num_genes: int, path) -> Vocabulary:
    """The gene vocabulary of an official checkpoint of `num_genes` genes: `vocabulary` (a
    Vocabulary, a name or a file), by default the released 19,264-gene list."""
    if vocabulary is None:
        if num_genes != OFFICIAL_GENES:
            raise CheckpointError(f"{path} has {num_genes} genes, not the released {OFFICIAL_GENES}; "
                                  "pass the vocabulary it was trained with: "
                                  "load(path, vocabulary='genes.tsv')")
        vocabulary = "scfoundation"
    if not isinstance(vocabulary, Vocabulary):
        vocabulary = load_vocabulary(vocabulary)
    if len(vocabulary) != num_genes:
        raise CheckpointError(f"vocabulary {vocabulary.name!r} has {len(vocabulary)} genes but the "
                              f"checkpoint's model has {num_genes} ({path}); pass the vocabulary "
                              "the checkpoint was trained with (a gene_name<TAB>index file)")
    return vocabulary


def load_official(path, *, key: str | None = None, vocabulary=None) -> OfficialModel:
    """One weight set (`key`: cell, the default, gene or rde) of an official `models.ckpt`."""
    from scfm_jax.interop.scfoundation_torch import load_official_checkpoint

    key = key or "cell"
    model_config, model = load_official_checkpoint(path, key)
    return OfficialModel(model_config, model, official_vocabulary(vocabulary, model.num_genes, path),
                         weight_set=key)


OFFICIAL_CHECKPOINT = OfficialCheckpoint(
    description="an official scFoundation checkpoint (keys gene/cell/rde)",
    recognises=lambda keys: bool(keys & {"gene", "cell", "rde"}) or {"config", "state_dict"} <= keys,
    load=load_official)

OBJECTIVE = Objective(
    name="scfoundation", build_model=ScFoundation, loss=pretraining_loss,
    resolve_config=resolve_config, weight_metric="masked_positions",
    refresh_buffers=performer.redraw_features, refresh_interval=redraw_interval,
    plan_config=plan_config, embed=embed_cells, embedding_key="X_scfoundation",
    official_checkpoint=OFFICIAL_CHECKPOINT)
