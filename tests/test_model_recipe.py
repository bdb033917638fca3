"""A third model added by the recipe of docs/adding_a_model.md plans, trains and embeds with no
change to train/, data/, analysis or the CLI.

The toy (tests/toy_model/: an architecture, an objective, a config) is registered as the recipe
says, as a row of `scfm_jax.objectives.OBJECTIVES`, and its config put in a configs/ folder beside
scfoundation_tiny.py; then the plan compiles its train and embed steps, the page's `scfm-jax
train` trains it two steps on a tiny store, and `scfm_jax.analysis` loads the workdir and embeds
an AnnData with it.
"""
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from docs_helpers import run_documented
from scfm_jax import analysis, objectives
from scfm_jax.train import config_checks, plan
from scfm_jax.train.metrics import read_metrics
from shared_helpers import REPO_ROOT
from toy_model import objective as toy_objective
from train_helpers import make_store, synthetic_counts

GENES = 40
# docs/adding_a_model.md, run from a folder holding configs/toy_tiny.py and runs/store
PLAN = "scfm-jax plan --config configs/toy_tiny.py --topology v5e-1 --config.model.num_genes=40"
TRAIN = ("scfm-jax train --config configs/toy_tiny.py --workdir runs/toy "
         "--config.data.store=runs/store")

needs_libtpu = pytest.mark.skipif(
    not plan.libtpu_available(),
    reason='libtpu is not installed (pip install -e ".[tpu]"); .ci/run installs it')


@pytest.fixture
def toy_registered(monkeypatch):
    """The recipe's registration: one row of the objectives table."""
    monkeypatch.setitem(objectives.OBJECTIVES, toy_objective.OBJECTIVE.name,
                        toy_objective.OBJECTIVE)


@pytest.fixture
def project(tmp_path) -> Path:
    """A folder with the toy's config in configs/, beside the config it starts from."""
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO_ROOT / "configs" / "scfoundation_tiny.py", tmp_path / "configs")
    shutil.copy(Path(__file__).parent / "toy_model" / "toy_tiny.py", tmp_path / "configs")
    return tmp_path


def test_the_toy_is_not_known_until_registered():
    with pytest.raises(Exception, match="'toy' is not a known model"):
        objectives.get_objective("toy")


def test_a_model_added_by_the_recipe_plans(toy_registered, project):
    """The plan compiles its train step (counting its FLOPs) and its embed step."""
    config = config_checks.load_config(str(project / "configs" / "toy_tiny.py"))
    config.model.num_genes = GENES
    config = plan.plan_config(config)
    devices = jax.devices()[:1]
    rows = [row for step in ("train", "embed") for row in plan.plan(config, devices, None,
                                                                    step=step)]
    assert [(r.step, r.bucket, r.global_batch) for r in rows] == [("train", 64, 8),
                                                                  ("embed", 64, 8)]
    assert all(not r.error and r.argument_bytes > 0 and r.xla_flops > 0 for r in rows)
    assert rows[0].model_flops > 0


@needs_libtpu
def test_a_model_added_by_the_recipe_plans_for_a_tpu(toy_registered, project, capsys):
    """`scfm-jax plan`, the CLI, compiles it for a TPU chip without one."""
    code = run_documented(PLAN, project)
    out = capsys.readouterr().out
    assert code == 0, out
    (row,) = [line.split() for line in out.splitlines() if line.startswith("train ")]
    assert row[1:3] == ["64", "8"] and "yes" in row   # bucket, batch; it fits the chip


def test_a_model_added_by_the_recipe_trains_and_embeds(toy_registered, project):
    make_store(project / "runs", num_cells=64, num_genes=GENES)
    assert run_documented(TRAIN, project) == 0
    workdir = project / "runs" / "toy"
    metrics = read_metrics(workdir)
    assert sorted(metrics) == [1, 2]
    assert all(np.isfinite(m["train/loss"]) and m["train/hidden_genes"] > 0
               for m in metrics.values())

    loaded = analysis.load(workdir)
    assert (loaded.kind, loaded.step, len(loaded.vocabulary)) == ("toy", 2, GENES)
    assert np.abs(np.asarray(loaded.model.gene_bias[...])).max() > 0   # zero at init: trained

    adata = synthetic_counts(num_cells=20, num_genes=GENES, seed=3)
    adata = adata[:, ::-1].copy()   # genes in another order than the vocabulary's
    analysis.embed(loaded, adata, batch_size=8, progress=False)
    embeddings = adata.obsm[toy_objective.OBJECTIVE.embedding_key]
    assert embeddings.shape == (20, 16) and np.isfinite(embeddings).all()
    assert adata.uns["X_toy"]["model"] == str(workdir)

    # every cell's row is the objective's embed of that cell alone, on the vocabulary's genes
    position = {symbol: i for i, symbol in enumerate(loaded.vocabulary.symbols)}
    for cell in (0, 7, 19):
        row = adata.X[cell]
        genes = np.array([position[adata.var_names[j]] for j in row.indices], np.int32)
        batch = {"gene_ids": genes[None], "counts": row.data[None].astype(np.float32),
                 "total_counts": np.array([row.data.sum()], np.float32),
                 "num_nonzero": np.array([len(genes)], np.int32)}
        alone = np.asarray(toy_objective.embed(loaded.model, batch))[0]
        np.testing.assert_allclose(embeddings[cell], alone, rtol=1e-5, atol=1e-6)
