"""Small real datasets with raw counts, for the demo, the docs and the tests.

scanpy bundles `pbmc68k_reduced` (700 PBMCs, 765 genes in `raw`) with log-normalised values only:
`raw.X = log1p(counts / n_counts * 1e4)`, where `obs.n_counts` is each cell's total over ALL its
genes. Inverting that recovers the integer UMI counts exactly up to float32 round-off.
"""
from __future__ import annotations

from scfm_jax.errors import InputError

import numpy as np
import scipy.sparse as sp

# float32 log1p values of counts up to a few hundred round-trip to within ~0.1 of an integer.
INTEGER_TOLERANCE = 0.15


def pbmc68k_reduced_counts():
    """scanpy's pbmc68k_reduced with integer raw counts in X (CSR float32) and the original obs.

    Counts = round(expm1(raw.X) * obs.n_counts / 1e4); refuses (ValueError) if any value lies
    further than INTEGER_TOLERANCE from an integer, i.e. if scanpy's file is not what we expect.
    """
    import anndata
    import scanpy as sc

    source = sc.datasets.pbmc68k_reduced()
    if source.raw is None or "n_counts" not in source.obs:
        raise InputError("scanpy's pbmc68k_reduced has no raw / obs.n_counts; cannot recover counts")
    log_values = source.raw.X
    log_values = log_values.toarray() if sp.issparse(log_values) else np.asarray(log_values)
    scale = source.obs["n_counts"].to_numpy(np.float64)[:, None] / 1e4
    values = np.expm1(log_values.astype(np.float64)) * scale
    counts = np.round(values)
    deviation = np.abs(values - counts)
    if deviation.max() > INTEGER_TOLERANCE:
        row, column = np.unravel_index(int(np.argmax(deviation)), deviation.shape)
        raise InputError(
            f"pbmc68k_reduced: cell {source.obs_names[row]!r}, gene {source.raw.var_names[column]!r} "
            f"gives {values[row, column]:.3f} counts, not an integer (tolerance "
            f"{INTEGER_TOLERANCE}); scanpy's bundled file differs from the expected "
            "log1p(counts / n_counts * 1e4)")
    adata = anndata.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=source.obs.copy(),
                            var=source.raw.var.copy())
    adata.obsm["X_umap"] = source.obsm["X_umap"].copy()
    return adata
