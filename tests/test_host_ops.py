"""The host-side rules every part of the package shares (`scfm_jax.data.host_ops`)."""
import hashlib

import numpy as np
import pytest
import scipy.sparse as sp

from scfm_jax.data import host_ops


def test_bucket_length_four_steps_per_doubling_and_the_cap():
    lengths = sorted({host_ops.bucket_length(n, 19264) for n in range(0, 19265)})
    assert lengths[:12] == [32, 64, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640]
    assert lengths[-1] == 19264 and 16384 in lengths and 20480 not in lengths
    for n in range(1, 19265, 7):
        bucket = host_ops.bucket_length(n, 19264)
        assert n <= bucket and (bucket <= 1.25 * n or bucket <= 128 or bucket == 19264)


def test_bucket_length_one_step_per_doubling_is_powers_of_two():
    for n in (0, 1, 32, 33, 64, 100, 129, 1025, 4096, 4097):
        expected = min(max(32, 1 << int(np.ceil(np.log2(max(n, 1))))), 5000)
        assert host_ops.bucket_length(n, 5000, steps_per_doubling=1) == expected


def test_non_count_positions_flags_what_is_not_a_count():
    values = np.array([0.0, 3.0, 2.0005, -1.0, np.nan, np.inf, 0.5, 7.0])
    np.testing.assert_array_equal(host_ops.non_count_positions(values), [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(host_ops.non_count_positions(values, 1e-3), [3, 4, 5, 6])
    np.testing.assert_array_equal(host_ops.non_count_positions(values, np.inf), [3, 4, 5])
    np.testing.assert_array_equal(host_ops.non_count_positions(np.array([1, -2, 3])), [1])


def test_first_non_count_names_the_row():
    block = sp.csr_matrix(np.array([[1, 0, 2], [0, 0, 0], [3, 0.5, 0], [1.5, 0, 0]]))
    assert host_ops.first_non_count(block) == (2, 3)   # row 2, block.data[3] == 0.5
    assert block.data[3] == 0.5
    assert host_ops.first_non_count(sp.csr_matrix(np.eye(3))) is None


def test_padded_csr_rows_and_segment_sums():
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.3, (9, 40)).astype(np.float32)
    dense[4] = 0   # an empty row
    csr = sp.csr_matrix(dense)
    rows = np.array([4, 0, 8, 0])
    ids, values = host_ops.padded_csr_rows(csr, rows, width=32)
    assert ids.shape == values.shape == (4, 32)
    for out, row in enumerate(rows):
        rebuilt = np.zeros(40, np.float32)
        kept = ids[out] >= 0
        rebuilt[ids[out][kept]] = values[out][kept]
        np.testing.assert_array_equal(rebuilt, dense[row])
        assert np.all(values[out][~kept] == 0) and np.all(ids[out][kept.sum():] == -1)
    with pytest.raises(ValueError, match="more than width 2"):
        host_ops.padded_csr_rows(csr, rows, width=2)
    np.testing.assert_array_equal(host_ops.segment_sums(csr.data, csr.indptr), dense.sum(1))


def test_log_normalise_sparse_equals_dense():
    counts = np.array([[1.0, 0, 3], [0, 0, 0], [5, 5, 0]])
    expected = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    np.testing.assert_allclose(host_ops.log_normalise(counts), expected)
    np.testing.assert_allclose(host_ops.log_normalise(sp.csr_matrix(counts)).toarray(), expected)


def test_sha256_file_of_a_file_and_of_a_folder(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 5_000_000)
    assert host_ops.sha256_file(tmp_path / "a.bin") == hashlib.sha256(b"x" * 5_000_000).hexdigest()
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "b").write_bytes(b"b")
    (folder / "a").write_bytes(b"a")
    digest = host_ops.sha256_file(folder)
    (folder / "a").write_bytes(b"A")
    assert host_ops.sha256_file(folder) != digest
    (folder / "a").write_bytes(b"a")
    assert host_ops.sha256_file(folder) == digest
    (folder / "sub" / "b").rename(folder / "sub" / "c")   # same bytes, another name
    assert host_ops.sha256_file(folder) != digest
