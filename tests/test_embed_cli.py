"""`scfm-jax embed` end to end on the fixture checkpoint, against the original outputs."""
import anndata
import numpy as np
import pandas as pd
import pytest
import zarr

from shared_helpers import shared_path
from scfm_jax.analysis import embed_cli
from scfm_jax.interop import torch_checkpoint
from scfm_jax.main import main as scfm_main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = shared_path("fixtures", "scfoundation-tiny")
    cells = np.load(folder / "cells.npz")
    tmp = tmp_path_factory.mktemp("embed")
    adata = anndata.AnnData(cells["counts"],
                            obs=pd.DataFrame({"sample": "s1"}, index=cells["cell_ids"].astype(str)),
                            var=pd.DataFrame(index=cells["gene_names"].astype(str)))
    adata.write_h5ad(tmp / "cells.h5ad")
    frame = pd.DataFrame(cells["counts"], index=cells["cell_ids"], columns=cells["gene_names"])
    frame.to_csv(tmp / "cells.csv")
    return dict(tmp=tmp, h5ad=tmp / "cells.h5ad", csv=tmp / "cells.csv",
                checkpoint=folder / "models.ckpt", vocabulary=folder / "genes.tsv",
                expected=dict(np.load(folder / "expected.npz")), cell_ids=cells["cell_ids"])


def _embed(files, *extra):
    return scfm_main(["embed", "--checkpoint", str(files["checkpoint"]), "--vocabulary",
                      str(files["vocabulary"]), "--quiet", *map(str, extra)])


def test_cell_embeddings_h5ad(files):
    output = files["tmp"] / "cells_t4.h5ad"
    assert _embed(files, "--input", files["h5ad"], "--output", output, "--batch-size", 3) == 0
    result = anndata.read_h5ad(output)
    assert list(result.obs_names) == list(files["cell_ids"])
    assert list(result.obs["sample"]) == ["s1"] * 8
    np.testing.assert_allclose(result.obsm["X_scfoundation"], files["expected"]["cell_emb_t4"],
                               rtol=1e-5, atol=1e-5)
    assert result.uns["scfoundation"]["key"] == "cell"


def test_cell_embeddings_csv_max_pool(files):
    output = files["tmp"] / "cells_a5.h5ad"
    assert _embed(files, "--input", files["csv"], "--output", output, "--tgthighres", "a5",
                  "--pool", "max") == 0
    np.testing.assert_allclose(anndata.read_h5ad(output).obsm["X_scfoundation"],
                               files["expected"]["cell_emb_a5_max"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output_type, name", [("gene", "gene_emb_percell"),
                                               ("gene_batch", "gene_emb_batch")])
def test_gene_embeddings_zarr(files, output_type, name):
    output = files["tmp"] / f"{output_type}.zarr"
    assert _embed(files, "--input", files["h5ad"], "--output", output,
                  "--output-type", output_type) == 0
    array = zarr.open_array(str(output), mode="r")
    assert array.shape == (8, 200, 24)
    assert array.attrs["cells"] == list(files["cell_ids"])
    np.testing.assert_allclose(array[:], files["expected"][name], rtol=1e-5, atol=1e-5)


def test_gene_expression_rde(files):
    output = files["tmp"] / "expression.h5ad"
    assert _embed(files, "--input", files["h5ad"], "--output", output, "--output-type",
                  "gene_expression", "--key", "rde", "--tgthighres", "a5") == 0
    result = anndata.read_h5ad(output)
    assert result.shape == (8, 200)
    assert result.var_names[0] == "A1BG"
    np.testing.assert_allclose(result.X, files["expected"]["expr_rde_a5"], rtol=1e-5, atol=1e-5)


def test_clear_errors(files, capsys):
    output = files["tmp"] / "never.h5ad"
    assert _embed(files, "--input", files["h5ad"], "--output", output, "--key", "rde",
                  "--output-type", "cell", "--tgthighres", "q4") == 2   # a usage mistake
    assert "tgthighres" in capsys.readouterr().err
    # a vocabulary of the wrong size for the checkpoint
    wrong = files["tmp"] / "wrong_vocabulary.tsv"
    wrong.write_text("gene_name\tindex\nA1BG\t0\nA2M\t1\n")
    assert scfm_main(["embed", "--checkpoint", str(files["checkpoint"]), "--vocabulary", str(wrong),
                      "--input", str(files["h5ad"]), "--output", str(output)]) == 1
    assert "has 2 genes but the checkpoint's model has 200" in capsys.readouterr().err
    # log-normalised values where raw counts are expected
    logged = anndata.read_h5ad(files["h5ad"])
    logged.X = np.log1p(logged.X)
    logged_path = files["tmp"] / "logged.h5ad"
    logged.write_h5ad(logged_path)
    assert _embed(files, "--input", logged_path, "--output", output) == 1
    assert "expects raw counts" in capsys.readouterr().err
    assert not output.exists()


def test_wrong_key_is_refused(files, tmp_path, capsys):
    checkpoint = tmp_path / "only_gene.ckpt"
    torch_checkpoint.save({"gene": torch_checkpoint.load(files["checkpoint"])["gene"]}, checkpoint)
    assert scfm_main(["embed", "--checkpoint", str(checkpoint), "--vocabulary",
                      str(files["vocabulary"]), "--input", str(files["h5ad"]),
                      "--output", str(tmp_path / "x.h5ad")]) == 1
    assert "no weight set 'cell'" in capsys.readouterr().err


def test_parser_defaults():
    args = embed_cli._parser().parse_args(["--checkpoint", "c", "--input", "i", "--output", "o"])
    assert (args.output_type, args.pool, args.tgthighres, args.pre_normalized, args.input_type) == (
        "cell", "all", "t4", "F", "singlecell")


def _with_string_dtypes(files, path):
    """The fixture cells with pandas' nullable `string` dtype in obs / var (recent anndata)."""
    adata = anndata.read_h5ad(files["h5ad"])
    adata.obs_names = pd.Index(list(adata.obs_names), dtype="string")
    adata.obs["donor"] = pd.array(["d1", None] * (adata.n_obs // 2), dtype="string")
    adata.var_names = pd.Index(list(adata.var_names), dtype="string")
    with anndata.settings.override(allow_write_nullable_strings=True):
        adata.write_h5ad(path)
    assert anndata.read_h5ad(path).obs_names.dtype == "string"
    return path


@pytest.mark.parametrize("output_type", ["cell", "gene_expression"])
def test_string_dtype_inputs_round_trip(files, output_type):
    path = _with_string_dtypes(files, files["tmp"] / f"strings_{output_type}.h5ad")
    output = files["tmp"] / f"strings_{output_type}_out.h5ad"
    assert _embed(files, "--input", path, "--output", output, "--output-type", output_type,
                  "--key", "cell" if output_type == "cell" else "rde") == 0
    result = anndata.read_h5ad(output)
    assert result.obs_names.dtype == "string"
    assert list(result.obs_names) == list(files["cell_ids"].astype(str))
    if output_type == "cell":
        np.testing.assert_allclose(result.obsm["X_scfoundation"], files["expected"]["cell_emb_t4"],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.slow   # writes a damaged copy of the checkpoint with torch
def test_non_finite_weights_give_no_output(files, tmp_path, capsys):
    import torch

    checkpoint = torch.load(files["checkpoint"], weights_only=True)
    state = checkpoint["cell"]["state_dict"]
    name = next(k for k in state if k.startswith("model.encoder") and k.endswith("weight"))
    state[name] = torch.full_like(state[name], float("nan"))
    damaged = tmp_path / "nan.ckpt"
    torch.save(checkpoint, damaged)
    output = tmp_path / "out.h5ad"
    assert scfm_main(["embed", "--checkpoint", str(damaged), "--vocabulary",
                      str(files["vocabulary"]), "--input", str(files["h5ad"]), "--output",
                      str(output), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "8 of 8 cells got NaN or infinite values" in err and str(files["cell_ids"][0]) in err
    assert "damaged or diverged checkpoint" in err and not output.exists()
