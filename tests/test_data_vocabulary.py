"""Gene vocabularies: official files, pinned downloads, alignment by symbol / Ensembl ID."""
import functools
import http.server
import threading
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from shared_helpers import shared_path

from scfm_jax.data import vocabulary as vocab_lib
from scfm_jax.data.vocabulary import CoverageError, Vocabulary, align_genes, load_vocabulary


def test_official_scfoundation_file_round_trips_byte_for_byte(tmp_path):
    path = shared_path("data", "OS_scRNA_gene_index.19264.tsv")
    vocab = Vocabulary.from_tsv(path)
    assert len(vocab) == 19264
    assert vocab.symbols[:3] == ("A1BG", "A1CF", "A2M")
    assert vocab.index_of("a2m") == 2
    vocab.to_tsv(tmp_path / "genes.tsv")
    assert (tmp_path / "genes.tsv").read_bytes() == path.read_bytes()
    assert Vocabulary.from_tsv(tmp_path / "genes.tsv").digest == vocab.digest


def test_scmulan_list_has_symbols_and_ensembl_ids(tmp_path):
    vocab = Vocabulary.from_tsv(shared_path("data", "scmulan", "total_gene_list_42117.txt"))
    assert len(vocab) == 42117
    assert vocab.symbols[0] == "A1BG" and vocab.ensembl_ids[0] == "ENSG00000121410"
    vocab.to_tsv(tmp_path / "genes.tsv")
    again = Vocabulary.from_tsv(tmp_path / "genes.tsv", name=vocab.name)
    assert again == vocab and again.digest == vocab.digest


def test_digest_depends_on_content_only():
    a = Vocabulary("a", ("X", "Y"))
    assert Vocabulary("b", ("X", "Y")).digest == a.digest
    assert Vocabulary("a", ("Y", "X")).digest != a.digest
    assert Vocabulary("a", ("X", "Y"), ("E1", "E2")).digest != a.digest
    with pytest.raises(KeyError, match="not in vocabulary"):
        a.index_of("Z")


def test_bad_tsv_index_is_refused(tmp_path):
    (tmp_path / "bad.tsv").write_text("gene_name\tindex\nA\t0\nB\t5\n")
    with pytest.raises(ValueError, match="line 3"):
        Vocabulary.from_tsv(tmp_path / "bad.tsv")


@pytest.fixture
def data_server():
    """The shared data folder served over HTTP on 127.0.0.1 (a stand-in for GitHub)."""
    root = shared_path("data")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name,size", [("scfoundation", 19264), ("scmulan", 42117)])
def test_builtin_download_over_http_is_verified_and_cached(name, size, data_server, tmp_path,
                                                           monkeypatch):
    url, sha, mirror_path = vocab_lib.BUILTIN_VOCABULARIES[name]
    monkeypatch.setitem(vocab_lib.BUILTIN_VOCABULARIES, name,
                        (f"{data_server}/{mirror_path}", sha, mirror_path))
    vocab = load_vocabulary(name, cache_dir=tmp_path)
    assert vocab.name == name and len(vocab) == size
    cached = tmp_path / "vocabularies" / mirror_path.split("/")[-1]
    assert cached.is_file()
    # Second load: from the cache, the server is not needed.
    monkeypatch.setitem(vocab_lib.BUILTIN_VOCABULARIES, name,
                        ("http://127.0.0.1:9/unreachable", sha, mirror_path))
    assert load_vocabulary(name, cache_dir=tmp_path).digest == vocab.digest


def test_checksum_mismatch_refuses_and_caches_nothing(data_server, tmp_path, monkeypatch):
    _, _, mirror_path = vocab_lib.BUILTIN_VOCABULARIES["scfoundation"]
    monkeypatch.setitem(vocab_lib.BUILTIN_VOCABULARIES, "scfoundation",
                        (f"{data_server}/{mirror_path}", "0" * 64, mirror_path))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_vocabulary("scfoundation", cache_dir=tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_mirror_environment_variable_with_file_url(tmp_path, monkeypatch):
    monkeypatch.setenv(vocab_lib.MIRROR_ENV, shared_path("data").as_uri())
    monkeypatch.setenv("SCFM_CACHE_DIR", str(tmp_path))
    vocab = load_vocabulary("scmulan")
    assert len(vocab) == 42117
    assert (tmp_path / "vocabularies" / "total_gene_list_42117.txt").is_file()


def test_unreachable_download_names_the_fix(tmp_path, monkeypatch):
    url, sha, mirror_path = vocab_lib.BUILTIN_VOCABULARIES["scfoundation"]
    monkeypatch.setitem(vocab_lib.BUILTIN_VOCABULARIES, "scfoundation",
                        ("http://127.0.0.1:9/x.tsv", sha, mirror_path))
    monkeypatch.delenv(vocab_lib.MIRROR_ENV, raising=False)
    with pytest.raises(OSError, match="SCFM_VOCABULARY_MIRROR"):
        load_vocabulary("scfoundation", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a built-in name"):
        load_vocabulary(tmp_path / "missing.tsv")


def test_alignment_by_symbol_sums_duplicates_and_zero_fills_missing():
    vocab = Vocabulary("v", ("A", "B", "C", "D"))
    names = ["b", "A", "zz", "B", "d"]          # B twice (case-insensitive), C missing, zz extra
    with pytest.warns(UserWarning, match="summed"):
        alignment = align_genes(names, vocab)
    rows = np.array([[1, 2, 7, 3, 4], [0, 5, 0, 0, 0]], np.float32)
    aligned = alignment.apply(rows, min_fraction=0.5)
    assert sp.isspmatrix_csr(aligned) and aligned.shape == (2, 4)
    np.testing.assert_array_equal(aligned.toarray(), [[2, 4, 0, 4], [5, 0, 0, 0]])
    assert alignment.apply(sp.csr_matrix(rows)).nnz == aligned.nnz
    report = alignment.report
    assert report.key == "symbol" and report.num_matched_genes == 4
    assert report.num_vocabulary_covered == 3 and report.duplicated == ["B"]
    assert report.unmatched_examples == ["zz"]
    assert report.counts_fraction == pytest.approx(15 / 22)


def test_alignment_by_ensembl_id_ignores_versions_and_uses_a_var_column():
    vocab = Vocabulary("v", ("A", "B", "C"), ("ENSG00000000001", "ENSG00000000002", "ENSG00000000003"))
    var = pd.DataFrame({"symbol": ["x", "y", "z", "w"]},
                       index=["ENSG00000000003.7", "ENSG00000000001", "ENSG00000009999.1",
                              "ensg00000000003.2"])
    with pytest.warns(UserWarning, match="summed"):
        alignment = align_genes(var, vocab)
    assert alignment.report.key == "ensembl"
    np.testing.assert_array_equal(alignment.positions, [2, 0, -1, 2])
    np.testing.assert_array_equal(alignment.apply(np.array([[1, 2, 1, 3]])).toarray(), [[2, 0, 4]])
    by_column = align_genes(var, Vocabulary("v", ("Y", "W")), gene_column="symbol")
    np.testing.assert_array_equal(by_column.positions, [-1, 0, -1, 1])
    with pytest.raises(ValueError, match="symbols only"):
        align_genes(var, Vocabulary("v", ("A",)))
    with pytest.raises(KeyError, match="gene column 'nope'"):
        align_genes(var, vocab, gene_column="nope")


def test_low_coverage_is_refused():
    alignment = align_genes(["A", "Q"], Vocabulary("v", ("A", "B")))
    with pytest.raises(CoverageError, match="10.0% of the expressed counts"):
        alignment.apply(np.array([[1, 9]]), min_fraction=0.5)
    assert alignment.apply(np.array([[1, 9]]), min_fraction=None).toarray().tolist() == [[1, 0]]


def test_fixture_alignment_matches_the_original_main_gene_selection():
    cells = np.load(shared_path("fixtures", "scfoundation-tiny", "cells.npz"))
    expected = np.load(shared_path("fixtures", "scfoundation-tiny", "expected.npz"))
    vocab = Vocabulary.from_tsv(shared_path("fixtures", "scfoundation-tiny", "genes.tsv"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the fixture has no duplicates
        alignment = align_genes(list(cells["gene_names"]), vocab)
    aligned = alignment.apply(cells["counts"], min_fraction=0.1).toarray()
    np.testing.assert_array_equal(aligned, expected["aligned_counts"])
    assert alignment.report.num_vocabulary_covered == 168
