"""Inference outputs are checked before anything is written: non-finite values are refused."""
from __future__ import annotations

import numpy as np

from scfm_jax.errors import ModelError


class NonFiniteOutput(ModelError):
    """A model produced NaN / infinite values; the message names the cells."""


def non_finite_rows(values) -> np.ndarray:
    values = np.asarray(values)
    return np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))


def refuse(rows, num_cells: int, cell_names, what: str):
    names = [str(cell_names[i]) if cell_names is not None else str(i) for i in rows[:5]]
    raise NonFiniteOutput(
        f"{what}: {len(rows)} of {num_cells} cells got NaN or infinite values (e.g. {names}); "
        "nothing was written. Likely cause: a damaged or diverged checkpoint (non-finite "
        "weights; load another step) or non-finite values in the input")


def require_finite(values, cell_names, what: str) -> None:
    """Raise NonFiniteOutput if any row (cell) of `values` holds NaN or infinity."""
    rows = non_finite_rows(values)
    if len(rows):
        refuse(rows, len(values), cell_names, what)


def require_finite_array(array, cell_names, what: str, cells_per_read: int = 64) -> None:
    """The same for a [cells, ...] array read in blocks of cells (a zarr array on disk)."""
    bad = []
    for start in range(0, array.shape[0], cells_per_read):
        bad.extend(start + non_finite_rows(array[start:start + cells_per_read]))
    if bad:
        refuse(np.asarray(bad), array.shape[0], cell_names, what)
