"""AnnData files in and out of the commands: errors that name the file, string dtypes kept.

Files written by recent anndata (and every file under pandas 3) hold pandas' nullable `string`
dtype in obs / var; anndata refuses to write it back unless `allow_write_nullable_strings` is set,
so every command writes through `write_h5ad`, which sets it, and checks with `check_writable` that
the input's obs / var can be written before it starts computing.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import anndata

from scfm_jax.errors import InputError, MissingInput


def read_h5ad(path, what: str = "--input") -> anndata.AnnData:
    """Read an h5ad; a missing, truncated or damaged file, or one without cells, is a ValueError
    (FileNotFoundError) naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{what} {path}: no such file")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as error:   # h5py's OSError does not name the file; anndata wraps others
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{what} {path} cannot be read as an h5ad file ({first}); it may be "
                         "truncated or damaged: copy or write it again") from None
    if adata.n_obs == 0:
        raise InputError(f"{what} {path} holds no cells (obs has 0 rows)")
    if adata.n_vars == 0:
        raise InputError(f"{what} {path} holds no genes (var has 0 rows); write the count matrix "
                         "with its genes")
    return adata


def read_csv_matrix(path, what: str = "--input") -> anndata.AnnData:
    """A CSV of cells as rows and genes as columns (the first column names the cells) as an
    AnnData; a value that is not a number is an InputError naming the file, row and column."""
    import numpy as np
    import pandas as pd

    frame = pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False)
    values = frame.apply(pd.to_numeric, errors="coerce")
    bad = values.isna().to_numpy() | ~np.isfinite(values.to_numpy(np.float64))
    if bad.any():
        row, column = map(int, np.argwhere(bad)[0])
        raise InputError(f"{what} {path}: row {row + 2} (cell {frame.index[row]!r}), column "
                         f"{frame.columns[column]!r} holds {frame.iat[row, column]!r}, not a "
                         f"number ({int(bad.sum())} such values); the CSV must hold a finite "
                         "number for every cell and gene")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise InputError(f"{what} {path} holds no {'cells' if frame.shape[0] == 0 else 'genes'}")
    return anndata.AnnData(values.to_numpy(np.float32),
                           obs=pd.DataFrame(index=frame.index.astype(str)),
                           var=pd.DataFrame(index=frame.columns.astype(str)))


def write_h5ad(adata: anndata.AnnData, path) -> None:
    with anndata.settings.override(allow_write_nullable_strings=True):
        adata.write_h5ad(path)


def check_writable(adata: anndata.AnnData, folder, what: str = "--input") -> None:
    """Write the obs / var of `adata` to a scratch file in `folder`, so a dtype that cannot be
    written fails now rather than after the compute."""
    skeleton = anndata.AnnData(obs=adata.obs, var=adata.var)
    Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".scfm-check-") as scratch:
        try:
            write_h5ad(skeleton, Path(scratch) / "check.h5ad")
        except Exception as error:
            raise InputError(f"{what}: its obs / var cannot be written to h5ad "
                             f"({str(error).splitlines()[0]}); convert the offending columns "
                             "(e.g. to str or categorical) first") from None
