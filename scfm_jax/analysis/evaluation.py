"""How well an embedding keeps known cell types (and removes batches), next to a PCA baseline.

`compare_embeddings` runs scib-metrics' `Benchmarker`, the field's benchmark of embeddings:
bio conservation (isolated labels, Leiden NMI/ARI, label silhouette, cLISI) and, with a batch key,
batch correction (BRAS, iLISI, kBET, graph connectivity, PCR comparison), with its aggregate
scores and summary plot. `label_transfer` adds what scib-metrics does not do: kNN label transfer
onto held-out cells (accuracy, macro-F1). The enhancement checks at the end compare expression
profiles after binomial thinning.
"""
from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from scfm_jax.analysis.scfoundation_classifier import labelled_codes, scores, split_cells
from scfm_jax.data.host_ops import log_normalise, non_count_positions
from scfm_jax.errors import InputError, UnknownName

MODEL_EMBEDDINGS = ("X_scfoundation", "X_scmulan")
# Up to this many cells the neighbour graphs are exact (scikit-learn, seconds); above it they are
# scib-metrics' approximate pynndescent graphs.
EXACT_NEIGHBORS_MAX_CELLS = 20_000
MIN_CELLS = 91  # scib-metrics' largest neighbourhood: a cell and its 90 nearest neighbours
# scIB's bio-conservation set: Leiden NMI/ARI (optimised resolution) instead of k-means.
BIO_CONSERVATION = dict(isolated_labels=True, nmi_ari_cluster_labels_leiden=True,
                        nmi_ari_cluster_labels_kmeans=False, silhouette_label=True, clisi_knn=True)


def _embedding(adata: anndata.AnnData, key: str) -> np.ndarray:
    if key not in adata.obsm:
        raise UnknownName(f"adata.obsm has no {key!r} (keys: {list(adata.obsm)})")
    return np.asarray(adata.obsm[key], np.float64)


def knn_transfer(adata: anndata.AnnData, label_key: str, embedding_key: str, *, k: int = 15,
                 test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Accuracy and macro-F1 of k-nearest-neighbour label transfer from the training split
    (Euclidean distance, neighbours weighted equally) onto the held-out cells."""
    labelled, classes, codes = labelled_codes(adata, label_key)
    train, test = split_cells(codes, test_fraction, seed)
    x = _embedding(adata, embedding_key)[labelled]
    knn = KNeighborsClassifier(n_neighbors=min(k, len(train))).fit(x[train], codes[train])
    return scores(classes[codes[test]], classes[knn.predict(x[test])])


def pca_baseline(adata: anndata.AnnData, *, layer: str | None = None, n_comps: int = 50,
                 n_top_genes: int | None = None, hvg_batch_key: str | None = None,
                 key_added: str = "X_pca_baseline") -> None:
    """`obsm[key_added]`: PCA of log1p(counts / total * 1e4) of the counts in X / `layer` / raw,
    the standard scanpy preprocessing, as the baseline an embedding is compared against.
    `n_top_genes`: only that many highly variable genes (scanpy's default flavour) enter the PCA,
    chosen within each batch of `obs[hvg_batch_key]` when given (as scIB does for integration)."""
    import scanpy as sc

    from scfm_jax.analysis.embedding import matrix_source, require_counts

    matrix, var, where = matrix_source(adata, layer)
    require_counts(adata, layer, matrix, where)
    baseline = anndata.AnnData(sp.csr_matrix(matrix, dtype=np.float32), obs=adata.obs[[]],
                               var=var[[]])
    sc.pp.normalize_total(baseline, target_sum=1e4)
    sc.pp.log1p(baseline)
    if n_top_genes is not None and n_top_genes < baseline.n_vars:
        if hvg_batch_key is not None:
            baseline.obs["batch"] = adata.obs[hvg_batch_key].astype(str).to_numpy()
        sc.pp.highly_variable_genes(baseline, n_top_genes=n_top_genes, subset=True,
                                    batch_key=None if hvg_batch_key is None else "batch")
    n_comps = min(n_comps, min(baseline.shape) - 1)
    sc.pp.pca(baseline, n_comps=n_comps, random_state=0)
    adata.obsm[key_added] = baseline.obsm["X_pca"]


def harmony_baseline(adata: anndata.AnnData, batch_key: str, *, basis: str = "X_pca_baseline",
                     key_added: str = "X_harmony", seed: int = 0) -> None:
    """`obsm[key_added]`: Harmony (harmonypy, default settings) on `obsm[basis]` with
    `obs[batch_key]` as the batch: the integration baseline."""
    import harmonypy

    pca = _embedding(adata, basis)
    batches = pd.DataFrame({"batch": adata.obs[batch_key].astype(str).to_numpy()})
    corrected = np.asarray(harmonypy.run_harmony(pca, batches, "batch", random_state=seed,
                                                 verbose=False).Z_corr)
    adata.obsm[key_added] = corrected if corrected.shape == pca.shape else corrected.T


def _keys_with_baseline(adata, embedding_keys, baseline_key, layer) -> list[str]:
    """The embeddings to compare (default: the model embeddings `adata` has), then the baseline,
    which is computed from the counts when missing."""
    if embedding_keys is None:
        embedding_keys = [key for key in MODEL_EMBEDDINGS if key in adata.obsm]
        if not embedding_keys:
            raise UnknownName(f"adata.obsm has none of {MODEL_EMBEDDINGS} (keys: {list(adata.obsm)}); "
                              "run analysis.embed_cells first or name the keys to compare")
    keys = [key for key in embedding_keys if key != baseline_key]
    for key in keys:
        _embedding(adata, key)
    if baseline_key not in adata.obsm:
        pca_baseline(adata, layer=layer, key_added=baseline_key)
    return [*keys, baseline_key]


def _exact_neighbors(x: np.ndarray, k: int):
    from scib_metrics.nearest_neighbors import NeighborsResults

    distances, indices = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    return NeighborsResults(indices=indices, distances=distances)


def scored_cells(adata: anndata.AnnData, label_key: str, batch_key: str | None = None
                 ) -> tuple[pd.DataFrame, np.ndarray]:
    """(obs with `label` and `batch` of the labelled cells, their positions); raises when the
    metrics cannot be computed: too few labelled cells, one label, or a batch key with one batch."""
    if label_key in adata.obs and adata.obs[label_key].nunique() < 2:
        raise InputError(f"obs[{label_key!r}] holds {adata.obs[label_key].nunique()} label; "
                         "scoring an embedding needs at least 2: choose a label key with several "
                         "cell types")
    labelled, classes, codes = labelled_codes(adata, label_key)
    if len(labelled) < MIN_CELLS:
        raise InputError(f"scib-metrics needs at least {MIN_CELLS} labelled cells (its cLISI and "
                         f"iLISI use 90 neighbours); obs[{label_key!r}] labels {len(labelled)}")
    obs = pd.DataFrame({"label": classes[codes]}, index=adata.obs_names[labelled])
    if batch_key is None:
        obs["batch"] = "one batch"  # isolated labels then means the rarest labels
    else:
        if batch_key not in adata.obs:
            raise UnknownName(f"adata.obs has no batch column {batch_key!r} (columns: "
                              f"{list(adata.obs.columns)})")
        batches = adata.obs[batch_key].iloc[labelled]
        if batches.isna().any() or batches.nunique() < 2:
            raise InputError(f"obs[{batch_key!r}] must name a batch for every labelled cell and "
                             f"hold at least 2 batches, found {batches.nunique()}")
        obs["batch"] = batches.astype(str).to_numpy()
    return obs, labelled


def compare_embeddings(adata: anndata.AnnData, label_key: str, embedding_keys=None, *,
                       batch_key: str | None = None, layer: str | None = None,
                       baseline_key: str = "X_pca_baseline", plot_dir: str | Path | None = None,
                       bio_conservation=None, batch_correction=None,
                       progress: bool = False) -> pd.DataFrame:
    """scib-metrics' table for the embeddings in `obsm` against PCA of the log-normalised counts.

    `embedding_keys`: the obsm keys to score (default: whichever of X_scfoundation / X_scmulan
    `adata` has); the baseline `obsm[baseline_key]` is computed from the counts (X, `layer` or
    raw) when missing. One row per embedding, one column per metric (0..1, higher is better) and
    the aggregate scores: `Bio conservation`, and with `batch_key` also `Batch correction` and
    `Total` (0.4 batch + 0.6 bio, scIB's weighting); `table.attrs["metric_type"]` gives each
    column's group. Only labelled cells are scored. `bio_conservation` / `batch_correction`:
    scib-metrics `BioConservation` / `BatchCorrection` to change the metric sets (default: scIB's
    set with Leiden clustering; the library's batch set). `plot_dir`: write scib-metrics' summary
    plot there (`scib_results.svg`).
    """
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    keys = _keys_with_baseline(adata, embedding_keys, baseline_key, layer)
    obs, labelled = scored_cells(adata, label_key, batch_key)
    scored = anndata.AnnData(obs=obs, obsm={key: np.asarray(adata.obsm[key], np.float32)[labelled]
                                            for key in keys})
    benchmark = Benchmarker(
        scored, batch_key="batch", label_key="label", embedding_obsm_keys=keys,
        bio_conservation_metrics=bio_conservation or BioConservation(**BIO_CONSERVATION),
        batch_correction_metrics=None if batch_key is None else (
            batch_correction or BatchCorrection()),
        pre_integrated_embedding_obsm_key=baseline_key, progress_bar=progress)
    benchmark.prepare(_exact_neighbors if len(obs) <= EXACT_NEIGHBORS_MAX_CELLS else None)
    benchmark.benchmark()
    results = benchmark.get_results(min_max_scale=False)
    table = results.drop(index="Metric Type").astype(np.float64)
    table.attrs["metric_type"] = results.loc["Metric Type"].to_dict()
    if plot_dir is not None:
        import matplotlib.pyplot as plt

        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        plot = benchmark.plot_results_table(min_max_scale=False, show=False, save_dir=str(plot_dir))
        plt.close(plot.ax.figure)
    return table


def label_transfer(adata: anndata.AnnData, label_key: str, embedding_keys=None, *,
                   layer: str | None = None, baseline_key: str = "X_pca_baseline", k: int = 15,
                   test_fraction: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """`knn_transfer` for the embeddings of `compare_embeddings` (same defaults, same baseline):
    one row per embedding, kNN accuracy and macro-F1 on the same held-out cells."""
    keys = _keys_with_baseline(adata, embedding_keys, baseline_key, layer)
    return pd.DataFrame.from_dict(
        {key: {f"knn_{name}": value for name, value in knn_transfer(
            adata, label_key, key, k=k, test_fraction=test_fraction, seed=seed).items()}
         for key in keys}, orient="index")


def thin_counts(counts, rate: float, seed: int = 0) -> sp.csr_matrix:
    """Binomial thinning: every count is kept with probability `rate` (a shallower sequencing of
    the same cells)."""
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    thinned = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    if len(non_count_positions(thinned.data)):
        raise InputError("thin_counts needs non-negative integer counts")
    thinned.data = np.random.default_rng(seed).binomial(
        thinned.data.astype(np.int64), rate).astype(np.float32)
    thinned.eliminate_zeros()
    return thinned


def log_normalised(counts) -> np.ndarray:
    """Dense log1p(counts / total * 1e4) per row (the scale scFoundation predicts)."""
    normalised = log_normalise(counts)
    return normalised.toarray() if sp.issparse(normalised) else normalised


def profile_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of `a` with the same row of `b` (NaN columns ignored)."""
    columns = ~(np.isnan(a).any(axis=0) | np.isnan(b).any(axis=0))
    a = a[:, columns] - a[:, columns].mean(axis=1, keepdims=True)
    b = b[:, columns] - b[:, columns].mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    return np.divide((a * b).sum(axis=1), denominator, out=np.full(len(a), np.nan),
                     where=denominator > 0)


def enhancement_check(model, adata: anndata.AnnData, *, rate: float = 0.2,
                      target: str | None = None, layer: str | None = None, seed: int = 0,
                      masked: bool | None = None, batch_size: int = 8,
                      progress: bool = False) -> dict:
    """Thin the counts to `rate`, enhance the thinned cells back to the original depth, and
    compare with the unthinned cells (mean per-cell Pearson r of log-normalised profiles).

    `target` defaults to f<1/rate> (T = log10 of the thinned total times 1/rate, i.e. the original
    depth). `masked`: see `enhance`. Cells left with no counts are dropped. Returns the mean correlations of the thinned
    and of the enhanced profiles with the original, and of the enhanced original (the model's
    reconstruction of cells it saw whole).
    """
    from scfm_jax.analysis.embedding import enhance, matrix_source, require_counts

    matrix, var, where = matrix_source(adata, layer)
    require_counts(adata, layer, matrix, where)
    original = sp.csr_matrix(matrix, dtype=np.float32)
    thinned = thin_counts(original, rate, seed)
    kept = np.flatnonzero(np.diff(thinned.indptr) > 0)
    target = target or f"f{1 / rate:g}"
    cells = anndata.AnnData(original[kept], obs=adata.obs.iloc[kept][[]], var=var[[]])
    cells.layers["thinned"] = thinned[kept]
    enhance(model, cells, target, layer="thinned", layer_added="enhanced", masked=masked,
            batch_size=batch_size, progress=progress)
    enhance(model, cells, target="f1", layer_added="reconstructed", masked=masked,
            batch_size=batch_size, progress=progress)
    reference = log_normalised(cells.X)
    return {"cells": len(kept), "rate": rate, "target": target,
            "masked": bool(cells.uns["enhanced"]["masked"]),
            "thinned_r": float(np.nanmean(profile_correlation(
                log_normalised(cells.layers["thinned"]), reference))),
            "enhanced_r": float(np.nanmean(profile_correlation(cells.layers["enhanced"],
                                                               reference))),
            "reconstructed_r": float(np.nanmean(profile_correlation(cells.layers["reconstructed"],
                                                                    reference)))}
