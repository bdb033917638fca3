"""`scfm-jax annotate` end to end on the fixture's real cells, with shuffled, renamed genes."""
import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from shared_helpers import shared_path
from scfm_jax.data import vocabulary
from scfm_jax.main import main as scfm_main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = shared_path("fixtures", "scmulan-tiny")
    gene_list = shared_path("data", "scmulan", "total_gene_list_42117.txt")
    cells = np.load(folder / "cells.npz")
    genes = (folder / "gene_set.txt").read_text().split()
    vocab = vocabulary.load_vocabulary(gene_list)
    # user-style input: Ensembl IDs with versions, columns shuffled, plus genes scMulan ignores
    ensembl = [vocab.ensembl_ids[vocab.index_of(g)] + ".7" for g in genes]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(genes))
    extra = np.zeros((6, 3), np.float32)
    extra[:, 0] = 1.5  # a gene outside the 42,117 list: dropped by the alignment
    x = np.concatenate([cells["expr"][:, order], extra], axis=1)
    var = pd.DataFrame(index=[ensembl[i] for i in order] + ["ENSG99999999999", "ENSG99999999998",
                                                           vocab.ensembl_ids[0]])
    path = tmp_path_factory.mktemp("annotate") / "cells.h5ad"
    anndata.AnnData(scipy.sparse.csr_matrix(x), obs=pd.DataFrame(index=cells["cell_ids"]),
                    var=var).write_h5ad(path)
    return dict(folder=folder, gene_list=gene_list, input=path,
                expected=np.load(folder / "expected.npz"))


def test_annotate_command_reproduces_the_original(inputs, tmp_path):
    output = tmp_path / "out.h5ad"
    rc = scfm_main(["annotate", "--checkpoint", str(inputs["folder"] / "ckpt.pt"),
                    "--vocabulary", str(inputs["folder"]), "--gene-list", str(inputs["gene_list"]),
                    "--input", str(inputs["input"]), "--output", str(output), "--batch-size", "4",
                    "--smooth", "3", "--quiet"])
    assert rc == 0
    result = anndata.read_h5ad(output)
    expected = inputs["expected"]
    assert list(result.obs["cell_type_scmulan"]) == list(expected["pred_cell_type"])
    assert list(result.obs["cell_type_scmulan_coarse"]) == list(expected["pred_coarse_type"])
    np.testing.assert_allclose(result.obsm["X_scmulan"], expected["cell_emb"], atol=1e-5, rtol=0)
    assert "cell_type_scmulan_smoothed" in result.obs
    for column in ("cell_type_scmulan", "cell_type_scmulan_coarse"):   # NaN where Unclassified
        unclassified = result.obs[column].to_numpy() == "Unclassified"
        assert result.obs[column + "_probability"].isna().to_numpy().tolist() == list(unclassified)
    assert result.n_vars == 2003  # the input is returned whole, with the new columns


def test_annotate_refuses_raw_counts_without_flag(inputs, tmp_path, capsys):
    data = anndata.read_h5ad(inputs["input"])
    data.X = data.X.multiply(40).tocsr()  # looks like counts: max far above 10
    path = tmp_path / "counts.h5ad"
    data.write_h5ad(path)
    assert scfm_main(["annotate", "--checkpoint", str(inputs["folder"] / "ckpt.pt"),
                      "--vocabulary", str(inputs["folder"]), "--gene-list", str(inputs["gene_list"]),
                      "--input", str(path), "--output", str(tmp_path / "o.h5ad"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()   # the gene report, then the one error
    assert err[-1].startswith("scfm-jax annotate: error:") and "counts=True" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "o.h5ad").exists()


def test_annotate_counts_flag_normalises_over_all_input_genes(inputs, tmp_path):
    rng = np.random.default_rng(1)
    data = anndata.read_h5ad(inputs["input"])
    counts = scipy.sparse.csr_matrix(rng.poisson(0.3, data.shape).astype(np.float32))
    data.X = counts
    raw_path, log_path = tmp_path / "raw.h5ad", tmp_path / "log.h5ad"
    data.write_h5ad(raw_path)
    totals = np.asarray(counts.sum(axis=1))
    data.X = scipy.sparse.csr_matrix(np.log1p(counts.toarray() / totals * 1e4))
    data.write_h5ad(log_path)
    common = ["--checkpoint", str(inputs["folder"] / "ckpt.pt"), "--vocabulary",
              str(inputs["folder"]), "--gene-list", str(inputs["gene_list"]), "--quiet"]
    scfm_main(["annotate", *common, "--counts", "--input", str(raw_path),
               "--output", str(tmp_path / "a.h5ad")])
    scfm_main(["annotate", *common, "--input", str(log_path), "--output", str(tmp_path / "b.h5ad")])
    a, b = anndata.read_h5ad(tmp_path / "a.h5ad"), anndata.read_h5ad(tmp_path / "b.h5ad")
    assert list(a.obs["cell_type_scmulan"]) == list(b.obs["cell_type_scmulan"])
    np.testing.assert_allclose(a.obsm["X_scmulan"], b.obsm["X_scmulan"], atol=1e-5)


def test_annotate_errors_are_one_line(inputs, tmp_path, capsys, monkeypatch):
    common = ["--input", str(inputs["input"]), "--output", str(tmp_path / "o.h5ad"), "--quiet"]
    official = ["--checkpoint", str(inputs["folder"] / "ckpt.pt"), "--vocabulary",
                str(inputs["folder"])]

    def run(*argv):
        status = scfm_main(["annotate", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 1 and err[-1].startswith("scfm-jax annotate: error:"), err
        assert not any("Traceback" in line for line in err)
        return err[-1]

    scfoundation = shared_path("fixtures", "scfoundation-tiny", "models.ckpt")
    assert "is a scFoundation checkpoint" in run("--checkpoint", str(scfoundation), *common)
    # a gene list that cannot be downloaded (an empty offline mirror, an empty cache)
    monkeypatch.setenv("SCFM_VOCABULARY_MIRROR", str(tmp_path / "empty-mirror"))
    monkeypatch.setenv("SCFM_CACHE_DIR", str(tmp_path / "cache"))
    assert "scmulan" in run(*official, "--gene-list", "scmulan", *common)
    # no gene in common with the gene list
    data = anndata.read_h5ad(inputs["input"])
    data.var_names = [f"NOTAGENE{i}" for i in range(data.n_vars)]
    path = tmp_path / "foreign.h5ad"
    data.write_h5ad(path)
    message = run(*official, "--gene-list", str(inputs["gene_list"]), "--input", str(path),
                  "--output", str(tmp_path / "o.h5ad"), "--quiet")
    assert "foreign" in message or "match" in message or "coverage" in message
    assert not (tmp_path / "o.h5ad").exists()


def test_annotate_keeps_string_dtypes(inputs, tmp_path):
    data = anndata.read_h5ad(inputs["input"])
    data.obs_names = pd.Index(list(data.obs_names), dtype="string")
    data.obs["donor"] = pd.array(["a", None] * (data.n_obs // 2), dtype="string")
    path, output = tmp_path / "strings.h5ad", tmp_path / "out.h5ad"
    with anndata.settings.override(allow_write_nullable_strings=True):
        data.write_h5ad(path)
    assert scfm_main(["annotate", "--checkpoint", str(inputs["folder"] / "ckpt.pt"),
                      "--vocabulary", str(inputs["folder"]), "--gene-list",
                      str(inputs["gene_list"]), "--input", str(path), "--output", str(output),
                      "--batch-size", "4", "--quiet"]) == 0
    result = anndata.read_h5ad(output)
    assert result.obs_names.dtype == "string"
    assert list(result.obs["cell_type_scmulan"]) == list(inputs["expected"]["pred_cell_type"])
