"""pbmc68k_reduced with its raw counts recovered (the demo's data)."""
import numpy as np

from scfm_jax.data.datasets import pbmc68k_reduced_counts


def test_pbmc68k_reduced_counts_are_integer_and_keep_labels():
    adata = pbmc68k_reduced_counts()
    assert adata.shape == (700, 765)
    values = adata.X.data
    assert np.all(values == np.round(values)) and values.min() >= 1
    assert adata.obs["bulk_labels"].nunique() == 10
    # The recovered counts re-normalise to the bundled log values.
    import scanpy as sc
    source = sc.datasets.pbmc68k_reduced()
    relog = np.log1p(adata.X.toarray() / source.obs["n_counts"].to_numpy()[:, None] * 1e4)
    np.testing.assert_allclose(relog, source.raw.X.toarray(), atol=2e-3)
