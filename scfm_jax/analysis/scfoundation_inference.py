"""Batched scFoundation inference over a cell-by-gene matrix already on the model's vocabulary.

The batched equivalent of the official `get_embedding.py`: cell embeddings (encoder only, pooled),
gene embeddings (decoder output without the head) and predicted expression (with the head), with
the same input conventions (`pre_normalized` F/T/A, `input_type` singlecell/bulk, `tgthighres`).

Cells are grouped by their number of expressed genes into padded length buckets (see
`host_ops.bucket_length`), so the model compiles once per bucket length whatever the cells; a short
last batch of a bucket is filled with copies of its last cell (results dropped), which keeps one
shape per bucket and leaves the batch-wide key stabiliser unchanged (a max is blind to
duplicates). Normalisation and the T/S tokens are computed on the device by
`objectives.scfoundation.inference_inputs`.
"""
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from flax import nnx
from tqdm.auto import tqdm

from scfm_jax.data.host_ops import (COUNT_TOLERANCE, bucket_length, first_non_count,
                                   non_count_positions, padded_csr_rows)
from scfm_jax.errors import InputError, UsageError
from scfm_jax.models.scfoundation import ScFoundation, pool_cell_embeddings
from scfm_jax.objectives.scfoundation import inference_inputs

PRE_NORMALIZED = ("F", "T", "A")
INPUT_TYPES = ("singlecell", "bulk")


def _as_csr(matrix) -> sp.csr_matrix:
    csr = sp.csr_matrix(matrix, dtype=np.float64) if not sp.issparse(matrix) else (
        matrix.tocsr().astype(np.float64))
    csr.eliminate_zeros()
    csr.sort_indices()
    return csr


def _cell_name(cell_names, index: int) -> str:
    return f"cell {index}" + (f" ({cell_names[index]!r})" if cell_names is not None else "")


def _check_counts(csr: sp.csr_matrix, cell_names) -> None:
    first = first_non_count(csr, COUNT_TOLERANCE)
    if first is not None:
        row, position = first
        raise InputError(
            f"pre_normalized='F' expects raw counts, but {_cell_name(cell_names, row)} has "
            f"{csr.data[position]!r} at vocabulary gene {int(csr.indices[position])} "
            f"({len(non_count_positions(csr.data, COUNT_TOLERANCE))} non-count values in all). Give "
            "raw counts, or pre_normalized='T' for log1p-normalised values ('A': normalised values "
            "plus a last column with the raw total count).")


def prepare(counts, num_genes: int, *, pre_normalized: str = "F", input_type: str = "singlecell",
            cell_names: Sequence[str] | None = None) -> tuple[sp.csr_matrix, np.ndarray, dict]:
    """(gene values as CSR [cells, num_genes], per-cell totals, `inference_inputs` options).

    Host-side part of get_embedding.py's input handling (SPEC.md I.2): which matrix the values
    come from and which total feeds S (and T); normalisation itself happens on the device.
    """
    if pre_normalized not in PRE_NORMALIZED:
        raise UsageError(f"pre_normalized must be one of {PRE_NORMALIZED}, got {pre_normalized!r}")
    if input_type not in INPUT_TYPES:
        raise UsageError(f"input_type must be one of {INPUT_TYPES}, got {input_type!r}")
    csr = _as_csr(counts)
    expected = num_genes + (1 if pre_normalized == "A" else 0)
    if csr.shape[1] != expected:
        extra = " plus the total-count column of pre_normalized='A'" if pre_normalized == "A" else ""
        raise InputError(f"the matrix has {csr.shape[1]} gene columns but the model's vocabulary "
                         f"has {num_genes}{extra}; align the genes to the vocabulary first "
                         "(scfm_jax.data.vocabulary.align_genes)")
    if pre_normalized == "A":
        totals = csr[:, -1].toarray().ravel()
        csr = _as_csr(csr[:, :-1])
    else:
        totals = np.asarray(csr.sum(axis=1), np.float64).ravel()
    options = dict(normalize=False, log_total=True, tgthighres=None)
    if input_type == "singlecell":
        if pre_normalized == "F":
            _check_counts(csr, cell_names)
            options["normalize"] = True
    elif pre_normalized == "F":
        if np.any(csr.data < 0):
            raise InputError("input_type='bulk' with pre_normalized='F' expects non-negative "
                             "expression (counts or TPM-like values); found negative values")
        # scanpy's normalize_total default: scale every cell to the median total, then log1p;
        # T = S = log10 of the sum of the log-normalised row.
        positive = totals[totals > 0]
        target = np.median(positive) if len(positive) else 1.0
        scale = np.divide(target, totals, out=np.zeros_like(totals), where=totals > 0)
        csr = _as_csr(sp.diags(scale) @ csr)
        csr.data = np.log1p(csr.data)
        totals = np.asarray(csr.sum(axis=1), np.float64).ravel()
        options["tgthighres"] = "f1"
    else:
        options.update(log_total=False, tgthighres="t0")  # T = S = the row sum, no log
    empty = np.flatnonzero(np.diff(csr.indptr) == 0)
    if len(empty):
        raise InputError(f"{_cell_name(cell_names, int(empty[0]))} has no expressed vocabulary "
                         f"gene ({len(empty)} such cells); remove them before embedding")
    if input_type == "singlecell" and np.any(totals <= 0):
        bad = int(np.flatnonzero(totals <= 0)[0])
        raise InputError(f"{_cell_name(cell_names, bad)} has total {totals[bad]} <= 0; S = "
                         "log10(total) needs a positive total")
    return csr, totals, options


def _batches(csr: sp.csr_matrix, num_genes: int, batch_size: int, single_bucket: bool):
    """Yield (cell indices, padded sparse batch) grouped by bucket length."""
    lengths = np.diff(csr.indptr)
    if single_bucket:
        groups = {bucket_length(int(lengths.max()), num_genes): np.arange(csr.shape[0])}
    else:
        buckets = np.array([bucket_length(int(n), num_genes) for n in lengths])
        groups = {int(b): np.flatnonzero(buckets == b) for b in np.unique(buckets)}
    for width, cells in sorted(groups.items()):
        for start in range(0, len(cells), batch_size):
            chosen = cells[start:start + batch_size]
            padded = np.concatenate([chosen, np.full(batch_size - len(chosen), chosen[-1])])
            gene_ids, values = padded_csr_rows(csr, padded, width)
            yield chosen, {"gene_ids": gene_ids, "counts": values}, padded


def _num_batches(csr, num_genes, batch_size, single_bucket) -> int:
    lengths = np.diff(csr.indptr)
    if single_bucket:
        return -(-csr.shape[0] // batch_size)
    buckets = np.array([bucket_length(int(n), num_genes) for n in lengths])
    return sum(-(-int(np.sum(buckets == b)) // batch_size) for b in np.unique(buckets))


def cell_forward(model: ScFoundation, batch, *, tgthighres, normalize, log_total, pool):
    """Pooled encoder embeddings of a padded batch (traced; the one cell-embedding forward)."""
    inputs = inference_inputs(batch, num_genes=model.num_genes, tgthighres=tgthighres,
                              normalize=normalize, log_total=log_total, pad_value=model.pad_value)
    encoded = model.encode(inputs["encoder_values"], inputs["encoder_gene_ids"],
                           inputs["encoder_padding_mask"])
    return pool_cell_embeddings(encoded, inputs["encoder_lengths"], pool)


@functools.partial(jax.jit, static_argnames=("graphdef", "output", "num_genes", "tgthighres",
                                             "normalize", "log_total", "pool", "stabilizer_scope"))
def _forward(graphdef, state, batch, *, output, num_genes, tgthighres, normalize, log_total, pool,
             stabilizer_scope):
    model = nnx.merge(graphdef, state)
    if output == "cell":
        return cell_forward(model, batch, tgthighres=tgthighres, normalize=normalize,
                            log_total=log_total, pool=pool)
    inputs = inference_inputs(batch, num_genes=num_genes, tgthighres=tgthighres,
                              normalize=normalize, log_total=log_total, pad_value=model.pad_value)
    result = model(inputs["encoder_values"], inputs["encoder_gene_ids"],
                   inputs["encoder_padding_mask"], inputs["decoder_values"],
                   output="embedding" if output == "gene" else "expression",
                   stabilizer_scope=stabilizer_scope)
    return result[:, :num_genes].astype(jnp.float32)


def _run(model: ScFoundation, counts, *, output: str, tgthighres: str, pool: str = "all",
         pre_normalized: str, input_type: str, batch_size: int, stabilizer_scope=None, out=None,
         cell_names=None, progress: bool = True, description: str = ""):
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    num_genes = model.num_genes
    csr, totals, options = prepare(counts, num_genes, pre_normalized=pre_normalized,
                                   input_type=input_type, cell_names=cell_names)
    tgthighres = options.pop("tgthighres") or tgthighres
    graphdef, state = nnx.split(model)
    single_bucket = stabilizer_scope == "batch"
    total_batches = _num_batches(csr, num_genes, batch_size, single_bucket)
    for chosen, batch, padded in tqdm(_batches(csr, num_genes, batch_size, single_bucket),
                                      total=total_batches, desc=description, disable=not progress,
                                      unit="batch"):
        batch["total_counts"] = totals[padded].astype(np.float32)
        result = np.asarray(_forward(graphdef, state, batch, output=output, num_genes=num_genes,
                                     tgthighres=tgthighres, pool=pool,
                                     stabilizer_scope=stabilizer_scope, **options))
        if out is None:
            out = np.zeros((csr.shape[0],) + result.shape[1:], np.float32)
        order = np.argsort(chosen)
        rows, values = chosen[order], result[:len(chosen)][order]
        if hasattr(out, "oindex"):  # zarr: integer rows need orthogonal indexing
            out.oindex[rows] = values
        else:
            out[rows] = values
    return out


def cell_embeddings(model: ScFoundation, counts, *, tgthighres: str = "t4", pool: str = "all",
                    pre_normalized: str = "F", input_type: str = "singlecell",
                    batch_size: int = 16, cell_names=None, progress: bool = True) -> np.ndarray:
    """Encoder cell embeddings [cells, 4 * width] (`pool="all"`) or [cells, width] (`"max"`).

    `counts`: scipy sparse or dense [cells, num_genes] on the model's vocabulary.
    """
    if pool not in ("all", "max"):
        raise UsageError(f"pool must be 'all' or 'max', got {pool!r}")
    return _run(model, counts, output="cell", tgthighres=tgthighres, pool=pool,
                pre_normalized=pre_normalized, input_type=input_type, batch_size=batch_size,
                cell_names=cell_names, progress=progress, description="cell embeddings")


def gene_embeddings(model: ScFoundation, counts, *, tgthighres: str = "t4",
                    pre_normalized: str = "F", input_type: str = "singlecell",
                    batch_size: int = 4, stabilizer_scope: str | None = None, out=None,
                    cell_names=None, progress: bool = True):
    """Decoder gene embeddings [cells, num_genes, decoder width].

    `stabilizer_scope="batch"` is the official `gene_batch`: all cells padded to one length and
    the key stabiliser spans each batch of `batch_size` cells (pass batch_size >= cells for one
    batch). `out`: an array-like to write into batch by batch (e.g. a zarr array), returned.
    """
    return _run(model, counts, output="gene", tgthighres=tgthighres,
                pre_normalized=pre_normalized, input_type=input_type, batch_size=batch_size,
                stabilizer_scope=stabilizer_scope, out=out, cell_names=cell_names,
                progress=progress, description="gene embeddings")


def predicted_expression(model: ScFoundation, counts, *, tgthighres: str = "t4",
                         pre_normalized: str = "F", input_type: str = "singlecell",
                         batch_size: int = 4, stabilizer_scope: str | None = None, out=None,
                         cell_names=None, progress: bool = True):
    """Predicted normalised expression [cells, num_genes] (`to_final` output, T/S dropped)."""
    return _run(model, counts, output="expression", tgthighres=tgthighres,
                pre_normalized=pre_normalized, input_type=input_type, batch_size=batch_size,
                stabilizer_scope=stabilizer_scope, out=out, cell_names=cell_names,
                progress=progress, description="predicted expression")


def store_cell_task(model: ScFoundation, vocabulary, store_vocabulary, *, tgthighres: str = "t4",
                    pool: str = "all", pre_normalized: str = "F", min_coverage: float = 0.5):
    """The cell-embedding task of `store_inference.run`: a store's rows (on `store_vocabulary`)
    aligned onto the model's `vocabulary`, bucketed as `cell_embeddings` does, pooled embeddings
    out."""
    from scfm_jax.analysis.store_inference import StoreTask
    from scfm_jax.data.vocabulary import align_genes

    if pool not in ("all", "max"):
        raise ValueError(f"pool must be 'all' or 'max', got {pool!r}")
    if pre_normalized == "A":
        raise ValueError("pre_normalized='A' needs a total-count column, which a store does not "
                         "have; a store holds counts (F) or normalised values (T)")
    num_genes = model.num_genes
    same_genes = tuple(store_vocabulary.symbols) == tuple(vocabulary.symbols)
    alignment = None if same_genes else align_genes(list(store_vocabulary.symbols), vocabulary)
    # what `prepare` decides for single cells: counts (F) are normalised on the device
    options = dict(normalize=pre_normalized == "F", log_total=True)

    def prepare_rows(rows, cells):
        csr = rows.to_csr(len(store_vocabulary))
        if alignment is not None:
            csr = alignment.apply(csr, min_fraction=min_coverage)
        csr, totals, _ = prepare(csr, num_genes, pre_normalized=pre_normalized,
                                 cell_names=[f"store cell {c}" for c in cells])
        items = [(csr.indices[csr.indptr[i]:csr.indptr[i + 1]],
                  csr.data[csr.indptr[i]:csr.indptr[i + 1]], totals[i])
                 for i in range(csr.shape[0])]
        return items, [bucket_length(len(genes), num_genes) for genes, _, _ in items]

    def batch(items, width):
        gene_ids = np.full((len(items), width), -1, np.int32)
        counts = np.zeros((len(items), width), np.float32)
        for row, (genes, values, _) in enumerate(items):
            gene_ids[row, :len(genes)] = genes
            counts[row, :len(genes)] = values
        totals = np.array([total for _, _, total in items], np.float32)
        return {"gene_ids": gene_ids, "counts": counts, "total_counts": totals}

    def forward(model, batch):
        return {"embedding": cell_forward(model, batch, tgthighres=tgthighres, pool=pool,
                                          **options)}

    dims = _cell_embedding_width(model, pool)
    widths = sorted({bucket_length(n, num_genes) for n in range(1, num_genes + 1)})
    return StoreTask(
        name="embed", model=model, arrays={"embedding": ((dims,), "float32")}, widths=widths,
        prepare=prepare_rows, batch=batch, dummy=lambda width: (np.zeros(1, np.int32),
                                                                 np.ones(1, np.float32), 1.0),
        forward=forward, finish=lambda items, out: out,
        attributes={"obsm_key": "X_scfoundation"})


def _cell_embedding_width(model: ScFoundation, pool: str) -> int:
    probe = jax.eval_shape(lambda m: cell_forward(
        m, {"gene_ids": jnp.zeros((1, 32), jnp.int32), "counts": jnp.ones((1, 32)),
            "total_counts": jnp.ones((1,))}, tgthighres="t4", normalize=True, log_total=True,
        pool=pool), model)
    return int(probe.shape[-1])
