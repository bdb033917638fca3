"""Input readers of `scfm-jax convert`: one class per file format behind one interface.

A reader opens one input file and gives its genes (`var`), its cells (`obs`) and row-chunk access
to one count matrix as CSR (`rows(start, stop)`). `open_source` picks the reader from `READERS`
(the first whose `accepts(path)` is true) and chooses the count matrix; the converter (`convert.py`)
only ever talks to that interface, so a new format is one more class in `READERS`.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm_jax.data.host_ops import first_non_count
from scfm_jax.errors import InputError  # noqa: F401 (the readers' error; convert imports it here)

_READ_ELEMENTS = 1 << 22            # values read from an input at a time (bounds memory)
_COUNT_SOURCES = ("layers/counts", "raw/X", "X")


class Source:
    """One input file: its genes (`var`), its cells (`obs`) and row-chunk access to its counts.

    Subclasses set `kind`, `var`, `obs` and `num_rows` when they open the file and implement
    `rows`; `layer` names the count matrix the rows come from.
    """

    kind = ""
    description = ""   # how the format is named in the "unsupported input" error

    def __init__(self, path: str, label: str):
        self.path, self.label = path, label
        self.layer = "X"

    @classmethod
    def accepts(cls, path: Path) -> bool:
        raise NotImplementedError

    def select_layer(self, layer: str | None, allow_non_integer: bool):
        """Choose the count matrix; formats with one matrix accept only X."""
        if self.num_rows == 0:
            raise InputError(f"{self.path}: holds no cells (0 barcodes); nothing to convert")
        if layer not in (None, "X"):
            raise InputError(f"{self.path}: a {self.kind} input has only X; --layer {layer} "
                             "does not apply")

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        raise NotImplementedError

    def genes(self, gene_column: str | None) -> list[str]:
        """The gene of every var row: var_names, or the `gene_column` var column."""
        if gene_column is None:
            return self.var.index.astype(str).tolist()
        if gene_column not in self.var.columns:
            raise InputError(f"{self.path}: --gene-column {gene_column!r} is not a var column "
                             f"(columns: {list(self.var.columns)})")
        return self.var[gene_column].astype(str).tolist()

    def chunk_rows(self) -> int:
        """Rows per read so that one chunk holds about _READ_ELEMENTS values."""
        if not sp.issparse(self.rows(0, min(1, self.num_rows))):
            return max(1, min(65_536, _READ_ELEMENTS // max(len(self.var), 1)))
        sample = self.rows(0, min(self.num_rows, 1024))
        per_row = max(1.0, sample.nnz / max(sample.shape[0], 1))
        return max(1, min(65_536, int(_READ_ELEMENTS // per_row)))

    def source_rows(self, rows: np.ndarray) -> np.ndarray:
        """The input's own numbers of rows `rows` (each cell's `scfm_source_row` in the store)."""
        return rows

    def close(self):
        pass

    @classmethod
    def discard_cache(cls, path: str):
        """Remove what reading `path` left in the temp folder (called once a conversion is done)."""


class _CsrSource(Source):
    """A source whose counts are (data, indices, indptr) arrays, cell-major."""

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        data, indices, indptr = self._csr
        indptr = np.asarray(indptr[start:stop + 1], np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        return sp.csr_matrix((np.asarray(data[lo:hi]), np.asarray(indices[lo:hi]), indptr - lo),
                             shape=(stop - start, len(self.var)))


class TenXMtxSource(_CsrSource):
    """A 10x Genomics folder: matrix.mtx(.gz) (genes x cells), features / barcodes TSVs."""

    kind = "10x-mtx"
    description = "a 10x folder with matrix.mtx(.gz)"

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return path.is_dir() and any((path / n).exists() for n in ("matrix.mtx", "matrix.mtx.gz"))

    def __init__(self, path: str, label: str):
        super().__init__(path, label)
        folder = Path(path)
        features = pd.read_csv(self._find(folder, "features.tsv.gz", "features.tsv", "genes.tsv.gz",
                                          "genes.tsv"), sep="\t", header=None)
        barcodes = pd.read_csv(self._find(folder, "barcodes.tsv.gz", "barcodes.tsv"), sep="\t",
                               header=None)
        column = 1 if features.shape[1] > 1 else 0
        self.var = pd.DataFrame({"gene_ids": features[0].astype(str).values},
                                index=pd.Index(features[column].astype(str).values))
        self.obs = pd.DataFrame(index=pd.Index(barcodes[0].astype(str).values))
        self._csr, shape = _mtx_as_csr(self._find(folder, "matrix.mtx.gz", "matrix.mtx"))
        self.num_rows = shape[0]
        if shape != (len(self.obs), len(self.var)):
            raise InputError(f"{folder}: matrix.mtx is {shape[1]} genes x {shape[0]} cells but the "
                             f"features / barcodes files list {len(self.var)} x {len(self.obs)}")

    @staticmethod
    def _find(folder: Path, *names) -> Path:
        for n in names:
            if (folder / n).exists():
                return folder / n
        raise InputError(f"{folder}: missing {' or '.join(names)}")

    @classmethod
    def discard_cache(cls, path: str):
        for name in ("matrix.mtx.gz", "matrix.mtx"):
            if (Path(path) / name).exists():
                shutil.rmtree(_mtx_cache(Path(path) / name), ignore_errors=True)


class TenXH5Source(_CsrSource):
    """A 10x Genomics v3 .h5 file (CSC genes x cells, read as CSR cells x genes)."""

    kind = "10x-h5"
    description = "a 10x .h5 file"

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return path.suffix == ".h5" and not path.name.endswith(".h5ad")

    def __init__(self, path: str, label: str):
        super().__init__(path, label)
        self._handle = _open_hdf5(path)
        if "matrix" not in self._handle:
            raise InputError(f"{path}: not a 10x Genomics v3 .h5 file (no 'matrix' group); convert "
                             "it to .h5ad with scanpy.read_10x_h5 first")
        m = self._handle["matrix"]
        features = m["features"]
        names = [x.decode() for x in features["name"][:]]
        ids = [x.decode() for x in features["id"][:]]
        self.var = pd.DataFrame({"gene_ids": ids}, index=pd.Index(names))
        self.obs = pd.DataFrame(index=pd.Index([x.decode() for x in m["barcodes"][:]]))
        self.num_rows = len(self.obs)
        self._csr = (m["data"], m["indices"], m["indptr"])

    def close(self):
        self._handle.close()


class AnnDataSource(Source):
    """An AnnData .h5ad file or .zarr folder; the counts come from layers['counts'], raw.X or X."""

    kind = "anndata"
    description = ".h5ad or an anndata .zarr folder"

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return path.suffix in (".h5ad", ".zarr") or (path.is_dir() and (path / "obs").exists())

    def __init__(self, path: str, label: str):
        from anndata.io import read_elem

        super().__init__(path, label)
        p = Path(path)
        if p.suffix == ".h5ad":
            self._handle = _open_hdf5(p)
        else:
            import zarr
            self._handle = zarr.open_group(str(p), mode="r")
        try:
            self.obs = read_elem(self._handle["obs"])
        except Exception as e:   # h5py / zarr errors do not name the file
            raise InputError(f"{path}: its obs cannot be read ({type(e).__name__}: {e}); the file "
                             "may be truncated or damaged") from None
        self.num_rows = len(self.obs)

    def _candidates(self) -> list[str]:
        return [key for key in _COUNT_SOURCES if self._has(key)]

    def _has(self, key: str) -> bool:
        try:
            self._handle[key]
            return True
        except KeyError:
            return False

    def _layer_names(self) -> list[str]:
        return [f"layers/{k}" for k in self._handle["layers"]] if self._has("layers") else []

    def _select(self, key: str):
        from anndata.io import read_elem, sparse_dataset
        h = self._handle
        element = h[key]
        attrs = dict(element.attrs)
        if attrs.get("encoding-type") in ("csr_matrix", "csc_matrix"):
            matrix = sparse_dataset(element)
            if attrs["encoding-type"] == "csc_matrix":
                raise InputError(f"{self.path}: {key} is stored column-major (CSC); rows cannot be "
                                 "streamed. Save it as CSR (adata.X = adata.X.tocsr()) and retry")
        elif hasattr(element, "shape") and len(element.shape) == 2:
            matrix = element
        else:
            raise InputError(f"{self.path}: {key} is not a 2-D count matrix "
                             f"(encoding {attrs.get('encoding-type')!r})")
        var_key = "raw/var" if key == "raw/X" else "var"
        self.var = read_elem(h[var_key])
        return matrix

    def select_layer(self, layer: str | None, allow_non_integer: bool):
        if self.num_rows == 0:
            raise InputError(f"{self.path}: holds no cells (obs has 0 rows); nothing to convert")
        aliases = {"X": "X", "raw": "raw/X", "raw.X": "raw/X"}
        if layer is not None:
            key = aliases.get(layer, layer if layer.startswith("layers/") else f"layers/{layer}")
            if key not in self._candidates() and not self._has(key):
                raise InputError(f"{self.path}: --layer {layer} not found (available: "
                                 f"{self._candidates() + self._layer_names()})")
            self._matrix = self._select(key)
            self.layer = key
            return
        candidates = self._candidates()
        if not candidates:
            raise InputError(f"{self.path}: no count matrix (looked for layers['counts'], raw.X, X)")
        found = []
        for key in candidates:
            self._matrix = self._select(key)
            block = self.rows(0, min(self.num_rows, 2048))
            first = first_non_count(block)
            if first is None:
                self.layer = key
                return
            row, value = first[0], block.data[first[1]]
            if not np.isfinite(value) or value < 0:   # no --allow-non-integer accepts these
                raise InputError(f"{self.path}: {key} row {row} (cell {self.obs.index[row]!r}) "
                                 f"holds {value}; counts must be finite and non-negative")
            found.append(f"{key} row {row} (cell {self.obs.index[row]!r}) holds {value}")
        if allow_non_integer:   # the first by preference: layers["counts"], then raw.X, then X
            self._matrix = self._select(candidates[0])
            self.layer = candidates[0]
            return
        raise InputError(f"{self.path}: none of {candidates} holds integer counts ({'; '.join(found)})."
                         " Point --layer at the raw counts, or pass --allow-non-integer if the "
                         "values are meant to be non-integer")

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        block = self._matrix[start:stop]
        return block.tocsr() if sp.issparse(block) else sp.csr_matrix(np.asarray(block))

    def close(self):
        if hasattr(self._handle, "close"):
            self._handle.close()


READERS: list[type[Source]] = [TenXMtxSource, TenXH5Source, AnnDataSource]


def _open_hdf5(path):
    import h5py
    try:
        return h5py.File(path, "r")
    except OSError as e:   # h5py's message ("truncated file: eof = ...") does not name the file
        raise InputError(f"{path}: cannot be opened as HDF5 ({e}); the file may be truncated or "
                         "damaged: copy or write it again") from None


def open_source(path: str, label: str, layer: str | None, allow_non_integer: bool) -> Source:
    """Open `path` with the first reader that accepts it and choose its count matrix."""
    p = Path(path)
    reader = next((r for r in READERS if r.accepts(p)), None)
    if reader is None:
        raise InputError(f"{path}: unsupported input; expected one of: "
                         + "; ".join(r.description for r in READERS))
    source = reader(path, label)
    try:
        source.select_layer(layer, allow_non_integer)
    except BaseException:
        source.close()
        raise
    return source


def _mtx_cache(path: Path) -> Path:
    stat = path.stat()
    identity = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return Path(tempfile.gettempdir()) / f"scfm-mtx-{identity.hexdigest()[:24]}"


def _mtx_as_csr(path: Path):
    """A Matrix Market file (genes x cells, any entry order) as cell-major CSR memmaps.

    Two streaming passes (count entries per cell, then place them), so memory stays bounded; the
    result is cached in the temp folder under the file's identity for the other workers / reruns.
    """
    cache = _mtx_cache(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        header_lines = 0
        line = f.readline()
        while line.startswith("%"):
            header_lines += 1
            line = f.readline()
        num_genes, num_cells, nnz = (int(x) for x in line.split())
    shape = (num_cells, num_genes)

    def chunks():
        with opener(path, "rt") as f:
            yield from pd.read_csv(f, sep=r"\s+", header=None, names=["gene", "cell", "value"],
                                   skiprows=header_lines + 1, chunksize=1 << 22,
                                   dtype={"gene": np.int64, "cell": np.int64, "value": np.float64})

    if not (cache / "indptr.npy").exists():
        tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=cache.parent))
        per_cell = np.zeros(num_cells, np.int64)
        for chunk in chunks():
            per_cell += np.bincount(chunk["cell"].to_numpy() - 1, minlength=num_cells)
        if per_cell.sum() != nnz:
            shutil.rmtree(tmp)
            raise InputError(f"{path}: the header announces {nnz} entries, the file holds "
                             f"{per_cell.sum()}")
        indptr = np.zeros(num_cells + 1, np.int64)
        np.cumsum(per_cell, out=indptr[1:])
        data = np.lib.format.open_memmap(tmp / "data.npy", "w+", np.float32, (nnz,))
        indices = np.lib.format.open_memmap(tmp / "indices.npy", "w+", np.int32, (nnz,))
        fill = indptr[:-1].copy()
        for chunk in chunks():
            cells = chunk["cell"].to_numpy() - 1
            order = np.argsort(cells, kind="stable")
            cells = cells[order]
            first = np.searchsorted(cells, cells, side="left")
            where = fill[cells] + np.arange(len(cells)) - first
            data[where] = chunk["value"].to_numpy()[order]
            indices[where] = chunk["gene"].to_numpy()[order] - 1
            fill += np.bincount(cells, minlength=num_cells)
        data.flush()
        indices.flush()
        del data, indices
        np.save(tmp / "indptr.npy", indptr)   # last: marks the cache complete
        try:
            os.rename(tmp, cache)
        except OSError:
            shutil.rmtree(tmp)                 # another process built it first
    arrays = tuple(np.load(cache / f"{name}.npy", mmap_mode="r")
                   for name in ("data", "indices", "indptr"))
    return arrays, shape
