"""Analysis API: load any checkpoint, embed / enhance on AnnData, annotate, evaluate, plot."""
import anndata
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from analysis_helpers import pbmc_cells, write_workdir
from shared_helpers import plotted_pixels, shared_path
from scfm_jax import analysis
from scfm_jax.analysis import evaluation
from scfm_jax.main import main as scfm_main


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def fixture_files():
    folder = shared_path("fixtures", "scfoundation-tiny")
    cells = np.load(folder / "cells.npz")
    adata = anndata.AnnData(cells["counts"],
                            obs=pd.DataFrame(index=cells["cell_ids"].astype(str)),
                            var=pd.DataFrame(index=cells["gene_names"].astype(str)))
    return dict(adata=adata, checkpoint=folder / "models.ckpt", vocabulary=folder / "genes.tsv",
                expected=dict(np.load(folder / "expected.npz")))


@pytest.fixture(scope="module")
def cells():
    return pbmc_cells()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cells):
    """A tiny model saved from a 2 x 2 x 2 mesh of the 8 simulated devices."""
    folder, state = write_workdir(tmp_path_factory.mktemp("analysis") / "run",
                                  list(cells.var_names), mesh=(2, 2, 2))
    return folder, state


@pytest.fixture(scope="module")
def loaded(workdir):
    return analysis.load(workdir[0])


@pytest.fixture(scope="module")
def embedded(loaded, cells):
    adata = cells.copy()
    analysis.embed_cells(loaded, adata, batch_size=8, progress=False)
    return adata


# ------------------------------------------------------------------------------ load

def test_fixture_checkpoint_reproduces_official_cell_embeddings(fixture_files):
    model = analysis.load(fixture_files["checkpoint"], key="cell",
                          vocabulary=fixture_files["vocabulary"])
    assert model.kind == "scfoundation" and model.key == "cell" and len(model.vocabulary) == 200
    adata = fixture_files["adata"].copy()
    analysis.embed_cells(model, adata, batch_size=8, progress=False)
    np.testing.assert_allclose(adata.obsm["X_scfoundation"], fixture_files["expected"]["cell_emb_t4"],
                               rtol=1e-5, atol=1e-5)
    settings = adata.uns["X_scfoundation"]
    assert settings["tgthighres"] == "t4" and settings["vocabulary"] == "genes"
    # 168 of the 196 input genes are in the fixture's vocabulary (its README)
    assert "168/196 input genes matched" in settings["coverage"]


def test_official_checkpoint_needs_its_vocabulary(fixture_files):
    with pytest.raises(ValueError, match="has 200 genes, not the released 19264"):
        analysis.load(fixture_files["checkpoint"])


def test_workdir_saved_on_eight_devices_restores_on_one(workdir, loaded, cells):
    folder, state = workdir
    assert loaded.kind == "scfoundation" and loaded.step == 7
    assert list(loaded.vocabulary.symbols) == list(cells.var_names)
    assert loaded.config.model.encoder.width == 16
    from flax import nnx
    _, params, buffers = nnx.split(loaded.model, nnx.Param, ...)
    saved = jax.tree.leaves(state.params) + jax.tree.leaves(state.buffers)
    restored = jax.tree.leaves(params) + jax.tree.leaves(buffers)
    assert len(saved) == len(restored)
    for before, after in zip(saved, restored):
        assert len(after.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


def test_load_accepts_the_folders_around_a_workdir(workdir, tmp_path):
    folder, _ = workdir
    assert analysis.load(folder / "checkpoints").step == 7
    assert analysis.load(folder / "checkpoints" / "7").step == 7
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "train").symlink_to(folder)  # `scfm-jax demo --workdir demo` trains in demo/train
    assert analysis.load(demo).step == 7
    with pytest.raises(ValueError, match="no checkpoint at step 3; it has \\[7\\]"):
        analysis.load(folder, step=3)
    with pytest.raises(FileNotFoundError, match="without checkpoints/"):
        analysis.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        analysis.load(tmp_path / "missing.ckpt")


def test_load_scmulan_checkpoint_and_refuse_it_for_scfoundation_tasks(cells):
    model = analysis.load(shared_path("fixtures", "scmulan-tiny", "ckpt.pt"))
    assert model.kind == "scmulan"
    with pytest.raises(ValueError, match="runs scFoundation models; .* holds a scmulan model"):
        analysis.embed_cells(model, cells.copy(), progress=False)


# ------------------------------------------------------------------------------ embed

def test_embed_cells_independent_of_gene_order_and_extra_genes(loaded, cells, embedded):
    order = np.random.default_rng(0).permutation(cells.n_vars)
    shuffled = anndata.AnnData(
        sp.hstack([cells.X[:, order], sp.csr_matrix(np.ones((cells.n_obs, 1), np.float32))],
                  format="csr"),
        obs=cells.obs.copy(), var=pd.DataFrame(index=list(cells.var_names[order]) + ["NOT_A_GENE"]))
    analysis.embed_cells(loaded, shuffled, batch_size=8, key_added="X_shuffled", progress=False)
    assert embedded.obsm["X_scfoundation"].shape == (cells.n_obs, 4 * 16)
    np.testing.assert_allclose(shuffled.obsm["X_shuffled"], embedded.obsm["X_scfoundation"],
                               rtol=1e-5, atol=1e-5)
    assert "765/766 input genes matched" in shuffled.uns["X_shuffled"]["coverage"]


def test_log_normalised_input_is_refused_naming_the_counts_layer(loaded, cells):
    adata = cells.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = evaluation.log_normalised(adata.X).astype(np.float32)
    with pytest.raises(ValueError, match="adata.X does not hold raw counts.*pass layer='counts'"):
        analysis.embed_cells(loaded, adata, progress=False)
    del adata.layers["counts"]
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\] = adata.X.copy\(\)"):
        analysis.enhance(loaded, adata, progress=False)


def test_low_coverage_is_refused(loaded, cells):
    adata = cells.copy()
    adata.var_names = [f"UNKNOWN{i}" for i in range(adata.n_vars - 10)] + list(adata.var_names[-10:])
    with pytest.raises(ValueError, match="of the expressed counts fall on genes of vocabulary"):
        analysis.embed_cells(loaded, adata, progress=False)


@pytest.mark.slow  # ~90 s on 2 shared cores: the full decoder compiles per length bucket
def test_gene_embeddings_and_enhancement_match_the_fixture(fixture_files, tmp_path):
    expected = fixture_files["expected"]
    genes = analysis.load(fixture_files["checkpoint"], key="gene",
                          vocabulary=fixture_files["vocabulary"])
    adata = fixture_files["adata"].copy()
    per_cell = analysis.embed_genes(genes, adata, zarr_path=tmp_path / "genes.zarr",
                                    batch_size=8, progress=False)
    np.testing.assert_allclose(per_cell[...], expected["gene_emb_percell"], rtol=1e-5, atol=1e-5)
    assert zarr.open_array(str(tmp_path / "genes.zarr"), mode="r").attrs["genes"] == list(
        genes.vocabulary.symbols)
    positions = np.array([genes.vocabulary._positions.get(n, -1) for n in adata.var_names])
    known = positions >= 0
    np.testing.assert_allclose(adata.varm["X_scfoundation"][known],
                               expected["gene_emb_percell"].mean(axis=0)[positions[known]],
                               rtol=1e-5, atol=1e-5)
    assert np.isnan(adata.varm["X_scfoundation"][~known]).all()

    rde = analysis.load(fixture_files["checkpoint"], key="rde",
                        vocabulary=fixture_files["vocabulary"])
    analysis.enhance(rde, adata, "a5", batch_size=8, progress=False)
    enhanced = adata.layers["scfoundation_enhanced"]
    assert enhanced.shape == adata.shape
    np.testing.assert_allclose(enhanced[:, known], expected["expr_rde_a5"][:, positions[known]],
                               rtol=1e-5, atol=1e-5)
    assert np.isnan(enhanced[:, ~known]).all()


def test_embed_cli_reads_a_workdir(workdir, cells, embedded, tmp_path):
    cells.write_h5ad(tmp_path / "cells.h5ad")
    assert scfm_main(["embed", "--checkpoint", str(workdir[0]), "--input",
                      str(tmp_path / "cells.h5ad"), "--output", str(tmp_path / "out.h5ad"),
                      "--batch-size", "8", "--quiet"]) == 0
    np.testing.assert_allclose(anndata.read_h5ad(tmp_path / "out.h5ad").obsm["X_scfoundation"],
                               embedded.obsm["X_scfoundation"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ annotate

def _blobs(num_cells=150, classes=3, dims=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, num_cells)
    centres = rng.normal(0, 4, (classes, dims))
    adata = anndata.AnnData(np.zeros((num_cells, 1), np.float32),
                            obs=pd.DataFrame({"type": np.array(["a", "b", "c"])[labels]},
                                             index=[f"cell{i}" for i in range(num_cells)]))
    adata.obsm["X_blobs"] = (centres[labels] + rng.normal(0, 1, (num_cells, dims))).astype(np.float32)
    adata.obsm["X_noise"] = rng.normal(0, 1, (num_cells, dims)).astype(np.float32)
    return adata


@pytest.mark.parametrize("hidden", [0, 16])
def test_fit_classifier_learns_separable_types_and_predict_writes_obs(hidden):
    adata = _blobs()
    adata.obs.loc[adata.obs_names[:5], "type"] = np.nan  # unlabelled cells: predicted, not used
    classifier = analysis.fit_classifier(adata, "type", "X_blobs", hidden=hidden, verbose=False)
    report = classifier.report
    assert report["train_cells"] + report["test_cells"] == 145
    assert report["accuracy"] >= 0.9 and report["macro_f1"] >= 0.9
    assert report["losses"][-1] < report["losses"][0]
    analysis.predict(classifier, adata)
    assert list(adata.obs["cell_type_pred"].cat.categories) == ["a", "b", "c"]
    assert adata.obs["cell_type_pred"].notna().all()
    assert ((adata.obs["cell_type_pred_probability"] > 0) & (adata.obs["cell_type_pred_probability"]
                                                             <= 1)).all()
    labelled = adata.obs["type"].notna()
    agreement = (adata.obs["cell_type_pred"][labelled].astype(str) == adata.obs["type"][labelled])
    assert agreement.mean() >= 0.9


def test_fit_classifier_errors_name_the_missing_key():
    adata = _blobs()
    with pytest.raises(KeyError, match="no 'X_missing'.*run embed_cells first"):
        analysis.fit_classifier(adata, "type", "X_missing")
    with pytest.raises(KeyError, match="no 'celltype'"):
        analysis.fit_classifier(adata, "celltype", "X_blobs")


def test_fine_tune_trains_a_copy_and_reports_held_out_scores(loaded, cells):
    from flax import nnx
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(loaded.model, nnx.Param))]
    classifier = analysis.fine_tune(loaded, cells, "bulk_labels", epochs=2, batch_size=8,
                                    progress=False)
    after_user = [np.asarray(x) for x in jax.tree.leaves(nnx.state(loaded.model, nnx.Param))]
    assert all(np.array_equal(a, b) for a, b in zip(before, after_user))
    tuned = [np.asarray(x) for x in jax.tree.leaves(nnx.state(classifier.encoder.encoder_layers,
                                                              nnx.Param))]
    original = [np.asarray(x) for x in jax.tree.leaves(nnx.state(loaded.model.encoder_layers,
                                                                 nnx.Param))]
    assert not all(np.array_equal(a, b) for a, b in zip(tuned, original))
    report = classifier.report
    assert len(report["losses"]) == 2 and np.all(np.isfinite(report["losses"]))
    assert report["train_cells"] + report["test_cells"] == cells.n_obs
    adata = cells.copy()
    analysis.predict(classifier, adata)
    assert set(adata.obs["cell_type_pred"].astype(str)) <= set(cells.obs["bulk_labels"].astype(str))


# ------------------------------------------------------------------------------ evaluate, plot

def test_thinning_keeps_the_expected_fraction_of_counts(cells):
    thinned = evaluation.thin_counts(cells.X, 0.2, seed=1)
    assert np.all(thinned.data == np.round(thinned.data)) and np.all(thinned.data > 0)
    assert np.all(thinned.toarray() <= cells.X.toarray())
    assert abs(thinned.sum() / cells.X.sum() - 0.2) < 0.01
    profiles = evaluation.log_normalised(cells.X)
    np.testing.assert_allclose(evaluation.profile_correlation(profiles, profiles), 1.0)


def test_enhancement_check_compares_thinned_and_enhanced_profiles(loaded, cells):
    result = analysis.enhancement_check(loaded, cells[:8], rate=0.5, batch_size=8)
    assert result["target"] == "f2" and result["cells"] == 8
    for name in ("thinned_r", "enhanced_r", "reconstructed_r"):
        assert -1 <= result[name] <= 1
    assert result["thinned_r"] > 0.5  # half the counts of real cells still correlate clearly


def test_training_curves_from_a_workdir(workdir, tmp_path):
    png = analysis.training_curves(workdir[0], tmp_path / "curves.png")
    assert plotted_pixels(png, "C0") > 200   # the train curve (first colour of the cycle)
    assert plotted_pixels(png, "C1") > 20    # the held-out points
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        analysis.training_curves(tmp_path)


@pytest.mark.slow  # umap-learn's numba compilation takes minutes on 2 shared cores
def test_umap_keeps_existing_coordinates(tmp_path):
    adata = _blobs(num_cells=60)
    adata.obsm["X_umap"] = np.zeros((60, 2))
    figure = analysis.umap(adata, "X_blobs", color="type", save=tmp_path / "umap.png")
    assert adata.obsm["X_umap_blobs"].shape == (60, 2)
    assert not np.any(adata.obsm["X_umap"])
    points = np.concatenate([c.get_offsets() for c in figure.axes[0].collections])
    np.testing.assert_allclose(np.sort(points, axis=0),
                               np.sort(adata.obsm["X_umap_blobs"], axis=0), rtol=1e-5)
    assert (tmp_path / "umap.png").is_file()


def test_masked_enhancement_predicts_each_gene_while_it_is_masked(loaded, cells):
    from flax import nnx

    from scfm_jax.objectives.scfoundation import inputs_from_dense_values

    adata = cells[:3].copy()
    analysis.enhance(loaded, adata, "f2", folds=3, batch_size=4, progress=False)
    assert adata.uns["scfoundation_enhanced"]["masked"] is True  # a workdir model: masked default
    enhanced = adata.layers["scfoundation_enhanced"]
    model = loaded.model
    counts = adata.X.toarray().astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    values = np.log1p(counts / totals * 1e4)
    t, s = np.log10(totals * 2), np.log10(totals)
    for fold in range(3):
        dense = np.concatenate([values, t, s], axis=1)
        genes = np.arange(model.num_genes) % 3 == fold
        dense[:, :model.num_genes][:, genes] = model.mask_value
        inputs = inputs_from_dense_values(dense, num_genes=model.num_genes)
        expected = nnx.jit(lambda m, i: m(i["encoder_values"], i["encoder_gene_ids"],
                                          i["encoder_padding_mask"], i["decoder_values"]))(
            model, inputs)[:, :model.num_genes]
        np.testing.assert_allclose(enhanced[:, genes], np.asarray(expected)[:, genes],
                                   rtol=1e-4, atol=1e-4)
