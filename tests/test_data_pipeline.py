"""The reader and the step-pure pipeline: exact rows, process-count and resume invariance."""
import threading
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfm_jax.data.convert import convert
from scfm_jax.data.pipeline import Pipeline, split_cells
from scfm_jax.data.store import CellStore
from scfm_jax.data.vocabulary import Vocabulary

NUM_CELLS, NUM_GENES = 500, 300


@pytest.fixture(scope="module")
def reference():
    """A store of 500 cells (row lengths 1..~200) and the dense matrix it was made from."""
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(1, 60, NUM_CELLS - 20), rng.integers(150, 200, 20)])
    rng.shuffle(lengths)
    dense = np.zeros((NUM_CELLS, NUM_GENES), np.float32)
    for i, n in enumerate(lengths):
        dense[i, rng.choice(NUM_GENES, n, replace=False)] = rng.integers(1, 50, n)
    genes = [f"G{i}" for i in range(NUM_GENES)]
    obs = pd.DataFrame({"label": pd.Categorical(rng.choice(["a", "b", "c"], NUM_CELLS))},
                       index=[f"cell{i}" for i in range(NUM_CELLS)])
    adata = anndata.AnnData(sp.csr_matrix(dense), obs=obs, var=pd.DataFrame(index=genes))
    url = "memory://pipeline-test/"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert([adata], url, vocabulary=Vocabulary("v", tuple(genes)), shard_size=128,
                chunk_elements=1024)
    return CellStore.open(url), dense, obs


def make(store, processes=1, index=0, **overrides):
    options = dict(global_batch_size=32, seed=7, buckets=(16, 64, 128), max_nonzero=128,
                   block_size=8, window_blocks=3, obs_keys=("label",), process_index=index,
                   process_count=processes)
    options.update(overrides)
    return Pipeline(store, **options)


def test_reader_returns_exact_rows_in_any_order(reference):
    store, dense, _ = reference
    cells = np.array([499, 3, 3, 130, 127, 128, 0, 255, 256, 257])   # repeats, shard boundaries
    rows = store.read(cells)
    np.testing.assert_array_equal(rows.to_csr(NUM_GENES).toarray(), dense[cells])
    assert rows.counts.dtype == np.float32 and rows.gene_ids.dtype == np.int32
    assert all(np.all(np.diff(rows.gene_ids[a:b]) > 0) for a, b in zip(rows.indptr, rows.indptr[1:]))
    np.testing.assert_array_equal(store.row_lengths(cells), (dense[cells] > 0).sum(1))
    everything = store.read(np.arange(NUM_CELLS)).to_csr(NUM_GENES).toarray()
    np.testing.assert_array_equal(everything, dense)
    with pytest.raises(IndexError, match="cell index 500 is out of range"):
        store.read([1, 500])


def test_obs_codes(reference):
    store, _, obs = reference
    cells = np.array([5, 400, 17])
    labels = np.array(store.obs_categories("label"))[store.read_obs("label", cells)]
    np.testing.assert_array_equal(labels, obs["label"].astype(str).values[cells])
    with pytest.raises(KeyError, match="convert with --obs tissue"):
        store.read_obs("tissue", cells)


def test_batch_contents(reference):
    store, dense, obs = reference
    pipeline = make(store)
    for step in range(6):
        batch = pipeline.batch(step)
        cells = batch["cell_index"]
        width = batch["gene_ids"].shape[1]
        longest = (dense[cells] > 0).sum(1).max()
        assert width == next(b for b in (16, 64, 128) if b >= min(longest, 128))
        np.testing.assert_allclose(batch["total_counts"], dense[cells].sum(1))
        np.testing.assert_array_equal(
            batch["obs/label"], pd.Categorical(obs["label"].astype(str).values[cells],
                                               store.obs_categories("label")).codes)
        for row, cell in enumerate(cells):
            n = batch["num_nonzero"][row]
            genes = batch["gene_ids"][row]
            assert n == min((dense[cell] > 0).sum(), width)
            assert np.all(genes[n:] == -1) and np.all(batch["counts"][row, n:] == 0)
            assert np.all(np.diff(genes[:n]) > 0)
            np.testing.assert_array_equal(batch["counts"][row, :n], dense[cell, genes[:n]])
    assert batch["gene_ids"].dtype == np.int32 and batch["cell_index"].dtype == np.int64


def test_capped_cells_are_subsampled_deterministically(reference):
    store, dense, _ = reference
    pipeline = make(store, max_nonzero=64, buckets=(16, 64), global_batch_size=NUM_CELLS)
    a, b = pipeline.batch(0), pipeline.batch(0)
    capped = (dense[a["cell_index"]] > 0).sum(1) > 64
    assert capped.sum() == 20 and a["gene_ids"].shape[1] == 64
    np.testing.assert_array_equal(a["gene_ids"], b["gene_ids"])
    np.testing.assert_array_equal(a["num_nonzero"][capped], 64)
    c = pipeline.batch(1)        # another step draws another subset of the same cell
    row_a = {cell: set(g) for cell, g in zip(a["cell_index"], a["gene_ids"])}
    assert any(row_a[cell] != set(g) for cell, g, cap in
               zip(c["cell_index"], c["gene_ids"], (dense[c["cell_index"]] > 0).sum(1) > 64) if cap)


def _row_by_row_batch(pipeline, step, cells, width):
    """The padded rows of `cells` as the pipeline built them before vectorising (one Python
    iteration per row, one argpartition per capped cell): the reference the batch must reproduce
    bit for bit. (Which cells and which width are unchanged and come from the batch itself.)"""
    def mix(x):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    def row_key(cell):
        key = np.array([0x53554253], np.uint64)
        for value in (pipeline.seed, step, cell):
            key = mix(key ^ np.array([value & 0xFFFFFFFFFFFFFFFF], np.uint64))
        return key

    unique, inverse = np.unique(cells, return_inverse=True)
    counts_views, gene_views, unique_totals = pipeline.store.row_views(unique)
    gene_ids = np.full((len(cells), width), -1, np.int32)
    counts = np.zeros((len(cells), width), np.float32)
    num_nonzero = np.empty(len(cells), np.int32)
    for row, u in enumerate(inverse.tolist()):
        row_counts, row_genes = counts_views[u], gene_views[u]
        if len(row_genes) > width:
            keys = mix(row_genes.astype(np.uint64) ^ row_key(int(unique[u])))
            chosen = np.sort(np.argpartition(keys, width - 1)[:width])
            row_counts, row_genes = row_counts[chosen], row_genes[chosen]
        n = len(row_genes)
        num_nonzero[row] = n
        gene_ids[row, :n] = row_genes
        counts[row, :n] = row_counts
    return {"gene_ids": gene_ids, "counts": counts,
            "total_counts": unique_totals[inverse].astype(np.float32),
            "num_nonzero": num_nonzero, "cell_index": cells}


@pytest.mark.parametrize("overrides", [
    dict(),                                                            # buckets, a few capped cells
    dict(max_nonzero=64, buckets=(16, 64), global_batch_size=64),      # many capped cells
    dict(cell_indices=np.arange(100, 130), global_batch_size=64),      # repeats within a batch
    dict(seed=2**63 + 5, processes=2, index=1),                        # a huge seed, one process
])
def test_batches_equal_the_row_by_row_reference(reference, overrides):
    store, _, _ = reference
    overrides = dict(overrides)
    pipeline = make(store, overrides.pop("processes", 1), overrides.pop("index", 0), **overrides)
    for step in (0, 1, 7, 2**40 + 3):
        batch = pipeline.batch(step)
        expected = _row_by_row_batch(pipeline, step, batch["cell_index"], batch["gene_ids"].shape[1])
        for key, value in expected.items():
            assert batch[key].dtype == value.dtype, key
            np.testing.assert_array_equal(batch[key], value, err_msg=f"{key} at step {step}")


def test_epochs_visit_every_cell_once_and_keep_blocks_in_windows(reference):
    store, _, _ = reference
    train, _ = split_cells(NUM_CELLS, 0.2, seed=1)          # 400 cells
    pipeline = make(store, cell_indices=train, global_batch_size=40)
    epoch = np.concatenate([pipeline.global_cells(s) for s in range(10)])
    np.testing.assert_array_equal(np.sort(epoch), train)
    # Each window of 3 blocks of 8 cells (24 cells) draws its cells from exactly 3 blocks.
    positions = np.searchsorted(train, epoch)
    for w in range(len(epoch) // 24):
        assert len(np.unique(positions[w * 24:(w + 1) * 24] // 8)) == 3
    next_epoch = np.concatenate([pipeline.global_cells(s) for s in range(10, 20)])
    np.testing.assert_array_equal(np.sort(next_epoch), train)
    assert not np.array_equal(next_epoch, epoch)


def test_batches_do_not_depend_on_process_count_or_resume(reference):
    store, _, _ = reference
    single = make(store)
    steps = [0, 1, 13, 14, 40]       # 40 crosses into the third epoch
    expected = {s: single.batch(s) for s in steps}
    for processes in (2, 4):
        parts = [make(store, processes, p) for p in range(processes)]
        for s in steps:
            local = [p.batch(s) for p in parts]
            assert all(b["gene_ids"].shape == local[0]["gene_ids"].shape for b in local)
            for key, value in expected[s].items():
                np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), value)
    resumed = make(store)            # a fresh process resuming at step 13
    with resumed.iterate(13, 2) as it:
        got = list(it)
    assert [s for s, _ in got] == [13, 14]
    for s, batch in got:
        for key, value in expected[s].items():
            np.testing.assert_array_equal(batch[key], value)
    other_seed = make(store, seed=8)
    assert not np.array_equal(other_seed.global_cells(0), single.global_cells(0))


def test_iterator_shuts_down_its_threads(reference):
    store, _, _ = reference
    pipeline = make(store, prefetch=3)
    before = threading.active_count()
    iterator = pipeline.iterate(0)
    step, _ = next(iterator)
    assert step == 0
    iterator.close()
    iterator.close()
    assert threading.active_count() <= before
    with pytest.raises(StopIteration):
        next(iterator)


def test_split_cells_is_deterministic_and_disjoint():
    train, held = split_cells(1000, 0.1, seed=3)
    assert len(held) == 100 and len(train) == 900
    assert not np.intersect1d(train, held).size
    again = split_cells(1000, 0.1, seed=3)
    np.testing.assert_array_equal(again[1], held)
    assert not np.array_equal(split_cells(1000, 0.1, seed=4)[1], held)


def test_bad_configuration_is_refused(reference):
    store, _, _ = reference
    with pytest.raises(ValueError, match="not divisible"):
        make(store, processes=3)
    with pytest.raises(ValueError, match="must not exceed max_nonzero"):
        make(store, buckets=(256,), max_nonzero=128)
    with pytest.raises(KeyError, match="tissue"):
        make(store, obs_keys=("tissue",))
