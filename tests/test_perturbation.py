"""The perturbation task on the real Norman subset: split, metrics, baselines, the GEARS-style head,
the command's outputs and its one-line errors.

Expected values are computed here independently of the task's code (own normalisation, own
pseudobulks, hand arithmetic), never copied from its output.
"""
import json
import shlex

import anndata
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbation_helpers import widened_fixture_checkpoint
from shared_helpers import shared_path
from scfm_jax.main import main as scfm_main
from scfm_jax.tasks import perturbation
from scfm_jax.tasks.perturbation_data import (canonical, read_perturbations, simulation_split)
from scfm_jax.tasks.perturbation_fm import ControlEmbeddings
from scfm_jax.tasks.perturbation_gears import GearsPredictor, HeadSettings, gears_loss
from scfm_jax.tasks.perturbation_metrics import condition_metrics, de_genes, pearson
from scfm_jax.tasks.perturbation_predictors import Predictor, TrainingView, ridge_fit

NORMAN = ("data", "downstream", "perturbench_norman19_k562_crispra.h5ad")
# The command lines of docs/perturbation.md, run here with the file names replaced.
DOC_BASELINES = ("scfm-jax perturb --input perturbench_norman19_k562_crispra.h5ad "
                 "--output norman_perturb --total-key ncounts")
DOC_WITH_CHECKPOINT = ("scfm-jax perturb --input norman_small.h5ad --output norman_fm "
                       "--total-key ncounts --checkpoint scfoundation-random.ckpt "
                       "--vocabulary genes.tsv --epochs 2 "
                       "--hidden 16 --max-controls 8")


def _run_doc_command(command: str, replacements: dict, *extra: str) -> int:
    words = [replacements.get(word, word) for word in shlex.split(command)]
    assert words[0] == "scfm-jax"
    return scfm_main(words[1:] + list(extra))


@pytest.fixture(scope="module")
def norman_path():
    return shared_path(*NORMAN)


@pytest.fixture(scope="module")
def norman(norman_path):
    return anndata.read_h5ad(norman_path)


def _independent_expression(adata):
    counts = np.asarray(adata.layers["counts"].todense(), np.float64)
    return np.log1p(counts / adata.obs["ncounts"].to_numpy()[:, None] * 1e4)


def _independent_profiles(adata):
    """Mean log1p(count / ncounts * 1e4) per condition, computed here from the raw counts."""
    expression = _independent_expression(adata)
    conditions = adata.obs["condition"].astype(str).to_numpy()
    return {c: expression[conditions == c].mean(axis=0) for c in np.unique(conditions)}


@pytest.fixture(scope="module")
def baseline_run(norman_path, tmp_path_factory):
    """The documented baseline command on the whole Norman subset (no checkpoint)."""
    folder = tmp_path_factory.mktemp("perturb")
    output = folder / "norman_perturb"
    assert _run_doc_command(DOC_BASELINES, {"perturbench_norman19_k562_crispra.h5ad":
                                            str(norman_path), "norman_perturb": str(output)},
                            "--quiet") == 0
    return output


@pytest.fixture(scope="module")
def small_model(norman, tmp_path_factory):
    """A random-weight scFoundation of the fixture's architecture whose vocabulary is the Norman
    genes (measured and perturbed), as an official-format models.ckpt plus its genes.tsv."""
    folder = tmp_path_factory.mktemp("small_model")
    perturbed = sorted({g for c in norman.obs["condition"].astype(str).unique() if c != "control"
                        for g in c.split("+")})
    genes = list(dict.fromkeys(list(norman.var_names) + perturbed))
    (folder / "genes.tsv").write_text("gene_name\tindex\n" + "".join(
        f"{g}\t{i}\n" for i, g in enumerate(genes)))
    template = shared_path("fixtures", "scfoundation-tiny", "models.ckpt")
    checkpoint = widened_fixture_checkpoint(template, folder / "scfoundation-random.ckpt",
                                            num_genes=len(genes))
    return checkpoint, folder / "genes.tsv"


@pytest.fixture(scope="module")
def norman_small(norman, tmp_path_factory):
    """15 cells of every Norman condition (510 cells), for the head's quick runs."""
    conditions = norman.obs["condition"].astype(str).to_numpy()
    keep = np.concatenate([np.flatnonzero(conditions == c)[:15] for c in np.unique(conditions)])
    path = tmp_path_factory.mktemp("small") / "norman_small.h5ad"
    norman[np.sort(keep)].copy().write_h5ad(path)
    return path


def test_condition_names_accept_the_gears_spelling(norman):
    assert canonical("KLF1+ctrl") == canonical("ctrl+KLF1") == "KLF1"
    assert canonical("KLF1+MAP2K6") == "KLF1+MAP2K6"
    gears_style = norman.copy()
    names = gears_style.obs["condition"].astype(str)
    gears_style.obs["condition"] = np.where(names == "control", "ctrl",
                                            np.where(names.str.contains(r"\+"), names,
                                                     names + "+ctrl"))
    ours = read_perturbations(norman)
    theirs = read_perturbations(gears_style, control="ctrl")
    assert list(ours.conditions) == list(theirs.conditions)
    assert ours.perturbations == theirs.perturbations and len(ours.perturbations) == 33


def test_simulation_split_is_seeded_disjoint_and_grouped(norman):
    perturbations = read_perturbations(norman).perturbations
    split = simulation_split(perturbations, seed=1)
    again = simulation_split(perturbations, seed=1)
    other = simulation_split(perturbations, seed=2)
    assert split.to_json() == again.to_json() and split.test != other.test
    assert not set(split.train) & set(split.test)
    assert sorted(split.train + split.test) == sorted(perturbations)
    train_genes = set(split.settings["train_genes"])
    assert len(train_genes) == int(31 * 0.75)
    for condition in split.train:      # training conditions only use training genes
        assert set(condition.split("+")) <= train_genes
    seen = {c: sum(g in train_genes for g in c.split("+")) for c in split.test}
    assert all(seen[c] == 0 and "+" not in c for c in split.subgroups["unseen_single"])
    for k in (0, 1, 2):
        assert all(seen[c] == k and "+" in c for c in split.subgroups[f"combo_seen{k}"])
    assert sum(map(len, split.subgroups.values())) == len(split.test)


def test_metrics_match_hand_computation():
    true = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.0, 3.0, 2.0, 6.0])
    ctrl = np.array([1.0, 1.0, 3.0, 2.0])
    de = np.array([1, 3])
    got = condition_metrics(pred, true, ctrl, de)
    # errors 0, 1, 1, 4 -> mse 6/4; on DE genes (1, 3): 1, 4 -> 5/2
    assert got["mse"] == pytest.approx(1.5) and got["mse_de"] == pytest.approx(2.5)
    # pred - 3 = (-2, 0, -1, 3), true - 2.5 = (-1.5, -0.5, 0.5, 1.5): products sum to 7,
    # squares to 14 and 5 -> r = 7 / sqrt(70)
    assert got["pearson"] == pytest.approx(7 / np.sqrt(70))
    assert got["pearson_de"] == pytest.approx(1.0)   # (3, 6) against (2, 4)
    # deltas pred (0, 2, -1, 4) - 1.25, true (0, 1, 0, 2) - 0.75: products 6.25,
    # squares 14.75 and 2.75
    assert got["pearson_delta"] == pytest.approx(6.25 / np.sqrt(14.75 * 2.75))
    assert got["pearson_delta_de"] == pytest.approx(1.0)   # (2, 4) against (1, 2)
    assert got["direction_de"] == 1.0
    flipped = condition_metrics(np.array([1.0, 0.0, 2.0, 6.0]), true, ctrl, de)
    assert flipped["direction_de"] == 0.5        # gene 1 goes down instead of up
    assert np.isnan(pearson(np.ones(3), np.arange(3.0)))


def test_de_genes_are_scanpy_t_test_ranks(norman):
    """GEARS ranks DE genes with scanpy's t-test against the controls, by |score|."""
    import scanpy as sc

    data = read_perturbations(norman)
    adata = anndata.AnnData(data.expression, obs=pd.DataFrame(
        {"group": np.where(data.is_control, "ctrl", data.conditions)}))
    for condition in ("KLF1", "CEBPE+RUNX1T1"):
        subset = adata[np.isin(adata.obs.group, ["ctrl", condition])].copy()
        sc.tl.rank_genes_groups(subset, "group", groups=[condition], reference="ctrl",
                                method="t-test", rankby_abs=True, n_genes=20)
        expected = subset.uns["rank_genes_groups"]["names"][condition].astype(int)
        ours = de_genes(data.expression[data.conditions == condition],
                        data.expression[data.is_control])
        assert set(ours) == set(expected)


def test_ridge_solves_the_double_normal_equations():
    rng = np.random.default_rng(0)
    G, Y, P = rng.normal(size=(30, 4)), rng.normal(size=(30, 7)), rng.normal(size=(7, 3))
    W = ridge_fit(G, Y, P, 0.1)
    np.testing.assert_allclose((G.T @ G + 0.1 * np.eye(4)) @ W @ (P.T @ P + 0.1 * np.eye(3)),
                               G.T @ Y @ P, atol=1e-9)


def test_gears_loss_by_hand():
    import jax.numpy as jnp

    pred = jnp.array([[1.0, 2.0], [0.0, 0.0], [2.0, 2.0]])
    y = jnp.array([[2.0, 2.0], [0.0, 1.0], [2.0, 2.0]])
    ctrl = jnp.array([[1.5, 1.5], [0.5, 0.5], [1.0, 1.0]])
    retained = jnp.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    # cell 0: (1^4 + 0.1 * (1 - -1)^2 + 0 + 0.1 * (1 - 1)^2) / 2 = 0.7; cell 1, gene 0 only:
    # 0 + 0.1 * (-1 - -1)^2 = 0; cell 2: 0. Condition 0 = cells 0, 1 -> 0.35; condition 1 -> 0;
    # condition 2 has no cell and is left out -> (0.35 + 0) / 2
    loss = gears_loss(pred, y, ctrl, retained, jnp.array([0, 0, 1]), 3)
    assert float(loss) == pytest.approx(0.175)


def test_no_test_condition_reaches_a_fit(norman, monkeypatch):
    seen = {}
    original = Predictor.fit

    def spy(self, view):
        seen[self.name] = set(view.data.conditions) - {""}
        return original(self, view)

    monkeypatch.setattr(Predictor, "fit", spy)
    result = perturbation.run(norman, progress=False)
    assert set(seen) == set(perturbation.BASELINES)
    for conditions in seen.values():
        assert conditions == set(result.split.train)
        assert not conditions & set(result.split.test)


def test_baselines_rank_as_the_data_say(norman, baseline_run):
    """Computed here from the counts: on combinations whose two singles were both trained, the
    additive model's error is below no-change's; on unseen singles the training mean's DE error
    is below no-change's. The command's metrics agree, value for value."""
    split = json.loads((baseline_run / "split.json").read_text())
    metrics = pd.read_csv(baseline_run / "metrics.csv", keep_default_na=False,
                          na_values=["nan", "NaN", ""])
    profiles = _independent_profiles(norman)
    ctrl = profiles["control"]
    rows = metrics[metrics.level == "condition"].set_index(["predictor", "condition"])
    trained_singles = [c for c in split["train"] if "+" not in c]
    both = [c for c in split["subgroups"]["combo_seen2"]
            if all(g in trained_singles for g in c.split("+"))]
    assert both, "the seed-1 split has combinations with both singles trained"
    for condition in both:
        a, b = condition.split("+")
        additive = ctrl + (profiles[a] - ctrl) + (profiles[b] - ctrl)
        mse_additive = np.mean((additive - profiles[condition]) ** 2)
        mse_none = np.mean((ctrl - profiles[condition]) ** 2)
        assert mse_additive < mse_none
        assert rows.loc[("additive", condition), "mse"] == pytest.approx(mse_additive, rel=1e-4)
        assert rows.loc[("no_change", condition), "mse"] == pytest.approx(mse_none, rel=1e-4)
    mean_change = np.mean([profiles[c] - ctrl for c in split["train"]], axis=0)
    expression = _independent_expression(norman)
    conditions = norman.obs["condition"].astype(str).to_numpy()
    for condition in split["subgroups"]["unseen_single"]:
        de = de_genes(expression[conditions == condition], expression[conditions == "control"])
        truth = profiles[condition][de]
        mean_error = np.mean((ctrl[de] + mean_change[de] - truth) ** 2)
        assert rows.loc[("train_mean", condition), "mse_de"] == pytest.approx(mean_error,
                                                                              rel=1e-4)
    means = metrics[metrics.level == "subgroup"].set_index(["predictor", "subgroup"])
    assert (means.loc[("train_mean", "unseen_single"), "mse_de"]
            < means.loc[("no_change", "unseen_single"), "mse_de"])


def test_command_outputs_are_consistent(norman, baseline_run):
    metrics = pd.read_csv(baseline_run / "metrics.csv")
    split = json.loads((baseline_run / "split.json").read_text())
    predictions = anndata.read_h5ad(baseline_run / "predictions.h5ad")
    assert (baseline_run / "perturbation.png").stat().st_size > 10_000
    per_condition = metrics[metrics.level == "condition"]
    assert set(per_condition.predictor) == set(perturbation.BASELINES)
    for predictor, frame in per_condition.groupby("predictor"):
        assert sorted(frame.condition) == sorted(split["test"])
    for (predictor, subgroup), frame in per_condition.groupby(["predictor", "subgroup"]):
        summary = metrics[(metrics.level == "subgroup") & (metrics.predictor == predictor)
                          & (metrics.subgroup == subgroup)]
        assert summary.n_conditions.item() == len(frame) == len(split["subgroups"][subgroup])
        assert summary.mse_de.item() == pytest.approx(frame.mse_de.mean())
    profiles = _independent_profiles(norman)
    obs = predictions.obs
    for condition in split["test"]:
        row = np.flatnonzero((obs.predictor == "truth") & (obs.condition == condition))
        np.testing.assert_allclose(predictions.X[row[0]], profiles[condition], atol=1e-5)
    control_row = np.flatnonzero(obs.predictor == "control")[0]
    no_change = np.flatnonzero(obs.predictor == "no_change")
    np.testing.assert_allclose(predictions.X[no_change], np.broadcast_to(
        predictions.X[control_row], (len(no_change), predictions.n_vars)))
    np.testing.assert_allclose(predictions.X[control_row], profiles["control"], atol=1e-5)


def test_contexts_get_their_own_controls_and_predictions(norman):
    rng = np.random.default_rng(0)
    two = norman.copy()
    two.obs["line"] = rng.choice(["a", "b"], two.n_obs)
    counts = two.layers["counts"].tolil()
    is_b = np.flatnonzero(two.obs["line"] == "b")
    counts[is_b, 0] = np.asarray(counts[is_b, 0].todense()) + 50   # context b: gene 0 up
    two.layers["counts"] = sp.csr_matrix(counts)
    result = perturbation.run(two, context_key="line", predictors=["no_change", "additive"],
                              progress=False)
    rows = result.metrics[result.metrics.level == "condition"]
    assert set(rows.context) == {"a", "b"}
    data = read_perturbations(two, context_key="line")
    for context in ("a", "b"):
        expected = data.expression[data.is_control & (data.contexts == context)].mean(axis=0)
        np.testing.assert_allclose(result.predictors["no_change"].predict("KLF1", context),
                                   expected)
    assert (result.predictors["no_change"].predict("KLF1", "b")[0]
            > result.predictors["no_change"].predict("KLF1", "a")[0] + 1)
    lone = two[~((two.obs.line == "b") & (two.obs.condition == "control"))].copy()
    with pytest.raises(ValueError, match="context 'b' .* has no control cells"):
        perturbation.run(lone, context_key="line", progress=False)


def test_bad_input_is_a_one_line_error(norman_path, tmp_path, capsys):
    base = ["perturb", "--input", str(norman_path), "--quiet"]
    assert scfm_main(base + ["--output", str(tmp_path / "a"), "--control", "ctrl"]) == 1
    error = capsys.readouterr().err.strip()
    assert "no control cells" in error and "--control" in error and "\n" not in error
    fixture = shared_path("fixtures", "scfoundation-tiny")
    assert scfm_main(base + ["--output", str(tmp_path / "b"), "--checkpoint",
                             str(fixture / "models.ckpt"), "--vocabulary",
                             str(fixture / "genes.tsv")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not in the vocabulary of" in error and "perturbed gene" in error
    assert scfm_main(base + ["--output", str(tmp_path / "c"), "--predictors",
                             "gears_scfoundation"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert scfm_main(base + ["--output", str(foreign)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_head_loss_falls_and_its_checkpoint_restores(norman_small, tmp_path):
    """The GEARS-style head on 15 cells per Norman condition, with stand-in frozen embeddings (the
    FM's part is covered by the slow command test): the loss on a fixed training sample falls,
    the Orbax checkpoint restores to the same predictions, and only training conditions and
    control cells are fitted on."""
    data = read_perturbations(anndata.read_h5ad(norman_small), total_key="ncounts")
    split = simulation_split(data.perturbations)
    view = TrainingView.of(data, split.train)
    controls = np.flatnonzero(view.data.is_control)[:8]
    genes = tuple(view.data.genes) + tuple(data.perturbed_genes)
    embeddings = ControlEmbeddings(
        genes=genes, checkpoint="stand-in",
        embeddings=np.random.default_rng(0).normal(size=(8, len(genes), 8)).astype(np.float32))
    head = GearsPredictor(embeddings, controls, data.perturbed_genes,
                          settings=HeadSettings(epochs=2, hidden=16),
                          checkpoint_dir=tmp_path / "ckpt", progress=False)
    head.fit(view)
    before, after = head.fixed_sample_loss
    assert after < 0.9 * before
    assert set(view.data.conditions) - {""} == set(split.train)
    assert len(head.losses) == 2 * -(-len(view.data.conditions) // 32)
    predicted = head.predict("KLF1+MAP2K6", "all")
    trained = head.params
    head.params = jax.tree.map(lambda x: x * 0, trained)
    assert not np.allclose(head.predict("KLF1+MAP2K6", "all"), predicted)
    head.restore(tmp_path / "ckpt")
    np.testing.assert_allclose(head.predict("KLF1+MAP2K6", "all"), predicted, rtol=1e-6)


@pytest.mark.slow
def test_documented_checkpoint_command(norman_small, small_model, tmp_path):
    """The documented command with an scFoundation checkpoint: every FM row, labelled."""
    checkpoint, genes = small_model
    output = tmp_path / "norman_fm"
    assert _run_doc_command(DOC_WITH_CHECKPOINT, {
        "norman_small.h5ad": str(norman_small), "norman_fm": str(output),
        "scfoundation-random.ckpt": str(checkpoint), "genes.tsv": str(genes)}, "--quiet") == 0
    metrics = pd.read_csv(output / "metrics.csv")
    assert set(metrics.predictor) == set(perturbation.BASELINES +
                                         perturbation.SCFOUNDATION_PREDICTORS)
    fm_rows = metrics[metrics.predictor.isin(perturbation.SCFOUNDATION_PREDICTORS)]
    assert fm_rows.checkpoint.str.contains("scfoundation-random.ckpt").all()
    assert metrics[metrics.predictor == "no_change"].checkpoint.isna().all()
    assert np.isfinite(fm_rows[fm_rows.level == "all"].pearson_delta).all()
    assert (output / "gears_checkpoints").is_dir()


@pytest.mark.slow
@pytest.mark.heavy
def test_full_norman_run_with_every_predictor(norman_path, tmp_path):
    checkpoint = widened_fixture_checkpoint(
        shared_path("fixtures", "scfoundation-tiny", "models.ckpt"), tmp_path / "wide.ckpt")
    result = perturbation.run(
        norman_path, checkpoint=checkpoint,
        vocabulary=shared_path("data", "OS_scRNA_gene_index.19264.tsv"),
        scmulan_checkpoint=shared_path("fixtures", "scmulan-tiny", "ckpt.pt"),
        head=HeadSettings(epochs=5), output=tmp_path / "out", progress=False)
    means = result.metrics[result.metrics.level == "all"]
    assert set(means.predictor) == set(perturbation.PREDICTORS)
    assert np.isfinite(means.set_index("predictor").drop("no_change").pearson_delta).all()


def test_metrics_agree_with_cell_eval(norman, baseline_run):
    """cell-eval (Arc's Virtual Cell Challenge scorer) computes pearson_delta and mse on the same
    pseudobulks; where it installs, its values must equal ours for every baseline. Where a
    predictor predicts no change, ours is NaN (a constant has no correlation) and cell-eval's
    correlates float32 rounding noise: those are left out."""
    pytest.importorskip("cell_eval", reason="cell-eval is not installed (pip install cell-eval; "
                        "it pulls polars, pdex, numba-mwu)")
    from cell_eval._types import PerturbationAnndataPair
    from cell_eval.metrics import mse, pearson_delta

    metrics = pd.read_csv(baseline_run / "metrics.csv")
    predictions = anndata.read_h5ad(baseline_run / "predictions.h5ad")
    expression = _independent_expression(norman).astype(np.float32)
    conditions = norman.obs["condition"].astype(str).to_numpy()
    test = sorted(set(predictions.obs.condition) - {"control"})
    keep = np.isin(conditions, test + ["control"])
    real = anndata.AnnData(expression[keep], obs=pd.DataFrame({"condition": conditions[keep]}),
                           var=pd.DataFrame(index=list(norman.var_names)))
    controls = expression[conditions == "control"]
    obs = predictions.obs
    compared = 0
    for predictor in perturbation.BASELINES:
        chosen = np.flatnonzero(obs.predictor == predictor)
        pred = anndata.AnnData(
            np.concatenate([predictions.X[chosen], controls]),
            obs=pd.DataFrame({"condition": list(obs.condition.iloc[chosen]) +
                              ["control"] * len(controls)}),
            var=pd.DataFrame(index=list(norman.var_names)))
        pair = PerturbationAnndataPair(real=real, pred=pred, pert_col="condition",
                                       control_pert="control")
        theirs_delta, theirs_mse = pearson_delta(pair), mse(pair)
        ours = metrics[(metrics.level == "condition") &
                       (metrics.predictor == predictor)].set_index("condition")
        for condition in test:
            assert theirs_mse[condition] == pytest.approx(ours.loc[condition, "mse"], rel=1e-3)
            if np.isfinite(ours.loc[condition, "pearson_delta"]):
                compared += 1
                assert theirs_delta[condition] == pytest.approx(
                    ours.loc[condition, "pearson_delta"], rel=1e-3, abs=1e-4)
    assert compared >= 2 * len(test)   # train_mean and linear_pca at least


# bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation); through the fixture's
# encoder and decoder the embedding rows may drift by a few per cent, no more.
BF16_RELATIVE_TOLERANCE = 0.03


def test_bfloat16_control_embeddings_agree_with_float32():
    """The control-cell decoder embedding computed in bfloat16 (as a bf16 config, or
    `compute_dtype="bfloat16"`, gives) against float32 on the same weights and cells: the same
    kept rows, float32 out, within bfloat16 rounding of each other, and not identical (the bf16
    path really ran in bf16)."""
    import jax.numpy as jnp

    from scfm_jax.analysis.loading import load, with_compute_dtype
    from scfm_jax.tasks.perturbation_fm import control_embeddings

    folder = shared_path("fixtures", "scfoundation-tiny")
    full = load(folder / "models.ckpt", key="gene", vocabulary=folder / "genes.tsv")
    half = with_compute_dtype(full, "bfloat16")
    assert full.model.dtype == jnp.float32 and half.model.dtype == jnp.bfloat16
    assert half.config.model.dtype == "bfloat16" and with_compute_dtype(full, None) is full
    cells = np.load(folder / "cells.npz")
    genes = [str(g) for g in cells["gene_names"]]
    keep = genes[::4] + ["NOT_A_GENE"]
    kept = tuple(g for g in keep if g in set(full.vocabulary.symbols))
    assert len(kept) > 30
    runs = [control_embeddings(model, cells["counts"][:6], genes, keep, batch_size=4,
                               progress=False) for model in (full, half)]
    expected, rounded = (run.embeddings for run in runs)
    assert runs[0].genes == runs[1].genes == kept
    assert rounded.dtype == np.float32 and rounded.shape == expected.shape
    assert expected.shape[:2] == (6, len(kept))
    relative = np.linalg.norm(rounded - expected) / np.linalg.norm(expected)
    assert 0 < relative < BF16_RELATIVE_TOLERANCE, relative
    table_relative = (np.linalg.norm(runs[1].mean_table().vectors - runs[0].mean_table().vectors)
                      / np.linalg.norm(runs[0].mean_table().vectors))
    assert table_relative < BF16_RELATIVE_TOLERANCE, table_relative
