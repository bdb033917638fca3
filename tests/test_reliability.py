"""Nothing lost, nothing silently wrong: the misuse and damage cases of the CLI, one test each.

Every case checks that the error is detected, named in one line (no traceback) and that nothing of
the user's is deleted. Random damage (deleted / truncated / flipped store files, flipped checkpoint
bytes) runs over several seeds. Cases that train a model are `slow`.
"""
import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import anndata
import h5py
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfm_jax import main as main_module
from scfm_jax.data import verify as verify_lib
from scfm_jax.data.convert import convert
from scfm_jax.data.store import CellStore, StoreDamaged
from scfm_jax.errors import InputError
from scfm_jax.main import main as scfm_main
from scfm_jax.train import workdir as workdir_lib
from scfm_jax.train.checkpointing import CheckpointDamaged, Checkpoints
from train_helpers import make_store, synthetic_counts, tiny_config

REPO = Path(__file__).resolve().parent.parent


def counts_adata(num_cells=60, num_genes=30, seed=0, name="c"):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, (num_cells, num_genes)).astype(np.float32)
    counts[:, 0] += 1   # every cell has counts
    obs = pd.DataFrame({"kind": pd.Categorical(rng.choice(["a", "b"], num_cells))},
                       index=[f"{name}{i}" for i in range(num_cells)])
    return anndata.AnnData(sp.csr_matrix(counts), obs=obs,
                           var=pd.DataFrame(index=[f"G{i}" for i in range(num_genes)]))


def write(adata, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with anndata.settings.override(allow_write_nullable_strings=True):
            adata.write_h5ad(path)
    return Path(path)


# What the misuse cases of this module end in, printed at its end: every `run_cli` call is a case;
# a failing case should end in exactly one `error:` line; `files_of` comparisons count lost files
# and `result_is` comparisons results reported as success but wrong.
TALLY = dict.fromkeys(("cases", "one-line errors", "successes", "tracebacks", "files lost",
                       "results silently wrong"), 0)


@pytest.fixture(scope="module", autouse=True)
def tally(request):
    yield TALLY
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and TALLY["cases"]:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\nreliability cases: "
                                + ", ".join(f"{k} {v}" for k, v in TALLY.items()))


def run_cli(capsys, *argv):
    """(exit status, stderr lines) of `scfm-jax ARGV` run in this process (a tallied case)."""
    status = scfm_main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    TALLY["cases"] += 1
    traceback = any("Traceback" in line for line in err)
    TALLY["tracebacks"] += traceback
    if status == 0:
        TALLY["successes"] += 1
    elif sum("error:" in line for line in err) == 1 and not traceback:
        TALLY["one-line errors"] += 1
    assert not traceback, err
    return status, err


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def unchanged(before: dict[str, bytes], root: Path) -> bool:
    """Whether `root` still holds exactly the files `before` listed (tallied when not)."""
    same = files_of(root) == before
    TALLY["files lost"] += not same
    return same


def result_is(ok: bool) -> bool:
    """A check of a result a command reported as written (tallied when wrong)."""
    TALLY["results silently wrong"] += not ok
    return ok


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A converted store of 60 cells in 3 shards with several chunks each."""
    root = tmp_path_factory.mktemp("reliability_store")
    path = write(counts_adata(), root / "cells.h5ad")
    convert([path], root / "store", vocabulary="from-data", shard_size=20, chunk_elements=64)
    return root / "store"


@pytest.fixture
def store_copy(small_store, tmp_path):
    import shutil
    target = tmp_path / "store"
    shutil.copytree(small_store, target)
    return target


# ------------------------------------------------------------------------ 1. convert --overwrite

@pytest.mark.parametrize("overwrite", [False, True])
def test_overwrite_never_deletes_a_folder_that_is_not_a_store(tmp_path, capsys, overwrite):
    folder = tmp_path / "d"
    folder.mkdir()
    write(counts_adata(), folder / "cells.h5ad")
    (folder / "analysis.ipynb").write_text("my notes")
    before = files_of(folder)
    flags = ["--overwrite"] if overwrite else []
    status, err = run_cli(capsys, "convert", folder / "cells.h5ad", "--output", folder,
                          "--vocabulary", "from-data", "--no-progress", *flags)
    assert status == 1 and len(err) == 1 and "contains the input" in err[0]
    other = tmp_path / "other.h5ad"
    write(counts_adata(seed=1), other)
    status, err = run_cli(capsys, "convert", other, "--output", folder, "--vocabulary",
                          "from-data", "--no-progress", *flags)
    assert status == 1 and "convert did not write" in err[-1] and "analysis.ipynb" in err[-1]
    assert unchanged(before, folder)   # nothing deleted, nothing written


def test_overwrite_replaces_only_what_a_conversion_wrote(store_copy, tmp_path, capsys):
    source = tmp_path / "new.h5ad"
    write(counts_adata(seed=3), source)
    status, err = run_cli(capsys, "convert", source, "--output", store_copy, "--vocabulary",
                          "from-data", "--shard-size", "50", "--no-progress")
    assert status == 1 and "different inputs" in err[-1]   # without --overwrite: refused
    status, _ = run_cli(capsys, "convert", source, "--output", store_copy, "--vocabulary",
                        "from-data", "--shard-size", "50", "--no-progress", "--overwrite")
    assert status == 0
    assert sorted(p.name for p in (store_copy / "shards").iterdir()) == ["00000.zarr", "00001.zarr"]
    assert CellStore.open(store_copy).num_cells == 60


def test_output_inside_an_input_folder_is_refused(tmp_path, capsys):
    source = tmp_path / "cells.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts_adata().write_zarr(source)
    status, err = run_cli(capsys, "convert", source, "--output", source / "store",
                          "--vocabulary", "from-data", "--no-progress")
    assert status == 1 and "inside the input" in err[-1]
    assert not (source / "store").exists()


# ------------------------------------------------------------------------ 2. store integrity

@pytest.mark.parametrize("array", ["data", "indices", "indptr"])
def test_a_missing_chunk_is_an_error_naming_shard_and_file(store_copy, capsys, array):
    victim = store_copy / "shards" / "00001.zarr" / "X" / array / "c" / "0"
    victim.unlink()
    with pytest.raises(StoreDamaged, match=rf"shards/00001\.zarr .*X/{array}/c/0: missing"):
        CellStore.open(store_copy)
    status, out = scfm_main(["verify", str(store_copy)]), capsys.readouterr()
    assert status == 1
    assert f"damaged: shards/00001.zarr: X/{array}/c/0: missing" in out.out
    assert out.out.count("damaged:") == 1


def test_a_chunk_lost_after_open_is_an_error_not_zeros(store_copy):
    store = CellStore.open(store_copy, page_cells=4)
    (store_copy / "shards" / "00002.zarr" / "X" / "data" / "c" / "1").unlink()
    with pytest.raises(StoreDamaged, match=r"shards/00002\.zarr .*X/data"):
        store.read(np.arange(40, 60))


def test_flipped_chunk_bytes_fail_the_crc(store_copy):
    chunk = store_copy / "shards" / "00000.zarr" / "X" / "indices" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x10
    chunk.write_bytes(bytes(data))
    store = CellStore.open(store_copy)   # every file is present: the cheap checks pass
    with pytest.raises(StoreDamaged, match=r"X/indices.*[Dd]igest mismatch"):
        store.read(np.arange(20))


def test_manifest_counts_are_checked_against_indptr(store_copy):
    manifest = json.loads((store_copy / "manifest.json").read_text())
    manifest["shards"][0]["nnz"] += 1
    (store_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreDamaged, match=r"X/indptr: spans"):
        CellStore.open(store_copy).read([0])


def test_verify_passes_an_intact_store(small_store, capsys):
    assert scfm_main(["verify", str(small_store)]) == 0
    assert "all intact" in capsys.readouterr().out


@pytest.mark.parametrize("seed", range(6))
def test_random_store_damage_is_detected_and_named(store_copy, seed):
    """Delete, truncate or flip a random file of a random shard: verify names that shard, and
    reading every cell and obs column either raises StoreDamaged or returns the intact values."""
    rng = np.random.default_rng(seed)
    intact = CellStore.open(store_copy).read(np.arange(60))
    shard = f"{rng.integers(3):05d}.zarr"
    candidates = sorted(p for p in (store_copy / "shards" / shard).rglob("*") if p.is_file())
    victim = candidates[rng.integers(len(candidates))]
    action = ["delete", "truncate", "flip"][seed % 3]
    data = victim.read_bytes()
    if action == "delete":
        victim.unlink()
    elif action == "truncate":
        victim.write_bytes(data[:len(data) // 2])
    else:
        flipped = bytearray(data)
        flipped[rng.integers(len(flipped))] ^= 0xFF
        victim.write_bytes(bytes(flipped))
    _, problems = verify_lib.verify(store_copy)
    assert list(problems) == [f"shards/{shard}"], (victim, action, problems)
    try:
        store = CellStore.open(store_copy)
        rows = store.read(np.arange(60))
        for column in store.obs_columns:
            store.read_obs(column, np.arange(60))
    except StoreDamaged as error:
        assert f"shards/{shard}" in str(error)
    else:   # the damage is in a file the reader does not use (obs names, var): values intact
        np.testing.assert_array_equal(rows.counts, intact.counts)
        np.testing.assert_array_equal(rows.gene_ids, intact.gene_ids)


# ------------------------------------------------------------------------ 3. checkpoints, outputs

def _tiny_checkpoint(workdir):
    state = {"w": jax.random.normal(jax.random.key(0), (256, 256)),   # not inlined by OCDBT
             "b": jnp.arange(64, dtype=jnp.int32), "key": jax.random.key(3)}
    checkpoints = Checkpoints(workdir, asynchronous=False)
    checkpoints.save(1, state, config=ml_collections.ConfigDict({"a": 1}), seed=0,
                     vocabulary={"name": "v", "digest": "d", "symbols": ["A"]})
    checkpoints.close()
    return state


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def test_checkpoint_checksums_round_trip_and_catch_a_changed_value(tmp_path):
    state = _tiny_checkpoint(tmp_path)
    checkpoints = Checkpoints(tmp_path, read_only=True)
    restored = checkpoints.restore_state(_abstract(state), 1)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert checkpoints.restore_metadata(1)["config"] == {"a": 1}
    changed = dict(restored, w=restored["w"].at[3, 7].add(1.0))
    with pytest.raises(CheckpointDamaged, match=r"step 1 .*state array w .*checksum mismatch"):
        checkpoints.verify(1, changed)
    checkpoints.close()



def test_reads_finishing_after_a_failed_restore_are_not_reported(monkeypatch):
    """TensorStore reads that finish after Orbax closed its loop (a damaged checkpoint) would print
    a traceback each; only that RuntimeError is dropped, every other report still goes through."""
    import types

    from scfm_jax.train import checkpointing
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    checkpointing._ignore_reads_after_a_failed_restore()
    checkpointing._ignore_reads_after_a_failed_restore()   # once: not wrapped twice
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    sys.unraisablehook(closed)
    sys.unraisablehook(other)
    assert reported == [other]


_RESTORE = """
import jax, sys
from scfm_jax.train.checkpointing import Checkpoints
import jax.numpy as jnp
state = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32), "b": jax.ShapeDtypeStruct((64,), jnp.int32),
         "key": jax.eval_shape(lambda: jax.random.key(3))}
state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                     sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), state)
c = Checkpoints(sys.argv[1], read_only=True)
c.restore_metadata(1)
c.restore_state(state, 1)
print("RESTORED INTACT")
"""


@pytest.mark.slow   # one Python + JAX start per seed
@pytest.mark.parametrize("seed", range(4))
def test_random_checkpoint_byte_flips_are_detected(tmp_path, seed):
    """Flip 4 KB (or all of a smaller file) in a random array or JSON file of a checkpoint: the
    restore, in a fresh process (this one caches what it read), fails naming the step."""
    _tiny_checkpoint(tmp_path)
    step = tmp_path / "checkpoints" / "1"
    # the files a restore reads values from: the JSON items and the array data (small arrays are
    # inlined in OCDBT's index nodes, whose stale per-process copies a restore does not read)
    candidates = sorted(p for p in step.rglob("*") if p.is_file() and (
        p.name == "metadata" or p.parent.name == "d" and p.stat().st_size > 64 << 10))
    rng = np.random.default_rng(seed)
    victim = candidates[rng.integers(len(candidates))]
    data = bytearray(victim.read_bytes())
    start = int(rng.integers(max(len(data) - 4096, 1)))
    for i in range(start, min(start + 4096, len(data))):
        data[i] ^= 0xA5
    victim.write_bytes(bytes(data))
    result = subprocess.run([sys.executable, "-c", _RESTORE, str(tmp_path)], capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "RESTORED INTACT" not in result.stdout, victim
    assert "CheckpointDamaged: checkpoint step 1" in result.stderr, (victim, result.stderr[-2000:])


def test_non_finite_outputs_are_refused_naming_the_cells():
    from scfm_jax.analysis.output_checks import NonFiniteOutput, require_finite
    values = np.ones((5, 3), np.float32)
    values[1, 2], values[4, 0] = np.nan, np.inf
    with pytest.raises(NonFiniteOutput, match=r"2 of 5 cells .*\['b', 'e'\].*damaged"):
        require_finite(values, list("abcde"), "X_test")
    require_finite(np.ones((2, 2)), ["a", "b"], "X_test")


# ------------------------------------------------------------------------ 4. string dtypes

def test_convert_keeps_string_dtype_obs_names(tmp_path):
    adata = counts_adata()
    adata.obs_names = pd.Index(list(adata.obs_names), dtype="string")
    adata.obs["donor"] = pd.array(["x", "y", None] * 20, dtype="string")
    path = write(adata, tmp_path / "cells.h5ad")
    assert anndata.read_h5ad(path).obs_names.dtype == "string"
    convert([path], tmp_path / "store", vocabulary="from-data", shard_size=32,
            obs=["kind", "donor"])
    shard = anndata.read_zarr(tmp_path / "store" / "shards" / "00000.zarr")
    assert list(shard.obs_names) == list(adata.obs_names[:32])
    store = CellStore.open(tmp_path / "store")
    assert store.obs_categories("donor") == ["x", "y", "nan"]


def test_check_writable_runs_before_compute(tmp_path):
    from scfm_jax.data.anndata_io import check_writable, write_h5ad
    adata = counts_adata(5)
    adata.obs_names = pd.Index(list(adata.obs_names), dtype="string")
    check_writable(adata, tmp_path)
    write_h5ad(adata, tmp_path / "x.h5ad")
    assert anndata.read_h5ad(tmp_path / "x.h5ad").obs_names.dtype == "string"
    adata.obs["bad"] = [object(), 1, "a", 2.0, None]
    with pytest.raises(ValueError, match="obs / var cannot be written"):
        check_writable(adata, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5ad"]   # no scratch left behind


# ------------------------------------------------------------------------ misuse: one line

def test_train_help_prints_the_flags(capsys):
    with pytest.raises(SystemExit) as exited:
        scfm_main(["train", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "--config" in out


@pytest.mark.parametrize("override, message", [
    ("--config.data.global_bach_size=4", "did you mean --config.data.global_batch_size"),
    ("--config.data.global_batch_size=-4", "global_batch_size=-4: must be an integer >= 1"),
    ("--config.data.buckets=(128,64)", "buckets=(128, 64): must be increasing"),
    ("--config.data.buckets=(64,1024)", "must not exceed data.max_nonzero"),
    ("--config.train.learning_rate=0.0", "learning_rate=0.0: must be a positive number"),
    ("--config.train.steps=0", "train.steps=0: must be an integer >= 1"),
    ("--config.mesh.fsdp=0", "mesh.fsdp=0: must be a positive integer or -1"),
    ("--config.data.store=/nonexistent/store", "data.store='/nonexistent/store': no such folder"),
])
def test_invalid_config_is_one_line_before_anything_is_written(small_store, tmp_path, capsys,
                                                               override, message):
    workdir = tmp_path / "run"
    status, err = run_cli(capsys, "train", "--config", REPO / "configs" / "scfoundation_tiny.py",
                          "--workdir", workdir, f"--config.data.store={small_store}", override)
    assert status == 2 and len(err) == 1 and message in err[0], err
    assert not workdir.exists()


def test_workdir_lock_refuses_a_second_run_and_detects_a_stale_lock(tmp_path, capsys):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from scfm_jax.train import workdir as w; "
         "w.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(workdir)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lib.WorkdirBusy, match=rf"PID {holder.pid} "):
            workdir_lib.acquire(workdir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    workdir_lib.acquire(workdir)   # the killed run's lock is stale: taken over, and said so
    assert f"PID {holder.pid}" in capsys.readouterr().err
    workdir_lib.release(workdir)
    assert (workdir / ".lock").read_text() == ""


def test_train_on_a_busy_workdir_is_refused_in_one_line(small_store, tmp_path, capsys):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from scfm_jax.train import workdir as w; "
         "w.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(workdir)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        status, err = run_cli(capsys, "train", "--config",
                              REPO / "configs" / "scfoundation_tiny.py", "--workdir", workdir,
                              f"--config.data.store={small_store}")
        assert status == 1 and f"in use by another training run (PID {holder.pid}" in err[-1]
        assert sorted(p.name for p in workdir.iterdir()) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_resume_mismatch_names_the_fields():
    saved = {"seed": 0, "model": {"encoder": {"width": 16, "depth": 1}, "remat_policy": "none"},
             "train": {"steps": 10}}
    workdir_lib.check_resume(saved, dict(saved, train={"steps": 20}), "runs/x")  # longer: fine
    changed = json.loads(json.dumps(saved))
    changed["model"]["encoder"]["width"] = 32
    changed["model"]["remat_policy"] = "full"   # does not change the parameters: allowed
    with pytest.raises(workdir_lib.ResumeMismatch,
                       match=r"model\.encoder\.width is 16 there, 32 now; resume with"):
        workdir_lib.check_resume(saved, changed, "runs/x")


def test_metrics_are_cut_back_to_the_restored_step(tmp_path):
    lines = [json.dumps({"step": s, "train/loss": float(s)}) for s in (1, 2, 3, 4, 5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "tra')
    workdir_lib.truncate_metrics(tmp_path, 3)
    kept = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 2, 3]


def test_nan_counts_are_reported_as_nan(tmp_path, capsys):
    adata = counts_adata()
    dense = adata.X.toarray()
    dense[4, 2] = np.nan
    adata.X = sp.csr_matrix(dense)
    path = write(adata, tmp_path / "nan.h5ad")
    status, err = run_cli(capsys, "convert", path, "--output", tmp_path / "s", "--vocabulary",
                          "from-data", "--no-progress")
    assert status == 1 and "X row 4 (cell 'c4') holds nan" in err[-1]
    assert "finite" in err[-1] and "--allow-non-integer" not in err[-1]


def test_no_cells_and_truncated_files_are_named(tmp_path, capsys):
    empty = write(counts_adata()[:0].copy(), tmp_path / "empty.h5ad")
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(write(counts_adata(), tmp_path / "full.h5ad").read_bytes()[:3000])
    for path, message in ((empty, "holds no cells"), (truncated, "truncated.h5ad")):
        status, err = run_cli(capsys, "convert", path, "--output", tmp_path / "s",
                              "--vocabulary", "from-data", "--no-progress")
        assert status == 1 and message in err[-1], err
        status, err = run_cli(capsys, "embed", "--checkpoint", tmp_path / "none.ckpt",
                              "--input", path, "--output", tmp_path / "o.h5ad")
        assert status == 1 and message in err[-1], err
        status, err = run_cli(capsys, "annotate", "--checkpoint", tmp_path / "none.pt",
                              "--input", path, "--output", tmp_path / "o.h5ad")
        assert status == 1 and message in err[-1], err
    assert "truncated" in err[-1]
    assert not (tmp_path / "s").exists() and not (tmp_path / "o.h5ad").exists()


def _mtx_folder(adata, folder):
    import gzip

    import scipy.io
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(adata.X.T))
    pd.DataFrame({0: list(adata.var_names), 1: list(adata.var_names)}).to_csv(
        folder / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.DataFrame({0: list(adata.obs_names)}).to_csv(folder / "barcodes.tsv.gz", sep="\t",
                                                    header=False, index=False)
    return folder


def _h5_file(adata, path):
    csr = adata.X.tocsr()
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = csr.data, csr.indices, csr.indptr
        m["shape"] = [adata.n_vars, adata.n_obs]
        m["barcodes"] = np.array(list(adata.obs_names), dtype="S")
        features = m.create_group("features")
        features["name"] = np.array(list(adata.var_names), dtype="S")
        features["id"] = np.array(list(adata.var_names), dtype="S")
    return path


@pytest.mark.parametrize("kind", ["h5ad", "zarr", "10x-mtx", "10x-h5"])
def test_non_integer_values_name_file_and_row_for_every_source(tmp_path, capsys, kind):
    adata = counts_adata()
    dense = adata.X.toarray()
    dense[23, 5] = 2.5
    adata.X = sp.csr_matrix(dense)
    path = {"h5ad": lambda: write(adata, tmp_path / "x.h5ad"),
            "zarr": lambda: (adata.write_zarr(tmp_path / "x.zarr"), tmp_path / "x.zarr")[1],
            "10x-mtx": lambda: _mtx_folder(adata, tmp_path / "mtx"),
            "10x-h5": lambda: _h5_file(adata, tmp_path / "x.h5")}[kind]()
    status, err = run_cli(capsys, "convert", path, "--output", tmp_path / "s", "--vocabulary",
                          "from-data", "--no-progress")
    assert status == 1 and str(path) in err[-1] and "row 23 (cell 'c23')" in err[-1], err
    assert "2.5" in err[-1] and "--allow-non-integer" in err[-1]


def test_embed_given_an_scmulan_checkpoint_says_so(tmp_path, capsys):
    from shared_helpers import shared_path
    pytest.importorskip("torch")
    checkpoint = shared_path("fixtures", "scmulan-tiny", "ckpt.pt")
    path = write(counts_adata(), tmp_path / "cells.h5ad")
    status, err = run_cli(capsys, "embed", "--checkpoint", checkpoint, "--input", path,
                          "--output", tmp_path / "o.h5ad")
    assert status == 1 and "is an scMulan checkpoint" in err[-1] and "annotate" in err[-1]


# ------------------------------------------------------------------------ trained workdirs

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny scFoundation run of 6 steps with checkpoints at 3 and 6."""
    from scfm_jax.train import loop
    root = tmp_path_factory.mktemp("reliability_train")
    store = make_store(root)
    loop.train(tiny_config(store, steps=6), root / "run", progress=False)
    return root / "run", store


def _copy(workdir, target):
    import shutil
    shutil.copytree(workdir, target, ignore=shutil.ignore_patterns(".lock"))
    return target


@pytest.mark.slow
def test_resume_with_another_model_leaves_config_json_alone(trained, tmp_path):
    from scfm_jax.train import loop
    workdir = _copy(trained[0], tmp_path / "run")
    before = (workdir / "config.json").read_text()
    config = tiny_config(trained[1], steps=8)
    config.model.encoder.width = 32
    with pytest.raises(workdir_lib.ResumeMismatch, match="model.encoder.width is 16 there, 32 now"):
        loop.train(config, workdir, progress=False)
    assert (workdir / "config.json").read_text() == before


@pytest.mark.slow
def test_replayed_steps_appear_once_in_metrics(trained, tmp_path):
    import shutil

    from scfm_jax.train import loop
    from scfm_jax.train.metrics import read_metrics
    workdir = _copy(trained[0], tmp_path / "run")
    shutil.rmtree(workdir / "checkpoints" / "6")   # killed after logging 4..6, before saving 6
    loop.train(tiny_config(trained[1], steps=6), workdir, progress=False)
    steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s, x in zip(steps, (workdir / "metrics.jsonl").read_text().splitlines())
                   if "train/loss" in x]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert sorted(read_metrics(workdir)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_embed_refuses_a_damaged_checkpoint(trained, tmp_path, capsys):
    workdir = _copy(trained[0], tmp_path / "run")
    for victim in (workdir / "checkpoints" / "6" / "state").rglob("d/*"):   # 4 KB in each
        data = bytearray(victim.read_bytes())
        for i in range(len(data) // 2, min(len(data) // 2 + 4096, len(data))):
            data[i] ^= 0x5A
        victim.write_bytes(bytes(data))
    adata = synthetic_counts(num_cells=16)
    path = write(adata, tmp_path / "cells.h5ad")
    result = subprocess.run(
        [sys.executable, "-m", "scfm_jax.main", "embed", "--checkpoint", str(workdir), "--input",
         str(path), "--output", str(tmp_path / "out.h5ad"), "--min-coverage", "0", "--quiet"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    err = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 1 and len(err) == 1, result.stderr[-3000:]
    assert "checkpoint step 6" in err[0] and "damaged" in err[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out.h5ad").exists()


# ------------------------------------------------------------------------ the command line contract

def test_version_and_no_arguments(capsys):
    from scfm_jax import __version__
    assert scfm_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"scfm-jax {__version__}"
    assert scfm_main([]) == 2
    assert "usage: scfm-jax COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["convert", "verify", "train", "demo", "embed", "annotate",
                                     "plan"])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as exited:
        scfm_main([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: scfm-jax {command}" in capsys.readouterr().out


def test_train_and_plan_take_dashed_flags():
    from scfm_jax.train import loop, plan
    config = str(REPO / "configs" / "scfoundation_tiny.py")
    args = loop._parse(["--config", config, "--workdir", "w", "--dry-run", "--num-cpu-devices",
                        "2", "--coordinator-address", "h:1", "--num-processes", "2",
                        "--process-id", "1", "--auto-distributed", "--config.train.steps=7"])
    assert (args.dry_run, args.num_cpu_devices, args.coordinator_address, args.num_processes,
            args.process_id, args.auto_distributed) == (True, 2, "h:1", 2, 1, True)
    assert args.config.train.steps == 7
    args = plan._parse([f"--config={config}:", "--topology", "v5e-8", "--largest-collectives",
                        "2", "--bucket", "64", "--bucket", "128", "--remat", "full",
                        "--config.data.buckets=(64,128)"])
    assert (args.largest_collectives, args.bucket, args.remat) == (2, [64, 128], ["full"])
    assert tuple(args.config.data.buckets) == (64, 128)


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "configs/scfoundation_tiny.py"], "--workdir"),
    (["train", "--config", "configs/scfoundation_tiny.py", "--workdir", "w", "--dry_run"],
     "unrecognized arguments: --dry_run"),
    (["train", "--config", "configs/scfoundation_tiny.py", "--workdir", "w",
      "--config.train.steps=many"], "--config.train.steps=many: expected a value of type int"),
    (["train", "--config", "configs/scfoundation_tiny.py", "--workdir", "w",
      "--config.model"], "give a value"),
    (["train", "--config", "configs/nonexistent.py", "--workdir", "w"], "no such file"),
    (["plan", "--config", "configs/scfoundation_tiny.py"], "--topology"),
    (["convert", "x.h5ad", "--output", "s", "--task-index", "3", "--num-tasks", "2"],
     "--task-index 3 must be in"),
    (["embed", "--checkpoint", "c", "--input", "x.h5ad", "--output", "o.h5ad",
      "--output-type", "gene"], "writes a zarr array"),
    # by hand: --batch-size 0 ran with the default, --min-coverage 2 and --cells 10:5 exited 1
    # after loading the model, --cells a:b was a traceback, plan's refusal had no "error:"
    (["embed", "--checkpoint", "c", "--input", "x.h5ad", "--output", "o.h5ad", "--batch-size",
      "0"], "argument --batch-size: expected a positive integer, got '0'"),
    (["annotate", "--checkpoint", "c", "--input", "x.h5ad", "--output", "o.h5ad",
      "--min-coverage", "2"], "argument --min-coverage: expected a fraction between 0 and 1"),
    (["embed", "--checkpoint", "c", "--store", "s", "--output", "o", "--chunk-cells", "-4"],
     "argument --chunk-cells: expected a positive integer"),
    (["embed", "--checkpoint", "c", "--store", "s", "--output", "o", "--cells", "10:5"],
     "error: --cells '10:5': expected START:STOP, two cell indices with 0 <= START < STOP"),
    (["annotate", "--checkpoint", "c", "--store", "s", "--output", "o", "--cells", "a:b"],
     "error: --cells 'a:b': expected START:STOP"),
    (["plan", "--config", "configs/scfoundation_tiny.py", "--topology", "v9z-8"],
     "scfm-jax plan: error: --topology 'v9z-8': expected a Cloud TPU slice name"),
    (["embed", "--checkpoint", "c", "--input", "x.h5ad", "--output", "o.h5ad", "--step", "-1"],
     "argument --step: expected a step (0 or more), got '-1'"),
])
def test_usage_mistakes_exit_2(capsys, argv, message, monkeypatch):
    monkeypatch.chdir(REPO)
    try:
        status = scfm_main(argv)
    except SystemExit as exited:   # argparse's own usage errors
        status = exited.code
    err = capsys.readouterr().err
    TALLY["cases"] += 1
    TALLY["one-line errors"] += status != 0 and "Traceback" not in err
    assert status == 2 and message in err and "Traceback" not in err, err


def test_config_file_with_a_syntax_error_is_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections(\n")
    status, err = run_cli(capsys, "train", "--config", broken, "--workdir", tmp_path / "w")
    assert status == 2 and len(err) == 1 and f"--config {broken}: line 4" in err[0], err
    failing = tmp_path / "failing.py"
    failing.write_text("def get_config():\n    return undefined_name\n")
    status, err = run_cli(capsys, "train", "--config", failing, "--workdir", tmp_path / "w")
    assert status == 2 and len(err) == 1 and "line 2: NameError" in err[0], err
    assert not (tmp_path / "w").exists()


def test_only_the_projects_errors_are_one_line(monkeypatch, capsys):
    from scfm_jax.data import verify
    from scfm_jax.train.loop import TrainingDiverged

    def raising(error):
        def main(argv):
            raise error
        return main

    monkeypatch.setattr(verify, "main", raising(TrainingDiverged("loss is nan at step 3")))
    status, err = run_cli(capsys, "verify", "x")
    assert status == 1 and err == ["scfm-jax verify: error: loss is nan at step 3"]
    for bug in (RuntimeError("internal"), KeyError("k"), ValueError("v"), ImportError("i")):
        monkeypatch.setattr(verify, "main", raising(bug))
        assert scfm_main(["verify", "x"]) == 70
        err = capsys.readouterr().err
        assert "Traceback" in err and "This is a bug in scfm-jax: please report it" in err
    monkeypatch.setattr(verify, "main", raising(
        OSError(28, "No space left on device", "/data/store/x")))
    status, err = run_cli(capsys, "verify", "x")
    assert status == 1 and err == ["scfm-jax verify: error: /data/store/x: no space left on the "
                                   "device; free some space (or write elsewhere) and run the "
                                   "command again"]


def test_preempted_train_exits_75_saying_so(monkeypatch, capsys, tmp_path):
    from scfm_jax.train import loop
    monkeypatch.setattr(loop, "train", lambda *a, **k: {"final_step": 4, "preempted": True,
                                                         "stopped_early": True})
    status = scfm_main(["train", "--config", str(REPO / "configs" / "scfoundation_tiny.py"),
                        "--workdir", str(tmp_path)])
    assert status == 75 and "preempted at step 4; rerun to resume" in capsys.readouterr().err


def test_slurm_job_is_requeued_when_preempted(tmp_path):
    """A task exiting 75 (preempted with a checkpoint): the batch script requeues the job and
    passes the status on."""
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 75\n")
    (tmp_path / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    for fake in ("srun", "scontrol"):
        (tmp_path / fake).chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="42")
    result = subprocess.run(["bash", "launch/slurm.sbatch", "configs/scfoundation_tiny.py",
                             str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 75, result.stderr
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "42"]
    assert "requeueing job 42" in result.stderr


def test_default_warm_up_with_few_steps_is_accepted(small_store, tmp_path):
    from scfm_jax.train import config_checks
    from scfm_jax.train.train_state import make_schedule
    config = tiny_config(str(small_store), steps=6)
    config.train.warmup_steps = 50   # the config file's default
    config_checks.check(config, tmp_path / "run")
    schedule = make_schedule(config.train)
    assert float(schedule(5)) == pytest.approx(config.train.learning_rate)   # warmed up by then


# ------------------------------------------------------------------------ never lose the user's data

def test_embed_and_annotate_refuse_to_write_over_their_input(tmp_path, capsys):
    path = write(counts_adata(), tmp_path / "x.h5ad")
    before = files_of(tmp_path)
    for command in ("embed", "annotate"):
        for flags in ([], ["--overwrite"]):
            status, err = run_cli(capsys, command, "--checkpoint", tmp_path / "c.ckpt", "--input",
                                  path, "--output", path, *flags)
            assert status == 1 and len(err) == 1 and "is the input" in err[0], err
    assert unchanged(before, tmp_path)


def test_an_existing_output_that_is_not_ours_is_refused(tmp_path, capsys):
    path = write(counts_adata(), tmp_path / "x.h5ad")
    folder = tmp_path / "existing.zarr"   # an anndata zarr and notes: never deleted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts_adata(seed=2).write_zarr(folder)
    (folder / "notes.txt").write_text("my notes")
    mine = write(counts_adata(seed=3), tmp_path / "mine.h5ad")
    before = files_of(tmp_path)
    for flags in ([], ["--overwrite"]):
        status, err = run_cli(capsys, "embed", "--checkpoint", tmp_path / "c.ckpt", "--input",
                              path, "--output-type", "gene", "--output", folder, *flags)
        assert status == 1 and len(err) == 1 and "did not write" in err[0], err
    for command in ("embed", "annotate"):
        status, err = run_cli(capsys, command, "--checkpoint", tmp_path / "c.ckpt", "--input",
                              path, "--output", mine)
        assert status == 1 and "was not written by scfm-jax" in err[-1] and "--overwrite" in err[-1]
    assert unchanged(before, tmp_path)


def test_output_safety_rules(tmp_path):
    from scfm_jax.errors import OutputError
    from scfm_jax.output_safety import (OWNER_KEY, check_output, owner_record, publish,
                                        temporary_path)
    folder = tmp_path / "genes.zarr"
    (folder / "study").mkdir(parents=True)
    (folder / "study" / "a").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="holding 1 files that scfm-jax embed did not write"):
            check_output(folder, command="embed", overwrite=overwrite)
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(OutputError, match="exists"):
        check_output(empty, command="embed")
    check_output(empty, command="embed", overwrite=True)
    # a previous output of the same command is replaced without --overwrite; of another, not
    adata = counts_adata(5)
    adata.uns[OWNER_KEY] = owner_record("annotate")
    previous = write(adata, tmp_path / "annotated.h5ad")
    check_output(previous, command="annotate")
    with pytest.raises(OutputError, match="not written by scfm-jax embed"):
        check_output(previous, command="embed")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"file is a file, not a folder"):
        check_output(tmp_path / "file" / "out.h5ad", command="embed")
    temporary = temporary_path(previous)
    temporary.write_text("new")
    publish(temporary, previous)
    assert previous.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotated.h5ad", "empty.zarr", "file",
                                                         "genes.zarr"]


def test_output_under_a_file_is_one_line_for_every_command(tmp_path, capsys, small_store):
    path = write(counts_adata(), tmp_path / "x.h5ad")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    for argv in (["convert", path, "--output", blocker / "store", "--vocabulary", "from-data",
                  "--no-progress"],
                 ["embed", "--checkpoint", "c", "--input", path, "--output", blocker / "o.h5ad"],
                 ["annotate", "--checkpoint", "c", "--input", path, "--output",
                  blocker / "o.h5ad"],
                 ["train", "--config", REPO / "configs" / "scfoundation_tiny.py", "--workdir",
                  blocker / "run", f"--config.data.store={small_store}"]):
        status, err = run_cli(capsys, *argv)
        assert status == 1 and len(err) == 1 and f"{blocker} is a file, not a folder" in err[0]
    assert blocker.read_text() == "a file"


def test_train_refuses_a_workdir_of_other_files(tmp_path, capsys, small_store):
    workdir = tmp_path / "thesis"
    workdir.mkdir()
    (workdir / "chapter1.tex").write_text("...")
    before = files_of(workdir)
    status, err = run_cli(capsys, "train", "--config", REPO / "configs" / "scfoundation_tiny.py",
                          "--workdir", workdir, f"--config.data.store={small_store}")
    assert status == 1 and "'chapter1.tex'" in err[0] and "did not write" in err[0]
    assert unchanged(before, workdir)


def test_train_never_writes_into_its_store(store_copy, capsys):
    """The sibling of an output that is an input: a workdir or checkpoint folder inside the store
    trained on would add files to the user's store."""
    before = files_of(store_copy)
    config = ["--config", REPO / "configs" / "scfoundation_tiny.py",
              f"--config.data.store={store_copy}"]
    for argv, flag in ((["--workdir", store_copy / "run"], "--workdir"),
                       (["--workdir", store_copy.parent / "run",
                         f"--config.train.checkpoint_dir={store_copy}"],
                        "--config.train.checkpoint_dir")):
        status, err = run_cli(capsys, "train", *config, *argv)
        assert status == 1 and len(err) == 1 and err[0].startswith(f"scfm-jax train: error: {flag}")
        assert f"the input {store_copy}" in err[0], err
    assert unchanged(before, store_copy) and not (store_copy.parent / "run").exists()


# ------------------------------------------------------------------------ convert: lock, repair

def test_a_second_convert_on_the_same_output_is_refused(tmp_path, capsys):
    path = write(counts_adata(), tmp_path / "x.h5ad")
    output = tmp_path / "store"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from scfm_jax.output_safety import FolderLock; "
         "FolderLock(sys.argv[1], command='convert').acquire(); print('held', flush=True); "
         "time.sleep(600)", str(output)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        status, err = run_cli(capsys, "convert", path, "--output", output, "--vocabulary",
                              "from-data", "--no-progress")
        assert status == 1 and len(err) == 1, err
        assert f"in use by another conversion (PID {holder.pid}" in err[0]
        assert sorted(p.name for p in output.iterdir()) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    status, _ = run_cli(capsys, "convert", path, "--output", output, "--vocabulary", "from-data",
                        "--no-progress")   # the killed run's lock is stale: taken over
    assert status == 0 and not verify_lib.verify(output)[1]


def test_rerunning_convert_repairs_a_damaged_store(small_store, store_copy, capsys):
    source = small_store.parent / "cells.h5ad"
    options = dict(vocabulary="from-data", shard_size=20, chunk_elements=64)
    (store_copy / "shards" / "00001.zarr" / "X" / "data" / "c" / "0").unlink()
    chunk = store_copy / "shards" / "00002.zarr" / "X" / "indices" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"xyz")
    assert sorted(verify_lib.verify(store_copy)[1]) == ["shards/00001.zarr", "shards/00002.zarr"]
    summary = convert([source], store_copy, **options)
    assert summary.shards_written == 2
    assert "00001.zarr is damaged" in capsys.readouterr().err
    assert result_is(verify_lib.verify(store_copy)[1] == {})
    intact = CellStore.open(small_store).read(np.arange(60))
    repaired = CellStore.open(store_copy).read(np.arange(60))
    assert result_is(np.array_equal(intact.counts, repaired.counts))
    assert convert([source], store_copy, **options).shards_written == 0   # intact: nothing to do
    assert convert([source], store_copy, overwrite=True, **options).shards_written == 3


def test_counts_beyond_float32_integers_are_refused(tmp_path, capsys):
    adata = counts_adata()
    dense = adata.X.toarray().astype(np.float64)
    dense[7, 3] = 2**24 + 1
    adata.X = sp.csr_matrix(dense)
    path = write(adata, tmp_path / "big.h5ad")
    status, err = run_cli(capsys, "convert", path, "--output", tmp_path / "s", "--vocabulary",
                          "from-data", "--no-progress")
    assert status == 1 and len(err) == 1 and "row 7 (cell 'c7') holds 16777217" in err[0], err
    assert "above 2^24" in err[0] and not (tmp_path / "s").exists()


def test_counts_beyond_float32_integers_are_refused_by_the_analysis_api_too():
    """By hand, `embed` of the same file (no store) exited 0: the gene alignment made its counts
    float32. The analysis API's counts check (embed, genes, evaluate) and alignment refuse them."""
    from scfm_jax.analysis.embedding import aligned_matrix, require_counts
    from scfm_jax.data.vocabulary import Vocabulary
    adata = counts_adata()
    dense = adata.X.toarray().astype(np.float64)
    dense[7, 3] = 2**24 + 1
    for matrix in (sp.csr_matrix(dense), dense):
        with pytest.raises(InputError, match=r"X row 7 \(cell 'c7'\) holds 16777217, above 2\^24"):
            require_counts(adata, None, matrix, "X")
    adata.X = sp.csr_matrix(dense)
    vocabulary = Vocabulary("from-data", tuple(adata.var_names))
    with pytest.raises(InputError, match=r"X row 7 \(cell 'c7'\) holds 16777217, above 2\^24"):
        aligned_matrix(adata, vocabulary, counts_expected=False, verbose=False)   # embed's path
    dense[7, 3] = 2**24
    require_counts(adata, None, dense, "X")   # still exact


# ------------------------------------------------------------------------ messages that name the fix

def test_a_file_or_a_damaged_manifest_is_not_a_store(small_store, store_copy, tmp_path, capsys):
    not_a_store = tmp_path / "cells.txt"
    not_a_store.write_text("hello")
    status, err = run_cli(capsys, "verify", not_a_store)
    assert status == 1 and len(err) == 1 and "is a file, not a cell store" in err[0], err
    assert "scfm-jax convert" in err[0]
    (store_copy / "manifest.json").write_text('{"format": "scfm-cell-store", ')
    status, err = run_cli(capsys, "verify", store_copy)
    assert status == 1 and len(err) == 1, err
    assert f"{store_copy}/manifest.json is not valid JSON" in err[0] and "convert" in err[0]


def test_damaged_checkpoint_on_resume_says_how_to_resume(tmp_path):
    _tiny_checkpoint(tmp_path)
    checkpoints = Checkpoints(tmp_path, read_only=True)
    assert "--step" in str(checkpoints.damaged(1, "state", "x"))   # embed / annotate take --step
    checkpoints.resuming = True
    message = str(checkpoints.damaged(1, "state", "x"))
    assert "--step" not in message and "train again in a fresh --workdir" in message
    checkpoints.close()


@pytest.mark.parametrize("command", ["embed", "annotate", "convert"])
def test_an_h5ad_without_genes_says_so(tmp_path, capsys, command):
    path = write(counts_adata()[:, :0].copy(), tmp_path / "nogenes.h5ad")
    argv = ([path, "--output", tmp_path / "s", "--vocabulary", "from-data", "--no-progress"]
            if command == "convert" else
            ["--checkpoint", tmp_path / "c", "--input", path, "--output", tmp_path / "o.h5ad"])
    status, err = run_cli(capsys, command, *argv)
    assert status == 1 and len(err) == 1 and "holds no genes" in err[0], err


@pytest.mark.parametrize("value", ["n/a", "abc", ""])
def test_a_csv_with_a_value_that_is_not_a_number_names_row_and_column(tmp_path, capsys, value):
    csv = tmp_path / "cells.csv"
    csv.write_text(f"cell,G0,G1,G2\nc0,1,2,3\nc1,4,{value},6\n")
    status, err = run_cli(capsys, "embed", "--checkpoint", tmp_path / "c.ckpt", "--input", csv,
                          "--output", tmp_path / "o.h5ad")
    assert status == 1 and len(err) == 1, err
    assert f"{csv}: row 3 (cell 'c1'), column 'G1' holds {value!r}, not a number" in err[0]
    assert "--pre-normalized" not in err[0]


def test_obs_columns_named_source_are_the_users(tmp_path, capsys):
    adata = counts_adata()
    adata.obs["source"] = pd.Categorical(["lab A", "lab B"] * 30)
    adata.obs["source_row"] = pd.Categorical(["r1", "r2", "r3"] * 20)
    path = write(adata, tmp_path / "study.h5ad")
    status, _ = run_cli(capsys, "convert", path, "--output", tmp_path / "store", "--vocabulary",
                        "from-data", "--no-progress")
    assert status == 0
    store = CellStore.open(tmp_path / "store")
    assert set(store.obs_columns) == {"kind", "source", "source_row", "scfm_source"}
    assert store.obs_categories("scfm_source") == ["study.h5ad"]
    codes = store.read_obs("source", np.arange(60))
    assert result_is([store.obs_categories("source")[c] for c in codes] == list(adata.obs["source"]))
    shard = anndata.read_zarr(tmp_path / "store" / "shards" / "00000.zarr")
    assert list(shard.obs["scfm_source_row"]) == list(range(60))


def test_stores_written_with_the_old_bookkeeping_names_read_the_same(tmp_path, monkeypatch):
    from scfm_jax.data import store as store_lib
    monkeypatch.setattr(store_lib, "SOURCE", "source")   # how stores were written before
    monkeypatch.setattr(store_lib, "SOURCE_ROW", "source_row")
    monkeypatch.setattr(store_lib, "SOURCE_COLUMNS", ("source", "source_row"))
    path = write(counts_adata(), tmp_path / "old.h5ad")
    convert([path], tmp_path / "store", vocabulary="from-data", shard_size=32)
    monkeypatch.undo()
    store = CellStore.open(tmp_path / "store")
    assert "source" in store.manifest["obs"] and "scfm_source" not in store.manifest["obs"]
    assert set(store.obs_columns) == {"kind", "scfm_source"}
    assert store.obs_categories("scfm_source") == ["old.h5ad"]
    assert set(store.read_obs("scfm_source", np.arange(60))) == {0}
    assert set(store.to_anndata(np.arange(4)).obs.columns) == {"kind", "scfm_source"}


def test_library_logs_and_warnings_are_not_printed_with_source_lines(monkeypatch, capsys):
    from scfm_jax.data import verify

    def noisy(argv):
        logging.getLogger("absl").warning("CheckpointManagerOptions.read_only=True, setting ...")
        warnings.warn("Writing zarr v2 data will no longer be the default", UserWarning)
        return 0

    monkeypatch.setattr(verify, "main", noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        status, err = run_cli(capsys, "verify", "x")
    assert status == 0
    assert err == ["scfm-jax verify: warning: Writing zarr v2 data will no longer be the default"]
    assert warnings.showwarning is not None and logging.getLogger("absl").level != logging.CRITICAL


def test_a_failed_saves_unretrieved_task_errors_are_not_printed(monkeypatch, capsys, caplog):
    """By hand, a full disk during a save printed its one line, then at exit one asyncio
    "Task exception was never retrieved" traceback per array Orbax was writing."""
    import asyncio
    import errno
    import gc

    from scfm_jax.data import verify

    def failing_save(argv):
        async def write_array():
            raise ValueError("OUT_OF_RANGE: Error writing \"opt_state.mu/0\"")
        loop = asyncio.new_event_loop()
        loop.create_task(write_array())
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        raise OSError(errno.EFBIG, "File too large", "/run/checkpoints")

    monkeypatch.setattr(verify, "main", failing_save)
    level = logging.getLogger("asyncio").level
    try:
        status, err = run_cli(capsys, "verify", "x")
        gc.collect()   # the unfinished tasks are collected (at exit, in a real run)
    finally:
        logging.getLogger("asyncio").setLevel(level)
    assert status == 1 and err == ["scfm-jax verify: error: /run/checkpoints: file too large "
                                   "(beyond the file size limit, ulimit -f)"]
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow   # trains in a subprocess (a minute or more of compiling on a loaded machine)
def test_a_full_disk_during_a_checkpoint_save_is_one_line(small_store, tmp_path):
    """A file size limit (ulimit -f 40 KB, as a full disk: writes fail with an OS error) during the
    first save: one error line, no traceback, and the failed run's new workdir is not left behind
    to trip the next attempt."""
    import resource

    from test_train import _overrides
    workdir = tmp_path / "run"

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (40 << 10, resource.RLIM_INFINITY))

    result = subprocess.run(
        [sys.executable, "-m", "scfm_jax.main", "train", "--config",
         str(REPO / "configs" / "scfoundation_tiny.py"), "--workdir", str(workdir),
         *_overrides(tiny_config(str(small_store), steps=3))],
        capture_output=True, text=True, preexec_fn=limit_file_size,
        env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert "could not be written to" in errors[0] and "file too large" in errors[0]
    assert "Traceback" not in result.stderr and not workdir.exists()


# ------------------------------------------------------------------------ docs/reliability.md

# The commands docs/reliability.md shows, in order, with the status each must end in.
DOCUMENTED = (
    ("scfm-jax --version", 0),
    ("scfm-jax convert cells.h5ad --output store --vocabulary from-data --no-progress", 0),
    ("scfm-jax verify store", 0),
    ("rm store/shards/00000.zarr/X/data/c/0", None),
    ("scfm-jax verify store", 1),
    ("scfm-jax convert cells.h5ad --output store --vocabulary from-data --no-progress", 0),
    ("scfm-jax verify store", 0),
    ("scfm-jax embed --checkpoint run --input cells.h5ad --output cells.h5ad", 1),
)


def test_the_commands_of_the_reliability_page(tmp_path, monkeypatch, capsys):
    import re
    import shlex
    text = (REPO / "docs" / "reliability.md").read_text()
    shown = [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines() if line.strip()]
    assert shown == [command for command, _ in DOCUMENTED]
    write(counts_adata(), tmp_path / "cells.h5ad")
    before = (tmp_path / "cells.h5ad").read_bytes()
    monkeypatch.chdir(tmp_path)
    for command, expected in DOCUMENTED:
        words = shlex.split(command)
        if words[0] == "rm":
            Path(words[1]).unlink()
            continue
        status = scfm_main(words[1:])
        out = capsys.readouterr()
        assert status == expected, (command, out.err)
    assert (tmp_path / "cells.h5ad").read_bytes() == before
    assert "is the input" in out.err


def test_tpu_pod_restarts_a_run_preempted_on_a_healthy_slice(tmp_path):
    """Workers exiting 75 on a READY slice (SIGTERM from a maintenance event, checkpoint saved):
    the launcher runs them again; a real failure (status 1) is passed on."""
    fake = tmp_path / "gcloud"
    fake.write_text(f"""#!/bin/sh
case "$*" in
  *describe*) echo READY ;;
  *--command=python3*tpu_worker.py*)
    runs=$(cat {tmp_path}/runs 2>/dev/null || echo 0); echo $((runs + 1)) > {tmp_path}/runs
    [ "$runs" -eq 0 ] && exit 75; exit "$SECOND_STATUS" ;;
esac
exit 0
""")
    fake.chmod(0o755)
    for second, expected in ((0, 0), (1, 1)):
        (tmp_path / "runs").unlink(missing_ok=True)
        env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
                   TPU_NAME="scfm", ZONE="z", REPO="https://example.invalid/scfm-jax@main",
                   SECOND_STATUS=str(second))
        result = subprocess.run(["bash", "launch/tpu_pod.sh", "configs/scfoundation_tiny.py",
                                 str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == expected, result.stderr
        assert (tmp_path / "runs").read_text().strip() == "2"
        assert "running it again, which resumes from what it saved" in result.stderr


def test_no_libtpu_start_up_errors_where_no_tpu_is_attached(tmp_path):
    """By hand, with the [tpu] extra installed and no TPU, every command that starts JAX printed
    libtpu's five start-up lines (with a C++ 'Source Location Trace') before running on the CPU."""
    pytest.importorskip("libtpu", reason="the start-up lines come from libtpu: pip install -e \".[tpu]\"")
    if main_module._tpu_attached():
        pytest.skip("this machine has a TPU attached: libtpu starts for real here")
    (tmp_path / "probe_command.py").write_text(
        "import jax\n\ndef main(argv):\n    print(jax.devices()[0].platform)\n    return 0\n")
    script = ("import sys; from scfm_jax import main as m; "
              "m.COMMANDS['probe'] = ('probe_command', 'prints the platform'); sys.exit(m.main(['probe']))")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_SKIP_MDS_QUERY")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cpu"
    assert "libtpu" not in done.stderr and "Source Location Trace" not in done.stderr, done.stderr
