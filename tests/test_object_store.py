"""Stores and checkpoints on object storage, for real: a local S3 server (moto) on a loopback port,
reached through TensorStore's s3 kvstore driver with the AWS SDK's endpoint override (conversion,
resume after a kill, the reader and the pipeline from one and two processes, and training), and a
GCS emulator for checkpoints on a gs:// bucket (Orbax: TensorStore's gcs driver and gcsfs), each
checked against the same work on a local folder."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

from object_store_server import GCSServer, S3Server
from scfm_jax.data import convert as convert_lib
from scfm_jax.data import store as store_lib
from scfm_jax.data.pipeline import Pipeline
from scfm_jax.data.store import CellStore
from scfm_jax.errors import UsageError
from scfm_jax.main import main as cli
from scfm_jax.train import loop
from train_helpers import synthetic_counts, tiny_config


def _serving(server):
    """The server with its environment set in this process (and so its subprocesses)."""
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def s3():
    yield from _serving(S3Server())


@pytest.fixture(scope="module")
def gcs():
    yield from _serving(GCSServer("checkpoints"))


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "cells.h5ad"
    synthetic_counts(num_cells=600, num_genes=120, seed=4).write_h5ad(path)
    return path


def convert_args(h5ad, output, *extra):
    return [str(h5ad), "--output", str(output), "--vocabulary", "from-data", "--shard-size", "64",
            "--no-progress", *extra]


def bucket_tree(url) -> dict[str, bytes]:
    kvstore = store_lib.open_kvstore(url)
    return {key.decode(): kvstore.read(key).result().value for key in sorted(kvstore.list().result())}


def local_tree(root) -> dict[str, bytes]:
    """A folder's files, less the converter's lock file (a local folder's only; buckets are not
    locked), which holds no data."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def stores(s3, h5ad, tmp_path_factory):
    """The same conversion into a folder and into a bucket."""
    local = tmp_path_factory.mktemp("local") / "store"
    bucket = s3.create_bucket("cells") + "/runs/store"
    assert convert_lib.main(convert_args(h5ad, local)) == 0
    assert convert_lib.main(convert_args(h5ad, bucket)) == 0
    return local, bucket


def test_convert_to_a_bucket_writes_the_local_store_byte_for_byte(stores):
    local, bucket = stores
    tree = bucket_tree(bucket)
    assert any(key.startswith("shards/00009.zarr/X/data/") for key in tree)
    assert tree == local_tree(local)
    a, b = CellStore.open(local), CellStore.open(bucket)
    assert b.num_cells == a.num_cells == 600
    cells = np.random.default_rng(0).permutation(600)[:200]
    for field in ("counts", "gene_ids", "indptr"):
        np.testing.assert_array_equal(getattr(a.read(cells), field), getattr(b.read(cells), field))


def test_an_unknown_bucket_is_a_clear_error(s3, h5ad, capsys):
    assert cli(["convert", *convert_args(h5ad, "s3://no-such-bucket/store")]) == 1
    assert "no-such-bucket" in capsys.readouterr().err
    with pytest.raises(Exception, match="no-such-bucket|NoSuchBucket|NOT_FOUND|not found"):
        CellStore.open("s3://no-such-bucket/store")


PIPELINE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from scfm_jax.data.pipeline import Pipeline
    from scfm_jax.data.store import CellStore
    url, index, count, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    pipeline = Pipeline(CellStore.open(url), global_batch_size=32, seed=7, buckets=(64, 128),
                        max_nonzero=128, block_size=8, process_index=index, process_count=count)
    batches = [pipeline.batch(step) for step in (0, 5, 40)]
    np.savez(out, **{f"{k}_{i}": b[k] for i, b in enumerate(batches) for k in b})
""")


def test_pipeline_reads_the_bucket_from_one_and_two_processes(stores, tmp_path):
    local, bucket = stores
    script = tmp_path / "read.py"
    script.write_text(PIPELINE_SCRIPT)
    runs = [subprocess.Popen([sys.executable, str(script), bucket, str(i), "2",
                              str(tmp_path / f"{i}of2.npz")]) for i in (0, 1)]
    options = dict(global_batch_size=32, seed=7, buckets=(64, 128), max_nonzero=128, block_size=8)
    reference = Pipeline(CellStore.open(local), process_index=0, process_count=1, **options)
    one = Pipeline(CellStore.open(bucket), process_index=0, process_count=1, **options)
    assert all(p.wait(300) == 0 for p in runs)
    first, second = (np.load(tmp_path / f"{i}of2.npz") for i in (0, 1))
    for i, step in enumerate((0, 5, 40)):
        expected = reference.batch(step)
        for key, value in one.batch(step).items():
            np.testing.assert_array_equal(value, expected[key])
        for key, value in expected.items():
            np.testing.assert_array_equal(
                np.concatenate([first[f"{key}_{i}"], second[f"{key}_{i}"]]), value)


@pytest.mark.slow   # two tiny training runs (~1 min of compiles)
@pytest.mark.heavy
def test_training_on_the_bucket_matches_training_on_the_folder(stores, tmp_path):
    local, bucket = stores
    device = jax.devices()[:1]
    on_folder = loop.train(tiny_config(str(local), steps=4), tmp_path / "a", progress=False,
                           devices=device)
    on_bucket = loop.train(tiny_config(bucket, steps=4), tmp_path / "b", progress=False,
                           devices=device)
    assert on_bucket["losses"] == on_folder["losses"] and len(on_bucket["losses"]) == 4
    assert json.loads((tmp_path / "b" / "config.json").read_text())["data"]["store"] == bucket


@pytest.mark.slow   # three converter processes against the server
@pytest.mark.heavy
def test_conversion_to_a_bucket_by_two_workers_resumes_after_sigkill(s3, h5ad, tmp_path):
    bucket = s3.create_bucket("killed") + "/store"
    convert = [sys.executable, "-m", "scfm_jax.main", "convert"]
    command = convert + convert_args(h5ad, bucket, "--shard-size", "16", "--workers", "2")
    reference = tmp_path / "reference"
    subprocess.run(convert + convert_args(h5ad, reference, "--shard-size", "16"), check=True,
                   capture_output=True)
    done = re.compile(r"shards/\d{5}\.zarr/zarr\.json")
    kvstore = store_lib.open_kvstore(bucket)
    for wait_for_shards in (3, 15):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline and process.poll() is None:
            keys = [k.decode() for k in kvstore.list().result()]
            if sum(bool(done.fullmatch(k)) for k in keys) >= wait_for_shards:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the converter finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert "manifest.json" not in bucket_tree(bucket)
    subprocess.run(command, check=True, capture_output=True)
    assert bucket_tree(bucket) == local_tree(reference)


def test_checkpoints_on_s3_are_refused_with_the_reason(stores, tmp_path):
    config = tiny_config(str(stores[0]))
    config.train.checkpoint_dir = "s3://cells/run/checkpoints"
    with pytest.raises(UsageError, match=r"train.checkpoint_dir.*gs:// buckets only"):
        loop.train(config, tmp_path / "run", progress=False)


@pytest.mark.slow   # three tiny training runs against the emulator (~1 min)
@pytest.mark.heavy
def test_checkpoints_on_a_gcs_bucket_resume_and_load_as_on_a_folder(gcs, stores, tmp_path):
    """The workdir (config, metrics) stays on disk; checkpoints go to gs://. Training there,
    stopping, and resuming from the bucket gives the losses of one run on a folder, and the bucket's
    checkpoints load (from the workdir or the URL) to the folder run's weights."""
    from scfm_jax.analysis.loading import load
    from scfm_jax.train.checkpointing import Checkpoints

    local = str(stores[0])
    device = jax.devices()[:1]
    url = f"gs://{gcs.bucket}/run/checkpoints"
    reference = loop.train(tiny_config(local, steps=6), tmp_path / "folder", progress=False,
                           devices=device)
    losses = {}
    for steps in (3, 6):
        config = tiny_config(local, steps=steps)
        config.train.checkpoint_dir = url
        losses.update(loop.train(config, tmp_path / "bucket", progress=False,
                                 devices=device)["losses"])
    assert losses == reference["losses"] and len(losses) == 6
    assert not (tmp_path / "bucket" / "checkpoints").exists()
    on_bucket = Checkpoints(None, directory=url, read_only=True)
    assert on_bucket.all_steps() == [3, 6]
    on_bucket.close()
    expected = load(tmp_path / "folder")
    for source in (tmp_path / "bucket", url):
        loaded = load(source)
        assert loaded.step == 6 and loaded.vocabulary == expected.vocabulary
        for a, b in zip(jax.tree.leaves(nnx.state(loaded.model)),
                        jax.tree.leaves(nnx.state(expected.model))):
            np.testing.assert_array_equal(a, b)
