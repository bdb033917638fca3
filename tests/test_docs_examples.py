"""The shell commands of README.md and docs/, run as documented on small inputs.

Each command string here is the documented text exactly (`tests/test_docs_commands.py` checks that
every documented `scfm-jax` command is held by a test); the test first puts the files the command
names, under those names, in a temporary folder and runs the command from there.
"""
import json
import shutil
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse

from docs_helpers import REPO_ROOT, run_documented
from shared_helpers import shared_path

from scfm_jax.data.datasets import pbmc68k_reduced_counts
from scfm_jax.data.store import CellStore

TOUR_DATA = ("mkdir -p data && python -c \"from scfm_jax.data.datasets import "
             "pbmc68k_reduced_counts as pbmc; a = pbmc(); a[:350].write_h5ad('data/pbmc_1.h5ad'); "
             "a[350:].write_h5ad('data/pbmc_2.h5ad')\"")
TOUR_CONVERT = "scfm-jax convert data/*.h5ad --output runs/store --vocabulary from-data"
TOUR_TRAIN = ("scfm-jax train --config configs/scfoundation_tiny.py --workdir runs/tiny \\\n"
              "    --config.data.store=runs/store --config.train.steps=100")
TOUR_EMBED = ("scfm-jax embed --checkpoint runs/tiny --input data/pbmc_1.h5ad "
              "--output runs/embedded.h5ad")


def _configs():
    """The repository's configs/, copied beside a test's files: `--config configs/x.py` resolves."""
    return REPO_ROOT / "configs"


@pytest.fixture(scope="module")
def pbmc():
    return pbmc68k_reduced_counts()


@pytest.mark.slow  # trains the tiny scFoundation (compiles per bucket): minutes on 2 shared cores
def test_the_tour_converts_trains_and_embeds(tmp_path):
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert TOUR_DATA in readme, "the tour's first line changed: update TOUR_DATA"
    subprocess.run(["bash", "-c", TOUR_DATA.replace("python -c", f"{sys.executable} -c", 1)],
                   cwd=tmp_path, check=True)
    shutil.copytree(_configs(), tmp_path / "configs")
    assert run_documented(TOUR_CONVERT, tmp_path) == 0
    assert CellStore.open(str(tmp_path / "runs/store")).num_cells == 700
    assert run_documented(TOUR_TRAIN, tmp_path) == 0
    records = [json.loads(line) for line in (tmp_path / "runs/tiny/metrics.jsonl").open()]
    assert max(r["step"] for r in records) == 100
    assert run_documented(TOUR_EMBED, tmp_path) == 0
    embedded = anndata.read_h5ad(tmp_path / "runs/embedded.h5ad")
    assert embedded.n_obs == 350
    assert np.isfinite(embedded.obsm["X_scfoundation"]).all()


@pytest.mark.slow  # the demo itself: ~4 min on 2 shared cores
def test_the_readme_demo_command(tmp_path):
    assert run_documented("scfm-jax demo --workdir runs/demo", tmp_path) == 0
    result = json.loads((tmp_path / "runs/demo/demo_result.json").read_text())
    assert result["model_mse"] < result["baseline_mse"], result
    assert (tmp_path / "runs/demo/loss_curve.png").stat().st_size > 10_000


def _write_10x(adata, folder):
    """A Cell Ranger `filtered_feature_bc_matrix/` folder (genes x cells matrix.mtx.gz)."""
    import gzip

    folder.mkdir(parents=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb") as out:
        scipy.io.mmwrite(out, scipy.sparse.csr_matrix(adata.X).T.tocoo().astype(np.int64))
    features = pd.DataFrame({"id": adata.var_names, "name": adata.var_names,
                             "type": "Gene Expression"})
    features.to_csv(folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(adata.obs_names).to_csv(folder / "barcodes.tsv.gz", header=False, index=False)


def test_convert_mixes_h5ad_and_10x_inputs_as_documented(pbmc, tmp_path, monkeypatch):
    # the official vocabulary, from the shared copy instead of the network
    monkeypatch.setenv("SCFM_VOCABULARY_MIRROR", shared_path("data").as_uri())
    monkeypatch.setenv("SCFM_CACHE_DIR", str(tmp_path / "cache"))
    cells = pbmc[:90].copy()
    cells.obs["cell_type"] = cells.obs["bulk_labels"].astype(str).astype("category")
    cells.obs["batch"] = pd.Categorical(["a"] * 30 + ["b"] * 30 + ["c"] * 30)
    cells[:30].write_h5ad(tmp_path / "pbmc_a.h5ad")
    cells[30:60].write_h5ad(tmp_path / "pbmc_b.h5ad")
    _write_10x(cells[60:], tmp_path / "filtered_feature_bc_matrix")
    command = ("scfm-jax convert pbmc_a.h5ad pbmc_b.h5ad \\\n"
               "    --output stores/pbmc --vocabulary scfoundation --obs cell_type,batch "
               "--workers 4")
    assert run_documented(command, tmp_path) == 0
    store = CellStore.open(str(tmp_path / "stores/pbmc"))
    assert store.num_cells == 60
    assert len(store.vocabulary) == 19264
    assert {"cell_type", "batch"} <= set(store.obs_columns)
    tenx = ("scfm-jax convert filtered_feature_bc_matrix/ --output stores/tenx "
            "--vocabulary scfoundation")
    assert run_documented(tenx, tmp_path) == 0
    assert CellStore.open(str(tmp_path / "stores/tenx")).num_cells == 30


@pytest.fixture
def official_scmulan_stand_in(tmp_path, monkeypatch):
    """The files the scMulan page names, with the fixture's random-weight checkpoint standing in
    for the official weights: `ckpt_scMulan.pt`, `scmulan_vocab/`, `cells.h5ad` (log-normalised)
    and `counts.h5ad` (raw counts)."""
    folder = shared_path("fixtures", "scmulan-tiny")
    gene_list = shared_path("data", "scmulan", "total_gene_list_42117.txt")
    shutil.copyfile(folder / "ckpt.pt", tmp_path / "ckpt_scMulan.pt")
    vocab = tmp_path / "scmulan_vocab"
    vocab.mkdir()
    for name in ("token_set.tsv", "gene_set.txt", "meta_categories.json"):
        shutil.copyfile(folder / name, vocab / name)
    shutil.copyfile(gene_list, vocab / gene_list.name)
    cells = np.load(folder / "cells.npz")
    genes = (folder / "gene_set.txt").read_text().split()
    expr = np.tile(cells["expr"], (4, 1))  # 24 cells: enough for the 15 neighbours of --smooth
    obs = pd.DataFrame(index=[f"{cell}-{copy}" for copy in range(4) for cell in cells["cell_ids"]])
    var = pd.DataFrame(index=genes)
    anndata.AnnData(scipy.sparse.csr_matrix(expr), obs=obs, var=var).write_h5ad(
        tmp_path / "cells.h5ad")
    counts = np.round(np.expm1(expr) * 3).astype(np.float32)
    anndata.AnnData(scipy.sparse.csr_matrix(counts), obs=obs, var=var).write_h5ad(
        tmp_path / "counts.h5ad")
    monkeypatch.setenv("SCFM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_scmulan_annotate_commands_as_documented(official_scmulan_stand_in):
    folder = official_scmulan_stand_in
    log_normalised = ("scfm-jax annotate --checkpoint ckpt_scMulan.pt --vocabulary scmulan_vocab/ "
                      "\\\n    --input cells.h5ad --output annotated.h5ad")
    counts = ("scfm-jax annotate --checkpoint ckpt_scMulan.pt --vocabulary scmulan_vocab/ \\\n"
              "    --input counts.h5ad --output annotated_counts.h5ad --counts --smooth 15")
    assert run_documented(log_normalised, folder) == 0
    assert run_documented(counts, folder) == 0
    annotated = anndata.read_h5ad(folder / "annotated.h5ad")
    smoothed = anndata.read_h5ad(folder / "annotated_counts.h5ad")
    assert annotated.obsm["X_scmulan"].shape[0] == annotated.n_obs == 24
    assert annotated.obs["cell_type_scmulan"].notna().all()
    assert "cell_type_scmulan_smoothed" not in annotated.obs
    assert smoothed.obs["cell_type_scmulan_smoothed"].notna().all()


@pytest.mark.slow  # trains the tiny scMulan through the CLI, then annotates with it
@pytest.mark.heavy
def test_scmulan_pretraining_then_annotation_as_documented(pbmc, tmp_path):
    cells = pbmc.copy()
    cells.obs["cell_type"] = cells.obs["bulk_labels"].astype(str).astype("category")
    cells.obs["tissue"] = pd.Categorical(["Blood"] * cells.n_obs)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    shutil.copytree(_configs(), tmp_path / "configs")
    assert run_documented("scfm-jax convert cells.h5ad --output runs/store --vocabulary from-data "
                          "--obs tissue,cell_type", tmp_path) == 0
    train = ("scfm-jax train --config configs/scmulan_tiny.py --workdir runs/scmulan \\\n"
             "    --config.data.store=runs/store \\\n"
             "    --config.objective.metadata_columns='(\"tissue\", \"cell_type\")' \\\n"
             "    --config.objective.cell_type_columns='(\"cell_type\",)' \\\n"
             "    --config.train.steps=100")
    assert run_documented(train, tmp_path) == 0
    annotate = ("scfm-jax annotate --checkpoint runs/scmulan --input cells.h5ad "
                "--output annotated.h5ad --counts")
    assert run_documented(annotate, tmp_path) == 0
    annotated = anndata.read_h5ad(tmp_path / "annotated.h5ad")
    assert set(annotated.obs["cell_type_scmulan"].astype(str)) <= (
        set(cells.obs["cell_type"].astype(str)) | {"Unclassified"})


@pytest.mark.slow  # a TPU compile of the tiny config with libtpu: about a minute
@pytest.mark.heavy
def test_plan_of_the_tiny_config_as_documented(tmp_path, capfd):
    pytest.importorskip("libtpu", reason="scfm-jax plan needs libtpu: pip install -e \".[tpu]\"")
    shutil.copytree(_configs(), tmp_path / "configs")
    command = ("scfm-jax plan --config configs/scfoundation_tiny.py --config.model.num_genes=19264 "
               "\\\n    --topology v5e-8 --bucket 512")
    assert run_documented(command, tmp_path) == 0
    rows = [line.split() for line in capfd.readouterr().out.splitlines()]
    assert any(row[:2] == ["train", "512"] for row in rows)   # the row of the bucket asked for
