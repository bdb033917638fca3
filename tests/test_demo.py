"""The README demo end to end on the real pbmc68k_reduced cells: convert, pretrain, compare."""
import json

import pytest

from scfm_jax import demo


@pytest.mark.slow
@pytest.mark.heavy
def test_demo_learns_beyond_the_per_gene_mean_baseline(tmp_path):
    result = demo.run(tmp_path / "demo", steps=120)
    assert result["heldout_cells"] == 70  # data.eval_fraction 0.1 of 700 cells
    # the model must use the other genes of the cell, not just each gene's average level
    assert result["model_mse"] < 0.8 * result["baseline_mse"], result
    saved = json.loads((tmp_path / "demo" / "demo_result.json").read_text())
    assert saved["model_mse"] == pytest.approx(result["model_mse"])
    assert (tmp_path / "demo" / "loss_curve.png").stat().st_size > 10_000
    assert any((tmp_path / "demo" / "train" / "tensorboard").iterdir())
    assert (tmp_path / "demo" / "train" / "checkpoints").is_dir()
