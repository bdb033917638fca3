"""Host-side (numpy / scipy) helpers every part of the package shares: one version of each rule.

The device-side counterparts of the normalisation live with the objectives (jit-able, fixed
shapes); these serve the host code: baselines, analysis inputs, bucket choice, file digests.
"""
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

NORMALIZATION_TARGET = 1e4  # log1p(count / total * 1e4), the scale both models read


def row_totals(counts) -> np.ndarray:
    """Per-row sums [rows] (float64) of a dense or sparse matrix."""
    return np.asarray(counts.sum(axis=1), np.float64).reshape(-1)


def log_normalise(counts):
    """log1p(counts / row total * 1e4) per row, float64; CSR in, CSR out (rows of total 0 stay 0)."""
    totals = row_totals(counts)
    scale = np.divide(NORMALIZATION_TARGET, totals, out=np.zeros_like(totals), where=totals > 0)
    if sp.issparse(counts):
        out = (sp.diags(scale) @ counts.tocsr().astype(np.float64)).tocsr()
        out.data = np.log1p(out.data)
        return out
    return np.log1p(np.asarray(counts, np.float64) * scale[:, None])


def smallest_bucket(length: int, buckets: Sequence[int], otherwise: int) -> int:
    """The smallest of `buckets` holding `length`, or `otherwise` when none does."""
    return next((bucket for bucket in sorted(buckets) if bucket >= length), otherwise)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()
