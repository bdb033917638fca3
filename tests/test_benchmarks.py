"""The data benchmarks run end to end on small inputs (their figures are not checked, their
tables and saved results are): a benchmark that fails after an hour of converting is a defect."""
import json
import os
import subprocess
import sys

import pytest

from shared_helpers import REPO_ROOT


@pytest.mark.slow   # four converter processes and two reads (~30 s)
def test_scale_benchmark_runs_and_resumes_without_converting_again(tmp_path):
    command = [sys.executable, "benchmarks/bench_scale.py", "--workdir", str(tmp_path),
               "--cells", "3000", "--sources", "2", "--median-genes", "600", "--shard-size",
               "512", "--batches", "3", "--soma", "--annbatch-python", "", "--tasks", "1,8"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                           timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.splitlines()
    rows = [line for line in lines if line.startswith(("h5ad, ", "soma, "))]
    assert [row.split()[:2] for row in rows] == [["h5ad,", "1"], ["h5ad,", "2"], ["soma,", "1"],
                                                 ["soma,", "2"]]
    assert any(line.startswith("pipeline, 3 batches of 256 at random steps") for line in lines)
    assert any(line.startswith("pipeline, the training stream (3 consecutive steps") for line in lines)
    assert any(line.startswith("50M cells at") and "8 tasks" in line for line in lines)
    results = json.loads((tmp_path / "results-3000x19264x600x2.json").read_text())
    assert [c["bytes"] > 0 for c in results["conversions"]] == [True] * 4
    assert results["read"]["cold"] > 0 and results["read"]["stream"] > 0
    assert results["cells"] == 3000

    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                           timeout=1500)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(an earlier run)") == 4
    assert json.loads((tmp_path / "results-3000x19264x600x2.json").read_text())[
        "conversions"] == results["conversions"]


def test_model_benchmark_draws_cells_with_every_gene_expressed():
    """`bench_model.py --expressed N` for N at the vocabulary size (it drew up to 1.05 N genes
    without replacement and failed); beyond the vocabulary it says what to fix."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    try:
        from bench_model import synthetic_counts
    finally:
        sys.path.pop(0)
    counts = synthetic_counts(3, 19_264, 19_264)
    assert counts.shape == (3, 19_264) and list(counts.getnnz(axis=1)) == [19_264] * 3
    assert (counts.getnnz(axis=1) <= 19_264).all() and counts.getnnz() > 0
    assert all(17_000 <= n <= 19_264 for n in synthetic_counts(4, 18_500, 19_264).getnnz(axis=1))
    with pytest.raises(SystemExit, match="--expressed must be in"):
        synthetic_counts(1, 20_000, 19_264)


@pytest.mark.slow   # two child processes, each compiling the tiny model's embedding (~30 s)
def test_inference_memory_benchmark_prints_a_row_per_store_size():
    command = [sys.executable, "benchmarks/bench_inference_memory.py", "--cells", "130", "300",
               "--chunk-cells", "128", "--batch-size", "16", "--expressed", "20"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[cell.strip() for cell in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("| this tree |")]
    assert [(row[0], row[1]) for row in rows] == [("130", "2"), ("300", "3")]
    for row in rows:   # RSS after warm-up and after each chunk <= the run's peak, real sizes
        warm, highest, peak = float(row[2]), float(row[3]), float(row[8])
        assert 50 < warm <= peak and 50 < highest <= peak, row
