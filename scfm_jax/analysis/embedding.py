"""scFoundation on AnnData: cell embeddings, gene embeddings and read-depth enhancement.

Thin AnnData wrappers over `scfoundation_inference` (batched, length-bucketed forwards): they pick
the count matrix (`X`, a layer, or `raw`), align its genes onto the model's vocabulary with the
vocabulary module (coverage report printed and kept in `uns`), refuse values that are not counts
where counts are expected, and write the results back in the scverse way (`obsm`, `varm`, `layers`).
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from flax import nnx
from tqdm.auto import tqdm

from scfm_jax.analysis import scfoundation_inference as inference
from scfm_jax.analysis.loading import LoadedModel
from scfm_jax.analysis.output_checks import require_finite
from scfm_jax.data.host_ops import (COUNT_TOLERANCE, bucket_length, non_count_positions,
                                   padded_csr_rows, require_float32_exact_counts)
from scfm_jax.data.vocabulary import GeneAlignment, Vocabulary, align_genes
from scfm_jax.errors import CheckpointError, InputError, MissingInput, UnknownName, UsageError
from scfm_jax.objectives.scfoundation import inference_inputs

def model_and_vocabulary(model, vocabulary: Vocabulary | None):
    if isinstance(model, LoadedModel):
        if model.kind != "scfoundation":
            raise UsageError(f"this function runs scFoundation models; {model.source} holds a "
                             f"{model.kind} model")
        vocabulary = vocabulary or model.vocabulary
        model = model.model
    if vocabulary is None:
        raise UsageError("no gene vocabulary: pass a model from scfm_jax.analysis.load (it carries "
                         "one) or vocabulary=")
    if len(vocabulary) != model.num_genes:
        raise UsageError(f"vocabulary {vocabulary.name!r} has {len(vocabulary)} genes but the model "
                         f"has {model.num_genes}")
    return model, vocabulary


def matrix_source(adata: anndata.AnnData, layer: str | None):
    """(matrix, var, description) of the values to feed: X, a layer, or raw ('raw')."""
    if layer is None:
        return adata.X, adata.var, "adata.X"
    if layer == "raw":
        if adata.raw is None:
            raise InputError("layer='raw' but adata.raw is None")
        return adata.raw.X, adata.raw.var, "adata.raw.X"
    if layer not in adata.layers:
        raise UnknownName(f"adata has no layer {layer!r} (layers: {list(adata.layers)}; "
                          "'raw' reads adata.raw)")
    return adata.layers[layer], adata.var, f"adata.layers[{layer!r}]"


def _values(matrix) -> np.ndarray:
    return matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()


def _is_counts(matrix) -> bool:
    return not len(non_count_positions(_values(matrix), COUNT_TOLERANCE))


def _candidate_count_sources(adata: anndata.AnnData) -> list[str]:
    names = sorted(adata.layers, key=lambda name: name != "counts")
    found = [f"layer={name!r}" for name in names if _is_counts(adata.layers[name])]
    if adata.raw is not None and _is_counts(adata.raw.X):
        found.append("layer='raw'")
    return found


def require_counts(adata: anndata.AnnData, layer: str | None, matrix, where: str) -> None:
    """Raise ValueError naming where counts are, when `matrix` holds non-count values, or counts
    above 2^24 (the model computes in float32, which would round them)."""
    require_float32_exact_counts(matrix, where, adata.obs_names)
    if _is_counts(matrix):
        return
    values = _values(matrix)
    bad = values[non_count_positions(values, COUNT_TOLERANCE)]
    found = [c for c in _candidate_count_sources(adata) if c != f"layer={layer!r}"]
    advice = (f"pass {' or '.join(found)} (it holds integer counts)" if found else
              "keep the raw counts before normalising (adata.layers['counts'] = adata.X.copy()) and "
              "pass layer='counts'")
    raise InputError(
        f"{where} does not hold raw counts (e.g. {bad[:3].tolist()}; it looks log-normalised), but "
        f"raw counts are expected (they are normalised here): {advice}. For scFoundation, if "
        "these values are log1p(counts / total * 1e4), pass pre_normalized='T' instead.")


def aligned_matrix(adata: anndata.AnnData, vocabulary: Vocabulary, *, layer: str | None = None,
                   gene_column: str | None = None, min_coverage: float = 0.5,
                   counts_expected: bool = True, verbose: bool = True
                   ) -> tuple[sp.csr_matrix, GeneAlignment]:
    """(the chosen matrix as CSR on the vocabulary's genes, the alignment with its report)."""
    matrix, var, where = matrix_source(adata, layer)
    if counts_expected:
        require_counts(adata, layer, matrix, where)
    else:   # aligned in float32 below
        require_float32_exact_counts(matrix, where, adata.obs_names)
    alignment = align_genes(var, vocabulary, gene_column=gene_column)
    aligned = alignment.apply(matrix, min_fraction=min_coverage)
    if verbose:
        print(f"genes: {alignment.report.summary()}", file=sys.stderr)
    return aligned, alignment


def embedding_settings(model, vocabulary, alignment, **options) -> dict:
    """What `adata.uns[key]` records of a result: the options, the model's source, the vocabulary
    and the gene coverage report."""
    source = model.source if isinstance(model, LoadedModel) else type(model).__name__
    settings = dict(options, model=source, vocabulary=vocabulary.name,
                    coverage=alignment.report.summary(),
                    counts_fraction=alignment.report.counts_fraction)
    return {name: value for name, value in settings.items() if value is not None}


def embed_cells(model, adata: anndata.AnnData, *, layer: str | None = None,
                tgthighres: str = "t4", pool: str = "all", key_added: str = "X_scfoundation",
                batch_size: int = 16, pre_normalized: str = "F", input_type: str = "singlecell",
                gene_column: str | None = None, min_coverage: float = 0.5,
                vocabulary: Vocabulary | None = None, progress: bool = True) -> None:
    """Encoder cell embeddings into `adata.obsm[key_added]` ([cells, 4 x width] for pool 'all').

    `layer`: where the raw counts are (None: X; a layer name; 'raw': adata.raw). Genes are matched
    to the vocabulary by symbol or Ensembl ID (`gene_column` picks a var column); fewer than
    `min_coverage` of the counts on vocabulary genes is refused. Cells are batched by their number
    of expressed genes. Settings and the coverage report go to `adata.uns[key_added]`.
    """
    model_, vocabulary = model_and_vocabulary(model, vocabulary)
    if pre_normalized == "A":
        raise UsageError("pre_normalized='A' reads the raw totals from an extra last column, which "
                         "an AnnData's genes do not have; use `scfm-jax embed --pre-normalized A` "
                         "or scfoundation_inference.cell_embeddings on the aligned matrix")
    counts_expected = pre_normalized == "F" and input_type == "singlecell"
    matrix, alignment = aligned_matrix(adata, vocabulary, layer=layer, gene_column=gene_column,
                                       min_coverage=min_coverage, counts_expected=counts_expected,
                                       verbose=progress)
    embeddings = inference.cell_embeddings(
        model_, matrix, tgthighres=tgthighres, pool=pool, pre_normalized=pre_normalized,
        input_type=input_type, batch_size=batch_size, cell_names=list(adata.obs_names),
        progress=progress)
    require_finite(embeddings, adata.obs_names, key_added)
    adata.obsm[key_added] = embeddings
    adata.uns[key_added] = embedding_settings(model, vocabulary, alignment, layer=str(layer),
                                     tgthighres=tgthighres, pool=pool,
                                     pre_normalized=pre_normalized, input_type=input_type)


class _CellSum:
    """An `out` for the inference loop that keeps the sum over cells (and tees to a zarr array)."""

    def __init__(self, per_cell=None):
        self.total = None
        self.cells = 0
        self.per_cell = per_cell

    def __setitem__(self, rows, values):
        if self.per_cell is not None:
            self.per_cell.oindex[rows] = values
        summed = values.sum(axis=0, dtype=np.float64)
        self.total = summed if self.total is None else self.total + summed
        self.cells += len(rows)


def _to_input_genes(per_vocabulary_gene: np.ndarray, alignment: GeneAlignment) -> np.ndarray:
    """Rows per vocabulary gene -> rows per input gene (NaN for genes outside the vocabulary)."""
    positions = alignment.positions
    out = np.full((len(positions),) + per_vocabulary_gene.shape[1:], np.nan, np.float32)
    out[positions >= 0] = per_vocabulary_gene[positions[positions >= 0]]
    return out


def embed_genes(model, adata: anndata.AnnData, *, layer: str | None = None,
                tgthighres: str = "t4", key_added: str = "X_scfoundation",
                zarr_path: str | Path | None = None, batch_size: int = 4,
                pre_normalized: str = "F", input_type: str = "singlecell",
                gene_column: str | None = None, min_coverage: float = 0.5,
                vocabulary: Vocabulary | None = None, progress: bool = True):
    """Context gene embeddings (decoder output per gene), averaged over all cells.

    Writes `adata.varm[key_added]` [input genes, decoder width] (NaN rows for genes outside the
    vocabulary). With `zarr_path`, every cell's embeddings are also streamed to a zarr array
    [cells, vocabulary genes, width] (the vocabulary's symbols and the cell names in its attrs),
    which is returned; memory stays at one batch whatever the number of cells.
    """
    import zarr

    model_, vocabulary = model_and_vocabulary(model, vocabulary)
    counts_expected = pre_normalized == "F" and input_type == "singlecell"
    matrix, alignment = aligned_matrix(adata, vocabulary, layer=layer, gene_column=gene_column,
                                       min_coverage=min_coverage, counts_expected=counts_expected,
                                       verbose=progress)
    width = model_.decoder_norm.num_features
    per_cell = None
    if zarr_path is not None:
        per_cell = zarr.open_array(str(zarr_path), mode="w", dtype="float32",
                                   shape=(adata.n_obs, model_.num_genes, width),
                                   chunks=(1, model_.num_genes, width))
        per_cell.attrs.update(genes=list(vocabulary.symbols), cells=list(map(str, adata.obs_names)),
                              tgthighres=tgthighres)
    accumulator = _CellSum(per_cell)
    inference.gene_embeddings(model_, matrix, tgthighres=tgthighres,
                              pre_normalized=pre_normalized, input_type=input_type,
                              batch_size=batch_size, stabilizer_scope="cell", out=accumulator,
                              cell_names=list(adata.obs_names), progress=progress)
    mean = (accumulator.total / accumulator.cells).astype(np.float32)
    adata.varm[key_added] = _to_input_genes(mean, alignment)
    adata.uns[f"{key_added}_genes"] = embedding_settings(model, vocabulary, alignment, layer=str(layer),
                                                tgthighres=tgthighres, cells=int(adata.n_obs))
    return per_cell


@functools.partial(jax.jit, static_argnames=("graphdef", "tgthighres", "folds"))
def _masked_prediction(graphdef, state, batch, *, tgthighres: str, fold: int, folds: int):
    """Predicted expression with the genes of `fold` masked: absent from the encoder (the batch
    holds only the other genes) and at the mask value in the decoder, as in pretraining."""
    model = nnx.merge(graphdef, state)
    inputs = inference_inputs(batch, num_genes=model.num_genes, tgthighres=tgthighres,
                              pad_value=model.pad_value)
    positions = jnp.arange(model.num_genes + 2)
    in_fold = (positions < model.num_genes) & (positions % folds == fold)
    decoder_values = jnp.where(in_fold[None], model.mask_value, inputs["decoder_values"])
    encoded = model.encode(inputs["encoder_values"], inputs["encoder_gene_ids"],
                           inputs["encoder_padding_mask"])
    predicted = model.decode(encoded, inputs["encoder_gene_ids"], inputs["encoder_padding_mask"],
                             decoder_values, output="expression", stabilizer_scope="cell")
    return predicted[:, :model.num_genes].astype(jnp.float32)


def _masked_expression(model, counts: sp.csr_matrix, *, tgthighres: str, folds: int,
                       batch_size: int, cell_names, progress: bool) -> np.ndarray:
    """Every gene predicted while masked: `folds` passes, fold k masking genes k, k + folds, ..."""
    csr, totals, _ = inference.prepare(counts, model.num_genes, cell_names=cell_names)
    graphdef, state = nnx.split(model)
    out = np.zeros((csr.shape[0], model.num_genes), np.float32)
    fold_of_gene = np.arange(model.num_genes) % folds
    steps = [(fold, start) for fold in range(folds) for start in range(0, csr.shape[0], batch_size)]
    lengths = np.diff(csr.indptr)
    # cells of similar length together, so few padded widths compile
    order = np.argsort(lengths, kind="stable")
    for fold, start in tqdm(steps, desc="enhanced expression", disable=not progress,
                            unit="batch"):
        chosen = order[start:start + batch_size]
        padded = np.concatenate([chosen, np.full(batch_size - len(chosen), chosen[-1])])
        rows = []
        for cell in padded:
            genes = csr.indices[csr.indptr[cell]:csr.indptr[cell + 1]]
            visible = fold_of_gene[genes] != fold
            rows.append((genes[visible], csr.data[csr.indptr[cell]:csr.indptr[cell + 1]][visible]))
        visible_rows = sp.csr_matrix(
            (np.concatenate([data for _, data in rows]), np.concatenate([g for g, _ in rows]),
             np.concatenate([[0], np.cumsum([len(g) for g, _ in rows])])),
            shape=(len(rows), model.num_genes))
        width = bucket_length(max(max(len(g) for g, _ in rows), 1), model.num_genes)
        gene_ids, values = padded_csr_rows(visible_rows, np.arange(len(rows)), width)
        batch = {"gene_ids": gene_ids, "counts": values,
                 "total_counts": totals[padded].astype(np.float32)}
        predicted = np.asarray(_masked_prediction(graphdef, state, batch, tgthighres=tgthighres,
                                                  fold=fold, folds=folds))
        columns = fold_of_gene == fold
        out[np.ix_(chosen, columns)] = predicted[:len(chosen)][:, columns]
    return out


def enhance(model, adata: anndata.AnnData, target: str = "a5", *,
            layer_added: str = "scfoundation_enhanced", layer: str | None = None,
            masked: bool | None = None, folds: int = 4, batch_size: int = 4,
            gene_column: str | None = None, min_coverage: float = 0.5,
            vocabulary: Vocabulary | None = None, progress: bool = True) -> None:
    """Read-depth enhancement: the expression predicted at a higher depth, as `layers[layer_added]`.

    The cell is encoded from its raw counts with the target depth token T = `target` (`a5`:
    log10(total) + 5, the official rde demo; `f5`: five times the observed total; `t4`: 10^4
    counts); the decoder then predicts every gene's normalised expression log1p(count / total *
    1e4) at that depth. The layer has the input's genes (NaN for genes outside the vocabulary).

    `masked=False` is the official `gene_expression` output: one forward with every gene visible.
    A model pretrained here learned to predict masked genes only (the loss covers nothing else), so
    `masked=True` predicts each gene while it is masked: `folds` forwards, each hiding every
    `folds`-th gene from the encoder and giving the decoder the mask value there. Default: False
    for official checkpoints, True for scfm-jax workdirs.
    """
    if masked is None:
        masked = not (isinstance(model, LoadedModel) and model.key is not None)
    model_, vocabulary = model_and_vocabulary(model, vocabulary)
    matrix, alignment = aligned_matrix(adata, vocabulary, layer=layer, gene_column=gene_column,
                                       min_coverage=min_coverage, verbose=progress)
    if masked:
        if folds < 2:
            raise UsageError(f"folds must be >= 2 (each pass masks 1/folds of the genes), got {folds}")
        predicted = _masked_expression(model_, matrix, tgthighres=target, folds=folds,
                                       batch_size=batch_size, cell_names=list(adata.obs_names),
                                       progress=progress)
    else:
        predicted = inference.predicted_expression(
            model_, matrix, tgthighres=target, batch_size=batch_size, stabilizer_scope="cell",
            cell_names=list(adata.obs_names), progress=progress)
    require_finite(predicted, adata.obs_names, layer_added)
    adata.layers[layer_added] = _to_input_genes(predicted.T, alignment).T
    adata.uns[layer_added] = embedding_settings(model, vocabulary, alignment, layer=str(layer),
                                       target=target, masked=masked,
                                       folds=folds if masked else None)


# ------------------------------------------------------------------ files and stores (the CLI's API)

OUTPUT_TYPES = ("cell", "gene", "gene_batch", "gene_expression")
# get_embedding.py's --version: cell embeddings come from `cell`, gene modes from `gene`.
DEFAULT_KEY = {"cell": "cell", "gene": "gene", "gene_batch": "gene", "gene_expression": "gene"}
OBSM_KEY = "X_scfoundation"


def load_scfoundation(checkpoint, *, key: str = "cell", step: int | None = None,
                      vocabulary=None) -> LoadedModel:
    """`load`, refusing anything but an scFoundation model with a pointer to `annotate`."""
    from scfm_jax.analysis.loading import load

    loaded = load(checkpoint, key=key, step=step, vocabulary=vocabulary)
    if loaded.kind != "scfoundation":
        raise CheckpointError(f"--checkpoint {checkpoint} is an scMulan checkpoint; `scfm-jax embed` runs "
                         f"scFoundation models. Use `scfm-jax annotate --checkpoint {checkpoint}` "
                         "for scMulan embeddings and cell types")
    return loaded


def read_cells(path, *, layer: str | None = None, pre_normalized: str = "F"):
    """(AnnData with the matrix to embed in X, the raw totals of `pre_normalized='A'` or None)
    from an h5ad (X, a layer, or 'raw') or a csv with cells as rows, genes as columns."""
    from scfm_jax.data.anndata_io import read_csv_matrix, read_h5ad

    path = Path(path)
    if path.suffix == ".h5ad":
        adata = read_h5ad(path)
        if layer is not None:
            matrix, var, _ = matrix_source(adata, layer)
            adata = anndata.AnnData(matrix, obs=adata.obs, var=var, obsm=dict(adata.obsm),
                                    uns=dict(adata.uns))
    elif path.suffix == ".csv":
        if not path.is_file():
            raise MissingInput(f"--input {path}: no such file")
        adata = read_csv_matrix(path)
    else:
        raise InputError(f"--input {path}: expected a .h5ad or .csv file")
    if adata.n_obs == 0:
        raise InputError(f"--input {path} holds no cells")
    totals = None
    if pre_normalized == "A":
        last = adata.X[:, -1]
        totals = np.asarray(last.toarray() if sp.issparse(last) else last, np.float64).ravel()
        adata = adata[:, :-1].copy()
    return adata, totals


def require_output_suffix(output_type: str, output) -> Path:
    """`output` as a Path, refused unless its suffix is what `output_type` writes."""
    output = Path(output)
    suffix = ".zarr" if output_type in ("gene", "gene_batch") else ".h5ad"
    if output.suffix != suffix:
        what = "a zarr array" if suffix == ".zarr" else "an h5ad file"
        raise UsageError(f"--output-type {output_type} writes {what}; name the output *{suffix} "
                         f"(got {output})")
    return output


def embed_file(model: LoadedModel, adata: anndata.AnnData, output, *, totals=None,
               output_type: str = "cell", pool: str = "all", tgthighres: str = "t4",
               pre_normalized: str = "F", input_type: str = "singlecell",
               batch_size: int | None = None, gene_column: str | None = None,
               min_coverage: float = 0.5, progress: bool = True) -> Path:
    """`get_embedding.py` on a file's cells, written atomically to `output`:
      cell             the cells (h5ad) with obsm["X_scfoundation"]
      gene, gene_batch a zarr array [cells, vocabulary genes, decoder width]; gene_batch runs all
                       cells as one batch (the key stabiliser spans them), as the official tool does
      gene_expression  an h5ad whose X is the predicted expression, var the vocabulary
    """
    import pandas as pd
    import zarr

    from scfm_jax.analysis.output_checks import require_finite_array
    from scfm_jax.data.anndata_io import check_writable, write_h5ad
    from scfm_jax.output_safety import OWNER_KEY, owner_record, staged_output

    output = require_output_suffix(output_type, output)
    if output.suffix == ".h5ad":
        check_writable(adata, output.absolute().parent)
    net, vocabulary = model.model, model.vocabulary
    matrix, _ = aligned_matrix(adata, vocabulary, gene_column=gene_column,
                               min_coverage=min_coverage, counts_expected=False)
    if totals is not None:
        matrix = sp.hstack([matrix, sp.csr_matrix(totals[:, None])], format="csr")
    options = dict(tgthighres=tgthighres, pre_normalized=pre_normalized, input_type=input_type,
                   cell_names=list(adata.obs_names), progress=progress)
    settings = {"checkpoint": model.source, "key": model.key, "output_type": output_type,
                "tgthighres": tgthighres, "pre_normalized": pre_normalized,
                "input_type": input_type, "vocabulary": vocabulary.name}
    settings = {k: v for k, v in settings.items() if v is not None}
    with staged_output(output) as temporary:
        if output_type == "cell":
            embeddings = inference.cell_embeddings(net, matrix, pool=pool,
                                                   batch_size=batch_size or 16, **options)
            require_finite(embeddings, adata.obs_names, f"{OBSM_KEY} of {model.source}")
            adata.obsm[OBSM_KEY] = embeddings
            adata.uns["scfoundation"] = dict(settings, pool=pool)
            adata.uns[OWNER_KEY] = owner_record("embed")
            write_h5ad(adata, temporary)
        elif output_type == "gene_expression":
            predicted = inference.predicted_expression(net, matrix, batch_size=batch_size or 4,
                                                       **options)
            require_finite(predicted, adata.obs_names, f"expression predicted by {model.source}")
            result = anndata.AnnData(predicted, obs=adata.obs.copy(),
                                     var=pd.DataFrame(index=pd.Index(vocabulary.symbols,
                                                                     name="gene_name")))
            result.uns["scfoundation"] = settings
            result.uns[OWNER_KEY] = owner_record("embed")
            write_h5ad(result, temporary)
        else:
            width = net.decoder_norm.num_features
            array = zarr.open_array(str(temporary), mode="w", dtype="float32",
                                    shape=(adata.n_obs, net.num_genes, width),
                                    chunks=(1, net.num_genes, width))
            array.attrs.update(dict(settings, cells=list(map(str, adata.obs_names)),
                                    genes=list(vocabulary.symbols),
                                    **{OWNER_KEY: owner_record("embed")}))
            whole = output_type == "gene_batch"
            inference.gene_embeddings(net, matrix, batch_size=adata.n_obs if whole else
                                      batch_size or 4, stabilizer_scope="batch" if whole else
                                      "cell", out=array, **options)
            require_finite_array(array, adata.obs_names, f"gene embeddings of {model.source}")
    return output


def embed_store(model: LoadedModel, store, output, *, selection=None, tgthighres: str = "t4",
                pool: str = "all", pre_normalized: str = "F", min_coverage: float = 0.5,
                batch_size: int | None = None, chunk_cells: int = 4096, overwrite: bool = False,
                progress: bool = True, devices=None) -> dict:
    """Cell embeddings of a whole cell store (or a `store_inference.Selection` of it) on every
    device of every process, into a resumable zarr output `[cells, width]` (see
    `store_inference`); returns the run's summary. Bring them back with
    `store_inference.to_anndata`."""
    from scfm_jax.analysis import store_inference

    store = store_inference.open_store(store)
    model_, vocabulary = model_and_vocabulary(model, None)
    task = inference.store_cell_task(model_, vocabulary, store.vocabulary, tgthighres=tgthighres,
                                     pool=pool, pre_normalized=pre_normalized,
                                     min_coverage=min_coverage)
    return store_inference.run(
        task, store, str(output), selection=selection or store_inference.Selection(),
        checkpoint=store_inference.checkpoint_identity(model.source, model.step, model.key),
        config=model.config, options=dict(tgthighres=tgthighres, pool=pool,
                                          pre_normalized=pre_normalized),
        batch_size=batch_size, chunk_cells=chunk_cells, overwrite=overwrite, progress=progress,
        devices=devices)
