"""`scfm-jax embed/annotate --store`: a cell store on any mesh and number of processes gives the
results of the single-device AnnData path, resumes after a kill byte for byte, and refuses to mix
checkpoints or stores."""
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from shared_helpers import shared_path
from scfm_jax.analysis import embedding, loading, scmulan_tasks, store_inference
from scfm_jax.data.convert import convert
from scfm_jax.data.store import CellStore
from scfm_jax.data.vocabulary import Vocabulary
from scfm_jax.main import main as scfm_main

REPO = Path(__file__).resolve().parent.parent
# fixture cells with 33..64 expressed genes: one length bucket (64), so each mesh compiles once
ONE_BUCKET = (33, 64)


def _scfoundation_store(root: Path, one_bucket: bool):
    folder = shared_path("fixtures", "scfoundation-tiny")
    cells = np.load(folder / "cells.npz")
    counts = cells["counts"].astype(np.float32)
    keep = np.ones(len(counts), bool)
    if one_bucket:
        nnz = (counts > 0).sum(axis=1)
        keep = (nnz >= ONE_BUCKET[0]) & (nnz <= ONE_BUCKET[1])
    adata = anndata.AnnData(sp.csr_matrix(counts[keep]),
                            obs=pd.DataFrame({"donor": ["a", "b"] * (int(keep.sum()) // 2)},
                                             index=cells["cell_ids"][keep].astype(str)),
                            var=pd.DataFrame(index=cells["gene_names"].astype(str)))
    adata.write_h5ad(root / "cells.h5ad")
    convert([root / "cells.h5ad"], root / "store", vocabulary=str(folder / "genes.tsv"),
            obs=["donor"], shard_size=3)
    return root / "store"


@pytest.fixture(scope="module")
def scfoundation(tmp_path_factory):
    """A 4-cell store of the fixture's cells (2 shards), the model, and the AnnData path's result
    on one device."""
    folder = shared_path("fixtures", "scfoundation-tiny")
    root = tmp_path_factory.mktemp("store_embed")
    store = _scfoundation_store(root, one_bucket=True)
    model = loading.load(folder / "models.ckpt", vocabulary=folder / "genes.tsv")
    cells = CellStore.open(store).to_anndata()
    embedding.embed_cells(model, cells, batch_size=4, progress=False)
    return dict(root=root, store=store, model=model, folder=folder,
                reference=cells.obsm["X_scfoundation"])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_store_embeddings_on_one_device_match_the_anndata_path_and_resume(scfoundation, tmp_path):
    output = tmp_path / "embedded"
    summary = embedding.embed_store(scfoundation["model"], scfoundation["store"], output,
                                    batch_size=2, chunk_cells=2, progress=False,
                                    devices=jax.devices()[:1])
    assert (summary["chunks"], summary["computed"], summary["mesh"]["data"]) == (2, 4, 1)
    back = store_inference.to_anndata(output)
    np.testing.assert_allclose(back.obsm["X_scfoundation"], scfoundation["reference"],
                               atol=1e-5, rtol=1e-5)
    assert back.obs["donor"].tolist() == ["a", "b", "a", "b"]
    finished = _files(output)
    # a run killed after the first chunk: its marker and the second chunk's files are missing
    shutil.rmtree(output / "done")
    (output / "done").mkdir()
    (output / "done" / "00000000").write_bytes(b"")
    for name in ("embedding", "cell_index"):
        (output / name / "c" / ("1/0" if name == "embedding" else "1")).unlink()
    summary = embedding.embed_store(scfoundation["model"], scfoundation["store"], output,
                                    batch_size=2, chunk_cells=2, progress=False,
                                    devices=jax.devices()[:1])
    assert (summary["computed"], summary["skipped_chunks"]) == (2, 1)
    assert _files(output) == finished
    # a run drops the cached index pointers of the shards it has passed: a later read loads them
    store = CellStore.open(scfoundation["store"])
    rows = store.read(range(4))
    store.forget_before(4)
    again = store.read(range(4))
    np.testing.assert_array_equal(again.counts, rows.counts)
    np.testing.assert_array_equal(again.indptr, rows.indptr)


def test_memory_kept_by_a_store_run_is_bounded_whatever_the_number_of_cells(scfoundation,
                                                                             monkeypatch):
    """What would make a run's memory grow with the store, asserted on the structures themselves
    (RSS against store size is measured by benchmarks/bench_inference_memory.py)."""
    from scfm_jax.data import store as store_lib

    # the store is read without a page cache, in the process-wide context of a bounded chunk cache
    opened = store_inference.open_store(str(scfoundation["store"]))
    assert opened._pages.capacity == 0
    limit = store_lib.context()["cache_pool"].to_json()["total_bytes_limit"]
    assert 0 < limit <= int(os.environ.get("SCFM_TENSORSTORE_CACHE_BYTES", 64 << 20))
    # the output's arrays keep no written chunk (the default cache_pool holds 0 bytes)
    assert store_inference.output_context()["cache_pool"].to_json().get("total_bytes_limit", 0) == 0
    # a cell range is a range; an obs filter keeps one count per block, not the cells or codes
    assert isinstance(store_inference.Selection.parse("1:4").cells(opened), range)
    monkeypatch.setattr(store_inference, "FILTER_BLOCK", 1)   # one block per cell: 4 blocks
    selected = store_inference.Selection.parse(obs_filter="donor=b").cells(opened)
    held = [v for v in vars(selected).values() if isinstance(v, np.ndarray)]
    assert [len(v) for v in held] == [5]   # the counts before each of the 4 blocks, and in all
    assert all(not shard._obs for shard in opened._shards[:-1])   # the passed shards' codes dropped
    assert len(selected) == 2 and selected[0:2].tolist() == [1, 3]
    reads = []
    monkeypatch.setattr(opened, "read_obs", lambda *a: reads.append(a) or CellStore.read_obs(
        opened, *a))
    assert selected[0:1].tolist() == selected[0:1].tolist() == [1] and len(reads) == 1
    assert [selected[a:b].tolist() for a, b in ((1, 2), (0, 1), (2, 2))] == [[3], [1], []]
    rows, found = store_inference.selection_positions(selected, [0, 1, 2, 3, 4])
    assert rows.tolist() == [0, 0, 1, 1, 2] and found.tolist() == [False, True, False, True, False]


def test_to_anndata_reads_only_the_rows_of_its_selection(scfoundation, tmp_path):
    output = tmp_path / "embedded"
    embedding.embed_store(scfoundation["model"], scfoundation["store"], output, batch_size=2,
                          chunk_cells=2, selection=store_inference.Selection(1, 4),
                          progress=False, devices=jax.devices()[:1])
    everything = store_inference.to_anndata(output)
    assert everything.obs_names.tolist() == ["1", "2", "3"]
    np.testing.assert_allclose(everything.obsm["X_scfoundation"], scfoundation["reference"][1:],
                               atol=1e-5, rtol=1e-5)
    # with the first chunk of cell_index and embedding (cells 1 and 2) damaged, cell 3 and the
    # second shard (cell 3) come back as before: neither reads the rows it does not return
    (output / "cell_index" / "c" / "0").write_bytes(b"damaged")
    (output / "embedding" / "c" / "0" / "0").write_bytes(b"damaged")
    for back in (store_inference.to_anndata(output, cells=[3]),
                 store_inference.to_anndata(output, shard=1)):
        assert back.obs_names.tolist() == ["3"]
        np.testing.assert_array_equal(back.obsm["X_scfoundation"],
                                      everything.obsm["X_scfoundation"][[2]])
    with pytest.raises(ValueError, match="requested cells"):
        store_inference.to_anndata(output, cells=[0])


EMBED_STORE = ("scfm-jax embed --checkpoint models.ckpt --vocabulary genes.tsv "
               "--store cells_store --obs-filter donor=a --output donor_a --batch-size 8")
ANNOTATE_STORE = ("scfm-jax annotate --checkpoint ckpt.pt --vocabulary scmulan_vocabulary "
                  "--gene-list total_gene_list_42117.txt --store cells_store --output cell_types "
                  "--batch-size 8")


def run_command(command: str, cwd: Path, *extra: str) -> int:
    """A documented `scfm-jax ...` line run in this process from `cwd` (plus `extra` flags)."""
    words = shlex.split(command)
    assert words[0] == "scfm-jax"
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return scfm_main(words[1:] + list(extra))
    finally:
        os.chdir(previous)


def test_embed_store_command_on_every_device_with_a_filter_and_refusals(scfoundation, tmp_path,
                                                                        capsys):
    store, folder = scfoundation["store"], scfoundation["folder"]
    for name, target in (("models.ckpt", folder / "models.ckpt"),
                         ("genes.tsv", folder / "genes.tsv"), ("cells_store", store)):
        (tmp_path / name).symlink_to(target)
    output = tmp_path / "donor_a"
    assert run_command(EMBED_STORE, tmp_path, "--quiet") == 0
    assert "'data': 8" in capsys.readouterr().err   # every device of the conftest's eight
    back = store_inference.to_anndata(output)   # the store found from another folder than the run's
    np.testing.assert_allclose(back.obsm["X_scfoundation"], scfoundation["reference"][[0, 2]],
                               atol=1e-5, rtol=1e-5)
    one = store_inference.to_anndata(output, store, cells=[2])
    np.testing.assert_allclose(one.obsm["X_scfoundation"], scfoundation["reference"][[2]],
                               atol=1e-5, rtol=1e-5)
    shard = store_inference.to_anndata(output, store, shard=0)   # cells 0..2; 0 and 2 computed
    assert shard.obs_names.tolist() == ["0", "2"]
    with pytest.raises(ValueError, match="requested cells"):
        store_inference.to_anndata(output, store, cells=[1])
    # another weight set of the checkpoint: refused in one line, the output untouched
    before = _files(output)
    assert run_command(EMBED_STORE, tmp_path, "--key", "rde", "--quiet") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("scfm-jax embed: error:") and "another checkpoint" in err[-1]
    assert "--overwrite" in err[-1] and _files(output) == before
    # a folder that is not an output of ours
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert run_command(EMBED_STORE.replace("donor_a", "foreign"), tmp_path, "--quiet") == 1
    assert "scfm-jax embed did not write (e.g. 'notes.txt')" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
    assert run_command(EMBED_STORE, tmp_path, "--input", "x.h5ad") == 2


@pytest.mark.slow
def test_store_embeddings_on_four_devices_across_buckets(tmp_path):
    folder = shared_path("fixtures", "scfoundation-tiny")
    store = _scfoundation_store(tmp_path, one_bucket=False)
    model = loading.load(folder / "models.ckpt", vocabulary=folder / "genes.tsv")
    cells = CellStore.open(store).to_anndata()
    embedding.embed_cells(model, cells, batch_size=3, progress=False)
    for devices, output in ((jax.devices()[:1], "one"), (jax.devices()[:4], "four")):
        embedding.embed_store(model, store, tmp_path / output, batch_size=4, chunk_cells=3,
                              progress=False, devices=devices)
        np.testing.assert_allclose(
            store_inference.to_anndata(tmp_path / output).obsm["X_scfoundation"],
            cells.obsm["X_scfoundation"], atol=1e-5, rtol=1e-5)


def _scmulan_store(root: Path):
    folder = shared_path("fixtures", "scmulan-tiny")
    cells = np.load(folder / "cells.npz")
    genes = (folder / "gene_set.txt").read_text().split()
    adata = anndata.AnnData(sp.csr_matrix(cells["expr"].astype(np.float32)),
                            obs=pd.DataFrame(index=cells["cell_ids"].astype(str)),
                            var=pd.DataFrame(index=genes))
    adata.write_h5ad(root / "cells.h5ad")
    convert([root / "cells.h5ad"], root / "store",
            vocabulary=Vocabulary(name="scmulan-gene-set", symbols=tuple(genes)),
            allow_non_integer=True, shard_size=4)
    return folder, adata, root / "store"


@pytest.fixture(scope="module")
def scmulan(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_annotate")
    folder, adata, store = _scmulan_store(root)
    annotator = scmulan_tasks.load_annotator(folder / "ckpt.pt", vocabulary=folder,
                                             gene_list=folder / "gene_set.txt")
    scmulan_tasks.annotate(annotator.model, annotator.token_set, adata, batch_size=4,
                           progress=False)
    return dict(root=root, store=store, annotator=annotator, reference=adata,
                expected=np.load(folder / "expected.npz"))


def _check_annotation(output, reference):
    back = store_inference.to_anndata(output)
    for column in ("cell_type_scmulan", "cell_type_scmulan_coarse"):
        assert back.obs[column].astype(str).tolist() == reference.obs[column].astype(str).tolist()
        probability = column + "_probability"
        np.testing.assert_allclose(back.obs[probability], reference.obs[probability], atol=1e-5,
                                   rtol=0)   # NaN (Unclassified) where the reference has NaN
        assert back.obs[probability].notna().any()
    np.testing.assert_allclose(back.obsm["X_scmulan"], reference.obsm["X_scmulan"], atol=1e-5,
                               rtol=0)


@pytest.mark.slow   # a minute of generation compiles on two cores per mesh
@pytest.mark.parametrize("devices, chunk_cells", [(1, 4), (4, 3)])
def test_store_annotation_matches_the_anndata_path(scmulan, tmp_path, devices, chunk_cells):
    assert list(scmulan["reference"].obs["cell_type_scmulan"]) == list(
        scmulan["expected"]["pred_cell_type"])
    scmulan_tasks.annotate_store(scmulan["annotator"], scmulan["store"], tmp_path / "types",
                                 batch_size=4, chunk_cells=chunk_cells, progress=False,
                                 devices=jax.devices()[:devices])
    _check_annotation(tmp_path / "types", scmulan["reference"])


@pytest.mark.slow
def test_annotate_store_command_on_every_device(scmulan, tmp_path):
    folder = shared_path("fixtures", "scmulan-tiny")
    links = {"ckpt.pt": folder / "ckpt.pt", "scmulan_vocabulary": folder,
             "total_gene_list_42117.txt": shared_path("data", "scmulan",
                                                      "total_gene_list_42117.txt"),
             "cells_store": scmulan["store"]}
    for name, target in links.items():
        (tmp_path / name).symlink_to(target)
    assert run_command(ANNOTATE_STORE, tmp_path, "--quiet") == 0
    _check_annotation(tmp_path / "cell_types", scmulan["reference"])


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")


@pytest.mark.slow
def test_two_processes_of_two_devices_embed_and_annotate_as_one_device(scfoundation, scmulan,
                                                                       tmp_path):
    """Embedding as a SLURM job of two tasks (the fake sbatch/srun of tests/fakes), annotation
    with local_processes.sh."""
    folder = scfoundation["folder"]
    scmulan_folder = shared_path("fixtures", "scmulan-tiny")
    launchers = {"embedded": ["sbatch", "--ntasks-per-node=2", "launch/slurm.sbatch"],
                 "types": ["bash", str(REPO / "launch" / "local_processes.sh"), "2", "2", "--",
                           sys.executable, "-m", "scfm_jax.main"]}
    commands = {
        "embedded": ["embed", "--checkpoint", str(folder / "models.ckpt"), "--vocabulary",
                     str(folder / "genes.tsv"), "--store", str(scfoundation["store"]),
                     "--num-cpu-devices", "2"],
        "types": ["annotate", "--checkpoint", str(scmulan_folder / "ckpt.pt"), "--vocabulary",
                  str(scmulan_folder), "--gene-list", str(scmulan_folder / "gene_set.txt"),
                  "--store", str(scmulan["store"])]}
    env = dict(_env(), PATH=f"{REPO / 'tests' / 'fakes'}{os.pathsep}{os.environ['PATH']}")
    for name, command in commands.items():
        result = subprocess.run(
            [*launchers[name], *command, "--output", str(tmp_path / name), "--batch-size",
             "4", "--chunk-cells", "1", "--quiet"],
            capture_output=True, text=True, env=env, timeout=900,
            cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "'data': 4" in result.stderr, result.stderr[-2000:]
    np.testing.assert_allclose(
        store_inference.to_anndata(tmp_path / "embedded").obsm["X_scfoundation"],
        scfoundation["reference"], atol=1e-5, rtol=1e-5)
    _check_annotation(tmp_path / "types", scmulan["reference"])


@pytest.mark.slow
def test_kill_9_at_a_random_moment_then_rerun_gives_identical_bytes(tmp_path):
    folder = shared_path("fixtures", "scfoundation-tiny")
    store = _scfoundation_store(tmp_path, one_bucket=False)
    command = [sys.executable, "-m", "scfm_jax.main", "embed", "--checkpoint",
               str(folder / "models.ckpt"), "--vocabulary", str(folder / "genes.tsv"),
               "--store", str(store), "--chunk-cells", "1", "--batch-size", "1", "--quiet",
               "--num-cpu-devices", "1"]
    env = _env()
    subprocess.run(command + ["--output", str(tmp_path / "whole")], check=True, env=env,
                   capture_output=True, timeout=900)
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(4.0, 25.0)
    process = subprocess.Popen(command + ["--output", str(tmp_path / "killed")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list((tmp_path / "killed" / "done").glob("*"))) if (
        tmp_path / "killed" / "done").exists() else 0
    result = subprocess.run(command + ["--output", str(tmp_path / "killed")], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"({done} already done)" in result.stderr, (seed, delay, result.stderr[-1000:])
    assert _files(tmp_path / "killed") == _files(tmp_path / "whole"), (seed, delay, done)
