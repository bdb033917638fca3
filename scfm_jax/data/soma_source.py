"""TileDB-SOMA experiments, and the CELLxGENE Census, as inputs of `scfm-jax convert`.

A `SomaInput` names an experiment (a local path or URI opened with `tiledbsoma`, or the Census
opened with `cellxgene_census.open_soma`), a measurement, an X layer and an obs value filter in
SOMA's syntax. `SomaSource` gives the converter the same view as a file input: `var` (genes, the
index being `feature_name` when there is one), `obs` (only the columns kept), and `rows(start,
stop)`, rows being the query's cells in ascending soma_joinid. X is read in soma_joinid ranges of
`chunk_rows()` cells, never whole, so shards stream whatever the size of the experiment; shard k
holds the k-th range of the query's cells, so `--task-index/--num-tasks` splits by soma_joinid.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm_jax.data.readers import _READ_ELEMENTS, InputError, Source

_PROBE_CELLS = 256   # cells read to estimate the values per cell of a query

INSTALL_HINT = 'SOMA / Census inputs need tiledbsoma: pip install -e ".[census]"'


@dataclasses.dataclass(frozen=True)
class SomaInput:
    """One SOMA experiment to convert: `uri`, or the Census (`census` = its version) at `uri`."""

    uri: str | None
    measurement: str = "RNA"
    layer: str = "raw"
    obs_filter: str | None = None
    census: str | None = None
    organism: str = "homo_sapiens"

    @property
    def label(self) -> str:
        if self.census is not None:
            return f"census-{self.census}-{self.organism}"
        return str(self.uri).rstrip("/").rsplit("/", 1)[-1]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tiledbsoma():
    try:
        import tiledbsoma
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return tiledbsoma


def _open_experiment(spec: SomaInput):
    tiledbsoma = _tiledbsoma()
    if spec.census is not None:
        try:
            import cellxgene_census
        except ImportError:
            raise InputError('--census needs cellxgene_census: pip install -e ".[census]"') from None
        census = cellxgene_census.open_soma(census_version=spec.census, uri=spec.uri)
        data = census["census_data"]
        if spec.organism not in data:
            census.close()
            raise InputError(f"Census {spec.census}: no organism {spec.organism!r} "
                             f"(available: {sorted(data.keys())})")
        return data[spec.organism], census
    try:
        experiment = tiledbsoma.Experiment.open(str(spec.uri))
    except (tiledbsoma.DoesNotExistError, tiledbsoma.SOMAError) as e:
        raise InputError(f"{spec.uri}: not a SOMA experiment ({_first_line(e)})") from None
    return experiment, experiment


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class SomaSource(Source):
    """The cells of one SOMA query, with the converter's input interface (see the module doc).

    Not in `readers.READERS`: a SOMA input is a `SomaInput` (measurement, layer, filter), not a
    path to sniff."""

    kind = "soma"

    def __init__(self, spec: SomaInput, label: str, obs_columns: list[str] | None):
        tiledbsoma = _tiledbsoma()
        super().__init__(str(spec.uri) if spec.census is None else spec.label, label)
        self.spec = spec
        self._chunk_rows = None
        self._experiment, self._handle = _open_experiment(spec)
        try:
            self._setup(tiledbsoma, obs_columns)
        except BaseException:
            self.close()
            raise

    def _setup(self, tiledbsoma, obs_columns):
        spec, experiment = self.spec, self._experiment
        if spec.measurement not in experiment.ms:
            raise InputError(f"{self.path}: no measurement {spec.measurement!r} (available: "
                             f"{sorted(experiment.ms.keys())}); choose one with --measurement")
        measurement = experiment.ms[spec.measurement]
        if spec.layer not in measurement.X:
            raise InputError(f"{self.path}: measurement {spec.measurement!r} has no X layer "
                             f"{spec.layer!r} (available: {sorted(measurement.X.keys())}); choose "
                             "one with --layer")
        self.layer = f"{spec.measurement}/X/{spec.layer}"
        self._x = measurement.X[spec.layer]

        var = measurement.var.read().concat().to_pandas().sort_values("soma_joinid")
        self._var_joinids = var["soma_joinid"].to_numpy(np.int64)
        self._var_dense = bool(np.array_equal(self._var_joinids, np.arange(len(var))))
        name = next((c for c in ("feature_name", "feature_id", "var_id") if c in var.columns), None)
        index = var[name].astype(str) if name else var["soma_joinid"].astype(str)
        self.var = var.drop(columns=["soma_joinid"]).set_index(pd.Index(index.to_numpy()))

        schema = experiment.obs.schema
        names = set(schema.names)
        if obs_columns is None:   # as for files: every categorical (dictionary-encoded) column
            import pyarrow as pa
            obs_columns = [f.name for f in schema if pa.types.is_dictionary(f.type)]
        missing = [c for c in obs_columns if c not in names]
        if missing:
            raise InputError(f"{self.path}: obs has no column {missing[0]!r} (columns: "
                             f"{[n for n in schema.names if n != 'soma_joinid']}); drop it from --obs")
        id_column = ["obs_id"] if "obs_id" in names and "obs_id" not in obs_columns else []
        try:
            table = experiment.obs.read(value_filter=spec.obs_filter,
                                        column_names=["soma_joinid", *id_column, *obs_columns]
                                        ).concat()
        except (tiledbsoma.SOMAError, ValueError, TypeError) as e:
            raise InputError(f"{self.path}: --obs-filter {spec.obs_filter!r} is not valid for this "
                             f"obs ({_first_line(e)}); columns: "
                             f"{[n for n in schema.names if n != 'soma_joinid']}") from None
        obs = table.to_pandas().sort_values("soma_joinid", kind="stable")
        self.joinids = obs["soma_joinid"].to_numpy(np.int64)
        self.num_rows = len(self.joinids)
        # Cells are named by obs_id when the experiment has one (from_anndata writes it), else by
        # soma_joinid, kept as int64 until a shard is written (the Census has no obs_id).
        names_column = obs["obs_id"] if "obs_id" in obs.columns else obs["soma_joinid"]
        self.obs = obs[obs_columns].set_index(pd.Index(names_column.to_numpy()))

    def identity(self) -> str:
        """sha256 of what the conversion reads: the query's cells, the genes, the layer's shape."""
        hasher = hashlib.sha256()
        hasher.update(np.ascontiguousarray(self.joinids).tobytes())
        hasher.update("\0".join(self.var.index).encode())
        # not `nnz`: on an experiment of many fragments tiledbsoma counts it by reading all of X
        hasher.update(repr((self.layer, tuple(self._x.shape), self._x.non_empty_domain())).encode())
        return hasher.hexdigest()

    def source_rows(self, rows: np.ndarray) -> np.ndarray:
        """The soma_joinids of query rows (stored as each cell's `scfm_source_row`)."""
        return self.joinids[rows]

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        ids = self.joinids[start:stop]
        shape = (len(ids), len(self.var))
        if not len(ids):
            return sp.csr_matrix(shape, dtype=np.float32)
        contiguous = int(ids[-1]) - int(ids[0]) == len(ids) - 1
        coords = slice(int(ids[0]), int(ids[-1])) if contiguous else ids   # SOMA slices: inclusive
        table = self._x.read(coords=(coords,)).tables().concat()
        cells, genes = table["soma_dim_0"].to_numpy(), table["soma_dim_1"].to_numpy()
        rows = cells - ids[0] if contiguous else np.searchsorted(ids, cells)
        columns = genes if self._var_dense else np.searchsorted(self._var_joinids, genes)
        data = table["soma_data"].to_numpy()
        if np.all(rows[1:] >= rows[:-1]):   # TileDB returns row-major order: CSR as it comes
            indptr = np.zeros(len(ids) + 1, np.int64)
            np.cumsum(np.bincount(rows, minlength=len(ids)), out=indptr[1:])
            block = sp.csr_matrix((data, columns, indptr), shape=shape)
        else:
            block = sp.csr_matrix((data, (rows, columns)), shape=shape)
        block.sort_indices()
        return block

    def chunk_rows(self) -> int:
        """Cells per X read so that one read holds about the converter's read budget of values.

        The values per cell are those of the query's first cells (one small read), not X's `nnz`:
        tiledbsoma counts `nnz` by reading the whole layer when its fragments may overlap (as
        `tiledbsoma.io.from_h5ad` writes them), which held 6 GB for a 250,000-cell experiment."""
        if self._chunk_rows is None:
            probe = self.joinids[:_PROBE_CELLS]
            values = len(self._x.read(coords=(probe,)).tables().concat()) if len(probe) else 0
            per_row = max(1.0, values / max(len(probe), 1))
            self._chunk_rows = max(1, min(65_536, int(_READ_ELEMENTS // per_row)))
        return self._chunk_rows

    def close(self):
        if self._handle is not None:
            self._handle.close()
            self._handle = None
