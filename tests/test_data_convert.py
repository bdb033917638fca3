"""`scfm-jax convert`: inputs, alignment, refusals, the anndata round trip, resume after a kill."""
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from scfm_jax.data import convert as convert_lib
from scfm_jax.data.convert import InputError, convert, finalize
from scfm_jax.data.store import CellStore
from scfm_jax.data.vocabulary import Vocabulary

VOCAB = Vocabulary("test", tuple(f"G{i}" for i in range(40)),
                   tuple(f"ENSG{i:011d}" for i in range(40)))


def make_adata(num_cells=50, seed=0, genes=None, empty_rows=(), name="c"):
    """Integer counts over shuffled vocabulary genes plus two foreign genes and one duplicate."""
    rng = np.random.default_rng(seed)
    genes = genes or [f"G{i}" for i in rng.permutation(40)[:34]] + ["FOREIGN1", "FOREIGN2"]
    genes = genes + [genes[0].lower()]   # a duplicate (case-insensitive) of the first gene
    counts = rng.negative_binomial(2, 0.5, size=(num_cells, len(genes))).astype(np.float32)
    counts[:, :len(genes)][rng.random(counts.shape) < 0.6] = 0
    for r in empty_rows:
        counts[r] = 0
        counts[r, genes.index("FOREIGN1")] = 3     # counts, but none on the vocabulary
    obs = pd.DataFrame({
        "cell_type": pd.Categorical(rng.choice(["T", "B", "NK"], num_cells)),
        "batch": pd.Categorical(rng.choice([f"b{seed}", "shared"], num_cells)),
        "score": rng.random(num_cells)}, index=[f"{name}{i}" for i in range(num_cells)])
    return anndata.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))


def aligned_rows(adata, layer=None):
    """Reference alignment by hand: sum duplicates case-insensitively, drop foreign genes."""
    matrix = adata.layers[layer] if layer else adata.X
    dense = np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix)
    out = np.zeros((adata.n_obs, len(VOCAB)), np.float32)
    for j, g in enumerate(adata.var_names):
        if g.upper() in VOCAB.symbols:
            out[:, VOCAB.symbols.index(g.upper())] += dense[:, j]
    return out


def write(adata, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_h5ad(path)
    return path


def quiet_convert(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the duplicated-gene warning is expected here
        return convert(*args, **kwargs)


def test_two_h5ad_inputs_round_trip_through_anndata_read_zarr(tmp_path):
    a = make_adata(50, seed=0, empty_rows=(3, 40))
    b = make_adata(30, seed=1, name="d")
    paths = [write(a, tmp_path / "a.h5ad"), write(b, tmp_path / "b.h5ad")]
    summary = quiet_convert(paths, tmp_path / "store", vocabulary=VOCAB, shard_size=32)
    assert summary.num_cells == 78 and summary.skipped_empty == 2 and summary.num_shards == 3
    assert "a.h5ad" in summary.table()

    expected = np.concatenate([np.delete(aligned_rows(a), [3, 40], axis=0), aligned_rows(b)])
    names = [n for i, n in enumerate(a.obs_names) if i not in (3, 40)] + list(b.obs_names)
    shards = sorted((tmp_path / "store" / "shards").iterdir())
    assert [s.name for s in shards] == ["00000.zarr", "00001.zarr", "00002.zarr"]
    start = 0
    for shard in shards:
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # a real client reads our format without complaint
            back = anndata.read_zarr(shard)
        n = back.n_obs
        assert sp.issparse(back.X) and back.X.dtype == np.float32
        np.testing.assert_array_equal(back.X.toarray(), expected[start:start + n])
        assert list(back.obs_names) == names[start:start + n]
        assert list(back.var_names) == list(VOCAB.symbols)
        assert back.X.has_sorted_indices
        start += n
    assert start == 78

    store = CellStore.open(tmp_path / "store")
    assert store.num_cells == 78 and store.vocabulary == VOCAB
    assert set(store.obs_columns) == {"cell_type", "batch", "scfm_source"}   # categorical columns only
    assert store.obs_categories("batch") == ["b0", "shared", "b1"]
    codes = store.read_obs("batch", np.arange(78))
    labels = np.array(store.obs_categories("batch"))[codes]
    reference = np.concatenate([np.delete(a.obs["batch"].astype(str).values, [3, 40]),
                                b.obs["batch"].astype(str).values])
    np.testing.assert_array_equal(labels, reference)
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["vocabulary"]["digest"] == VOCAB.digest
    assert [s["skipped_empty"] for s in manifest["sources"]] == [2, 0]
    assert all(len(s["sha256"]) == 64 for s in manifest["sources"])
    assert manifest["sources"][0]["alignment"]["duplicated"]


def test_layer_choice_and_non_integer_refusal(tmp_path):
    a = make_adata(20)
    counts = a.X.copy()
    a.layers["counts"] = counts
    a.X = counts.multiply(0.37).tocsr()               # normalised values in X
    path = write(a, tmp_path / "a.h5ad")
    summary = quiet_convert([path], tmp_path / "s1", vocabulary=VOCAB)
    assert summary.sources[0]["layer"] == "layers/counts"
    np.testing.assert_array_equal(CellStore.open(tmp_path / "s1").read(np.arange(20))
                                  .to_csr(40).toarray(), aligned_rows(a, "counts"))

    with pytest.raises(InputError, match=r"a\.h5ad: X row \d+ \(cell 'c\d+'\) holds the non-integer"):
        quiet_convert([path], tmp_path / "s2", vocabulary=VOCAB, layer="X")
    assert not (tmp_path / "s2").exists()
    summary = quiet_convert([path], tmp_path / "s3", vocabulary=VOCAB, layer="X",
                            allow_non_integer=True)
    assert summary.sources[0]["layer"] == "X"

    del a.layers["counts"]
    write(a, tmp_path / "b.h5ad")
    with pytest.raises(InputError, match="none of .* holds integer counts"):
        quiet_convert([tmp_path / "b.h5ad"], tmp_path / "s4", vocabulary=VOCAB)
    assert not (tmp_path / "s4").exists()


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_negative_nan_inf_always_refused(tmp_path, bad):
    a = make_adata(20)
    dense = a.X.toarray()
    dense[7, 2] = bad
    a.X = sp.csr_matrix(dense)
    path = write(a, tmp_path / "a.h5ad")
    with pytest.raises(InputError, match="row 7 .*finite and non-negative"):
        quiet_convert([path], tmp_path / "store", vocabulary=VOCAB, allow_non_integer=True)
    assert not (tmp_path / "store").exists()


def test_low_coverage_and_missing_obs_column_refused(tmp_path):
    a = make_adata(20, genes=[f"OTHER{i}" for i in range(30)] + ["G1"])
    path = write(a, tmp_path / "a.h5ad")
    with pytest.raises(InputError, match="only .* of the expressed counts .*--min-coverage"):
        quiet_convert([path], tmp_path / "store", vocabulary=VOCAB)
    assert not (tmp_path / "store").exists()
    with pytest.raises(InputError, match="obs has no column 'tissue'"):
        quiet_convert([write(make_adata(5), tmp_path / "b.h5ad")], tmp_path / "store",
                      vocabulary=VOCAB, obs=["tissue"])
    assert not (tmp_path / "store").exists()


def test_in_memory_anndata_from_data_vocabulary_and_selected_obs(tmp_path):
    a = make_adata(25)
    summary = quiet_convert([a], tmp_path / "store", vocabulary="from-data", obs=["cell_type", "score"])
    store = CellStore.open(tmp_path / "store")
    assert store.vocabulary.name == "from-data"
    assert list(store.vocabulary.symbols) == list(a.var_names[:-1])
    assert summary.sources[0]["label"] == "<AnnData 0>"
    assert store.obs_columns == ["cell_type", "scfm_source", "score"]  # sorted
    assert len(store.obs_categories("score")) == 25     # non-categorical columns become categories
    rows = store.read(np.arange(25)).to_csr(len(store.vocabulary)).toarray()
    dense = a.X.toarray()
    np.testing.assert_array_equal(rows[:, 1:], dense[:, 1:-1])
    np.testing.assert_array_equal(rows[:, 0], dense[:, 0] + dense[:, -1])


def test_anndata_zarr_and_10x_inputs(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"   # this test's own temp dir, where the mtx cache would be left
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    a = make_adata(12, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a.write_zarr(tmp_path / "a.zarr")
    expected = aligned_rows(a)

    # 10x matrix.mtx.gz folder (genes x cells) with features.tsv.gz / barcodes.tsv.gz.
    mtx = tmp_path / "filtered_feature_bc_matrix"
    mtx.mkdir()
    with gzip.open(mtx / "matrix.mtx.gz", "wb") as f:
        coo = sp.coo_matrix(a.X.T)
        shuffled = np.random.default_rng(0).permutation(coo.nnz)   # any entry order is accepted
        scipy.io.mmwrite(f, sp.coo_matrix((coo.data[shuffled], (coo.row[shuffled],
                                                                coo.col[shuffled])), shape=coo.shape))
    ids = [f"ENSG{i:011d}" for i in range(a.n_vars)]
    pd.DataFrame({0: ids, 1: list(a.var_names), 2: "Gene Expression"}).to_csv(
        mtx / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.DataFrame({0: list(a.obs_names)}).to_csv(mtx / "barcodes.tsv.gz", sep="\t", header=False,
                                                index=False)

    # 10x .h5 (CSC genes x cells == CSR cells x genes).
    csr = a.X.tocsr()
    with h5py.File(tmp_path / "a.h5", "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = csr.data.astype(np.int32), csr.indices, csr.indptr
        m["shape"] = [a.n_vars, a.n_obs]
        m["barcodes"] = np.array(list(a.obs_names), dtype="S")
        feats = m.create_group("features")
        feats["name"] = np.array(list(a.var_names), dtype="S")
        feats["id"] = np.array(ids, dtype="S")

    for source in (tmp_path / "a.zarr", mtx, tmp_path / "a.h5"):
        out = tmp_path / f"store-{source.name}"
        quiet_convert([source], out, vocabulary=VOCAB)
        store = CellStore.open(out)
        np.testing.assert_array_equal(store.read(np.arange(12)).to_csr(40).toarray(), expected,
                                      err_msg=str(source))
    assert not any(scratch.iterdir()), "mtx cache left behind"


def test_memory_kvstore(tmp_path):
    a = make_adata(30, seed=5)
    quiet_convert([write(a, tmp_path / "a.h5ad")], "memory://cells/", vocabulary=VOCAB,
                  shard_size=16)
    store = CellStore.open("memory://cells/")
    assert store.num_cells == 30
    np.testing.assert_array_equal(store.read(np.arange(30)).to_csr(40).toarray(), aligned_rows(a))
    with pytest.raises(FileNotFoundError, match="not a cell store"):
        CellStore.open("memory://nothing-here/")


def test_tasks_write_disjoint_shards_and_finalize_merges(tmp_path):
    a = make_adata(40, seed=2)
    path = write(a, tmp_path / "a.h5ad")
    out = tmp_path / "store"
    first = quiet_convert([path], out, vocabulary=VOCAB, shard_size=8, task_index=0, num_tasks=2)
    assert not first.finalized and first.shards_written == 3
    with pytest.raises(InputError, match="2 of 5 shards are not complete"):
        finalize(out)
    with pytest.raises(FileNotFoundError, match="unfinished"):
        CellStore.open(out)
    quiet_convert([path], out, vocabulary=VOCAB, shard_size=8, task_index=1, num_tasks=2)
    assert convert_lib.main(["--finalize", "--output", str(out)]) == 0
    store = CellStore.open(out)
    np.testing.assert_array_equal(store.read(np.arange(40)).to_csr(40).toarray(), aligned_rows(a))
    with pytest.raises(InputError, match="different inputs or options"):
        quiet_convert([path], out, vocabulary=VOCAB, shard_size=16)


def test_workers_produce_the_same_store(tmp_path):
    path = write(make_adata(40, seed=4), tmp_path / "a.h5ad")
    quiet_convert([path], tmp_path / "one", vocabulary=VOCAB, shard_size=10)
    quiet_convert([path], tmp_path / "two", vocabulary=VOCAB, shard_size=10, workers=2)
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow   # four converter processes (~30 s)
def test_kill_and_resume_gives_the_identical_store(tmp_path):
    """SIGKILL the converter mid-run (a real process), rerun: same bytes as an uninterrupted run."""
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(40)]
    counts = sp.random(3000, 40, density=0.3, format="csr", random_state=1, dtype=np.float32)
    counts.data = rng.integers(1, 20, counts.nnz).astype(np.float32)
    a = anndata.AnnData(counts, var=pd.DataFrame(index=genes),
                        obs=pd.DataFrame({"t": pd.Categorical(rng.choice(["x", "y"], 3000))}))
    path = write(a, tmp_path / "a.h5ad")
    vocab_file = tmp_path / "genes.tsv"
    VOCAB.to_tsv(vocab_file)
    command = [sys.executable, "-m", "scfm_jax.main", "convert", str(path), "--vocabulary",
               str(vocab_file), "--shard-size", "100", "--no-progress"]
    reference = tmp_path / "reference"
    subprocess.run(command + ["--output", str(reference)], check=True, capture_output=True)

    killed = tmp_path / "killed"
    for wait_for_shards in (2, 12):   # kill twice, at different points of the run
        process = subprocess.Popen(command + ["--output", str(killed)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            shards = killed / "shards"
            if shards.is_dir() and len(list(shards.glob("0*.zarr"))) >= wait_for_shards:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the converter finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert not (killed / "manifest.json").exists()
    subprocess.run(command + ["--output", str(killed)], check=True, capture_output=True)
    assert tree_bytes(killed) == tree_bytes(reference)
    assert CellStore.open(killed).num_cells == 3000


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from scfm_jax.main import main
    assert main(["convert", str(tmp_path / "missing.h5ad"), "--output", str(tmp_path / "s"),
                 "--vocabulary", "from-data"]) == 1
    err = capsys.readouterr().err
    assert "missing.h5ad: no such file" in err and "Traceback" not in err
    assert main(["convert", "--output", str(tmp_path / "s")]) == 2   # a usage error


def test_permuted_genes_without_duplicates(tmp_path):
    """The relabelling path (no duplicated genes): rows come out sorted on the vocabulary."""
    genes = [f"G{i}" for i in np.random.default_rng(9).permutation(40)[:30]] + ["FOREIGN"]
    a = make_adata(30, seed=9, genes=genes)
    a = a[:, :-1].copy()                      # drop make_adata's duplicate column
    quiet_convert([write(a, tmp_path / "a.h5ad")], tmp_path / "store", vocabulary=VOCAB)
    back = anndata.read_zarr(tmp_path / "store" / "shards" / "00000.zarr")
    assert back.X.has_sorted_indices
    np.testing.assert_array_equal(back.X.toarray(), aligned_rows(a))


@pytest.mark.parametrize("codec", ["zstd", "blosc"])
def test_compressed_store_reads_back(tmp_path, codec):
    a = make_adata(20, seed=11)
    quiet_convert([write(a, tmp_path / "a.h5ad")], tmp_path / "store", vocabulary=VOCAB,
                  compression=codec)
    meta = json.loads((tmp_path / "store" / "shards" / "00000.zarr" / "X" / "data" / "zarr.json")
                      .read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", codec, "crc32c"]
    np.testing.assert_array_equal(CellStore.open(tmp_path / "store").read(np.arange(20))
                                  .to_csr(40).toarray(), aligned_rows(a))
    back = anndata.read_zarr(tmp_path / "store" / "shards" / "00000.zarr")
    np.testing.assert_array_equal(back.X.toarray(), aligned_rows(a))
