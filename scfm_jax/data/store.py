"""The cell store: its on-disk format and the TensorStore reader.

A store is a folder or any TensorStore kvstore URL (`gs://bucket/x/`, `memory://x/` in tests):

    manifest.json            format version, vocabulary name + digest, shards, obs categories, sources
    genes.tsv                the vocabulary (`gene_name<TAB>index`)
    shards/00000.zarr/ ...   anndata-compatible zarr v3 groups of up to `cells_per_shard` cells:
                             X (CSR: data float32 counts, indices int32 sorted vocabulary positions,
                             indptr int64), obs (categorical columns, source, source_row), var

`anndata.read_zarr(shard)` opens a shard as an ordinary AnnData. The reader keeps each shard's
indptr in memory (row lengths are free) and fetches rows with asynchronous TensorStore reads, one
per contiguous run of requested cells, all in flight at once: on cloud storage latency, not
bandwidth, is what limits a random-access loader.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import numpy as np
import tensorstore as ts

from scfm_jax.data.vocabulary import Vocabulary

FORMAT_NAME = "scfm-cell-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GENES = "genes.tsv"
# A shard's root `zarr.json` is written last and carries its stats under this attribute: its presence
# marks the shard complete (object stores have no atomic rename of a folder).
SHARD_ATTRIBUTE = "scfm_shard"

_CONTEXT = None
_CONTEXT_LOCK = threading.Lock()


def context() -> ts.Context:
    """The process-wide TensorStore context (one chunk cache; `memory://` stores live in it)."""
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            cache_bytes = int(os.environ.get("SCFM_STORE_CACHE_BYTES", 256 << 20))
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


def open_kvstore(url: str | os.PathLike) -> ts.KvStore:
    return ts.KvStore.open(kvstore_url(url), context=context()).result()


def read_json(kvstore: ts.KvStore, key: str) -> dict | None:
    result = kvstore.read(key).result()
    return json.loads(result.value) if result.state == "value" else None


def shard_key(index: int) -> str:
    return f"shards/{index:05d}.zarr/"


def shard_stats(kvstore: ts.KvStore, index: int) -> dict | None:
    """A complete shard's stats (cells, nnz, skipped), or None while it is missing or partial."""
    root = read_json(kvstore, shard_key(index) + "zarr.json")
    return None if root is None else root.get("attributes", {}).get(SHARD_ATTRIBUTE)


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
    def __init__(self, kvstore: ts.KvStore, key: str):
        self.kvstore = kvstore / key
        self._indptr = None
        self._arrays = None
        self._obs: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def _open(self, name: str) -> ts.TensorStore:
        return ts.open({"driver": "zarr3"}, kvstore=self.kvstore / f"{name}/", open=True,
                       context=context()).result()

    @property
    def indptr(self) -> np.ndarray:
        if self._indptr is None:
            with self._lock:
                if self._indptr is None:
                    self._indptr = self._open("X/indptr").read().result()
        return self._indptr

    @property
    def arrays(self) -> tuple[ts.TensorStore, ts.TensorStore]:
        if self._arrays is None:
            with self._lock:
                if self._arrays is None:
                    self._arrays = (self._open("X/data"), self._open("X/indices"))
        return self._arrays

    def obs_codes(self, column: str) -> np.ndarray:
        codes = self._obs.get(column)
        if codes is None:
            codes = self._open(f"obs/{column}/codes").read().result().astype(np.int32)
            self._obs[column] = codes
        return codes


class CellStore:
    """Random access to the cells of a store, by global cell index (shards concatenated)."""

    def __init__(self, url: str, kvstore: ts.KvStore, manifest: dict, vocabulary: Vocabulary):
        self.url = url
        self.manifest = manifest
        self.vocabulary = vocabulary
        counts = [s["num_cells"] for s in manifest["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._shards = [_Shard(kvstore, s["key"]) for s in manifest["shards"]]

    @classmethod
    def open(cls, url: str | os.PathLike) -> "CellStore":
        kvstore = open_kvstore(url)
        manifest = read_json(kvstore, MANIFEST)
        if manifest is None:
            hint = (" The conversion is unfinished: run `scfm-jax convert` again to resume it, or "
                    "`scfm-jax convert --finalize` after parallel tasks.")
            if kvstore.list(range=ts.KvStore.KeyRange("shards/", "shards0")).result():
                raise FileNotFoundError(f"{url}: no {MANIFEST}.{hint}")
            raise FileNotFoundError(f"{url}: not a cell store (no {MANIFEST}); create one with "
                                    "`scfm-jax convert INPUT --output STORE`")
        if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{url}: format {manifest.get('format')!r} version "
                             f"{manifest.get('format_version')!r}; this reader reads {FORMAT_NAME} "
                             f"version {FORMAT_VERSION}")
        genes = kvstore.read(GENES).result()
        vocabulary = Vocabulary.from_text(genes.value.decode(), manifest["vocabulary"]["name"],
                                          source=f"{url}/{GENES}")
        if vocabulary.digest != manifest["vocabulary"]["digest"]:
            raise ValueError(f"{url}: {GENES} (digest {vocabulary.digest[:12]}) does not match the "
                             f"manifest's vocabulary digest {manifest['vocabulary']['digest'][:12]}; "
                             "the store is corrupt, convert it again")
        return cls(str(url), kvstore, manifest, vocabulary)

    @property
    def num_cells(self) -> int:
        return int(self._offsets[-1])

    @property
    def nnz(self) -> int:
        return int(self.manifest["nnz"])

    @property
    def obs_columns(self) -> list[str]:
        return list(self.manifest["obs"])

    def obs_categories(self, column: str) -> list[str]:
        if column not in self.manifest["obs"]:
            raise KeyError(f"obs column {column!r} is not in store {self.url} "
                           f"(columns: {self.obs_columns}); convert with --obs {column}")
        return list(self.manifest["obs"][column])

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
        shard, local = self._locate(unique)
        lengths = self.row_lengths(unique)
        indptr = np.zeros(len(unique) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        counts = np.empty(indptr[-1], np.float32)
        gene_ids = np.empty(indptr[-1], np.int32)

        # One read per contiguous run of cells inside a shard; all issued before any is awaited.
        breaks = np.flatnonzero((np.diff(unique) != 1) | (np.diff(shard) != 0)) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(unique)]])
        pending = []
        for start, end in zip(starts.tolist(), ends.tolist()):
            if indptr[end] == indptr[start]:
                continue
            s = self._shards[shard[start]]
            lo = int(s.indptr[local[start]])
            hi = int(s.indptr[local[end - 1] + 1])
            data, indices = s.arrays
            pending.append((int(indptr[start]), data[lo:hi].read(), indices[lo:hi].read()))
        for out, data_future, indices_future in pending:
            values = data_future.result()
            counts[out:out + len(values)] = values
            gene_ids[out:out + len(values)] = indices_future.result()
        rows = SparseRows(counts, gene_ids, indptr)
        return rows if inverse is None else take_rows(rows, inverse)

    def read_obs(self, column: str, cell_indices) -> np.ndarray:
        """int32 codes of an obs column (index into `obs_categories(column)`)."""
        self.obs_categories(column)
        cells = np.asarray(cell_indices, np.int64).ravel()
        shard, local = self._locate(cells)
        codes = np.empty(len(cells), np.int32)
        for s in np.unique(shard):
            where = shard == s
            codes[where] = self._shards[s].obs_codes(column)[local[where]]
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


def take_rows(rows: SparseRows, order: np.ndarray) -> SparseRows:
    """Rows `order[i]` of `rows`, as a new SparseRows."""
    lengths = rows.lengths[order]
    indptr = np.zeros(len(order) + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    gather = np.repeat(rows.indptr[order] - indptr[:-1], lengths) + np.arange(indptr[-1])
    return SparseRows(rows.counts[gather], rows.gene_ids[gather], indptr)
