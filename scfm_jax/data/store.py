"""The cell store: its on-disk format and the TensorStore reader.

A store is a folder or any TensorStore kvstore URL (`gs://bucket/x/`, `memory://x/` in tests):

    manifest.json            format version, vocabulary name + digest, shards, obs categories, sources
    genes.tsv                the vocabulary (`gene_name<TAB>index`)
    shards/00000.zarr/ ...   anndata-compatible zarr v3 groups of up to `cells_per_shard` cells:
                             X (CSR: data float32 counts, indices int32 sorted vocabulary positions,
                             indptr int64), obs (categorical columns, scfm_source, scfm_source_row), var

`anndata.read_zarr(shard)` opens a shard as an ordinary AnnData.

A store knows what it holds: every chunk of X carries a CRC32C (zarr's `crc32c` codec), every chunk
is written (none is left to the fill value), and the manifest lists each shard's cells, non-zeros,
chunk counts, the SHA-256 of its X arrays and of every other file. `CellStore.open` checks that every
file is present; loading a shard's indptr checks it against the shard's cell and non-zero counts;
reading a page checks the CRCs of its chunks, and a missing chunk is an error (TensorStore's
`fill_missing_data_reads=False`), never zeros. `verify` (`scfm-jax verify STORE`) checks the rest. The reader keeps each shard's
indptr in memory (row lengths are free) and fetches rows with asynchronous TensorStore reads, one
per page of requested cells, all in flight at once: on cloud storage latency, not
bandwidth, is what limits a random-access loader. Rows come in pages of contiguous cells kept
decoded in an LRU cache, since the pipeline's shuffled batches revisit the pages of a window.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import tensorstore as ts

from scfm_jax.data.host_ops import segment_sums
from scfm_jax.errors import StoreError
from scfm_jax.data.vocabulary import Vocabulary

FORMAT_NAME = "scfm-cell-store"
FORMAT_VERSION = 2   # 2: CRC32C per X chunk, every chunk stored, per-shard file digests
MANIFEST = "manifest.json"
GENES = "genes.tsv"
# A shard's root `zarr.json` is written last and carries its stats under this attribute: its presence
# marks the shard complete (object stores have no atomic rename of a folder).
SHARD_ATTRIBUTE = "scfm_shard"
# Each cell's origin, as obs columns of the shards: the input's label (categorical) and row. Named
# so that no study's own obs column collides; stores written before were "source" / "source_row".
SOURCE, SOURCE_ROW = "scfm_source", "scfm_source_row"
SOURCE_COLUMNS = (SOURCE, SOURCE_ROW)
LEGACY_SOURCE_COLUMNS = {SOURCE: "source", SOURCE_ROW: "source_row"}

_CONTEXT = None
_CONTEXT_LOCK = threading.Lock()


def context() -> ts.Context:
    """The process-wide TensorStore context (one chunk cache; `memory://` stores live in it)."""
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            cache_bytes = int(os.environ.get("SCFM_TENSORSTORE_CACHE_BYTES", 64 << 20))
            _CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes},
                                   "data_copy_concurrency": {"limit": "shared"}})
        return _CONTEXT


def local_path(url: str | os.PathLike) -> Path | None:
    """The filesystem path of a store URL, or None for remote / in-memory kvstores."""
    text = str(url)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return None if "://" in text else Path(text).expanduser().resolve()


def kvstore_url(url: str | os.PathLike) -> str:
    """A TensorStore kvstore URL (with a trailing slash) for a folder path or URL."""
    path = local_path(url)
    text = f"file://{path}" if path is not None else str(url)
    return text if text.endswith("/") else text + "/"


def kvstore_spec(url: str | os.PathLike) -> str | dict:
    """What TensorStore opens for a store URL: the URL itself, except `s3://` when the AWS SDK's
    endpoint override (`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`: MinIO, a local server...) is
    set, which TensorStore's URL syntax cannot carry."""
    text = kvstore_url(url)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not (text.startswith("s3://") and endpoint):
        return text
    bucket, _, path = text[len("s3://"):].partition("/")
    spec = {"driver": "s3", "bucket": bucket, "path": path, "endpoint": endpoint}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return spec | ({"aws_region": region} if region else {})


def open_kvstore(url: str | os.PathLike) -> ts.KvStore:
    return ts.KvStore.open(kvstore_spec(url), context=context()).result()


def read_json(kvstore: ts.KvStore, key: str) -> dict | None:
    result = kvstore.read(key).result()
    if result.state != "value":
        return None
    try:
        return json.loads(result.value)
    except ValueError as error:   # UnicodeDecodeError included
        where = f"{kvstore.url}{key}" if hasattr(kvstore, "url") else key
        raise StoreError(f"{where} is not valid JSON ({error}); the file is damaged: convert the "
                         "inputs again with --overwrite to rewrite it") from None


class NotAStore(StoreError, FileNotFoundError):
    """The path holds no finished cell store (no manifest)."""


class MissingObsColumn(StoreError, KeyError):
    """An obs column the store does not hold."""


class StoreDamaged(StoreError):
    """Data of a store is missing or damaged; the message names the shard and the file."""

    def __init__(self, url, shard: str, name: str, problem):
        self.shard, self.name, self.problem = shard.rstrip("/"), name, str(problem)
        super().__init__(f"{url}: shard {self.shard} is damaged: {name}: {problem}. Run "
                         f"`scfm-jax verify {url}` to list every damaged shard, then convert the "
                         "inputs again (the same command writes the damaged shards again)")



def shard_key(index: int) -> str:
    return f"shards/{index:05d}.zarr/"


def shard_stats(kvstore: ts.KvStore, index: int) -> dict | None:
    """A complete shard's stats (cells, nnz, skipped), or None while it is missing or partial."""
    root = read_json(kvstore, shard_key(index) + "zarr.json")
    return None if root is None else root.get("attributes", {}).get(SHARD_ATTRIBUTE)


def expected_files(shard: dict) -> list[str]:
    """Every file of a shard, relative to the shard's key, as its manifest entry lists them."""
    names = list(shard["files"])
    for array, chunks in shard["chunks"].items():
        names += [f"X/{array}/c/{i}" for i in range(chunks)]
    return names


def missing_files(kvstore: ts.KvStore, shards: list[dict]) -> dict[str, list[str]]:
    """shard key -> its files that are not in the kvstore (one listing of `shards/`)."""
    present = {k.decode() for k in kvstore.list(range=ts.KvStore.KeyRange("shards/", "shards0"))
               .result()}
    missing = {}
    for shard in shards:
        absent = [n for n in expected_files(shard) if shard["key"] + n not in present]
        if absent:
            missing[shard["key"]] = absent
    return missing


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass
class SparseRows:
    """CSR rows: row i holds `gene_ids[indptr[i]:indptr[i+1]]` (sorted) with `counts` alongside."""

    counts: np.ndarray    # float32 [nnz]
    gene_ids: np.ndarray  # int32 [nnz]
    indptr: np.ndarray    # int64 [rows + 1]

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def to_csr(self, num_genes: int):
        import scipy.sparse as sp
        return sp.csr_matrix((self.counts, self.gene_ids, self.indptr), shape=(self.num_rows, num_genes))


class _Shard:
    def __init__(self, url: str, kvstore: ts.KvStore, entry: dict):
        self.url, self.entry, self.key = url, entry, entry["key"]
        self.kvstore = kvstore / self.key
        self._indptr = None
        self._arrays = None
        self._obs: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def damaged(self, name: str, problem) -> StoreDamaged:
        return StoreDamaged(self.url, self.key, name, problem)

    def _open(self, name: str) -> ts.TensorStore:
        # X has every chunk stored, so a missing one is damage; the obs arrays (written by
        # anndata, which skips chunks of fill values) are checked against the manifest's file list.
        self.check_files(f"{name}/zarr.json")
        try:
            return ts.open({"driver": "zarr3", "fill_missing_data_reads": not name.startswith("X/")},
                           kvstore=self.kvstore / f"{name}/", open=True, context=context()).result()
        except Exception as e:   # TensorStore raises ValueError with the file and the cause
            raise self.damaged(f"{name}/zarr.json", e) from None

    def read(self, name: str, array: ts.TensorStore, future=None) -> np.ndarray:
        """Wait for a read of `array` (all of it without `future`); damage names the file."""
        try:
            return (future if future is not None else array.read()).result()
        except Exception as e:
            raise self.damaged(name, e) from None

    @property
    def indptr(self) -> np.ndarray:
        if self._indptr is None:
            with self._lock:
                if self._indptr is None:
                    indptr = self.read("X/indptr", self._open("X/indptr"))
                    problem = indptr_problem(indptr, self.entry["num_cells"], self.entry["nnz"])
                    if problem:
                        raise self.damaged("X/indptr", problem)
                    self._indptr = indptr
        return self._indptr

    @property
    def arrays(self) -> tuple[ts.TensorStore, ts.TensorStore]:
        if self._arrays is None:
            with self._lock:
                if self._arrays is None:
                    self._arrays = (self._open("X/data"), self._open("X/indices"))
        return self._arrays

    def check_files(self, prefix: str):
        """Compare the bytes of the shard's files under `prefix` with the manifest's digests."""
        names = [n for n in self.entry["files"] if n.startswith(prefix)]
        reads = {n: self.kvstore.read(n) for n in names}
        for name, future in reads.items():
            result = future.result()
            if result.state != "value":
                raise self.damaged(name, "missing")
            if sha256(result.value) != self.entry["files"][name]:
                raise self.damaged(name, "its content does not match the manifest's SHA-256")

    def forget(self) -> None:
        """Drop the cached index pointers and obs codes (read again when next needed)."""
        with self._lock:
            self._indptr, self._obs = None, {}

    def obs_codes(self, column: str) -> np.ndarray:
        codes = self._obs.get(column)
        if codes is None:
            name = f"obs/{column}/codes"
            self.check_files(name + "/")   # also: no listed chunk is missing
            codes = self.read(name, self._open(name)).astype(np.int32)
            if len(codes) != self.entry["num_cells"]:
                raise self.damaged(name, f"{len(codes)} codes for {self.entry['num_cells']} cells")
            self._obs[column] = codes
        return codes


def indptr_problem(indptr: np.ndarray, num_cells: int, nnz: int) -> str | None:
    """Why an indptr does not fit a shard of `num_cells` cells and `nnz` non-zeros (or None)."""
    if len(indptr) != num_cells + 1:
        return f"{len(indptr)} entries for {num_cells} cells"
    if indptr[0] != 0 or indptr[-1] != nnz:
        return f"spans [{indptr[0]}, {indptr[-1]}) but the shard holds {nnz} non-zeros"
    if np.any(np.diff(indptr) < 0):
        return "decreases"
    return None


class _PageCache:
    """A thread-safe LRU of decoded pages, bounded in bytes."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.size = 0
        self._pages: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, keys: list[int], fetch) -> list:
        with self._lock:
            found = {k: self._pages[k] for k in keys if k in self._pages}
            for k in found:
                self._pages.move_to_end(k)
        waiting = {k: fetch(k) for k in keys if k not in found}   # all reads in flight at once
        for k, wait in waiting.items():
            found[k] = wait()
        with self._lock:
            for k in waiting:
                if k not in self._pages:
                    self._pages[k] = found[k]
                    self.size += found[k][0].nbytes + found[k][1].nbytes
            while self.size > self.capacity and len(self._pages) > 1:
                _, (counts, genes, *_) = self._pages.popitem(last=False)
                self.size -= counts.nbytes + genes.nbytes
        return [found[k] for k in keys]


class CellStore:
    """Random access to the cells of a store, by global cell index (shards concatenated)."""

    def __init__(self, url: str, kvstore: ts.KvStore, manifest: dict, vocabulary: Vocabulary,
                 page_cells: int = 64, cache_bytes: int = 512 << 20):
        self.url = url
        self.manifest = manifest
        self.vocabulary = vocabulary
        counts = [s["num_cells"] for s in manifest["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._shards = [_Shard(url, kvstore, s) for s in manifest["shards"]]
        self.page_cells = page_cells
        self._pages_per_shard = -(-max(counts, default=1) // page_cells)
        self._pages = _PageCache(cache_bytes)

    @classmethod
    def open(cls, url: str | os.PathLike, *, page_cells: int = 64,
             cache_bytes: int = 512 << 20) -> "CellStore":
        """Open a store; rows are read in pages of `page_cells` cells, `cache_bytes` of them kept."""
        local = local_path(url)
        if local is not None and local.exists() and not local.is_dir():
            raise NotAStore(f"{url} is a file, not a cell store (a folder written by `scfm-jax "
                             "convert`); create one with `scfm-jax convert INPUT --output STORE`")
        kvstore = open_kvstore(url)
        manifest = read_json(kvstore, MANIFEST)
        if manifest is None:
            hint = (" The conversion is unfinished: run `scfm-jax convert` again to resume it, or "
                    "`scfm-jax convert --finalize` after parallel tasks.")
            if kvstore.list(range=ts.KvStore.KeyRange("shards/", "shards0")).result():
                raise NotAStore(f"{url}: no {MANIFEST}.{hint}")
            raise NotAStore(f"{url}: not a cell store (no {MANIFEST}); create one with "
                             "`scfm-jax convert INPUT --output STORE`")
        if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{url}: format {manifest.get('format')!r} version "
                             f"{manifest.get('format_version')!r}; this reader reads {FORMAT_NAME} "
                             f"version {FORMAT_VERSION} (convert the inputs again)")
        genes = kvstore.read(GENES).result()
        vocabulary = Vocabulary.from_text(genes.value.decode(), manifest["vocabulary"]["name"],
                                          source=f"{url}/{GENES}")
        if vocabulary.digest != manifest["vocabulary"]["digest"]:
            raise StoreError(f"{url}: {GENES} (digest {vocabulary.digest[:12]}) does not match the "
                             f"manifest's vocabulary digest {manifest['vocabulary']['digest'][:12]}; "
                             "the store is corrupt, convert it again")
        missing = missing_files(kvstore, manifest["shards"])
        if missing:
            key, names = next(iter(missing.items()))
            more = f" (and {len(missing) - 1} more shards)" if len(missing) > 1 else ""
            raise StoreDamaged(url, key, names[0], f"missing ({len(names)} of the shard's files "
                           f"are missing{more})")
        return cls(str(url), kvstore, manifest, vocabulary, page_cells, cache_bytes)

    @property
    def num_cells(self) -> int:
        return int(self._offsets[-1])

    @property
    def nnz(self) -> int:
        return int(self.manifest["nnz"])

    @property
    def obs_columns(self) -> list[str]:
        """The obs columns, the store's `SOURCE` included (under that name for older stores too)."""
        legacy = {old: new for new, old in LEGACY_SOURCE_COLUMNS.items()}
        renamed = SOURCE not in self.manifest["obs"]
        return [legacy.get(c, c) if renamed else c for c in self.manifest["obs"]]

    def _stored_name(self, column: str) -> str:
        """The name a column has in the files: stores written before `SOURCE` hold "source"."""
        if column in LEGACY_SOURCE_COLUMNS and SOURCE not in self.manifest["obs"]:
            return LEGACY_SOURCE_COLUMNS[column]
        return column

    def obs_categories(self, column: str) -> list[str]:
        if self._stored_name(column) not in self.manifest["obs"]:
            raise MissingObsColumn(f"obs column {column!r} is not in store {self.url} "
                                   f"(columns: {self.obs_columns}); convert with --obs {column}")
        return list(self.manifest["obs"][self._stored_name(column)])

    def _locate(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if cells.size and (cells.min() < 0 or cells.max() >= self.num_cells):
            bad = cells[(cells < 0) | (cells >= self.num_cells)][0]
            raise IndexError(f"cell index {bad} is out of range for store {self.url} "
                             f"({self.num_cells} cells)")
        shard = np.searchsorted(self._offsets, cells, side="right") - 1
        return shard, cells - self._offsets[shard]

    def row_lengths(self, cell_indices) -> np.ndarray:
        """Non-zero genes per cell (from the in-memory indptr)."""
        cells = np.asarray(cell_indices, np.int64).ravel()
        shard, local = self._locate(cells)
        lengths = np.empty(len(cells), np.int64)
        for s in np.unique(shard):
            where = shard == s
            indptr = self._shards[s].indptr
            lengths[where] = indptr[local[where] + 1] - indptr[local[where]]
        return lengths

    def read(self, cell_indices) -> SparseRows:
        """The rows of `cell_indices` (any order, repeats allowed), in that order."""
        cells = np.asarray(cell_indices, np.int64).ravel()
        in_order = cells.size < 2 or bool(np.all(cells[1:] > cells[:-1]))
        unique, inverse = (cells, None) if in_order else np.unique(cells, return_inverse=True)
        counts, gene_ids, _ = self.row_views(unique)
        if inverse is not None:
            counts = [counts[i] for i in inverse.tolist()]
            gene_ids = [gene_ids[i] for i in inverse.tolist()]
        indptr = np.zeros(len(cells) + 1, np.int64)
        np.cumsum([len(g) for g in gene_ids], out=indptr[1:])
        if not cells.size:
            return SparseRows(np.zeros(0, np.float32), np.zeros(0, np.int32), indptr)
        return SparseRows(np.concatenate(counts), np.concatenate(gene_ids), indptr)

    def row_views(self, sorted_cells: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray],
                                                          np.ndarray]:
        """(counts, gene_ids, totals) of ascending cells: read-only views into cached pages, and
        each cell's total count (float64).

        Rows are fetched in pages of `page_cells` contiguous cells: one TensorStore read per
        missing page (all in flight together), kept decoded in an LRU cache, since a shuffled
        batch touches many pages and the next batches of the same window touch them again.
        """
        cells = np.asarray(sorted_cells, np.int64)
        shard, local = self._locate(cells)
        pages = shard * self._pages_per_shard + local // self.page_cells
        bounds = np.flatnonzero(np.diff(pages)) + 1
        starts = np.concatenate([[0], bounds]).tolist()
        ends = np.concatenate([bounds, [len(cells)]]).tolist()
        loaded = self._pages.get_many(pages[starts].tolist(), self._fetch_page) if cells.size else []
        counts, gene_ids = [], []
        totals = np.empty(len(cells), np.float64)
        for start, end, (page_counts, page_genes, base, page_totals) in zip(starts, ends, loaded):
            indptr = self._shards[shard[start]].indptr
            rows = local[start:end]
            totals[start:end] = page_totals[rows % self.page_cells]
            for lo, hi in zip((indptr[rows] - base).tolist(), (indptr[rows + 1] - base).tolist()):
                counts.append(page_counts[lo:hi])
                gene_ids.append(page_genes[lo:hi])
        return counts, gene_ids, totals

    def _fetch_page(self, page: int):
        """Start reading one page; returns a callable that waits and gives (counts, genes, base)."""
        shard, first = divmod(page, self._pages_per_shard)
        s = self._shards[shard]
        indptr = s.indptr
        first *= self.page_cells
        last = min(first + self.page_cells, len(indptr) - 1)
        lo, hi = int(indptr[first]), int(indptr[last])
        data, indices = s.arrays
        data_future, indices_future = data[lo:hi].read(), indices[lo:hi].read()

        def wait():
            page_counts = s.read("X/data", data, data_future)
            page_genes = s.read("X/indices", indices, indices_future)
            page_counts.flags.writeable = page_genes.flags.writeable = False   # shared views
            return page_counts, page_genes, lo, segment_sums(page_counts, indptr[first:last + 1] - lo)
        return wait

    def forget_before(self, cell: int) -> None:
        """Drop what is cached of the shards that end at or before `cell` (their index pointers
        and obs codes, 12 bytes a cell): a pass through the store in order then holds one shard's
        at a time, however large the store."""
        for shard in self._shards[:int(np.searchsorted(self._offsets, cell, side="right")) - 1]:
            shard.forget()

    def read_obs(self, column: str, cell_indices) -> np.ndarray:
        """int32 codes of an obs column (index into `obs_categories(column)`)."""
        self.obs_categories(column)
        cells = np.asarray(cell_indices, np.int64).ravel()
        shard, local = self._locate(cells)
        codes = np.empty(len(cells), np.int32)
        for s in np.unique(shard):
            where = shard == s
            codes[where] = self._shards[s].obs_codes(self._stored_name(column))[local[where]]
        return codes

    def to_anndata(self, cell_indices=None):
        """An in-memory AnnData of some cells (all by default): CSR counts, categorical obs."""
        import anndata
        import pandas as pd

        cells = np.arange(self.num_cells) if cell_indices is None else np.asarray(cell_indices)
        rows = self.read(cells)
        obs = pd.DataFrame(
            {c: pd.Categorical.from_codes(self.read_obs(c, cells), self.obs_categories(c))
             for c in self.obs_columns}, index=[str(c) for c in cells])
        var = pd.DataFrame(index=pd.Index(self.vocabulary.symbols, name="gene_name"))
        return anndata.AnnData(rows.to_csr(len(self.vocabulary)), obs=obs, var=var)
