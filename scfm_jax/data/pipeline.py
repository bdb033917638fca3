"""The step-pure, multi-host input pipeline: cell store -> fixed-shape sparse numpy batches.

The global batch of step `s` is a pure function of `(seed, s)`: the stream of cells is an endless
sequence of epochs, each a seeded permutation of fixed-size blocks of contiguous cells (blocks keep
reads contiguous) with the cells shuffled inside windows of `window_blocks` blocks. Step s takes
stream positions [s * B, (s + 1) * B). Process p of n returns rows [p * B/n, (p + 1) * B/n) of that
batch and reads only those cells, so resuming at any step, or restarting on another number of hosts,
replays exactly the same global batches.

Rows are sparse and padded to K = the smallest bucket holding the longest row of the GLOBAL batch
(capped at `max_nonzero`; longer cells keep a random subset of their genes, drawn from (seed, step,
cell)), so every process returns the same shapes. Normalisation, downsampling and masking happen
on the device; the host only moves sparse counts.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading

import numpy as np

from scfm_jax.data.host_ops import smallest_bucket
from scfm_jax.data.store import CellStore

_EPOCH, _WINDOW, _SUBSAMPLE = 0x45504F43, 0x57494E44, 0x53554253   # rng stream tags


@dataclasses.dataclass(frozen=True)
class BatchField:
    """One field of a pipeline batch: one value per cell, or one per padded expressed gene."""
    dtype: str
    per_gene: bool = False   # [B, K] (K: the batch's padded length) rather than [B]
    on_host: bool = False    # bookkeeping that stays on the host; the device step never sees it

    def shape(self, rows: int, length: int) -> tuple[int, ...]:
        return (rows, length) if self.per_gene else (rows,)


def batch_schema(pipeline_class: type["Pipeline"] | None = None, obs_keys=()
                 ) -> dict[str, BatchField]:
    """name -> field of the batches `pipeline_class` (default `Pipeline`) returns with these
    `obs_keys`: the one description of a batch that training, the plan and inference share."""
    pipeline_class = pipeline_class or Pipeline
    return {**pipeline_class.FIELDS, **{f"obs/{key}": pipeline_class.OBS_FIELD for key in obs_keys}}


def device_fields(batch: dict, pipeline_class: type["Pipeline"] | None = None) -> dict:
    """The fields of a batch that go to the device (all but the schema's host-only ones)."""
    fields = (pipeline_class or Pipeline).FIELDS
    return {name: value for name, value in batch.items()
            if not (name in fields and fields[name].on_host)}


def split_cells(num_cells: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic disjoint (train, eval) cell indices, both sorted."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    num_eval = int(round(num_cells * eval_fraction))
    if eval_fraction > 0 and num_cells > 1:
        num_eval = min(max(num_eval, 1), num_cells - 1)
    order = np.random.default_rng([seed, 0x53504C54]).permutation(num_cells)
    return np.sort(order[num_eval:]).astype(np.int64), np.sort(order[:num_eval]).astype(np.int64)


def _row_key(seed: int, step: int, cell: int) -> np.ndarray:
    """A uint64 key of (seed, step, cell): the subsample of a capped cell depends on nothing else."""
    key = np.array([_SUBSAMPLE], np.uint64)
    for value in (seed, step, cell):
        key = _mix(key ^ np.array([value & 0xFFFFFFFFFFFFFFFF], np.uint64))
    return key


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: uint64 -> well-mixed uint64 (vectorised, layout-independent keys)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Pipeline:
    """Batches of a cell store for this process; `batch(step)` is pure in (seed, step)."""

    # what `batch` returns (see `batch_schema`); `obs/<key>` for every obs key are OBS_FIELD
    FIELDS = {"gene_ids": BatchField("int32", per_gene=True),     # store gene index, -1 pads
              "counts": BatchField("float32", per_gene=True),     # raw counts, 0 in pads
              "total_counts": BatchField("float32"),              # the cell's total, all genes
              "num_nonzero": BatchField("int32"),                 # genes kept in the row
              "cell_index": BatchField("int64", on_host=True)}    # store index of the cell
    OBS_FIELD = BatchField("int32")                               # category code of an obs column

    def __init__(self, store: CellStore, *, global_batch_size: int, seed: int,
                 buckets=(64, 128, 256, 512), max_nonzero: int = 512, block_size: int = 64,
                 window_blocks: int = 16, cell_indices=None, obs_keys=(), process_index=None,
                 process_count=None, prefetch: int = 2):
        if process_index is None or process_count is None:
            import jax
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the "
                             f"{process_count} processes")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.buckets = tuple(sorted(int(b) for b in buckets))
        if max_nonzero < 1 or (self.buckets and self.buckets[-1] > max_nonzero):
            raise ValueError(f"buckets {self.buckets} must not exceed max_nonzero {max_nonzero}")
        if block_size < 1 or window_blocks < 1:
            raise ValueError("block_size and window_blocks must be positive")
        for key in obs_keys:
            store.obs_categories(key)   # fails early, naming the store's columns
        self.store = store
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed = int(seed)
        self.max_nonzero = int(max_nonzero)
        self.block_size = int(block_size)
        self.window_blocks = int(window_blocks)
        self.obs_keys = tuple(obs_keys)
        self.process_index, self.process_count = process_index, process_count
        self.prefetch = prefetch
        cells = np.arange(store.num_cells, dtype=np.int64) if cell_indices is None else \
            np.unique(np.asarray(cell_indices, np.int64))
        if len(cells) == 0:
            raise ValueError("the pipeline has no cells (empty cell_indices)")
        if cells[0] < 0 or cells[-1] >= store.num_cells:
            raise IndexError(f"cell_indices out of range for a store of {store.num_cells} cells")
        self.cells = cells
        self.num_blocks = -(-len(cells) // self.block_size)
        self._cache_lock = threading.Lock()
        self._epochs: collections.OrderedDict = collections.OrderedDict()
        self._windows: collections.OrderedDict = collections.OrderedDict()

    # ---------------------------------------------------------------- the order of the stream
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(block order, start position of each window in the epoch) for one epoch."""
        with self._cache_lock:
            if epoch in self._epochs:
                self._epochs.move_to_end(epoch)
                return self._epochs[epoch]
        order = np.random.default_rng([self.seed, _EPOCH, epoch]).permutation(self.num_blocks)
        sizes = np.minimum(self.block_size, len(self.cells) - order * self.block_size)
        window_sizes = np.add.reduceat(sizes, np.arange(0, self.num_blocks, self.window_blocks))
        window_starts = np.concatenate([[0], np.cumsum(window_sizes)])
        with self._cache_lock:
            self._epochs[epoch] = (order, window_starts)
            while len(self._epochs) > 4:
                self._epochs.popitem(last=False)
        return order, window_starts

    def _window(self, epoch: int, window: int) -> np.ndarray:
        """The shuffled cells (store indices) of one window of an epoch."""
        key = (epoch, window)
        with self._cache_lock:
            if key in self._windows:
                self._windows.move_to_end(key)
                return self._windows[key]
        order, _ = self._epoch(epoch)
        blocks = order[window * self.window_blocks:(window + 1) * self.window_blocks]
        positions = np.concatenate([np.arange(b * self.block_size,
                                              min((b + 1) * self.block_size, len(self.cells)))
                                    for b in blocks])
        rng = np.random.default_rng([self.seed, _WINDOW, epoch, window])
        cells = self.cells[positions[rng.permutation(len(positions))]]
        with self._cache_lock:
            self._windows[key] = cells
            while len(self._windows) > 64:
                self._windows.popitem(last=False)
        return cells

    def global_cells(self, step: int) -> np.ndarray:
        """Store indices of the global batch of `step` (a pure function of seed and step)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        n = len(self.cells)
        first = step * self.global_batch_size
        out = np.empty(self.global_batch_size, np.int64)
        filled = 0
        while filled < self.global_batch_size:
            position = first + filled
            epoch, offset = divmod(position, n)
            _, window_starts = self._epoch(epoch)
            window = int(np.searchsorted(window_starts, offset, side="right") - 1)
            cells = self._window(epoch, window)
            take = min(self.global_batch_size - filled, int(window_starts[window + 1]) - offset)
            start = offset - int(window_starts[window])
            out[filled:filled + take] = cells[start:start + take]
            filled += take
        return out

    def padded_length(self, row_lengths: np.ndarray) -> int:
        """K: the smallest bucket holding the longest row (capped at max_nonzero)."""
        longest = min(int(row_lengths.max()), self.max_nonzero)
        return smallest_bucket(longest, self.buckets, self.max_nonzero)

    # ------------------------------------------------------------------------------ batches
    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of `step`."""
        global_cells = self.global_cells(step)
        width = self.padded_length(self.store.row_lengths(global_cells))
        lo = self.process_index * self.local_batch_size
        cells = global_cells[lo:lo + self.local_batch_size]

        # Each distinct cell is read once, in store order (views into the reader's cached pages),
        # and copied into its padded row; cells longer than the width keep a random subset.
        unique, inverse = np.unique(cells, return_inverse=True)
        counts_views, gene_views, unique_totals = self.store.row_views(unique)
        gene_ids = np.full((len(cells), width), -1, np.int32)
        counts = np.zeros((len(cells), width), np.float32)
        num_nonzero = np.empty(len(cells), np.int32)
        for row, u in enumerate(inverse.tolist()):
            row_counts, row_genes = counts_views[u], gene_views[u]
            if len(row_genes) > width:
                keys = _mix(row_genes.astype(np.uint64) ^ _row_key(self.seed, step, int(unique[u])))
                chosen = np.sort(np.argpartition(keys, width - 1)[:width])
                row_counts, row_genes = row_counts[chosen], row_genes[chosen]
            n = len(row_genes)
            num_nonzero[row] = n
            gene_ids[row, :n] = row_genes
            counts[row, :n] = row_counts

        batch = {
            "gene_ids": gene_ids,
            "counts": counts,
            "total_counts": unique_totals[inverse].astype(np.float32),
            "num_nonzero": num_nonzero,
            "cell_index": cells,
        }
        for key in self.obs_keys:
            batch[f"obs/{key}"] = self.store.read_obs(key, cells)
        return batch

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> "BatchIterator":
        """Batches of steps start_step, start_step + 1, ... prepared ahead in background threads."""
        return BatchIterator(self, start_step, num_steps, self.prefetch)


class BatchIterator:
    """Yields `(step, batch)`; `prefetch` batches are prepared ahead. Close it (or use `with`)."""

    def __init__(self, pipeline: Pipeline, start_step: int, num_steps: int | None, prefetch: int):
        self._closed = False
        self._pipeline = pipeline
        self._next_submit = start_step
        self._end = None if num_steps is None else start_step + num_steps
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max(1, prefetch), thread_name_prefix="scfm-pipeline")
        self._pending: collections.deque = collections.deque()
        self._depth = max(1, prefetch)
        self._fill()

    def _fill(self):
        while len(self._pending) < self._depth and (self._end is None or self._next_submit < self._end):
            step = self._next_submit
            self._pending.append((step, self._executor.submit(self._pipeline.batch, step)))
            self._next_submit += 1

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, dict[str, np.ndarray]]:
        if self._closed or not self._pending:
            raise StopIteration
        step, future = self._pending.popleft()
        batch = future.result()
        self._fill()
        return step, batch

    def close(self):
        """Cancel what is queued and wait for the running reads; idempotent."""
        if self._closed:
            return
        self._closed = True
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if hasattr(self, "_executor"):
            self.close()
