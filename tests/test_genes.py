"""Gene embeddings, modules and TF networks (`scfm_jax.tasks.genes`, `scfm-jax genes`) on the shared
lung cell-line mixture and DoRothEA's A/B edges, with the fixtures' random-weight checkpoints."""
import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from shared_helpers import plotted_pixels, shared_path
from scfm_jax.main import main as scfm_main
from scfm_jax.tasks import genes as gene_tasks
from scfm_jax.tasks.task_models import load_task_model

MIXOLOGY = ("data", "downstream", "mixology_lung_3lines_2technologies.h5ad")
DOROTHEA = ("data", "downstream", "dorothea_hs_AB.tsv")


@pytest.fixture(scope="module")
def cells():
    return anndata.read_h5ad(shared_path(*MIXOLOGY))


@pytest.fixture(scope="module")
def scfoundation(cells):
    """The scFoundation fixture (200 genes, random weights) on 120 cells of both batches."""
    folder = shared_path("fixtures", "scfoundation-tiny")
    model = load_task_model(folder / "models.ckpt", vocabulary=folder / "genes.tsv", key="gene")
    subset = cells[np.r_[0:60, cells.n_obs - 60:cells.n_obs]].copy()
    genes = gene_tasks.gene_embeddings(model, subset, label_key="cell_line",
                                       gene_column="gene_symbol", min_coverage=0.0,
                                       batch_size=8, progress=False)
    return dict(model=model, cells=subset, genes=genes,
                symbols=[line.split("\t")[0] for line in
                         (folder / "genes.tsv").read_text().splitlines()[1:]])


@pytest.fixture(scope="module")
def scmulan(cells):
    """scMulan's token table (the fixture checkpoint) over all mixology cells: Ensembl IDs aligned
    through scMulan's 42,117-gene list."""
    model = load_task_model(shared_path("fixtures", "scmulan-tiny", "ckpt.pt"),
                            token_set=shared_path("data", "scmulan"))
    return dict(model=model, genes=gene_tasks.gene_embeddings(model, cells, progress=False))


def test_scfoundation_gene_embeddings_have_the_vocabulary_genes_and_shapes(scfoundation):
    genes, cells = scfoundation["genes"], scfoundation["cells"]
    assert list(genes.obs_names) == scfoundation["symbols"]
    assert genes.shape == (200, cells.n_obs) and list(genes.var_names) == list(cells.obs_names)
    model = scfoundation["model"].model.model
    assert genes.obsm["X_scfoundation_token"].shape == (200, model.cfg.encoder.width)
    np.testing.assert_array_equal(genes.obsm["X_scfoundation_token"],
                                  np.asarray(model.pos_emb.embedding[...])[:200])
    width = model.decoder_norm.num_features
    lines = sorted(cells.obs["cell_line"].unique())
    per_label = [f"X_scfoundation_context_{line}" for line in lines]
    for key in ["X_scfoundation_context", *per_label]:
        assert genes.obsm[key].shape == (200, width) and np.isfinite(genes.obsm[key]).all()
    # the overall mean is the cell-weighted mean of the per-label means, and labels differ
    sizes = cells.obs["cell_line"].value_counts()[lines].to_numpy()
    pooled = sum(n * genes.obsm[key] for n, key in zip(sizes, per_label)) / sizes.sum()
    np.testing.assert_allclose(genes.obsm["X_scfoundation_context"], pooled, rtol=1e-4, atol=1e-5)
    assert np.abs(genes.obsm[per_label[0]] - genes.obsm[per_label[1]]).max() > 1e-3
    # n_cells_expressed counts the cells with a non-zero count of the gene's symbol
    symbols = cells.var["gene_symbol"].astype(str).to_numpy()
    expected = [int((cells.X[:, np.flatnonzero(symbols == gene)].toarray() > 0).any(1).sum())
                for gene in genes.obs_names[:30]]
    assert genes.obs["n_cells_expressed"].iloc[:30].tolist() == expected
    assert max(expected) > 0


def test_context_embeddings_match_the_analysis_api_average(scfoundation):
    from scfm_jax import analysis

    cells = scfoundation["cells"][:24].copy()
    genes = gene_tasks.gene_embeddings(scfoundation["model"], cells, gene_column="gene_symbol",
                                       min_coverage=0.0, batch_size=8, progress=False)
    analysis.embed_genes(scfoundation["model"].model, cells, gene_column="gene_symbol",
                         min_coverage=0.0, batch_size=8, progress=False)
    matched = ~np.isnan(cells.varm["X_scfoundation"][:, 0])
    symbols = cells.var["gene_symbol"].astype(str).to_numpy()[matched]
    np.testing.assert_allclose(genes.obsm["X_scfoundation_context"][
        [genes.obs_names.get_loc(s) for s in symbols]], cells.varm["X_scfoundation"][matched],
        rtol=1e-4, atol=1e-5)


def test_scmulan_gene_table_has_its_gene_set(scmulan):
    genes, model = scmulan["genes"], scmulan["model"]
    gene_set = shared_path("data", "scmulan", "gene_set.txt").read_text().split()
    assert list(genes.obs_names) == gene_set
    table = genes.obsm["X_scmulan_token"]
    assert table.shape == (2000, model.model.cfg.n_embd)
    first = model.token_set.id(gene_set[0])
    np.testing.assert_array_equal(table[0], np.asarray(model.model.wte[...])[first])
    assert "X_scfoundation_context" not in genes.obsm


def test_each_tf_gets_its_own_ranking(scmulan):
    genes = scmulan["genes"]
    tfs = [tf for tf in ["MYC", "JUN", "FOS", "STAT3", "TP53"] if tf in genes.obs_names][:2]
    assert len(tfs) == 2
    ranking = gene_tasks.tf_rankings(genes, tfs, top=20)
    first, second = (ranking[ranking["tf"] == tf] for tf in tfs)
    assert list(first["rank"]) == list(range(1, 21))
    assert tfs[0] not in set(first["target"]) and (np.diff(first["cosine"]) <= 0).all()
    assert list(first["target"]) != list(second["target"])


def _constructed_case():
    """13 genes on the unit circle; G12 is expressed in 2 of 4 cells only (not a candidate)."""
    names = [f"G{i}" for i in range(13)]
    angles = np.deg2rad([0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 5])
    expression = np.random.default_rng(0).uniform(0.5, 2.0, (13, 4))
    expression[12, 2:] = 0
    genes = anndata.AnnData(sp.csr_matrix(expression), obs=pd.DataFrame(index=names))
    genes.obs["n_cells_expressed"] = (expression > 0).sum(axis=1)
    genes.obsm["X_circle"] = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    edges = ([("G0", t) for t in ["G1", "G3", "G4", "G8", "G11", "G12", "ABSENT"]]
             + [("G11", t) for t in ["G10", "G9", "G8", "G7", "G6"]]
             + [("G5", t) for t in ["G6", "G7", "G8", "G9"]]          # 4 targets: not scored
             + [("NOT_A_GENE", f"G{i}") for i in range(6)])           # TF not a candidate
    return genes, pd.DataFrame(edges, columns=["tf", "target"])


def test_network_metrics_equal_the_hand_computed_values():
    genes, reference = _constructed_case()
    summary, per_tf = gene_tasks.evaluate_networks(genes, reference, ["X_circle"])
    # G0 ranks G1..G11 in order (cosine falls with the angle); its targets G1, G3, G4, G8, G11
    # sit at ranks 1, 3, 4, 8, 11 among 11 others (6 non-targets at ranks 2, 5, 6, 7, 9, 10).
    # AUROC: target-above-non-target pairs 6 + 5 + 5 + 2 + 0 = 18 of 5 * 6.
    auroc_g0 = 18 / 30
    ap_g0 = (1 / 1 + 2 / 3 + 3 / 4 + 4 / 8 + 5 / 11) / 5
    # G11 ranks G10, G9, ..., G0: its five targets come first.
    auroc_g11, ap_g11 = 1.0, 1.0
    # EPR: 10 reference edges over 2 * 11 pairs; the 10 best pairs are G0-G1..G5 (3 targets)
    # and G11-G10..G6 (5 targets): precision 8 / 10 over the density 10 / 22.
    epr = (8 / 10) / (10 / 22)
    row = summary.loc["X_circle"]
    assert row["n_tfs"] == 2
    np.testing.assert_allclose(row["mean_auroc"], (auroc_g0 + auroc_g11) / 2, rtol=1e-12)
    np.testing.assert_allclose(row["mean_average_precision"], (ap_g0 + ap_g11) / 2, rtol=1e-12)
    np.testing.assert_allclose(row["early_precision_ratio"], epr, rtol=1e-12)
    circle = per_tf[per_tf["method"] == "X_circle"].set_index("tf")
    np.testing.assert_allclose(circle.loc["G0", ["auroc", "average_precision"]].to_numpy(float),
                               [auroc_g0, ap_g0], rtol=1e-12)
    assert list(summary.index) == ["X_circle", "coexpression", "random"]
    assert list(summary.columns) == ["mean_auroc", "mean_average_precision", "n_tfs",
                                     "early_precision_ratio"]


def test_coexpression_baseline_on_mixology_is_computed_and_finite(scmulan):
    genes = scmulan["genes"]
    summary, per_tf = gene_tasks.evaluate_networks(
        genes, shared_path(*DOROTHEA))
    assert summary.attrs["candidates"] == int((genes.obs["n_cells_expressed"] >= 3).sum())
    for method in ["X_scmulan_token", "coexpression", "random"]:
        row = summary.loc[method]
        assert row["n_tfs"] >= 5
        assert np.isfinite(row[["mean_auroc", "mean_average_precision",
                                "early_precision_ratio"]].to_numpy(float)).all()
        assert 0 <= row["mean_auroc"] <= 1
    assert set(per_tf["method"]) == {"X_scmulan_token", "coexpression", "random"}
    # co-expression by hand for one evaluated TF: |Pearson r| ranks its targets
    tf = per_tf.loc[per_tf["method"] == "coexpression", "tf"].iloc[0]
    candidates = genes.obs_names[genes.obs["n_cells_expressed"] >= 3]
    x = genes[candidates].X.toarray()
    r = np.abs(np.corrcoef(x)[candidates.get_loc(tf)])
    reference = pd.read_csv(shared_path(*DOROTHEA), sep="\t")
    targets = set(reference.loc[reference["tf"] == tf, "target"])
    others = [g for g in candidates if g != tf]
    from sklearn.metrics import roc_auc_score
    expected = roc_auc_score([g in targets for g in others],
                             r[[candidates.get_loc(g) for g in others]])
    got = per_tf.query("method == 'coexpression' and tf == @tf")["auroc"].iloc[0]
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_modules_scores_and_specificity(scfoundation, tmp_path):
    genes, cells = scfoundation["genes"].copy(), scfoundation["cells"].copy()
    modules = gene_tasks.gene_modules(genes, min_size=5)
    assert list(modules.columns) == ["gene", "module"]
    sizes = modules["module"].value_counts()
    assert len(sizes) >= 2 and sizes.min() >= 5
    assert set(modules["gene"]) <= set(genes.obs_names[genes.obs["n_cells_expressed"] >= 3])
    columns = gene_tasks.score_modules(cells, genes)
    assert columns == [f"gene_module_{m}" for m in sorted(sizes.index)]
    assert np.isfinite(cells.obs[columns].to_numpy()).all()
    table = gene_tasks.module_specificity(cells, "cell_line", columns)
    assert table.shape == (len(columns), 3)
    png = gene_tasks.plot_module_specificity(table, tmp_path / "heat.png")
    assert png.stat().st_size > 5000


def test_genes_command_writes_embeddings_modules_and_network_table(cells, tmp_path):
    folder = shared_path("fixtures", "scmulan-tiny")
    subset = tmp_path / "cells.h5ad"
    cells[::4].copy().write_h5ad(subset)
    output = tmp_path / "genes_out"
    rc = scfm_main(["genes", "--checkpoint", str(folder / "ckpt.pt"), "--token-set",
                    str(shared_path("data", "scmulan")), "--input", str(subset),
                    "--reference", str(shared_path(*DOROTHEA)), "--label-key", "cell_line",
                    "--output", str(output), "--quiet"])
    assert rc == 0
    genes = anndata.read_h5ad(output / "gene_embeddings.h5ad")
    assert genes.shape[0] == 2000 and "X_scmulan_token" in genes.obsm
    modules = pd.read_csv(output / "modules.csv")
    assert list(modules.columns) == ["gene", "module"] and len(modules) > 0
    table = pd.read_csv(output / "network_eval.csv", index_col=0)
    assert list(table.index) == ["X_scmulan_token", "coexpression", "random"]
    assert list(table.columns) == ["mean_auroc", "mean_average_precision", "n_tfs",
                                   "early_precision_ratio"]
    assert plotted_pixels(output / "network_eval.png", "C1") > 100   # the coexpression bars
    assert (output / "module_specificity.png").is_file()
    scores = pd.read_csv(output / "module_scores.csv", index_col=0)
    assert len(scores) == 125 and scores.columns.str.startswith("gene_module_").all()
    # a second run may replace its own output; a folder of other files is refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    assert scfm_main(["genes", "--checkpoint", str(folder / "ckpt.pt"), "--token-set",
                      str(shared_path("data", "scmulan")), "--input", str(subset),
                      "--output", str(other), "--quiet"]) == 1
    assert (other / "mine.txt").read_text() == "keep"


# docs/genes.md, verbatim
DOCS_COMMAND = ("scfm-jax genes --checkpoint runs/demo "
                "--input mixology_lung_3lines_2technologies.h5ad --gene-column gene_symbol "
                "--reference dorothea_hs_AB.tsv --label-key cell_line "
                "--min-coverage 0.05 --output genes_demo")


@pytest.mark.slow
def test_documented_genes_command_on_a_training_workdir(tmp_path, monkeypatch):
    """docs/genes.md's command, run in a folder holding the shared files under the names it uses
    and, as runs/demo, a random-weight workdir on the demo's vocabulary (pbmc68k_reduced)."""
    import shlex

    from analysis_helpers import write_workdir
    from scfm_jax.data.datasets import pbmc68k_reduced_counts

    for name in [MIXOLOGY, DOROTHEA]:
        (tmp_path / name[-1]).symlink_to(shared_path(*name))
    write_workdir(tmp_path / "runs" / "demo", list(pbmc68k_reduced_counts().var_names))
    monkeypatch.chdir(tmp_path)
    assert scfm_main(shlex.split(DOCS_COMMAND)[1:]) == 0
    genes = anndata.read_h5ad(tmp_path / "genes_demo" / "gene_embeddings.h5ad")
    assert genes.n_obs == 765 and genes.n_vars == 499
    assert {"X_scfoundation_token", "X_scfoundation_context",
            "X_scfoundation_context_H1975"} <= set(genes.obsm)
    table = pd.read_csv(tmp_path / "genes_demo" / "network_eval.csv", index_col=0)
    assert list(table.index) == ["X_scfoundation_token", "X_scfoundation_context",
                                 "X_scfoundation_context_H1975", "X_scfoundation_context_H2228",
                                 "X_scfoundation_context_HCC827", "coexpression", "random"]
