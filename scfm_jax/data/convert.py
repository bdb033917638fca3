"""`scfm-jax convert`: AnnData / 10x files -> a sharded cell store (see `store.py` for the layout).

The input formats are read by `readers.py`; this module plans the store and writes its shards.

The conversion runs in three phases, so that bad input never leaves a half-written store and a
killed run resumes where it stopped:

1. plan: open every input, choose the raw-count matrix, align the genes, and scan the values once in
   row chunks (integer, finite, non-negative; per-gene totals for the coverage report). Shard k
   holds input rows [k * shard_size, (k + 1) * shard_size) of the concatenated inputs, minus the
   cells with no counts on the vocabulary, so the plan fixes every shard's content before anything
   is written. The plan is saved as `plan.json`; a rerun must produce the same plan.
2. shards: each shard is written under a temporary name and renamed when complete (object stores
   have no rename: there the shard's `scfm_shard.json` marker, written last, commits it). On rerun,
   finished shards are checked as `verify` checks them and skipped, damaged ones written again
   (`--overwrite`: all). `--workers` converts shards in processes, `--task-index/--num-tasks` lets
   separate jobs write disjoint shards. A local output is locked (`<output>/.lock`) while a single
   job converts into it, so a second conversion is refused naming the first.
3. finalize: `manifest.json` is written last, once every shard is complete.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import tensorstore as ts

from scfm_jax.data import store as store_lib
from scfm_jax.data.host_ops import (first_non_count, require_float32_exact_counts, segment_sums,
                                    sha256_file)
from scfm_jax.data.readers import READERS, InputError, Source, open_source
from scfm_jax.data.soma_source import SomaInput, SomaSource
from scfm_jax.data.vocabulary import (CoverageError, GeneAlignment, Vocabulary, align_genes,
                                      load_vocabulary)
from scfm_jax.data import verify as verify_lib
from scfm_jax.errors import OutputError, UsageError
from scfm_jax.output_safety import LOCK, FolderLock, check_output

PLAN = "plan.json"
DEFAULT_SHARD_SIZE = 65_536
DEFAULT_CHUNK_ELEMENTS = 1 << 17   # zarr chunk of the CSR arrays: 512 KiB of float32

# ------------------------------------------------------------------------------------------- plan

def _scan(source: Source, alignment: GeneAlignment, allow_non_integer: bool, progress) -> dict:
    """One pass over the values: refuse bad ones, count genes, find cells empty on the vocabulary."""
    gene_totals = np.zeros(len(source.var), np.float64)
    mapped = alignment.positions >= 0
    empty_rows = []
    step = source.chunk_rows()
    for start in range(0, source.num_rows, step):
        block = source.rows(start, min(start + step, source.num_rows))
        data = block.data
        # one pass for a block of counts; a second only to tell bad values from non-integers
        first = first_non_count(block)
        invalid = None if first is None else first_non_count(block, tolerance=np.inf)
        if invalid is not None:   # negative, NaN or infinite: no --allow-non-integer accepts it
            row = invalid[0] + start
            raise InputError(f"{source.path}: {source.layer} row {row} "
                             f"(cell {source.obs.index[row]!r}) holds {data[invalid[1]]}; counts "
                             "must be finite and non-negative")
        if first is not None and not allow_non_integer:
            row = first[0] + start
            raise InputError(
                f"{source.path}: {source.layer} row {row} (cell {source.obs.index[row]!r}) "
                f"holds the non-integer value {data[first[1]]}; the converter expects raw counts. "
                "Point --layer at the raw counts, or pass --allow-non-integer")
        require_float32_exact_counts(block, f"{source.path}: {source.layer}", source.obs.index,
                                     first_row=start,
                                     fix="check that --layer names raw counts of single cells")
        values = data.astype(np.float64)
        gene_totals += np.bincount(block.indices, weights=values, minlength=len(gene_totals))
        on_vocabulary = segment_sums(values * mapped[block.indices], block.indptr)
        empty_rows.extend((np.flatnonzero(on_vocabulary == 0) + start).tolist())
        if progress is not None:
            progress.update(block.shape[0])
    return {"gene_totals": gene_totals, "empty_rows": empty_rows}


def _obs_plan(sources: list[Source], obs: list[str] | None) -> tuple[list[str], dict[str, list[str]]]:
    if obs is None:
        columns = [c for c in sources[0].obs.columns
                   if all(c in s.obs.columns and isinstance(s.obs[c].dtype, pd.CategoricalDtype)
                          for s in sources)]
    else:
        columns = list(obs)
        for s in sources:
            missing = [c for c in columns if c not in s.obs.columns]
            if missing:
                raise InputError(f"{s.path}: obs has no column {missing[0]!r} (columns: "
                                 f"{list(s.obs.columns)}); drop it from --obs")
    for reserved in store_lib.SOURCE_COLUMNS:
        if reserved in columns:
            raise InputError(f"obs column {reserved!r} is the store's record of each cell's origin; "
                             "rename it in the input")
    categories = {}
    for c in columns:
        seen: dict[str, None] = {}
        for s in sources:
            values = s.obs[c]
            cats = values.cat.categories if isinstance(values.dtype, pd.CategoricalDtype) else \
                pd.unique(values.astype(str))
            seen.update(dict.fromkeys(str(x) for x in cats))
            if values.isna().any():
                seen["nan"] = None
        categories[c] = list(seen)
    categories[store_lib.SOURCE] = [s.label for s in sources]
    return columns, categories


def _source_label(path: str, taken: set[str]) -> str:
    label = Path(path).name
    base, n = label, 1
    while label in taken:
        n += 1
        label = f"{base}#{n}"
    taken.add(label)
    return label


def build_plan(inputs: list[str], *, vocabulary, gene_column, layer, obs, shard_size, min_coverage,
               allow_non_integer, chunk_elements, compression, labels=None,
               progress: bool = False) -> tuple[dict, Vocabulary]:
    """Open and scan every input; return the plan (JSON-able) and the vocabulary. Raises InputError."""
    taken: set[str] = set()
    sources = []
    try:
        for i, path in enumerate(inputs):
            if isinstance(path, SomaInput):
                sources.append(SomaSource(path, _source_label(path.label, taken), obs))
                continue
            if not Path(path).exists():
                raise InputError(f"{path}: no such file or folder")
            label = labels[i] if labels else _source_label(path, taken)
            sources.append(open_source(path, label, layer, allow_non_integer))
            if len(sources[-1].var) == 0:
                raise InputError(f"{path} holds no genes (var has 0 rows); write the count matrix "
                                 "with its genes")
        if isinstance(vocabulary, Vocabulary):
            vocab = vocabulary
        elif vocabulary == "from-data":
            # Genes in order of first appearance; spellings differing in case are one gene (the
            # alignment matches case-insensitively and sums them).
            symbols: dict[str, str] = {}
            for s in sources:
                for g in s.genes(gene_column):
                    symbols.setdefault(g.upper(), g)
            vocab = Vocabulary("from-data", tuple(symbols.values()))
        else:
            vocab = load_vocabulary(vocabulary)
        columns, categories = _obs_plan(sources, obs)
        bar = _progress_bar(sum(s.num_rows for s in sources), "scan", progress)
        plan_sources = []
        for s in sources:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                alignment = align_genes(s.genes(gene_column), vocab)
            for w in caught:
                print(f"warning: {s.path}: {w.message}", file=sys.stderr)
            scan = _scan(s, alignment, allow_non_integer, bar)
            try:
                alignment.check_coverage(scan["gene_totals"], min_coverage, where=s.path)
            except CoverageError as e:
                raise InputError(str(e)) from None
            soma = isinstance(s, SomaSource)
            plan_sources.append({
                "path": s.path if soma else str(Path(s.path).resolve()), "label": s.label,
                "kind": s.kind, "layer": s.layer, "rows": s.num_rows,
                "sha256": s.identity() if soma else sha256_file(s.path),
                "empty_rows": scan["empty_rows"], "alignment": alignment.report.to_dict(),
                "positions": alignment.positions.tolist()} | ({"soma": s.spec.to_dict()} if soma
                                                              else {}))
        if bar is not None:
            bar.close()
    finally:
        for s in sources:
            s.close()
    total_rows = sum(s["rows"] for s in plan_sources)
    if total_rows - sum(len(s["empty_rows"]) for s in plan_sources) == 0:
        raise InputError(f"{inputs}: no cell has counts on the vocabulary; nothing to convert")
    plan = {
        "format": store_lib.FORMAT_NAME, "format_version": store_lib.FORMAT_VERSION,
        "vocabulary": {"name": vocab.name, "digest": vocab.digest, "size": len(vocab)},
        "sources": plan_sources, "gene_column": gene_column, "obs_columns": columns,
        "obs": categories, "shard_size": shard_size, "total_rows": total_rows,
        "num_shards": -(-total_rows // shard_size), "chunk_elements": chunk_elements,
        "compression": compression, "allow_non_integer": allow_non_integer,
        "min_coverage": min_coverage,
    }
    return plan, vocab


# ----------------------------------------------------------------------------------------- shards

def _codecs(compression: str | None) -> list[dict]:
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": 3, "checksum": False}})
    elif compression == "blosc":   # byte shuffle first: a quarter smaller than zstd on counts
        codecs.append({"name": "blosc", "configuration": {"cname": "zstd", "clevel": 3,
                                                          "shuffle": "shuffle"}})
    elif compression is not None:
        raise UsageError(f"unknown compression {compression!r}; use 'zstd', 'blosc' or none")
    return codecs + [{"name": "crc32c"}]   # every chunk read is checked


def _create_array(kvstore: ts.KvStore, dtype: str, shape: int, chunk: int, compression):
    # Chunks equal to the fill value are stored too: a store lists every chunk it has, so a missing
    # one is damage, not zeros.
    return ts.open({"driver": "zarr3", "store_data_equal_to_fill_value": True, "metadata": {
        "shape": [shape], "data_type": dtype, "codecs": _codecs(compression),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk]}}}},
        kvstore=kvstore, create=True, delete_existing=True, context=store_lib.context()).result()


class _Appender:
    """A growing 1-D zarr v3 array, written a whole chunk at a time (no read-modify-write)."""

    def __init__(self, kvstore: ts.KvStore, dtype: str, chunk: int, compression):
        self.chunk, self.dtype = chunk, np.dtype(dtype).newbyteorder("<")
        self.array = _create_array(kvstore, dtype, 0, chunk, compression)
        self.digest = hashlib.sha256()   # of the values, little-endian, as they are written
        self.length = 0
        self.pending: list[np.ndarray] = []
        self.pending_size = 0

    def append(self, values: np.ndarray):
        self.pending.append(values)
        self.pending_size += len(values)
        if self.pending_size >= 8 * self.chunk:
            self._flush(final=False)

    def _flush(self, final: bool):
        values = np.concatenate(self.pending) if self.pending else np.zeros(0)
        n = len(values) if final else (len(values) // self.chunk) * self.chunk
        if n:
            self.array = self.array.resize(exclusive_max=[self.length + n], expand_only=True).result()
            self.array[self.length:self.length + n].write(values[:n]).result()
            self.digest.update(np.ascontiguousarray(values[:n], self.dtype).tobytes())
            self.length += n
        rest = values[n:]
        self.pending, self.pending_size = ([rest] if len(rest) else []), len(rest)

    def close(self) -> int:
        self._flush(final=True)
        return self.length


def _shard_rows(plan: dict, index: int) -> list[tuple[int, int, int]]:
    """(source, first row, stop row) pieces of the input rows that shard `index` covers."""
    begin = index * plan["shard_size"]
    end = min(begin + plan["shard_size"], plan["total_rows"])
    pieces, offset = [], 0
    for i, s in enumerate(plan["sources"]):
        lo, hi = max(begin, offset), min(end, offset + s["rows"])
        if lo < hi:
            pieces.append((i, lo - offset, hi - offset))
        offset += s["rows"]
    return pieces


def _metadata_files(obs: pd.DataFrame, vocab_symbols: list[str], num_cells: int,
                    num_genes: int) -> dict[str, bytes]:
    """The shard's zarr group files other than X's arrays, rendered in memory with anndata."""
    import zarr
    from anndata.io import write_elem

    files: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = zarr.open_group(zarr.storage.MemoryStore(files), mode="w", zarr_format=3)
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        write_elem(root, "obs", obs)
        write_elem(root, "var", pd.DataFrame(index=pd.Index(vocab_symbols, name="gene_name")))
        x = root.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": [num_cells, num_genes]})
    return {key: value.to_bytes() for key, value in files.items()}


class _Aligner:
    """Input CSR rows -> CSR on the vocabulary (float32, sorted indices, duplicates summed)."""

    def __init__(self, positions: np.ndarray, num_genes: int):
        self.positions = positions
        self.num_genes = num_genes
        matched = positions[positions >= 0]
        # Without duplicates a column relabelling is enough; if the matched genes are also in
        # vocabulary order the rows even stay sorted.
        self.relabel = len(np.unique(matched)) == len(matched)
        self.monotone = self.relabel and bool(np.all(np.diff(matched) > 0))
        self.mapping = sp.csr_matrix(
            (np.ones(len(matched), np.float32), (np.flatnonzero(positions >= 0), matched)),
            shape=(len(positions), num_genes))

    def __call__(self, block: sp.csr_matrix) -> sp.csr_matrix:
        if not self.relabel:
            aligned = (block.astype(np.float32) @ self.mapping).tocsr()
            aligned.sum_duplicates()
        else:
            block.sum_duplicates()
            targets = self.positions[block.indices]
            keep = (targets >= 0) & (block.data != 0)
            kept_per_row = segment_sums(keep.astype(np.float64), block.indptr).astype(np.int64)
            indptr = np.zeros(block.shape[0] + 1, np.int64)
            np.cumsum(kept_per_row, out=indptr[1:])
            aligned = sp.csr_matrix((block.data[keep].astype(np.float32),
                                     targets[keep].astype(np.int32), indptr),
                                    shape=(block.shape[0], self.num_genes))
            if not self.monotone:
                aligned.has_sorted_indices = False
        aligned.sort_indices()
        aligned.eliminate_zeros()
        return aligned


_OPEN_SOURCES: dict = {}


def _open_source(meta: dict, allow_non_integer: bool, obs_columns: list[str]) -> Source:
    """Inputs stay open between the shards a process writes (opening reads the whole obs)."""
    key = (meta["path"], meta["layer"], allow_non_integer, json.dumps(meta.get("soma")))
    if key not in _OPEN_SOURCES:
        while len(_OPEN_SOURCES) >= 4:
            _OPEN_SOURCES.pop(next(iter(_OPEN_SOURCES))).close()
        if meta["kind"] == SomaSource.kind:
            _OPEN_SOURCES[key] = SomaSource(SomaInput(**meta["soma"]), meta["label"], obs_columns)
        else:
            _OPEN_SOURCES[key] = open_source(meta["path"], meta["label"], meta["layer"] if
                                             meta["kind"] == "anndata" else None, allow_non_integer)
    return _OPEN_SOURCES[key]


def write_shard(url: str, plan: dict, index: int, progress_queue=None) -> dict:
    """Convert one shard (no-op if it is complete). Returns its stats."""
    kvstore = store_lib.open_kvstore(url)
    key = store_lib.shard_key(index)
    done = store_lib.shard_stats(kvstore, index)
    if done is not None:
        return done
    local = store_lib.local_path(url)
    if local is not None:
        tmp_name = f"shards/.tmp-{index:05d}-{uuid.uuid4().hex}.zarr/"
        target = kvstore / tmp_name
    else:
        target = kvstore / key
        target.delete_range(ts.KvStore.KeyRange()).result()

    symbols = Vocabulary.from_text(
        kvstore.read(store_lib.GENES).result().value.decode(), plan["vocabulary"]["name"]).symbols
    num_genes = len(symbols)
    data = _Appender(target / "X/data/", "float32", plan["chunk_elements"], plan["compression"])
    indices = _Appender(target / "X/indices/", "int32", plan["chunk_elements"], plan["compression"])
    lengths, obs_parts = [], []
    skipped = 0
    for source_index, first, stop in _shard_rows(plan, index):
        meta = plan["sources"][source_index]
        source = _open_source(meta, plan["allow_non_integer"], plan["obs_columns"])
        positions = np.asarray(meta["positions"], np.int64)
        aligner = _Aligner(positions, num_genes)
        empty = np.asarray(meta["empty_rows"], np.int64)
        step = source.chunk_rows()
        for start in range(first, stop, step):
            end = min(start + step, stop)
            aligned = aligner(source.rows(start, end))
            keep = np.ones(end - start, bool)
            keep[empty[(empty >= start) & (empty < end)] - start] = False
            skipped += int((~keep).sum())
            aligned = aligned[np.flatnonzero(keep)]
            data.append(aligned.data.astype(np.float32))
            indices.append(aligned.indices.astype(np.int32))
            lengths.append(np.diff(aligned.indptr))
            kept_rows = np.arange(start, end)[keep]
            part = {store_lib.SOURCE: pd.Categorical.from_codes(
                        np.full(len(kept_rows), source_index), plan["obs"][store_lib.SOURCE]),
                    store_lib.SOURCE_ROW: source.source_rows(kept_rows).astype(np.int64)}
            for column in plan["obs_columns"]:
                values = source.obs[column].iloc[kept_rows]
                values = values.astype(str).where(values.notna(), "nan")
                part[column] = pd.Categorical(values, categories=plan["obs"][column])
            obs_parts.append(pd.DataFrame(part, index=source.obs.index[kept_rows].astype(str)))
            if progress_queue is not None:
                progress_queue(end - start)

    nnz = data.close()
    indices.close()
    row_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    indptr = np.zeros(len(row_lengths) + 1, np.int64)
    np.cumsum(row_lengths, out=indptr[1:])
    _create_array(target / "X/indptr/", "int64", len(indptr), len(indptr),
                  plan["compression"]).write(indptr).result()
    obs = pd.concat(obs_parts) if obs_parts else pd.DataFrame()
    obs = obs[list(store_lib.SOURCE_COLUMNS) + list(plan["obs_columns"])]
    chunks = -(-nnz // plan["chunk_elements"])
    stats = {"index": index, "num_cells": int(len(row_lengths)), "nnz": int(nnz),
             "skipped_empty": skipped, "chunks": {"data": chunks, "indices": chunks, "indptr": 1},
             "sha256": {"data": data.digest.hexdigest(), "indices": indices.digest.hexdigest(),
                        "indptr": hashlib.sha256(indptr.astype("<i8").tobytes()).hexdigest()}}
    files = _metadata_files(obs, list(symbols), len(row_lengths), num_genes)
    root = json.loads(files.pop("zarr.json"))
    written = {n: target.read(n).result().value
               for n in ("X/data/zarr.json", "X/indices/zarr.json", "X/indptr/zarr.json")}
    stats["files"] = {n: store_lib.sha256(v) for n, v in sorted((files | written).items())}
    root["attributes"][store_lib.SHARD_ATTRIBUTE] = stats
    root = json.dumps(root, indent=2).encode()
    for name, value in sorted(files.items()):
        target.write(name, value).result()
    target.write("zarr.json", root).result()   # last: commits the shard
    if local is not None:
        final = local / key
        if final.exists() and store_lib.shard_stats(kvstore, index) is None:
            shutil.rmtree(final)   # not ours to keep: a complete shard always carries its stats
        try:
            os.rename(local / tmp_name, final)
        except OSError:
            if store_lib.shard_stats(kvstore, index) is None:
                raise
            shutil.rmtree(local / tmp_name)   # another task finished the same shard first
    return stats


# ---------------------------------------------------------------------------------------- driver

@dataclasses.dataclass
class ConversionSummary:
    """What a conversion produced; `table()` renders it for the terminal."""

    store: str
    num_cells: int
    num_shards: int
    nnz: int
    skipped_empty: int
    vocabulary: str
    sources: list[dict]
    seconds: float
    shards_written: int
    finalized: bool

    @property
    def cells_per_second(self) -> float:
        return self.num_cells / self.seconds if self.seconds else float("nan")

    def table(self) -> str:
        header = f"{'source':<28} {'layer':<14} {'rows':>9} {'kept':>9} {'empty':>7} " \
                 f"{'genes matched':>14} {'counts mapped':>13}"
        lines = [header, "-" * len(header)]
        for s in self.sources:
            a = s["alignment"]
            lines.append(
                f"{s['label'][:28]:<28} {s['layer']:<14} {s['rows']:>9} "
                f"{s['rows'] - len(s['empty_rows']):>9} {len(s['empty_rows']):>7} "
                f"{a['num_matched_genes']:>6}/{a['num_input_genes']:<7} "
                f"{(a['counts_fraction'] or 0):>12.1%}")
        lines.append("-" * len(header))
        lines.append(f"store {self.store}: {self.num_cells} cells in {self.num_shards} shards, "
                     f"{self.nnz} non-zeros ({self.nnz / max(self.num_cells, 1):.0f} genes/cell), "
                     f"vocabulary {self.vocabulary}; {self.skipped_empty} cells without counts "
                     f"skipped; {self.shards_written} shards written in {self.seconds:.1f} s "
                     f"({self.num_cells / max(self.seconds, 1e-9):,.0f} cells/s)"
                     + ("" if self.finalized else "; NOT finalized (run --finalize when all "
                                                  "tasks are done)"))
        return "\n".join(lines)


def _progress_bar(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=description, unit="cells", unit_scale=True, file=sys.stderr)


def _plan_for_compare(plan: dict) -> dict:
    return {k: v for k, v in plan.items() if k != "sources"} | {
        "sources": [{k: v for k, v in s.items() if k != "path"} for s in plan["sources"]]}


@contextlib.contextmanager
def _materialised(inputs):
    """Paths for the inputs; in-memory AnnData objects are written to temporary .h5ad files."""
    paths, labels, tmp = [], [], None
    try:
        for i, item in enumerate(inputs):
            if isinstance(item, (str, os.PathLike, SomaInput)):
                paths.append(item if isinstance(item, SomaInput) else str(item))
                labels.append(None)
            else:
                if tmp is None:
                    tmp = tempfile.mkdtemp(prefix="scfm-convert-")
                path = os.path.join(tmp, f"anndata_{i}.h5ad")
                item.write_h5ad(path)
                paths.append(path)
                labels.append(f"<AnnData {i}>")
        yield paths, labels
    finally:   # also after a refused input: what reading left in the temp folder goes
        for path in paths:
            if isinstance(path, SomaInput):
                continue
            reader = next((r for r in READERS if r.accepts(Path(path))), None)
            if reader is not None:
                reader.discard_cache(path)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def convert(inputs, output, *, vocabulary="scfoundation", gene_column=None, layer=None, obs=None,
            shard_size=DEFAULT_SHARD_SIZE, min_coverage=0.5, allow_non_integer=False, workers=1,
            task_index=0, num_tasks=1, overwrite=False, progress=False,
            chunk_elements=DEFAULT_CHUNK_ELEMENTS, compression=None) -> ConversionSummary:
    """Convert AnnData objects / files into a cell store at `output` (folder or kvstore URL).

    `vocabulary`: "scfoundation", "scmulan", a TSV path, a `Vocabulary`, or "from-data" (the input
    genes in order of first appearance). With `num_tasks > 1` only shards `k % num_tasks ==
    task_index` are written and `finalize(output)` must run once all tasks are done.
    """
    started = time.perf_counter()
    if not inputs:
        raise InputError("no input files given")
    if not 0 <= task_index < num_tasks:
        raise UsageError(f"--task-index {task_index} must be in [0, --num-tasks {num_tasks})")
    if shard_size < 1:
        raise UsageError("--shard-size must be positive")
    url = str(output)
    local = store_lib.local_path(url)
    if workers > 1 and local is None and not url.startswith(("gs://", "s3://", "http")):
        raise UsageError(f"--workers {workers} cannot share the in-process store {url}; use 1")
    with _materialised(list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]) as (paths, labels):
        kvstore = store_lib.open_kvstore(url)
        _check_output(url, local, kvstore, paths)
        plan, vocab = build_plan(
            paths, vocabulary=vocabulary, gene_column=gene_column, layer=layer,
            obs=None if obs is None else list(obs), shard_size=shard_size,
            min_coverage=min_coverage, allow_non_integer=allow_non_integer,
            chunk_elements=chunk_elements, compression=compression,
            labels=labels if any(labels) else None, progress=progress)
        with _output_lock(local, num_tasks):
            return _write_store(url, local, kvstore, plan, vocab, overwrite=overwrite,
                                workers=workers, task_index=task_index, num_tasks=num_tasks,
                                progress=progress, started=started)


def _output_lock(local: Path | None, num_tasks: int):
    """The lock of a local --output (parallel --num-tasks jobs share the output by design)."""
    if local is None or num_tasks > 1:
        return contextlib.nullcontext()
    return FolderLock(local, command="convert", busy=OutputError, what="conversion",
                      advice="wait for it to finish, stop it, or choose another --output")


def _write_store(url, local, kvstore, plan, vocab, *, overwrite, workers, task_index, num_tasks,
                 progress, started) -> "ConversionSummary":
    """Write the shards of `plan` that are missing or damaged (all of this task's with
    `overwrite`), then the manifest."""
    existing = store_lib.read_json(kvstore, PLAN)
    if existing is not None and _plan_for_compare(existing) != _plan_for_compare(plan):
        if not overwrite:
            raise InputError(f"{url} already holds a conversion of different inputs or options; "
                             "choose another --output, or pass --overwrite to replace it")
        existing = None
    mine = [k for k in range(plan["num_shards"]) if k % num_tasks == task_index]
    if existing is None:
        if overwrite:
            _delete_store(kvstore, local)
        kvstore.write(store_lib.GENES, vocab.tsv_text().encode()).result()
        kvstore.write(PLAN, json.dumps(plan, sort_keys=True).encode()).result()
    elif overwrite:   # the same plan: this task's shards are written again
        for k in mine:
            _delete_prefix(kvstore, local, store_lib.shard_key(k))
    if local is not None:
        _remove_stale_temporaries(local, mine)
    done = [k for k in mine if store_lib.shard_stats(kvstore, k) is not None]
    for k, problem in verify_lib.shard_problems(url, kvstore, done,
                                                len(vocab)).items():
        print(f"scfm-jax convert: {store_lib.shard_key(k).rstrip('/')} is damaged ({problem}); "
              "writing it again", file=sys.stderr)
        _delete_prefix(kvstore, local, store_lib.shard_key(k))
    todo = [k for k in mine if store_lib.shard_stats(kvstore, k) is None]
    total_rows = sum(_shard_rows_count(plan, k) for k in todo)
    bar = _progress_bar(total_rows, "convert", progress)
    try:
        if workers > 1 and len(todo) > 1:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = {pool.submit(write_shard, url, plan, k): k for k in todo}
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    if bar is not None:
                        bar.update(_shard_rows_count(plan, futures[future]))
        else:
            for k in todo:
                write_shard(url, plan, k, progress_queue=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    finalized = num_tasks == 1
    manifest = finalize(url) if finalized else None
    cells = manifest["num_cells"] if manifest else sum(
        _shard_rows_count(plan, k) for k in mine)
    return ConversionSummary(
        store=url, num_cells=cells, num_shards=plan["num_shards"],
        nnz=manifest["nnz"] if manifest else 0,
        skipped_empty=sum(len(s["empty_rows"]) for s in plan["sources"]),
        vocabulary=f"{vocab.name} ({len(vocab)} genes, {vocab.digest[:12]})",
        sources=[{**s, "alignment": s["alignment"]} for s in plan["sources"]],
        seconds=time.perf_counter() - started, shards_written=len(todo), finalized=finalized)


def _shard_rows_count(plan: dict, index: int) -> int:
    return sum(stop - first for _, first, stop in _shard_rows(plan, index))


def _remove_stale_temporaries(local: Path, mine: list[int]):
    shards = local / "shards"
    if not shards.is_dir():
        return
    owned = {f".tmp-{k:05d}-" for k in mine}
    for entry in shards.iterdir():
        if entry.name[:11] in owned:
            shutil.rmtree(entry, ignore_errors=True)


_OWN_FILES = (PLAN, store_lib.MANIFEST, store_lib.GENES)
_OWN_SHARD = re.compile(r"shards/(\d{5}|\.tmp-\d{5}-[0-9a-f]{32})\.zarr/")


def _foreign_keys(kvstore: ts.KvStore) -> list[str]:
    """Keys of the output that a conversion did not write (what --overwrite must never delete)."""
    keys = [k.decode() for k in kvstore.list().result()]
    return sorted(k for k in keys if k not in _OWN_FILES + (LOCK,) and not _OWN_SHARD.match(k))


def _check_output(url: str, local: Path | None, kvstore: ts.KvStore, inputs: list[str]):
    """Refuse an --output that holds an input, sits inside one, or holds files not of a store."""
    sources = [p.uri if isinstance(p, SomaInput) else p for p in inputs]
    check_output(local if local is not None else url, command="convert", inputs=sources,
                 overwrite=None, folder=True, foreign=lambda _: _foreign_keys(kvstore))


def _delete_store(kvstore: ts.KvStore, local: Path | None):
    """Delete what a conversion wrote, and only that (`_check_output` ran before)."""
    for key in _OWN_FILES:
        kvstore.write(key, None).result()   # None deletes the key
    shards = {m.group(0) for k in kvstore.list(range=ts.KvStore.KeyRange("shards/", "shards0"))
              .result() if (m := _OWN_SHARD.match(k.decode()))}
    for prefix in sorted(shards):
        _delete_prefix(kvstore, local, prefix)


def _delete_prefix(kvstore: ts.KvStore, local: Path | None, prefix: str):
    """Delete every key under `prefix` (a shard this conversion wrote)."""
    kvstore.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")).result()
    if local is not None:   # the file kvstore leaves the emptied folders behind
        folder = local / prefix
        for empty in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)) + [folder]:
            with contextlib.suppress(OSError):
                empty.rmdir()


def finalize(output) -> dict:
    """Write `manifest.json` once every shard of the plan is complete; returns the manifest."""
    url = str(output)
    kvstore = store_lib.open_kvstore(url)
    plan = store_lib.read_json(kvstore, PLAN)
    if plan is None:
        raise InputError(f"{url}: no {PLAN}; start the conversion with `scfm-jax convert INPUT... "
                         f"--output {url}`")
    shards, missing = [], []
    for k in range(plan["num_shards"]):
        stats = store_lib.shard_stats(kvstore, k)
        if stats is None:
            missing.append(k)
        else:
            shards.append({"key": store_lib.shard_key(k)} | {
                name: stats[name] for name in ("num_cells", "nnz", "chunks", "sha256", "files")})
    if missing:
        raise InputError(f"{url}: {len(missing)} of {plan['num_shards']} shards are not complete "
                         f"(e.g. {missing[:5]}); run the missing --task-index jobs (or convert "
                         "without --num-tasks) before --finalize")
    sources = [{k: v for k, v in s.items() if k not in ("positions", "empty_rows")} |
               {"cells": s["rows"] - len(s["empty_rows"]), "skipped_empty": len(s["empty_rows"])}
               for s in plan["sources"]]
    manifest = {
        "format": store_lib.FORMAT_NAME, "format_version": store_lib.FORMAT_VERSION,
        "vocabulary": plan["vocabulary"], "num_cells": sum(s["num_cells"] for s in shards),
        "nnz": sum(s["nnz"] for s in shards), "cells_per_shard": plan["shard_size"],
        "shards": shards, "obs": {c: plan["obs"][c] for c in plan["obs_columns"] + [store_lib.SOURCE]},
        "sources": sources, "chunk_elements": plan["chunk_elements"],
        "compression": plan["compression"],
    }
    kvstore.write(store_lib.MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode()).result()
    return manifest


# ------------------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scfm-jax convert",
        description="Convert .h5ad / anndata .zarr / 10x (matrix.mtx folder or .h5) files into a "
                    "sharded cell store. Rerunning the same command resumes an interrupted run.")
    p.add_argument("inputs", nargs="*", help="input files (several are appended into one store)")
    p.add_argument("--output", "-o", required=True, help="store folder or kvstore URL (gs://...)")
    p.add_argument("--vocabulary", default="scfoundation",
                   help="scfoundation | scmulan | PATH to a gene TSV | from-data (default: %(default)s)")
    p.add_argument("--gene-column", help="var column holding the genes (default: var_names)")
    p.add_argument("--layer", help="count matrix: X, raw, or a layer name (default: the first of "
                                   "layers['counts'], raw.X, X that holds integer counts)")
    p.add_argument("--obs", help="comma-separated obs columns to keep (default: all categorical)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="cells per shard")
    p.add_argument("--min-coverage", type=float, default=0.5,
                   help="refuse inputs with less than this fraction of counts on the vocabulary")
    p.add_argument("--allow-non-integer", action="store_true", help="accept non-integer values")
    p.add_argument("--compression", choices=["none", "zstd", "blosc"], default="none",
                   help="codec of the CSR arrays (none reads fastest)")
    p.add_argument("--workers", type=int, default=1, help="shards converted in parallel processes")
    p.add_argument("--task-index", type=int, default=0, help="this job's index (multi-machine)")
    p.add_argument("--num-tasks", type=int, default=1, help="jobs writing disjoint shards")
    p.add_argument("--finalize", action="store_true",
                   help="only write the manifest once all tasks' shards are complete")
    p.add_argument("--overwrite", action="store_true", help="replace a store of other inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    soma = p.add_argument_group("TileDB-SOMA / CELLxGENE Census inputs (pip install -e \".[census]\")")
    soma.add_argument("--soma", action="store_true",
                      help="the inputs are SOMA experiments (paths or URIs); --layer is the X layer")
    soma.add_argument("--census", metavar="VERSION",
                      help="convert the CELLxGENE Census of this version (e.g. stable)")
    soma.add_argument("--census-uri", help="where the Census is (default: its public location)")
    soma.add_argument("--organism", default="homo_sapiens", help="Census experiment (%(default)s)")
    soma.add_argument("--measurement", default="RNA", help="SOMA measurement (%(default)s)")
    soma.add_argument("--obs-filter", help="SOMA obs value filter, e.g. "
                                           "\"is_primary_data == True and tissue_general == 'blood'\"")
    return p


def _soma_inputs(args) -> list[SomaInput] | None:
    """The SOMA inputs the options name, or None when the inputs are files."""
    if not (args.soma or args.census):
        if args.obs_filter or args.census_uri:
            raise UsageError("--obs-filter / --census-uri apply to SOMA inputs; add --soma or "
                             "--census VERSION")
        return None
    options = dict(measurement=args.measurement, layer=args.layer or "raw",
                   obs_filter=args.obs_filter)
    if args.census:
        if args.inputs:
            raise UsageError("--census converts the Census itself; drop the positional inputs")
        return [SomaInput(args.census_uri, census=args.census, organism=args.organism, **options)]
    return [SomaInput(uri if "://" in uri else str(Path(uri).resolve()), **options)
            for uri in args.inputs]


def main(argv=None) -> int:
    """The `scfm-jax convert` command; errors are reported in one line by scfm_jax.main."""
    args = _parser().parse_args(argv)
    if args.finalize:
        manifest = finalize(args.output)
        print(f"finalized {args.output}: {manifest['num_cells']} cells in "
              f"{len(manifest['shards'])} shards, {manifest['nnz']} non-zeros")
        return 0
    soma_inputs = _soma_inputs(args)
    if not args.inputs and not soma_inputs:
        raise UsageError("give at least one input (or --finalize)")
    summary = convert(
        soma_inputs or args.inputs, args.output, vocabulary=args.vocabulary,
        gene_column=args.gene_column, layer=None if soma_inputs else args.layer,
        obs=None if args.obs is None else [c for c in args.obs.split(",") if c],
        shard_size=args.shard_size,
        min_coverage=args.min_coverage, allow_non_integer=args.allow_non_integer,
        workers=args.workers, task_index=args.task_index, num_tasks=args.num_tasks,
        overwrite=args.overwrite, progress=not args.no_progress,
        compression=None if args.compression == "none" else args.compression)
    print(summary.table())
    return 0
