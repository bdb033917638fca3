"""The Colab notebook runs top to bottom on a tiny checkpoint and real cells (nbclient)."""
import anndata
import nbformat
import numpy as np
import pandas as pd
import pytest

from analysis_helpers import pbmc_cells, write_workdir
from shared_helpers import REPO_ROOT, plotted_pixels, shared_dir, shared_path

NOTEBOOK = REPO_ROOT / "notebooks" / "analyse_checkpoint.ipynb"
DOWNSTREAM = ("data", "downstream")
NORMAN = "perturbench_norman19_k562_crispra.h5ad"
MIXOLOGY = "mixology_lung_3lines_2technologies.h5ad"
DOROTHEA = "dorothea_hs_AB.tsv"   # GPL-3, only in the shared folder (not committed)


def _set_parameters(notebook, **values):
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    lines = cell.source.splitlines()
    for name, value in values.items():
        index = next((i for i, line in enumerate(lines) if line.startswith(f"{name} =")), None)
        assert index is not None, f"the parameters cell has no {name}"
        lines[index] = f"{name} = {value!r}"
    cell.source = "\n".join(lines)


def _perturbed_genes(norman) -> list[str]:
    return sorted({gene for condition in norman.obs["condition"].astype(str).unique()
                   if condition != "control" for gene in condition.split("+")})


@pytest.mark.slow  # a kernel, the first UMAP (numba compilation), a fine-tune and three downstream
@pytest.mark.heavy
def test_notebook_runs_top_to_bottom(tmp_path):  # tasks: minutes on 2 cores
    """Every section on a random-weight workdir whose vocabulary holds the PBMC genes and the Norman
    genes (measured and perturbed), so the perturbation section has its FM rows."""
    from nbclient import NotebookClient

    cells = pbmc_cells(per_type=8)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    norman_path, mixology_path = (shared_path(*DOWNSTREAM, name) for name in (NORMAN, MIXOLOGY))
    norman = anndata.read_h5ad(norman_path)
    symbols = list(dict.fromkeys(list(cells.var_names) + list(norman.var_names) +
                                 _perturbed_genes(norman)))
    workdir, _ = write_workdir(tmp_path / "run", symbols)
    # DoRothEA is GPL-3 and only in a shared folder (CI always has one): without it the notebook
    # skips the network evaluation, as it does for a user who sets no GENE_REFERENCE.
    shared = shared_dir()
    reference = shared / "data" / "downstream" / DOROTHEA if shared is not None else None
    reference = reference if reference is not None and reference.is_file() else None
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    _set_parameters(notebook, CHECKPOINT=str(workdir), DATA=str(tmp_path / "cells.h5ad"),
                    FINE_TUNE_EPOCHS=1, OUTPUT=str(tmp_path / "analysed.h5ad"),
                    PERTURBATION_DATA=str(norman_path), INTEGRATION_DATA=str(mixology_path),
                    GENE_REFERENCE=None if reference is None else str(reference),
                    TASK_CELLS=16, HEAD_EPOCHS=1)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    result = anndata.read_h5ad(tmp_path / "analysed.h5ad")
    assert result.obsm["X_scfoundation"].shape == (cells.n_obs, 64)
    assert result.obsm["X_umap_scfoundation"].shape == (cells.n_obs, 2)
    assert set(result.obs["cell_type_pred"]) <= set(cells.obs["bulk_labels"])
    assert "cell_type_pred_finetuned" in result.obs
    assert result.layers["scfoundation_enhanced"].shape == cells.shape
    assert np.isfinite(result.layers["scfoundation_enhanced"]).all()
    assert plotted_pixels(tmp_path / "loss_curves.png", "C0") > 200   # the train curve

    perturbed = pd.read_csv(tmp_path / "perturbation" / "metrics.csv")
    fm_rows = perturbed[perturbed.predictor.isin(["gears_scfoundation", "linear_scfoundation_decoder",
                                                  "linear_scfoundation_tokens"])]
    assert set(fm_rows.predictor) == {"gears_scfoundation", "linear_scfoundation_decoder",
                                      "linear_scfoundation_tokens"}
    assert fm_rows.checkpoint.str.contains(str(workdir)).all()
    assert {"no_change", "additive", "linear_pca"} <= set(perturbed.predictor)
    assert plotted_pixels(tmp_path / "perturbation" / "perturbation.png", "C0") > 200
    assert (tmp_path / "module_specificity.png").stat().st_size > 5000
    if reference is not None:
        networks = pd.read_csv(tmp_path / "gene_networks.csv", index_col=0)
        assert {"X_scfoundation_context", "coexpression", "random"} <= set(networks.index)
        assert (networks.loc["coexpression", "checkpoint"] == "none (baseline)" and
                networks.loc["X_scfoundation_context", "checkpoint"] == str(workdir))
    integrated = pd.read_csv(tmp_path / "integration" / "integration.csv", index_col=0)
    assert list(integrated.index) == ["X_scfoundation", "pca", "harmony"]
    assert integrated.loc["X_scfoundation", "source"] == f"scfoundation {workdir}"
    assert (tmp_path / "integration" / "umap_scfoundation.png").stat().st_size > 5000
