"""Host-side (numpy / scipy) helpers every part of the package shares: one version of each rule.

The device-side counterparts of the normalisation live with the objectives (jit-able, fixed
shapes); these serve the host code: count checks, baselines, analysis inputs, padded rows, bucket
choice, file digests.
"""
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scfm_jax.errors import InputError

NORMALIZATION_TARGET = 1e4  # log1p(count / total * 1e4), the scale both models read
# Counts read back from float files may carry round-off (0.999999999...); the analysis API accepts
# values this close to an integer as counts. The converter is exact (tolerance 0).
COUNT_TOLERANCE = 1e-3
MIN_BUCKET = 32
FLOAT32_EXACT_INTEGERS = 1 << 24   # every integer up to this is exact in float32 (the counts' type)


def non_count_positions(values, tolerance: float = 0.0) -> np.ndarray:
    """Indices of the values that are not counts: negative, NaN/infinite, or further than
    `tolerance` from an integer."""
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.integer) or values.dtype == bool:
        return np.flatnonzero(values < 0)
    with np.errstate(invalid="ignore"):   # inf - round(inf) is NaN: flagged as not finite
        return np.flatnonzero(~np.isfinite(values) | (values < 0)
                              | (np.abs(values - np.round(values)) > tolerance))


def require_float32_exact_counts(
        matrix, where: str, cell_names=None, first_row: int = 0,
        fix: str = "check that it holds raw counts of single cells") -> None:
    """Refuse counts above 2^24 in `matrix` (cells x genes, its first row being cell `first_row`
    of `cell_names`): the models and the store compute in float32, which would round them without
    a word. The converter checks each block it reads, the analysis API each matrix it aligns."""
    sparse = sp.issparse(matrix)
    values = matrix.data if sparse else np.asarray(matrix)
    if not values.size:
        return
    largest = values.max()
    if not largest > FLOAT32_EXACT_INTEGERS:
        return
    if sparse:
        csr = sp.csr_matrix(matrix)
        row = int(np.searchsorted(csr.indptr, int(np.argmax(csr.data)), side="right") - 1)
    else:
        row = int(np.unravel_index(np.argmax(values), values.shape)[0])
    row += first_row
    cell = f" (cell {cell_names[row]!r})" if cell_names is not None else ""
    raise InputError(
        f"{where} row {row}{cell} holds {largest:.0f}, above 2^24 = {FLOAT32_EXACT_INTEGERS:,}, "
        "the largest count float32 keeps exactly (it would be rounded). No gene has that many "
        f"reads in one cell: {fix}")


def first_non_count(block, tolerance: float = 0.0) -> tuple[int, int] | None:
    """(row, index into `block.data`) of the first stored value of a CSR block that is not a
    count (see `non_count_positions`), or None."""
    bad = non_count_positions(block.data, tolerance)
    if not len(bad):
        return None
    return int(np.searchsorted(block.indptr, bad[0], side="right") - 1), int(bad[0])


def row_totals(counts) -> np.ndarray:
    """Per-row sums [rows] (float64) of a dense or sparse matrix."""
    return np.asarray(counts.sum(axis=1), np.float64).reshape(-1)


def segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """float64 sums of values[offsets[i]:offsets[i+1]] (empty segments give 0): CSR row sums
    from `data` and `indptr`."""
    starts = offsets[:-1]
    nonempty = offsets[1:] > starts
    sums = np.zeros(len(starts), np.float64)
    if nonempty.any():
        sums[nonempty] = np.add.reduceat(values, starts[nonempty], dtype=np.float64)
    return sums


def log_normalise(counts):
    """log1p(counts / row total * 1e4) per row, float64; CSR in, CSR out (rows of total 0 stay 0)."""
    totals = row_totals(counts)
    scale = np.divide(NORMALIZATION_TARGET, totals, out=np.zeros_like(totals), where=totals > 0)
    if sp.issparse(counts):
        out = (sp.diags(scale) @ counts.tocsr().astype(np.float64)).tocsr()
        out.data = np.log1p(out.data)
        return out
    return np.log1p(np.asarray(counts, np.float64) * scale[:, None])


def bucket_length(length: int, cap: int, steps_per_doubling: int = 4) -> int:
    """Padded length for `length` items, at most `cap`: 32, 64, 128, then `steps_per_doubling`
    even steps per doubling (4: ..., 1024, 1280, 1536, 1792, 2048, ...; 1: powers of two). Padding
    wastes at most 1/steps of the work while few shapes compile (the inference buckets; training
    takes its buckets from the config, see `smallest_bucket`)."""
    octave = MIN_BUCKET
    while True:
        steps = steps_per_doubling if octave >= 4 * MIN_BUCKET else 1
        for step in range(steps):
            candidate = octave + octave * step // steps
            if candidate >= length:
                return min(candidate, cap)
        octave *= 2


def padded_csr_rows(csr, rows, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows `rows` of a CSR matrix as right-padded (column ids, values) [len(rows), width]: pad -1
    and 0. Rows longer than `width` are an error (pick the width with `bucket_length`)."""
    rows = np.asarray(rows)
    lengths = csr.indptr[rows + 1] - csr.indptr[rows]
    if len(rows) and int(lengths.max()) > width:
        raise ValueError(f"a row has {int(lengths.max())} stored values, more than width {width}")
    column_ids = np.full((len(rows), width), -1, np.int32)
    values = np.zeros((len(rows), width), np.float32)
    for out, row in enumerate(rows):
        lo, hi = csr.indptr[row], csr.indptr[row + 1]
        column_ids[out, :hi - lo] = csr.indices[lo:hi]
        values[out, :hi - lo] = csr.data[lo:hi]
    return column_ids, values


def smallest_bucket(length: int, buckets: Sequence[int], otherwise: int) -> int:
    """The smallest of `buckets` holding `length`, or `otherwise` when none does."""
    return next((bucket for bucket in sorted(buckets) if bucket >= length), otherwise)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, or of a folder's files (relative names and bytes, in sorted order),
    read in 4 MiB chunks."""
    path = Path(path)
    hasher = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            hasher.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as handle:
            while chunk := handle.read(1 << 22):
                hasher.update(chunk)
    return hasher.hexdigest()
