"""Cell embeddings of any model on an AnnData, through its objective's `embed`.

`embed(load(checkpoint), adata)` needs nothing of the model but its entry in the objectives table
(`scfm_jax.objectives.objective.Objective.embed` and `.embedding_key`), so a model added by the
recipe (docs/adding_a_model.md) is embedded without code of its own here. The cells' genes are
aligned onto the model's vocabulary and fed as the training pipeline's batches
(`scfm_jax.data.pipeline.batch_schema`): expressed genes padded to a length bucket, raw counts, the
cell's total over the vocabulary's genes and its number of expressed genes. scFoundation's own
options (pooling, the depth token, gene embeddings) are in `scfm_jax.analysis.embedding`.
"""
from __future__ import annotations

import anndata
import jax
import numpy as np
import scipy.sparse as sp
from flax import nnx
from tqdm.auto import tqdm

from scfm_jax.analysis.embedding import aligned_matrix, embedding_settings
from scfm_jax.analysis.loading import LoadedModel
from scfm_jax.analysis.output_checks import require_finite
from scfm_jax.data.host_ops import bucket_length, padded_csr_rows, row_totals
from scfm_jax.errors import UsageError
from scfm_jax.objectives import Objective, get_objective


def cell_embeddings(model: nnx.Module, objective: Objective, objective_config,
                    counts: sp.csr_matrix, *, batch_size: int = 32,
                    progress: bool = True) -> np.ndarray:
    """[cells, D] float32: `objective.embed` of the rows of `counts` (cells x the model's genes).

    Cells are sorted by their number of expressed genes and batched `batch_size` at a time, each
    batch padded to the bucket of its longest cell (`host_ops.bucket_length`) and filled up with
    copies of its last cell, so few shapes compile."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, batch: objective.embed(nnx.merge(graphdef, state), batch,
                                                        objective_config))
    lengths = np.diff(counts.indptr)
    totals = row_totals(counts).astype(np.float32)
    order = np.argsort(lengths, kind="stable")
    outputs = None
    for start in tqdm(range(0, len(order), batch_size), desc="cell embeddings", unit="batch",
                      disable=not progress):
        chosen = order[start:start + batch_size]
        rows = np.concatenate([chosen, np.full(batch_size - len(chosen), chosen[-1])])
        width = bucket_length(max(int(lengths[rows].max()), 1), counts.shape[1])
        gene_ids, values = padded_csr_rows(counts, rows, width)
        batch = {"gene_ids": gene_ids, "counts": values, "total_counts": totals[rows],
                 "num_nonzero": lengths[rows].astype(np.int32)}
        embedded = np.asarray(step(state, batch), np.float32)
        if outputs is None:
            outputs = np.zeros((counts.shape[0], embedded.shape[1]), np.float32)
        outputs[chosen] = embedded[:len(chosen)]
    return outputs


def embed(model: LoadedModel, adata: anndata.AnnData, *, layer: str | None = None,
          key_added: str | None = None, batch_size: int = 32, gene_column: str | None = None,
          min_coverage: float = 0.5, progress: bool = True) -> None:
    """The model's cell embeddings into `adata.obsm[key_added]` (default: its objective's
    `embedding_key`, e.g. X_scfoundation), settings and gene coverage into `adata.uns[key_added]`.

    `model`: from `scfm_jax.analysis.load` (it carries the vocabulary and the config the
    objective's embed reads). `layer`: where the raw counts are (None: X; a layer; 'raw'). Genes
    are matched to the vocabulary by symbol or Ensembl ID (`gene_column` picks a var column); less
    than `min_coverage` of the counts on vocabulary genes is refused.
    """
    if not isinstance(model, LoadedModel):
        raise UsageError("embed takes a model from scfm_jax.analysis.load (it carries the gene "
                         f"vocabulary and config), got {type(model).__name__}")
    objective = get_objective(model.kind)
    if objective.embed is None:
        raise UsageError(f"model {model.kind!r} has no cell embedding (its objective defines no "
                         "embed)")
    if model.vocabulary is None:
        raise UsageError(f"{model.source} carries no gene vocabulary: load it with vocabulary=")
    key_added = key_added or objective.embedding_key
    matrix, alignment = aligned_matrix(adata, model.vocabulary, layer=layer,
                                       gene_column=gene_column, min_coverage=min_coverage,
                                       verbose=progress)
    embeddings = cell_embeddings(model.model, objective, model.config.get("objective"), matrix,
                                 batch_size=batch_size, progress=progress)
    require_finite(embeddings, adata.obs_names, key_added)
    adata.obsm[key_added] = embeddings
    adata.uns[key_added] = embedding_settings(model, model.vocabulary, alignment,
                                              layer=str(layer))
