"""The Colab notebook runs top to bottom on a tiny checkpoint and real cells (nbclient)."""
import anndata
import nbformat
import numpy as np
import pytest

from analysis_helpers import pbmc_cells, write_workdir
from shared_helpers import REPO_ROOT, plotted_pixels

NOTEBOOK = REPO_ROOT / "notebooks" / "analyse_checkpoint.ipynb"


def _set_parameters(notebook, **values):
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    lines = cell.source.splitlines()
    for name, value in values.items():
        index = next((i for i, line in enumerate(lines) if line.startswith(f"{name} =")), None)
        assert index is not None, f"the parameters cell has no {name}"
        lines[index] = f"{name} = {value!r}"
    cell.source = "\n".join(lines)


@pytest.mark.slow  # a kernel, the first UMAP (numba compilation) and a fine-tune: minutes on 2 cores
def test_notebook_runs_top_to_bottom(tmp_path):
    from nbclient import NotebookClient

    cells = pbmc_cells(per_type=8)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    workdir, _ = write_workdir(tmp_path / "run", list(cells.var_names))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    _set_parameters(notebook, CHECKPOINT=str(workdir), DATA=str(tmp_path / "cells.h5ad"),
                    FINE_TUNE_EPOCHS=1, OUTPUT=str(tmp_path / "analysed.h5ad"))
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
