"""`scfm-jax convert` from TileDB-SOMA experiments (and a Census-shaped collection).

Experiments are built with `tiledbsoma.io.from_anndata` from the bundled real PBMCs and from a
synthetic one with the Census's obs/var columns; every store is checked against converting the same
AnnData directly, or against the obs filter evaluated by pandas.
"""
import os
import signal
import subprocess
import sys
import time
import types
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tiledbsoma
import tiledbsoma.io

from scfm_jax.data import convert as convert_lib
from scfm_jax.data.convert import InputError, convert, finalize
from scfm_jax.data.datasets import pbmc68k_reduced_counts
from scfm_jax.data.soma_source import SomaInput
from scfm_jax.data.store import CellStore
from scfm_jax.data.vocabulary import Vocabulary
from scfm_jax.main import main as cli

NUM_GENES = 60
VOCAB_GENES = [i for i in range(2 * NUM_GENES) if i % 4 != 3]   # 3/4 of the input genes, and more
ENSEMBL_VOCAB = Vocabulary("census-like", tuple(f"GENE{i}" for i in VOCAB_GENES),
                           tuple(f"ENSG{i:011d}" for i in VOCAB_GENES))


def to_soma(adata, uri, layer="raw", obs_id_name="obs_id"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiledbsoma.io.from_anndata(str(uri), adata, measurement_name="RNA", X_layer_name=layer,
                                   obs_id_name=obs_id_name)
    return str(uri)


def census_like(num_cells=400, seed=0):
    """Counts with the Census's obs/var columns; every 5th cell has no counts on ENSEMBL_VOCAB."""
    rng = np.random.default_rng(seed)
    ids = [f"ENSG{i:011d}" for i in range(NUM_GENES)]
    counts = sp.random(num_cells, NUM_GENES, density=0.25, format="csr", random_state=seed,
                       dtype=np.float32)
    counts.data = np.floor(rng.pareto(1.5, counts.nnz) + 1).astype(np.float32)   # heavy-tailed
    in_vocab = np.isin(np.array(ids), ENSEMBL_VOCAB.ensembl_ids)
    counts = counts.tolil()
    for r in range(0, num_cells, 5):
        counts[r, np.flatnonzero(in_vocab)] = 0
        counts[r, np.flatnonzero(~in_vocab)[0]] = 4
    obs = pd.DataFrame({
        "is_primary_data": rng.random(num_cells) < 0.7,
        "tissue_general": pd.Categorical(rng.choice(["blood", "lung", "brain"], num_cells)),
        "cell_type": pd.Categorical(rng.choice(["T cell", "B cell", "neuron"], num_cells)),
        "assay": pd.Categorical(rng.choice(["10x 3' v3", "Smart-seq2"], num_cells)),
        "donor_id": pd.Categorical(rng.choice([f"d{i}" for i in range(7)], num_cells)),
        "raw_sum": rng.random(num_cells)}, index=[f"cell{i}" for i in range(num_cells)])
    var = pd.DataFrame({"feature_id": ids, "feature_name": [f"SYM{i}" for i in range(NUM_GENES)],
                        "feature_length": rng.integers(500, 5000, NUM_GENES)}, index=ids)
    return anndata.AnnData(counts.tocsr(), obs=obs, var=var)


def aligned_by_hand(adata):
    dense = adata.X.toarray()
    out = np.zeros((adata.n_obs, len(ENSEMBL_VOCAB)), np.float32)
    for j, e in enumerate(adata.var["feature_id"]):
        if e in ENSEMBL_VOCAB.ensembl_ids:
            out[:, ENSEMBL_VOCAB.ensembl_ids.index(e)] += dense[:, j]
    return out


def source_rows(store_path):
    return np.concatenate([anndata.read_zarr(s).obs["scfm_source_row"].to_numpy()
                           for s in sorted((store_path / "shards").iterdir())])


def shard_tree(root):
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted((root / "shards").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pbmc(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pbmc")
    adata = pbmc68k_reduced_counts()
    adata.obs_names = adata.obs_names.astype(str)
    return adata, to_soma(adata, folder / "pbmc.soma")


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    folder = tmp_path_factory.mktemp("census")
    adata = census_like()
    return adata, to_soma(adata, folder / "census_like.soma")


def test_pbmc_soma_store_equals_the_anndata_store(pbmc, tmp_path):
    adata, uri = pbmc
    h5ad = tmp_path / "pbmc.h5ad"
    adata.write_h5ad(h5ad)
    columns = ["bulk_labels", "louvain", "phase"]
    options = dict(vocabulary="from-data", shard_size=256, obs=columns)
    direct = convert([str(h5ad)], tmp_path / "direct", **options)
    soma = convert([SomaInput(uri)], tmp_path / "soma", **options)
    assert soma.num_cells == direct.num_cells == adata.n_obs and soma.num_shards == 3
    assert soma.sources[0]["kind"] == "soma" and soma.sources[0]["layer"] == "RNA/X/raw"
    assert soma.sources[0]["alignment"] == direct.sources[0]["alignment"]

    a, b = CellStore.open(tmp_path / "direct"), CellStore.open(tmp_path / "soma")
    assert a.vocabulary == b.vocabulary
    cells = np.arange(adata.n_obs)
    x_a, x_b = a.read(cells), b.read(cells)
    for field in ("counts", "gene_ids", "indptr"):
        np.testing.assert_array_equal(getattr(x_a, field), getattr(x_b, field))
    for column in columns:
        assert a.obs_categories(column) == b.obs_categories(column)
        np.testing.assert_array_equal(a.read_obs(column, cells), b.read_obs(column, cells))
    for name in ("X/data", "X/indices", "X/indptr"):   # the arrays are the same bytes
        assert {k: v for k, v in shard_tree(tmp_path / "direct").items() if f"/{name}/" in k} == \
               {k: v for k, v in shard_tree(tmp_path / "soma").items() if f"/{name}/" in k}
    shard = anndata.read_zarr(tmp_path / "soma" / "shards" / "00000.zarr")
    assert list(shard.obs_names) == list(adata.obs_names[:256])
    np.testing.assert_array_equal(source_rows(tmp_path / "soma"), cells)   # soma_joinid


def test_x_is_read_in_bounded_ranges_and_never_counted_whole(pbmc, tmp_path, monkeypatch):
    # tiledbsoma counts `nnz` by reading the whole layer when fragments may overlap (6 GB at
    # 250,000 cells), so the converter must not ask for it, and every X read covers one range.
    from scfm_jax.data import soma_source

    adata, uri = pbmc
    monkeypatch.setattr(soma_source, "_READ_ELEMENTS", 20_000)   # ~60 cells a read
    monkeypatch.setattr(convert_lib, "_OPEN_SOURCES", {})   # not the sources earlier tests opened
    reads = []
    original_read = tiledbsoma.SparseNDArray.read

    def read(self, coords=(), **kwargs):
        rows = coords[0] if coords else slice(None)
        reads.append(rows.stop - rows.start + 1 if isinstance(rows, slice) and rows.stop is not None
                     else len(rows) if not isinstance(rows, slice) else None)
        return original_read(self, coords, **kwargs)

    def nnz(self):
        raise AssertionError("the converter asked tiledbsoma for X's nnz")

    monkeypatch.setattr(tiledbsoma.SparseNDArray, "read", read)
    monkeypatch.setattr(tiledbsoma.SparseNDArray, "nnz", property(nnz))
    convert([SomaInput(uri)], tmp_path / "soma", vocabulary="from-data", shard_size=256)
    per_cell = adata.X.nnz / adata.n_obs
    assert None not in reads and len(reads) > adata.n_obs / 256   # no read of the whole layer
    # each opening of the source probes the query's first cells for the values per cell; every
    # other read holds the budget, from their average
    budget = 20_000 / per_cell * 2
    assert all(r <= budget or r == soma_source._PROBE_CELLS for r in reads)
    assert sum(r <= budget for r in reads) >= adata.n_obs / budget
    assert CellStore.open(tmp_path / "soma").num_cells == adata.n_obs


def test_census_like_filter_selects_exactly_the_matching_cells(census, tmp_path):
    adata, uri = census
    flt = "is_primary_data == True and tissue_general == 'blood'"
    summary = convert([SomaInput(uri, obs_filter=flt)], tmp_path / "store", vocabulary=ENSEMBL_VOCAB,
                      gene_column="feature_id", shard_size=32, obs=["cell_type", "donor_id"])
    mask = (adata.obs["is_primary_data"] & (adata.obs["tissue_general"] == "blood")).to_numpy()
    empty = np.zeros(adata.n_obs, bool)
    empty[::5] = True
    expected = np.flatnonzero(mask & ~empty)
    assert summary.sources[0]["rows"] == mask.sum()
    assert summary.skipped_empty == (mask & empty).sum() > 0
    assert summary.sources[0]["alignment"]["num_matched_genes"] == NUM_GENES * 3 // 4
    np.testing.assert_array_equal(source_rows(tmp_path / "store"), expected)
    store = CellStore.open(tmp_path / "store")
    assert store.num_cells == len(expected)
    np.testing.assert_array_equal(store.read(np.arange(store.num_cells)).to_csr(
        len(ENSEMBL_VOCAB)).toarray(), aligned_by_hand(adata)[expected])
    labels = np.array(store.obs_categories("donor_id"))[store.read_obs("donor_id",
                                                                       np.arange(len(expected)))]
    np.testing.assert_array_equal(labels, adata.obs["donor_id"].astype(str).to_numpy()[expected])
    assert set(store.obs_columns) == {"cell_type", "donor_id", "scfm_source"}


def test_tasks_split_by_joinid_ranges_and_the_cli(census, tmp_path):
    adata, uri = census
    vocab_file = tmp_path / "genes.tsv"
    ENSEMBL_VOCAB.to_tsv(vocab_file)
    common = ["--soma", uri, "--vocabulary", str(vocab_file), "--gene-column", "feature_id",
              "--shard-size", "50", "--obs-filter", "tissue_general != 'brain'", "--no-progress"]
    assert convert_lib.main(common + ["--output", str(tmp_path / "one")]) == 0
    for task in (1, 0):
        assert convert_lib.main(common + ["--output", str(tmp_path / "two"), "--task-index",
                                          str(task), "--num-tasks", "2"]) == 0
        if task == 1:
            written = sorted(p.name for p in (tmp_path / "two" / "shards").iterdir())
            assert written == ["00001.zarr", "00003.zarr", "00005.zarr"]
    finalize(tmp_path / "two")
    assert shard_tree(tmp_path / "one") == shard_tree(tmp_path / "two")
    rows = source_rows(tmp_path / "one")
    keep = (adata.obs["tissue_general"] != "brain").to_numpy()
    keep[::5] = False
    np.testing.assert_array_equal(rows, np.flatnonzero(keep))
    for k, shard in enumerate(sorted((tmp_path / "two" / "shards").iterdir())):
        joinids = anndata.read_zarr(shard).obs["scfm_source_row"].to_numpy()   # one joinid range each
        window = np.flatnonzero((adata.obs["tissue_general"] != "brain").to_numpy())[50 * k:50 * k + 50]
        assert joinids.min() >= window[0] and joinids.max() <= window[-1]


def test_census_opened_through_cellxgene_census(census, tmp_path, monkeypatch, capsys):
    """`--census VERSION --census-uri` goes through cellxgene_census.open_soma(uri=...)."""
    adata, _ = census
    root = tmp_path / "census"
    with tiledbsoma.Collection.create(str(root)) as collection:
        data = collection.add_new_collection("census_data")
        # no obs_id column, as in the Census: cells are named by soma_joinid
        to_soma(adata, root / "census_data" / "homo_sapiens", obs_id_name="barcode")
        with tiledbsoma.Experiment.open(str(root / "census_data" / "homo_sapiens")) as experiment:
            data.set("homo_sapiens", experiment, use_relative_uri=True)
    calls = []

    def open_soma(census_version=None, uri=None):   # what cellxgene_census does for a given uri
        calls.append((census_version, uri))
        return tiledbsoma.open(uri)
    monkeypatch.setitem(sys.modules, "cellxgene_census",
                        types.SimpleNamespace(open_soma=open_soma))
    vocab_file = tmp_path / "genes.tsv"
    ENSEMBL_VOCAB.to_tsv(vocab_file)
    assert convert_lib.main(["--census", "2025-01-30", "--census-uri", str(root), "--vocabulary",
                             str(vocab_file), "--gene-column", "feature_id", "--obs-filter",
                             "assay == 'Smart-seq2'", "--output", str(tmp_path / "store"),
                             "--no-progress"]) == 0
    assert calls and calls[0] == ("2025-01-30", str(root))
    keep = (adata.obs["assay"] == "Smart-seq2").to_numpy()
    keep[::5] = False
    np.testing.assert_array_equal(source_rows(tmp_path / "store"), np.flatnonzero(keep))
    shard = anndata.read_zarr(tmp_path / "store" / "shards" / "00000.zarr")
    assert list(shard.obs_names) == [str(j) for j in np.flatnonzero(keep)]
    assert CellStore.open(tmp_path / "store").obs_categories("scfm_source") == \
        ["census-2025-01-30-homo_sapiens"]
    assert cli(["convert", "--census", "2025-01-30", "--census-uri", str(root), "--organism",
                "mus_musculus", "--output", str(tmp_path / "mouse"),
                "--vocabulary", str(vocab_file)]) == 1
    assert "no organism 'mus_musculus'" in capsys.readouterr().err
    assert cli(["convert", "--census", "stable", "extra.h5ad", "--output", "s"]) == 2   # usage


def test_bad_inputs_are_clear_errors_and_leave_nothing(census, tmp_path):
    adata, uri = census
    normalised = adata.copy()
    normalised.X = normalised.X.multiply(1 / (normalised.X.sum(1) + 1)).tocsr().astype(np.float32)
    float_uri = to_soma(normalised, tmp_path / "normalised.soma")
    options = dict(vocabulary=ENSEMBL_VOCAB, gene_column="feature_id")
    cases = [(SomaInput(uri, measurement="ATAC"), "no measurement 'ATAC'"),
             (SomaInput(uri, layer="counts"), "no X layer 'counts'"),
             (SomaInput(uri, obs_filter="tissue == 'blood'"), "--obs-filter"),
             (SomaInput(float_uri), "non-integer value"),
             (SomaInput(str(tmp_path / "nothing.soma")), "not a SOMA experiment")]
    for spec, message in cases:
        output = tmp_path / "out"
        with pytest.raises(InputError, match=message):
            convert([spec], output, **options)
        assert not output.exists()
    with pytest.raises(InputError, match="obs has no column 'sex'"):
        convert([SomaInput(uri)], tmp_path / "out", obs=["sex"], **options)
    assert not (tmp_path / "out").exists()


def test_without_tiledbsoma_the_command_says_how_to_install(census, tmp_path, monkeypatch,
                                                           capsys):
    monkeypatch.setitem(sys.modules, "tiledbsoma", None)   # import tiledbsoma -> ImportError
    assert cli(["convert", "--soma", census[1], "--output", str(tmp_path / "s"),
                "--vocabulary", "from-data"]) == 1
    assert 'pip install -e ".[census]"' in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.slow   # three converter processes (~40 s)
def test_kill_and_resume_gives_the_identical_store(tmp_path):
    """SIGKILL `convert --soma` mid-run, rerun: the same bytes as an uninterrupted run."""
    uri = to_soma(census_like(3000, seed=3), tmp_path / "big.soma")
    vocab_file = tmp_path / "genes.tsv"
    ENSEMBL_VOCAB.to_tsv(vocab_file)
    command = [sys.executable, "-m", "scfm_jax.main", "convert", "--soma", uri, "--vocabulary",
               str(vocab_file), "--gene-column", "feature_id", "--shard-size", "100",
               "--obs-filter", "is_primary_data == True", "--no-progress"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(command + ["--output", str(reference)], check=True, capture_output=True)
    for wait_for_shards in (2, 10):
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
    tree = {str(p.relative_to(killed)): p.read_bytes() for p in sorted(killed.rglob("*"))
            if p.is_file()}
    assert tree == {str(p.relative_to(reference)): p.read_bytes()
                    for p in sorted(reference.rglob("*")) if p.is_file()}
    assert CellStore.open(killed).num_cells > 1500
