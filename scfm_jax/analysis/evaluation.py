"""How well an embedding separates known cell types, next to a PCA baseline on the same cells.

kNN label transfer (train on a stratified part of the cells, predict the rest: accuracy and
macro-F1) and clustering agreement (k-means with as many clusters as labels vs the labels: NMI and
ARI; silhouette of the labels in the embedding), all with scikit-learn.
"""
from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.neighbors import KNeighborsClassifier

from scfm_jax.analysis.annotation import labelled_codes, scores, split_cells


def _embedding(adata: anndata.AnnData, key: str) -> np.ndarray:
    if key not in adata.obsm:
        raise KeyError(f"adata.obsm has no {key!r} (keys: {list(adata.obsm)})")
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


def clustering_agreement(adata: anndata.AnnData, label_key: str, embedding_key: str, *,
                         seed: int = 0) -> dict:
    """NMI and ARI of k-means clusters (k = number of labels) against the labels, and the
    silhouette width of the labels in the embedding (-1..1)."""
    labelled, classes, codes = labelled_codes(adata, label_key)
    x = _embedding(adata, embedding_key)[labelled]
    clusters = KMeans(n_clusters=len(classes), n_init=10, random_state=seed).fit_predict(x)
    return {"nmi": float(normalized_mutual_info_score(codes, clusters)),
            "ari": float(adjusted_rand_score(codes, clusters)),
            "silhouette": float(silhouette_score(x, codes))}


def pca_baseline(adata: anndata.AnnData, *, layer: str | None = None, n_comps: int = 50,
                 key_added: str = "X_pca_baseline") -> None:
    """`obsm[key_added]`: PCA of log1p(counts / total * 1e4) of the counts in X / `layer` / raw,
    the standard scanpy preprocessing, as the baseline an embedding is compared against."""
    import scanpy as sc

    from scfm_jax.analysis.embedding import matrix_source, require_counts

    matrix, var, where = matrix_source(adata, layer)
    require_counts(adata, layer, matrix, where)
    baseline = anndata.AnnData(sp.csr_matrix(matrix, dtype=np.float32), obs=adata.obs[[]],
                               var=var[[]])
    sc.pp.normalize_total(baseline, target_sum=1e4)
    sc.pp.log1p(baseline)
    n_comps = min(n_comps, min(baseline.shape) - 1)
    sc.pp.pca(baseline, n_comps=n_comps, random_state=0)
    adata.obsm[key_added] = baseline.obsm["X_pca"]


def compare_embeddings(adata: anndata.AnnData, label_key: str, embedding_keys=("X_scfoundation",),
                       *, layer: str | None = None, baseline_key: str = "X_pca_baseline",
                       k: int = 15, test_fraction: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """One row per embedding (and the PCA baseline, computed when missing): kNN accuracy and
    macro-F1, NMI, ARI, silhouette."""
    if baseline_key not in adata.obsm:
        pca_baseline(adata, layer=layer, key_added=baseline_key)
    rows = {}
    for key in (*embedding_keys, baseline_key):
        rows[key] = dict(
            {f"knn_{name}": value for name, value in knn_transfer(
                adata, label_key, key, k=k, test_fraction=test_fraction, seed=seed).items()},
            **clustering_agreement(adata, label_key, key, seed=seed))
    return pd.DataFrame.from_dict(rows, orient="index")


def thin_counts(counts, rate: float, seed: int = 0) -> sp.csr_matrix:
    """Binomial thinning: every count is kept with probability `rate` (a shallower sequencing of
    the same cells)."""
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    thinned = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    if np.any(thinned.data < 0) or np.any(thinned.data != np.round(thinned.data)):
        raise ValueError("thin_counts needs non-negative integer counts")
    thinned.data = np.random.default_rng(seed).binomial(
        thinned.data.astype(np.int64), rate).astype(np.float32)
    thinned.eliminate_zeros()
    return thinned


def log_normalised(counts) -> np.ndarray:
    """Dense log1p(counts / total * 1e4) per row (the scale scFoundation predicts)."""
    dense = np.asarray(counts.toarray() if sp.issparse(counts) else counts, np.float64)
    totals = dense.sum(axis=1, keepdims=True)
    return np.log1p(np.divide(dense * 1e4, totals, out=np.zeros_like(dense), where=totals > 0))


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
