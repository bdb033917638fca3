"""compare_embeddings through scib-metrics, and kNN label transfer, on 700 real PBMCs."""
import numpy as np
import pytest

from scfm_jax import analysis

BIO_METRICS = ["Isolated labels", "Leiden NMI", "Leiden ARI", "Silhouette label", "cLISI"]
BATCH_METRICS = ["BRAS", "iLISI", "KBET", "Graph connectivity", "PCR comparison"]


@pytest.fixture(scope="module")
def pbmc():
    """pbmc68k_reduced's counts, its PCA baseline, the same rows shuffled against the labels,
    and two random batches (no batch effect) plus an embedding that splits them apart."""
    from scfm_jax.data.datasets import pbmc68k_reduced_counts

    adata = pbmc68k_reduced_counts()
    analysis.pca_baseline(adata)
    pca = adata.obsm["X_pca_baseline"]
    rng = np.random.default_rng(0)
    adata.obsm["X_shuffled"] = pca[rng.permutation(adata.n_obs)]
    adata.obs["batch"] = rng.choice(["a", "b"], adata.n_obs)
    offset = np.where(adata.obs["batch"].to_numpy() == "a", 1.0, -1.0)[:, None]
    adata.obsm["X_batch_split"] = pca + 3 * pca.std(axis=0) * offset
    return adata


def test_bio_conservation_table_ranks_pca_above_shuffled_labels(pbmc, tmp_path):
    adata = pbmc.copy()
    table = analysis.compare_embeddings(adata, "bulk_labels", ["X_shuffled"], plot_dir=tmp_path)
    assert list(table.index) == ["X_shuffled", "X_pca_baseline"]
    assert list(table.columns) == BIO_METRICS + ["Bio conservation"]
    assert table.attrs["metric_type"]["cLISI"] == "Bio conservation"
    assert table.attrs["metric_type"]["Bio conservation"] == "Aggregate score"
    assert ((table >= 0) & (table <= 1)).all().all()
    pca, shuffled = table.loc["X_pca_baseline"], table.loc["X_shuffled"]
    assert pca["Bio conservation"] > shuffled["Bio conservation"] + 0.1
    assert pca["Leiden NMI"] > shuffled["Leiden NMI"] + 0.3
    assert (tmp_path / "scib_results.svg").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.heavy
def test_batch_correction_table_penalises_an_embedding_that_splits_the_batches(pbmc):
    table = analysis.compare_embeddings(pbmc.copy(), "bulk_labels", ["X_batch_split"],
                                        batch_key="batch")
    assert list(table.index) == ["X_batch_split", "X_pca_baseline"]
    assert list(table.columns) == (BIO_METRICS + BATCH_METRICS
                                   + ["Batch correction", "Bio conservation", "Total"])
    pca, split = table.loc["X_pca_baseline"], table.loc["X_batch_split"]
    np.testing.assert_allclose(table["Total"], 0.4 * table["Batch correction"]
                               + 0.6 * table["Bio conservation"])
    assert pca["iLISI"] > split["iLISI"] + 0.3 and pca["KBET"] > split["KBET"] + 0.3
    assert pca["Batch correction"] > split["Batch correction"] + 0.1


def test_model_embeddings_are_the_default_and_errors_name_the_keys(pbmc):
    adata = pbmc[:100].copy()
    with pytest.raises(KeyError, match="none of .*X_scfoundation.*embed_cells"):
        analysis.compare_embeddings(adata, "bulk_labels")
    with pytest.raises(KeyError, match="no batch column 'donor'"):
        analysis.compare_embeddings(adata, "bulk_labels", ["X_shuffled"], batch_key="donor")
    adata.obs["one"] = "x"
    with pytest.raises(ValueError, match="at least 2 batches"):
        analysis.compare_embeddings(adata, "bulk_labels", ["X_shuffled"], batch_key="one")
    with pytest.raises(ValueError, match="at least 91 labelled cells.*labels 90"):
        analysis.compare_embeddings(adata[:90].copy(), "bulk_labels", ["X_shuffled"])


def test_label_transfer_beats_shuffled_labels(pbmc):
    adata = pbmc.copy()
    adata.obsm["X_scfoundation"] = adata.obsm["X_shuffled"]
    table = analysis.label_transfer(adata, "bulk_labels")
    assert list(table.index) == ["X_scfoundation", "X_pca_baseline"]
    assert list(table.columns) == ["knn_accuracy", "knn_macro_f1"]
    assert table.loc["X_pca_baseline", "knn_accuracy"] > table.loc["X_scfoundation",
                                                                    "knn_accuracy"] + 0.2
