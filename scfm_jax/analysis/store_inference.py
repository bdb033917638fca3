"""Inference over a whole cell store on every device of every process, resumable chunk by chunk.

The selected cells (a store, optionally a cell range or an obs filter) are cut into output chunks of
`chunk_cells` consecutive cells; chunk k belongs to process k % process_count, which reads only its
chunks' cells, computes them and writes them. Cells are grouped into the same length buckets as the
AnnData path; every step feeds one global batch of one bucket width, split over the mesh by the
`batch` rule of the logical axis rules (as in training), with the parameters placed by the same
rules. Each process contributes its own rows (a process with nothing left at that width feeds a
dummy batch, whose results are dropped), so all processes run the same programs in lockstep.

Output (a folder or a TensorStore kvstore URL, gs:// or s3://):

    inference.json   what produced it: checkpoint, store identity, options; `complete` at the end
    cell_index/      zarr int64 [cells]: the store index of each output row (store order)
    embedding/       zarr float32 [cells, width]
    cell_type/, cell_type_coarse/   (annotate) int32 codes into inference.json's categories
    cell_type_probability/, cell_type_coarse_probability/   (annotate) float32: the probability
                     the model gave each type (NaN for Unclassified)
    done/<chunk>     written after a chunk's arrays: a rerun skips the chunks that have one

A chunk is always computed at the bucket widths of its own cells, each batch holding cells of one
width, so its bytes do not depend on which other chunks were pending: a killed run (kill -9)
resumed with the same command ends byte-identical to an uninterrupted one (on the same mesh; on
another mesh the values agree to float rounding). Memory stays at one chunk per process: a
selection is not materialised (a cell range is a `range`, an obs filter keeps one count per block
of cells), the store is read without a page cache (`open_store`), the cached index pointers of the
shards already passed are dropped, and the output is written without a chunk cache
(`output_context`). What stays is TensorStore's process-wide chunk cache for the store's reads,
bounded by `SCFM_TENSORSTORE_CACHE_BYTES` (64 MiB).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
import tensorstore as ts
from flax import nnx

from scfm_jax import output_safety
from scfm_jax.data import store as store_lib
from scfm_jax.data.store import CellStore
from scfm_jax.errors import InputError, MissingInput, OutputError, UsageError
from scfm_jax.train import partitioning

RUN_FILE = "inference.json"
DONE = "done/"
FORMAT = "scfm-store-inference"
FILTER_BLOCK = 1 << 20   # cells whose obs codes an obs filter reads at a time


class OutputMismatch(OutputError):
    """An existing output was made from another checkpoint, store or options."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which store cells to run: a range [start, stop), optionally filtered by an obs value."""

    start: int = 0
    stop: int | None = None
    obs_column: str | None = None
    obs_value: str | None = None

    @classmethod
    def parse(cls, cell_range: str | None = None, obs_filter: str | None = None) -> "Selection":
        """From `--cells START:STOP` and `--obs-filter COLUMN=VALUE` (both optional)."""
        start, stop = 0, None
        if cell_range:
            first, sep, last = cell_range.partition(":")
            try:
                start, stop = int(first or 0), (int(last) if last else None)
            except ValueError:
                sep = ""
            if not sep or start < 0 or (stop is not None and stop <= start):
                raise UsageError(f"--cells {cell_range!r}: expected START:STOP, two cell indices "
                                 "with 0 <= START < STOP (e.g. 0:100000)")
        column = value = None
        if obs_filter:
            column, sep, value = obs_filter.partition("=")
            if not sep:
                raise UsageError(f"--obs-filter {obs_filter!r}: expected COLUMN=VALUE")
        return cls(start, stop, column, value)

    def cells(self, store: CellStore) -> "range | FilteredCells":
        """The selected store indices, ascending, without a list of them (so a run's memory does
        not grow with the selection): a `range` for a cell range, a `FilteredCells` under an obs
        filter."""
        stop = store.num_cells if self.stop is None else min(self.stop, store.num_cells)
        if not 0 <= self.start < stop:
            raise InputError(f"cell range {self.start}:{stop} selects no cell of {store.url} "
                             f"({store.num_cells} cells)")
        if self.obs_column is None:
            return range(self.start, stop)
        categories = store.obs_categories(self.obs_column)
        if self.obs_value not in categories:
            raise InputError(f"obs column {self.obs_column!r} of {store.url} has no value "
                             f"{self.obs_value!r} (values: {categories[:10]})")
        return FilteredCells(store, self.obs_column, categories.index(self.obs_value),
                             self.start, stop)

    def describe(self) -> dict:
        return dataclasses.asdict(self)


class FilteredCells:
    """The cells of [start, stop) whose obs `column` has code `code`, ascending, as a sequence
    that holds one count per block of `FILTER_BLOCK` cells instead of the cells: a slice reads the
    codes of the blocks it spans, and the selected cells of one block are kept (at most 8 MiB)."""

    def __init__(self, store: CellStore, column: str, code: int, start: int, stop: int):
        self.store, self.column, self.code, self.start, self.stop = store, column, code, start, stop
        self._last = None
        counts = []
        for lo in range(start, stop, FILTER_BLOCK):
            store.forget_before(lo)
            counts.append(len(self._block(lo)))
        store.forget_before(stop)
        # selected cells before each block, and in all
        self.before = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def _block(self, lo: int) -> np.ndarray:
        """The selected cells of the block that starts at store cell `lo`; the last block is kept,
        so that a run's consecutive chunks read its codes once."""
        if self._last is None or self._last[0] != lo:
            block = np.arange(lo, min(lo + FILTER_BLOCK, self.stop), dtype=np.int64)
            self._last = lo, block[self.store.read_obs(self.column, block) == self.code]
        return self._last[1]

    def __len__(self) -> int:
        return int(self.before[-1])

    def __getitem__(self, positions: slice) -> np.ndarray:
        first, last, step = positions.indices(len(self))
        if step != 1:
            raise ValueError("FilteredCells takes slices of step 1")
        if first >= last:
            return np.zeros(0, np.int64)
        blocks = range(int(np.searchsorted(self.before, first, side="right")) - 1,
                       int(np.searchsorted(self.before, last - 1, side="right")))
        cells = np.concatenate([self._block(self.start + b * FILTER_BLOCK) for b in blocks])
        offset = first - int(self.before[blocks[0]])
        return cells[offset:offset + last - first]

    def positions(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each store cell, the number of selected cells before it (its output row when it is
        selected) and whether it is selected, from the codes of the blocks the cells fall in."""
        cells = np.asarray(cells, np.int64)
        rows = np.where(cells < self.start, 0, len(self)).astype(np.int64)
        found = np.zeros(len(cells), bool)
        inside = (cells >= self.start) & (cells < self.stop)
        block_of = (cells - self.start) // FILTER_BLOCK
        for b in np.unique(block_of[inside]):
            members = np.flatnonzero(inside & (block_of == b))
            selected = self._block(self.start + int(b) * FILTER_BLOCK)
            rows[members] = self.before[b] + np.searchsorted(selected, cells[members])
            found[members] = np.isin(cells[members], selected)
        return rows, found


def selection_positions(cells: "range | FilteredCells", wanted) -> tuple[np.ndarray, np.ndarray]:
    """(rows, found): for each store cell of `wanted`, the number of selected cells before it (its
    row in the output when it is selected) and whether it is selected; from the selection, without
    reading the output's `cell_index`."""
    wanted = np.asarray(wanted, np.int64)
    if isinstance(cells, range):
        return (np.clip(wanted - cells.start, 0, len(cells)),
                (wanted >= cells.start) & (wanted < cells.stop))
    return cells.positions(wanted)


@dataclasses.dataclass
class StoreTask:
    """What one model's inference needs from the engine.

    `prepare(rows, cells)` turns a chunk's SparseRows into per-cell items and their bucket widths;
    `batch(items, width)` pads a list of items into one batch of numpy arrays (the engine fills
    short batches with copies of an item); `dummy(width)` is one valid item of that width;
    `forward(state, batch)` is traced under jit and returns {name: [B, ...]}; `finish(items,
    outputs)` turns a batch's host outputs into the rows of the output arrays.
    """

    name: str
    model: nnx.Module
    arrays: dict[str, tuple[tuple[int, ...], str]]     # name -> (trailing shape, dtype)
    widths: Sequence[int]                               # every bucket width, ascending
    prepare: Callable
    batch: Callable
    dummy: Callable
    forward: Callable
    finish: Callable
    attributes: dict = dataclasses.field(default_factory=dict)   # e.g. annotate's categories
    _steps: dict = dataclasses.field(default_factory=dict, repr=False)

    def step(self, graphdef, mesh, rules):
        """The jitted forward for this mesh, kept with the task, so a second run of the same task
        (a benchmark's timed run) reuses the compiled programs."""
        key = (graphdef, mesh, tuple(rules))
        if key not in self._steps:
            self._steps[key] = jax.jit(
                lambda state, batch: self.forward(nnx.merge(graphdef, state), batch),
                out_shardings=partitioning.batch_sharding(mesh, 1, rules))
        return self._steps[key]


def open_store(store: CellStore | str) -> CellStore:
    """A store opened for one pass in order: no page cache (every page is read once), so memory
    does not fill up with pages that are never read again. An opened CellStore is used as it is."""
    return store if isinstance(store, CellStore) else CellStore.open(store, cache_bytes=0)


def checkpoint_identity(source: str, step: int | None = None, key: str | None = None) -> dict:
    """What names a checkpoint: its path, step and weight set, and for a file its SHA-256."""
    identity = {"source": str(source), "step": step, "key": key}
    path = Path(source)
    if "://" not in str(source) and path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        identity["sha256"] = digest.hexdigest()
    return identity


def store_identity(store: CellStore) -> dict:
    """The store's content (its manifest lists every shard's digests) and, for the record, URL.

    A local store is recorded by its absolute path, so `to_anndata` finds it from any folder.
    """
    manifest = json.dumps(store.manifest, sort_keys=True).encode()
    local = store_lib.local_path(store.url)
    return {"url": str(local) if local is not None else str(store.url), "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "num_cells": store.num_cells}


def _same_store(a: dict, b: dict) -> bool:
    """The same content, wherever it is read from (a relative path, a copy on a bucket)."""
    return a.get("manifest_sha256") == b.get("manifest_sha256")


@functools.cache
def output_context() -> ts.Context:
    """The context of the output arrays: the process-wide one without a chunk cache. A run writes
    each chunk once and never reads it back, and the shared cache would otherwise keep written
    chunks up to its limit; `to_anndata` reads only the rows it returns."""
    return ts.Context({"cache_pool": {"total_bytes_limit": 0}}, store_lib.context())


class _Output:
    """The output's kvstore, arrays and chunk markers."""

    def __init__(self, url: str):
        self.url = str(url)
        self.kvstore = store_lib.open_kvstore(url)

    def read_run(self) -> dict | None:
        return store_lib.read_json(self.kvstore, RUN_FILE)

    def write_run(self, run: dict) -> None:
        self.kvstore.write(RUN_FILE, json.dumps(run, indent=1, sort_keys=True) + "\n").result()

    def foreign_keys(self) -> list[str]:
        """What the output holds that no run wrote (all of it without an inference.json)."""
        run = self.read_run()
        ours = () if run is None else (RUN_FILE, DONE, "cell_index/",
                                       *(f"{name}/" for name in run.get("arrays", {})))
        keys = sorted(k.decode() for k in self.kvstore.list().result())
        return [k for k in keys if not k.startswith(ours)] if ours else keys

    def clear(self) -> None:
        self.kvstore.delete_range(ts.KvStore.KeyRange()).result()

    def array(self, name: str, shape, dtype: str, chunk_cells: int, create: bool) -> ts.TensorStore:
        spec = {"driver": "zarr3"}
        where = dict(kvstore=self.kvstore / f"{name}/", context=output_context())
        if not create:
            return ts.open(spec, open=True, **where).result()
        metadata = {"shape": list(shape), "data_type": dtype,
                    "chunk_grid": {"name": "regular",
                                   "configuration": {"chunk_shape": [chunk_cells, *shape[1:]]}},
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                               {"name": "zstd", "configuration": {"level": 3}}]}
        return ts.open(spec | {"metadata": metadata}, create=True, open=True, **where).result()

    def done_chunks(self) -> set[int]:
        keys = self.kvstore.list(range=ts.KvStore.KeyRange(DONE, DONE[:-1] + "0")).result()
        return {int(k.decode()[len(DONE):]) for k in keys}

    def mark_done(self, chunk: int) -> None:
        self.kvstore.write(f"{DONE}{chunk:08d}", b"").result()


def _refusal(url, recorded: dict, run: dict) -> str | None:
    for field, what in (("checkpoint", "checkpoint"), ("store", "store"), ("options", "options"),
                        ("selection", "cell selection"), ("task", "task")):
        same = (_same_store(recorded.get(field, {}), run[field]) if field == "store"
                else recorded.get(field) == run[field])
        if not same:
            return (f"{url} holds {recorded.get('task')} results of another {what} "
                    f"({_short(recorded.get(field))}, not {_short(run[field])}); nothing was "
                    "changed. Pass --overwrite to replace it, or choose a new --output")
    return None


def _short(value) -> str:
    if isinstance(value, dict):
        keep = {k: v for k, v in value.items() if k in ("source", "url", "step", "key")} or value
        return ", ".join(f"{k}={v}" for k, v in keep.items() if v is not None)
    return str(value)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _allgather_max(values: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(values)).max(axis=0)


def check_output(output_url, command: str, store) -> None:
    """Refuse an output that is the store, lies in it, or holds what no run wrote (`--overwrite`
    replaces only an output of another checkpoint, store or options, never that)."""
    local = store_lib.local_path(output_url)
    source = store.url if isinstance(store, CellStore) else store
    output_safety.check_output(local if local is not None else str(output_url), command=command,
                               inputs=[store_lib.local_path(source)], overwrite=None, folder=True,
                               foreign=lambda _: _Output(output_url).foreign_keys())


def _prepare_output(output: _Output, run: dict, store: CellStore, overwrite: bool) -> None:
    """Process 0 checks what is there (refusing another run's results) and records this run."""
    if jax.process_index() == 0:
        check_output(output.url, run["task"], store)
        recorded = output.read_run()
        if recorded is not None and _refusal(output.url, recorded, run):
            if not overwrite:
                raise OutputMismatch(_refusal(output.url, recorded, run))
            output.clear()
        if output.read_run() is None:
            output.write_run(dict(run, complete=False))
    _sync("store_inference_output")


def _mesh_and_rules(config, devices=None):
    mesh_config = dict(config.get("mesh", None) or dict(data=-1, fsdp=1, tensor=1))
    devices = jax.devices() if devices is None else list(devices)
    try:
        mesh = partitioning.make_mesh(mesh_config, devices)
    except ValueError:   # the training mesh does not fit these devices: plain data parallelism
        mesh = partitioning.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices)
    if "logical_axis_rules" not in config:   # an official checkpoint: the training rules
        from scfm_jax.configs import scfoundation_tiny
        return mesh, scfoundation_tiny.LOGICAL_AXIS_RULES
    return mesh, partitioning.logical_rules(config)


def _placed_state(model, mesh, rules):
    graphdef, state = nnx.split(model)
    shardings = partitioning.state_shardings(state, mesh, rules)
    return graphdef, jax.device_put(state, shardings)


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in the order it fed them."""
    pieces = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        pieces.setdefault(start, np.asarray(shard.data))
    return np.concatenate([pieces[k] for k in sorted(pieces)])


def run(task: StoreTask, store: CellStore, output_url: str, *, selection: Selection,
        checkpoint: dict, config, options: dict, batch_size: int | None = None,
        chunk_cells: int = 4096, overwrite: bool = False, progress: bool = True,
        devices=None) -> dict:
    """Compute `task` for the selected cells of `store` into `output_url`; returns a summary.

    `batch_size`: cells per global batch (default 16 per batch shard of the mesh); it must split
    evenly over the processes and the mesh's batch axes.
    """
    mesh, rules = _mesh_and_rules(config, devices)
    shards = partitioning.batch_shards(mesh, rules)
    batch_size = batch_size or 16 * shards
    partitioning.check_batch_divisible(batch_size, mesh, 1, rules)
    local_batch = batch_size // jax.process_count()
    cells = selection.cells(store)
    num_chunks = -(-len(cells) // chunk_cells)
    run_record = {"format": FORMAT, "task": task.name, "checkpoint": checkpoint,
                  "store": store_identity(store), "selection": selection.describe(),
                  "options": dict(options, chunk_cells=chunk_cells), "num_cells": len(cells),
                  "arrays": {n: [list(s), d] for n, (s, d) in task.arrays.items()},
                  **task.attributes}
    output = _Output(output_url)
    _prepare_output(output, run_record, store, overwrite)
    layout = dict(task.arrays, cell_index=((), "int64"))
    if jax.process_index() == 0:
        arrays = {name: output.array(name, (len(cells), *shape), dtype, chunk_cells, True)
                  for name, (shape, dtype) in layout.items()}
    _sync("store_inference_arrays")
    if jax.process_index() != 0:   # the others open what process 0 created
        arrays = {name: output.array(name, None, None, chunk_cells, False) for name in layout}
    done = output.done_chunks()
    graphdef, state = _placed_state(task.model, mesh, rules)
    step = task.step(graphdef, mesh, rules)
    me, processes = jax.process_index(), jax.process_count()
    mine = [k for k in range(me, num_chunks, processes) if k not in done]
    bar = _progress(sum(min(chunk_cells, len(cells) - k * chunk_cells) for k in mine),
                    progress)
    width_index = {w: i for i, w in enumerate(task.widths)}
    timing = {"read": 0.0, "compute": 0.0, "write": 0.0}
    started = time.perf_counter()
    for window in range(-(-num_chunks // processes)):
        chunk = window * processes + me
        pending = chunk < num_chunks and chunk not in done
        tick = time.perf_counter()
        if pending:
            chunk_cells_ = np.asarray(cells[chunk * chunk_cells:(chunk + 1) * chunk_cells],
                                      np.int64)
            items, widths = task.prepare(store.read(chunk_cells_), chunk_cells_)
            widths = np.asarray(widths)
            store.forget_before(int(chunk_cells_[0]))   # this process reads no earlier cell
        else:
            items, widths = [], np.zeros(0, np.int64)
        timing["read"] += time.perf_counter() - tick
        counts = np.zeros(len(task.widths), np.int64)
        groups = {int(w): np.flatnonzero(widths == w) for w in np.unique(widths)}
        for w, members in groups.items():
            counts[width_index[w]] = -(-len(members) // local_batch)
        steps = _allgather_max(counts)
        if not steps.any():
            continue
        results: dict[str, list] = {name: [None] * len(items) for name in task.arrays}
        tick = time.perf_counter()
        for w_index in np.flatnonzero(steps):
            width = int(task.widths[w_index])
            members = groups.get(width, np.zeros(0, np.int64))
            for start in range(0, int(steps[w_index]) * local_batch, local_batch):
                chosen = members[start:start + local_batch]
                fed = ([items[i] for i in chosen] if len(chosen) else [task.dummy(width)])
                fed += [fed[-1]] * (local_batch - len(fed))
                host = task.batch(fed, width)
                batch = partitioning.global_batch(host, mesh, rules)
                out = {name: _local_rows(value) for name, value in step(state, batch).items()}
                rows = task.finish(fed, out)
                for name in task.arrays:
                    for position, cell in enumerate(chosen):
                        results[name][cell] = rows[name][position]
        timing["compute"] += time.perf_counter() - tick
        if pending:
            tick = time.perf_counter()
            lo = chunk * chunk_cells
            writes = [arrays[name][lo:lo + len(items)].write(np.stack(values))
                      for name, values in results.items()]
            writes.append(arrays["cell_index"][lo:lo + len(items)].write(chunk_cells_))
            for write in writes:
                write.result()
            output.mark_done(chunk)
            timing["write"] += time.perf_counter() - tick
            bar.update(len(items))
    bar.close()
    _sync("store_inference_done")
    if jax.process_index() == 0:
        missing = set(range(num_chunks)) - output.done_chunks()
        if missing:
            raise RuntimeError(f"{output.url}: chunks {sorted(missing)[:5]} were not written")
        output.write_run(dict(run_record, complete=True))
    elapsed = time.perf_counter() - started
    computed = sum(min(chunk_cells, len(cells) - k * chunk_cells) for k in mine)
    return {"cells": len(cells), "computed": computed, "chunks": num_chunks,
            "skipped_chunks": len(done), "seconds": elapsed, "mesh": dict(mesh.shape),
            "batch_size": batch_size, **{f"{k}_seconds": v for k, v in timing.items()}}


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    host = f"host {jax.process_index()}" if jax.process_count() > 1 else "cells"
    return tqdm(total=total, desc=host, unit="cell", unit_scale=True, disable=not enabled,
                file=sys.stderr)


def read_run(output_url: str) -> dict:
    """The record of a finished (or running) store output."""
    run = _Output(output_url).read_run()
    if run is None:
        raise MissingInput(f"{output_url}: not an output of `scfm-jax embed/annotate "
                                "--store` (no inference.json)")
    return run


def to_anndata(output_url: str, store: CellStore | str | None = None, *, cells=None,
               shard: int | None = None, key_added: str | None = None):
    """The store's cells with their results, as AnnData for scanpy: counts in X, obs from the
    store, the embedding in `obsm[key_added]` (default X_<task model>) and annotate's types and
    their probabilities in obs.

    `cells`: store indices to bring back (default all computed; each must be in the output's
    selection); `shard`: the computed cells of one store shard. Only the requested rows are read.
    """
    import pandas as pd

    run = read_run(output_url)
    if not run.get("complete"):
        raise OutputError(f"{output_url} is unfinished: rerun the same command to complete it")
    if not isinstance(store, CellStore):
        store = CellStore.open(store or run["store"]["url"])
    if not _same_store(store_identity(store), run["store"]):
        raise OutputMismatch(f"{output_url} was computed from store {run['store']['url']}, "
                             f"not {store.url} (its manifest differs)")
    output = _Output(output_url)
    selected = Selection(**run["selection"]).cells(store)
    if shard is not None:
        offsets = np.concatenate([[0], np.cumsum([s["num_cells"] for s in store.manifest["shards"]])])
        if not 0 <= shard < len(offsets) - 1:
            raise InputError(f"shard {shard} is not in {store.url} ({len(offsets) - 1} shards)")
        first, last = selection_positions(selected, offsets[shard:shard + 2])[0]
        cells = selected[int(first):int(last)]   # the shard's cells that the selection holds
    wanted = np.asarray(selected[0:len(selected)] if cells is None else cells, np.int64)
    rows, found = selection_positions(selected, wanted)
    if not found.all():
        raise InputError(f"{int((~found).sum())} requested cells (e.g. {wanted[~found][:3]}) are "
                         f"not in {output_url} (it holds the selection {run['selection']})")
    index = output.array("cell_index", None, None, 0, False)
    if len(rows) and not np.array_equal(index.oindex[rows].read().result(), wanted):
        raise OutputError(f"{output_url}: its cell_index does not follow its selection "
                          f"{run['selection']} of {store.url}; compute it again with --overwrite")
    adata = store.to_anndata(wanted)
    for name in run["arrays"]:
        values = output.array(name, None, None, 0, False).oindex[rows].read().result() \
            if len(rows) else np.zeros((0,))
        if name == "embedding":
            adata.obsm[key_added or run.get("obsm_key", "X_embedding")] = np.asarray(values)
        elif name in run.get("categories", {}):
            adata.obs[run["obs_keys"][name]] = pd.Categorical.from_codes(
                values, run["categories"][name])
        else:
            adata.obs[run["obs_keys"][name]] = np.asarray(values)
    adata.uns[RUN_FILE.split(".")[0]] = {"output": str(output_url), "task": run["task"],
                                        "checkpoint": run["checkpoint"]["source"]}
    return adata
