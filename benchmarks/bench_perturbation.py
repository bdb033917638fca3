"""The perturbation task on the Norman subset: the full table from one run, and its costs.

    python benchmarks/bench_perturbation.py [--shared ../shared] [--epochs 15] [--out DIR]
    python benchmarks/bench_perturbation.py --dtypes-only [--cells 32]

One `scfm_jax.tasks.perturbation.run` over the 3,375 Norman cells (GEARS simulation split, seed 1;
expression normalised by each cell's whole-transcriptome total `ncounts`, i.e. the published X)
with every predictor: the baselines, the linear model with every gene table and the GEARS-style
head. The scFoundation rows come from a random-weight checkpoint of the shared fixture's
architecture widened to the released 19,264-gene vocabulary (the fixture's 200 genes and the demo
model's 765 hold none of Norman's perturbed genes), the scMulan row from the scMulan fixture;
every row names its checkpoint. Then the costs: cells/s of the control-cell embedding step (a
second, warm pass of the same cells), the head's training steps/s (after the compiling step), and
the process's peak resident memory. Last, the control-cell embedding step in float32 and in
bfloat16 (`compute_dtype`) side by side: each in its own process (alternating, twice each), warm
cells/s, the temporary memory XLA plans for the jitted step and the process's peak resident
memory. Prints Markdown tables with `os.getloadavg()`; on a shared CPU the rates move with the
other processes' load.
"""
import argparse
import json
import os
import subprocess
import resource
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from perturbation_helpers import widened_fixture_checkpoint  # noqa: E402

from scfm_jax.analysis import load  # noqa: E402
from scfm_jax.tasks import perturbation  # noqa: E402
from scfm_jax.tasks.perturbation_data import read_perturbations  # noqa: E402
from scfm_jax.tasks.perturbation_fm import control_embeddings  # noqa: E402
from scfm_jax.tasks.perturbation_gears import HeadSettings  # noqa: E402
from scfm_jax.tasks.perturbation_metrics import METRICS  # noqa: E402

NORMAN = ("data", "downstream", "perturbench_norman19_k562_crispra.h5ad")
DTYPES = ("float32", "bfloat16")


def embedding_child(checkpoint: Path, vocabulary: Path, norman: Path, dtype: str,
                    cells: int) -> None:
    """One process: embed `cells` control cells in `dtype` twice (the first compiles); print
    warm cells/s, XLA's planned temporary bytes of the step and the peak RSS as a JSON line."""
    import anndata

    from scfm_jax.analysis.loading import with_compute_dtype
    from scfm_jax.tasks import perturbation_fm

    planned = []
    step = perturbation_fm._kept_embeddings

    def measured_step(*args, **kwargs):
        if not planned:
            analysis = step.lower(*args, **kwargs).compile().memory_analysis()
            planned.append(analysis.temp_size_in_bytes)
        return step(*args, **kwargs)

    perturbation_fm._kept_embeddings = measured_step
    data = read_perturbations(anndata.read_h5ad(norman))
    loaded = with_compute_dtype(load(checkpoint, key="gene", vocabulary=vocabulary), dtype)
    keep = list(data.genes) + data.perturbed_genes
    counts = data.counts[data.is_control][:cells]
    for _ in range(2):
        warm = perturbation_fm.control_embeddings(loaded, counts, data.genes, keep,
                                                  progress=False)
    print(json.dumps(dict(dtype=dtype, cells_per_second=counts.shape[0] / warm.seconds,
                          temp_bytes=planned[0], kept=list(warm.embeddings.shape),
                          peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))


def dtype_comparison(checkpoint: Path, vocabulary: Path, norman: Path, cells: int) -> None:
    """float32 against bfloat16, alternating child processes (two of each), as a Markdown table."""
    runs = {dtype: [] for dtype in DTYPES}
    for dtype in DTYPES * 2:
        output = subprocess.run(
            [sys.executable, __file__, "--embedding-child", dtype, "--cells", str(cells),
             "--checkpoint", str(checkpoint), "--vocabulary", str(vocabulary),
             "--norman", str(norman)], check=True, capture_output=True, text=True).stdout
        runs[dtype].append(json.loads(output.strip().splitlines()[-1]))
    print(f"\n## Control-cell embedding, float32 against bfloat16 ({cells} Norman control cells, "
          f"{jax.device_count()} {jax.default_backend()} device(s), load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})\n")
    print("| compute dtype | warm cells/s (two processes) | XLA temporary memory of the step "
          "| peak resident memory | kept rows out |\n|---|---|---|---|---|")
    for dtype, results in runs.items():
        rates = ", ".join(f"{r['cells_per_second']:.2f}" for r in results)
        print(f"| {dtype} | {rates} | {results[0]['temp_bytes'] / 2**20:.1f} MiB | "
              f"{max(r['peak_rss'] for r in results) / 2**30:.2f} GiB | "
              f"{' x '.join(map(str, results[0]['kept']))} float32 |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", help="output folder of the run (default: a temporary one)")
    parser.add_argument("--dtypes-only", action="store_true",
                        help="only the float32 / bfloat16 comparison of the embedding step")
    parser.add_argument("--cells", type=int, default=32,
                        help="control cells of the float32 / bfloat16 comparison")
    parser.add_argument("--embedding-child", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--vocabulary", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--norman", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.embedding_child:
        embedding_child(args.checkpoint, args.vocabulary, args.norman, args.embedding_child,
                        args.cells)
        return
    shared = Path(args.shared)
    work = Path(tempfile.mkdtemp(prefix="bench_perturbation."))
    checkpoint = widened_fixture_checkpoint(shared / "fixtures" / "scfoundation-tiny" /
                                            "models.ckpt", work / "scfoundation-19264-random.ckpt")
    vocabulary = shared / "data" / "OS_scRNA_gene_index.19264.tsv"
    if args.dtypes_only:
        dtype_comparison(checkpoint, vocabulary, shared.joinpath(*NORMAN), args.cells)
        return
    started = time.perf_counter()
    result = perturbation.run(
        shared.joinpath(*NORMAN), total_key="ncounts", checkpoint=checkpoint, vocabulary=vocabulary,
        scmulan_checkpoint=shared / "fixtures" / "scmulan-tiny" / "ckpt.pt",
        head=HeadSettings(epochs=args.epochs), output=args.out or work / "run", overwrite=True)
    seconds = time.perf_counter() - started
    print(f"\n## Norman subset, one run ({seconds:.0f} s, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})\n")
    labels = result.metrics.drop_duplicates("predictor").set_index("predictor").checkpoint
    for name, label in labels.items():
        print(f"- {name}: {label or 'baseline (no checkpoint)'}")
    print()
    print(perturbation.table(result.metrics, METRICS))

    data = read_perturbations(__import__("anndata").read_h5ad(shared.joinpath(*NORMAN)))
    controls = data.is_control
    loaded = load(checkpoint, key="gene", vocabulary=vocabulary)
    keep = list(data.genes) + data.perturbed_genes
    warm = control_embeddings(loaded, data.counts[controls], data.genes, keep, progress=False)
    head = result.predictors["gears_scfoundation"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n## Costs ({jax.device_count()} {jax.default_backend()} device(s), load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})\n")
    print("| step | value |\n|---|---|")
    print(f"| control-cell embedding, first pass (compile included) | "
          f"{result.embedded_cells / result.embedding_seconds:.1f} cells/s |")
    print(f"| control-cell embedding, warm pass | {len(warm.embeddings) / warm.seconds:.1f} "
          "cells/s |")
    print(f"| kept rows per cell | {len(warm.genes)} of {loaded.model.num_genes} genes x "
          f"{warm.embeddings.shape[-1]} |")
    print(f"| GEARS head training (batch {head.settings.batch_size}, hidden "
          f"{head.settings.hidden}) | {head.steps_per_second:.2f} steps/s |")
    print(f"| head loss on a fixed training sample, before -> after training | "
          f"{head.fixed_sample_loss[0]:.3f} -> {head.fixed_sample_loss[1]:.3f} |")
    print(f"| peak resident memory of the process | {peak:.2f} GiB |")
    dtype_comparison(checkpoint, vocabulary, shared.joinpath(*NORMAN), args.cells)


if __name__ == "__main__":
    main()
