"""Batch integration scored with scib-metrics beside PCA and Harmony (`scfm_jax.tasks.integration`,
`scfm-jax evaluate`) on the shared lung cell-line mixture (3 cell lines x 2 technologies)."""
import anndata
import numpy as np
import pandas as pd
import pytest

from shared_helpers import shared_path
from scfm_jax.analysis import evaluation
from scfm_jax.main import main as scfm_main
from scfm_jax.tasks import integration

MIXOLOGY = ("data", "downstream", "mixology_lung_3lines_2technologies.h5ad")


@pytest.fixture(scope="module")
def cells():
    return anndata.read_h5ad(shared_path(*MIXOLOGY))


@pytest.fixture(scope="module")
def scored(cells, tmp_path_factory):
    """The table for two controls built from the unintegrated PCA: the batches pushed further
    apart, and the rows shuffled against the labels."""
    adata = cells.copy()
    evaluation.pca_baseline(adata, key_added="X_control_base")
    base = adata.obsm["X_control_base"]
    offset = np.where(adata.obs["batch"].to_numpy() == "CEL-seq2", 1.0, -1.0)[:, None]
    adata.obsm["X_batch_split"] = base + 3 * base.std(axis=0) * offset
    adata.obsm["X_label_shuffled"] = base[np.random.default_rng(0).permutation(adata.n_obs)]
    folder = tmp_path_factory.mktemp("integration")
    # kBET is left out here: its pynndescent graphs cost minutes of numba compilation on a loaded
    # 2-core machine; the slow test of the documented command scores every metric.
    from scib_metrics.benchmark import BatchCorrection
    table = integration.integration_benchmark(
        adata, "cell_line", "batch", obsm_keys=["X_batch_split", "X_label_shuffled"],
        output_dir=folder, umaps=False, batch_correction=BatchCorrection(kbet_per_label=False),
        progress=False)
    return dict(table=table, adata=adata, folder=folder)


def test_table_has_a_row_per_embedding_and_baseline(scored):
    table = scored["table"]
    assert list(table.index) == ["X_batch_split", "X_label_shuffled", "pca", "harmony"]
    for column in ["source", "Batch correction", "Bio conservation", "Total", "iLISI", "BRAS",
                   "Leiden NMI", "Silhouette label"]:
        assert column in table.columns
    assert table.loc["harmony", "source"].startswith("Harmony")
    scores = table.drop(columns="source")
    assert ((scores >= 0) & (scores <= 1)).all().all()
    assert (scored["folder"] / "scib_results.svg").stat().st_size > 1000
    assert scored["adata"].obsm["X_harmony"].shape == scored["adata"].obsm["X_pca_hvg"].shape


def test_harmony_corrects_batches_better_than_a_batch_separated_embedding(scored):
    table = scored["table"]
    harmony, split, pca = (table.loc[key] for key in ["harmony", "X_batch_split", "pca"])
    assert harmony["Batch correction"] > split["Batch correction"] + 0.1
    assert harmony["iLISI"] > split["iLISI"] + 0.1
    assert harmony["Batch correction"] > pca["Batch correction"]


def test_pca_conserves_biology_better_than_shuffled_labels(scored):
    table = scored["table"]
    pca, shuffled = table.loc["pca"], table.loc["X_label_shuffled"]
    assert pca["Bio conservation"] > shuffled["Bio conservation"] + 0.2
    assert pca["Leiden NMI"] > shuffled["Leiden NMI"] + 0.3


@pytest.mark.parametrize("case, message", [
    ("one batch", r"obs\['batch'\] must name a batch .* at least 2 batches, found 1"),
    ("one label", r"obs\['cell_line'\] holds 1 label; .* at least 2"),
    ("60 cells", r"at least 91 labelled cells"),
])
def test_bad_inputs_are_one_line_errors(cells, tmp_path, capsys, case, message):
    import re

    adata = cells[:60].copy() if case == "60 cells" else cells.copy()
    if case == "one batch":
        adata.obs["batch"] = "Drop-seq"
    if case == "one label":
        adata.obs["cell_line"] = "H1975"
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    rc = scfm_main(["evaluate", "--input", str(path), "--label-key", "cell_line", "--batch-key",
                    "batch", "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists()


def test_scmulan_embedding_is_the_annotation_embedding(cells):
    """X_scmulan of the scored is `scfm-jax annotate`'s embedding (first generated type token)."""
    from scfm_jax.analysis import scmulan_tasks
    from scfm_jax.tasks.task_models import load_task_model

    subset = cells[:12].copy()
    model = load_task_model(shared_path("fixtures", "scmulan-tiny", "ckpt.pt"),
                            token_set=shared_path("data", "scmulan"))
    model.embed(subset, "X_scmulan", batch_size=4, progress=False)
    expression, _ = scmulan_tasks.gene_set_expression(subset, model.token_set, model.vocabulary,
                                                     counts=True)
    one = anndata.AnnData(expression[:1], obs=pd.DataFrame(index=subset.obs_names[:1]),
                          var=pd.DataFrame(index=list(model.token_set.genes)))
    scmulan_tasks.annotate(model.model, model.token_set, one, batch_size=1, progress=False)
    assert subset.obsm["X_scmulan"].shape == (12, model.model.cfg.n_embd)
    np.testing.assert_allclose(subset.obsm["X_scmulan"][0], one.obsm["X_scmulan"][0], atol=1e-5)


@pytest.mark.slow  # 154 s at load average 18 on 2 cores: scMulan generates over 96 cells (the
# command's floor is 91) and Harmony runs; the default test above covers the embedding itself
def test_evaluate_command_scores_an_scmulan_checkpoint(cells, tmp_path, monkeypatch):
    """`scfm-jax evaluate --checkpoint <scMulan .pt> --token-set DIR` computes X_scmulan and hands
    it to the scorer under that key beside the baselines, with its checkpoint as the row's source
    in integration.csv. scib-metrics itself is replaced by a recorder here (the tests above score
    real embeddings); what is checked is the command's path from an scMulan checkpoint."""
    from scfm_jax.analysis import evaluation as evaluation_module

    checkpoint = shared_path("fixtures", "scmulan-tiny", "ckpt.pt")
    token_set = shared_path("data", "scmulan")
    groups = cells.obs.groupby(["cell_line", "batch"], observed=True).indices.values()
    subset = cells[np.sort(np.concatenate([rows[:16] for rows in groups]))].copy()
    subset.write_h5ad(tmp_path / "cells.h5ad")
    given = {}

    def recording_scorer(adata, label_key, embedding_keys, **options):
        given.update(keys=list(embedding_keys), obsm={k: adata.obsm[k] for k in adata.obsm},
                     baseline=options["baseline_key"])
        rows = [*embedding_keys, options["baseline_key"]]
        return pd.DataFrame({"Batch correction": 0.5, "Bio conservation": 0.5, "Total": 0.5},
                            index=rows)

    monkeypatch.setattr(evaluation_module, "compare_embeddings", recording_scorer)
    assert scfm_main(["evaluate", "--input", str(tmp_path / "cells.h5ad"), "--label-key",
                      "cell_line", "--batch-key", "batch", "--checkpoint", str(checkpoint),
                      "--token-set", str(token_set), "--output", str(tmp_path / "out"),
                      "--no-umap", "--quiet"]) == 0
    assert given["keys"] == ["X_scmulan", "harmony"] and given["baseline"] == "pca"
    embedding = given["obsm"]["X_scmulan"]
    assert embedding.shape[0] == subset.n_obs and np.isfinite(embedding).all()
    assert np.linalg.matrix_rank(embedding) > 1   # one vector per cell, not one for all
    table = pd.read_csv(tmp_path / "out" / "integration.csv", index_col=0)
    assert list(table.index) == ["X_scmulan", "pca", "harmony"]
    assert table.loc["X_scmulan", "source"] == f"scmulan {checkpoint}"


# docs/integration.md, verbatim
DOCS_COMMAND = ("scfm-jax evaluate --input mixology_lung_3lines_2technologies.h5ad "
                "--label-key cell_line --batch-key batch --checkpoint runs/demo "
                "--gene-column gene_symbol --min-coverage 0.05 --output integration_demo")


@pytest.mark.slow
def test_documented_evaluate_command_on_a_training_workdir(tmp_path, monkeypatch):
    """docs/integration.md's command, run in a folder holding the shared file under its name and,
    as runs/demo, a random-weight workdir on the demo's vocabulary (pbmc68k_reduced)."""
    import shlex

    from analysis_helpers import write_workdir
    from scfm_jax.data.datasets import pbmc68k_reduced_counts

    (tmp_path / MIXOLOGY[-1]).symlink_to(shared_path(*MIXOLOGY))
    write_workdir(tmp_path / "runs" / "demo", list(pbmc68k_reduced_counts().var_names))
    monkeypatch.chdir(tmp_path)
    assert scfm_main(shlex.split(DOCS_COMMAND)[1:]) == 0
    output = tmp_path / "integration_demo"
    table = pd.read_csv(output / "integration.csv", index_col=0)
    assert list(table.index) == ["X_scfoundation", "pca", "harmony"]
    assert table.loc["X_scfoundation", "source"].startswith("scfoundation ")
    assert {"umap_scfoundation.png", "umap_pca.png", "umap_harmony.png",
            "scib_results.svg"} <= {p.name for p in output.iterdir()}
