"""The pipeline's batch build alone (pages already cached), this tree's against another version's,
interleaved in one process so both see the same load (prints a line per setting; not a test).

    git archive REV scfm_jax | tar -x -C /tmp/old
    python benchmarks/bench_batch_build.py STORE --baseline-src /tmp/old

Two settings: buckets wide enough for every cell (each row a plain copy) and a cap below every
cell's length (every row subsampled). The batches of the two versions are checked to be equal.
"""
import argparse
import importlib.util
import os
import time
from pathlib import Path

import numpy as np

from scfm_jax.data.pipeline import Pipeline
from scfm_jax.data.store import CellStore

SETTINGS = {"no capped cells (buckets to 3,072)": dict(buckets=(1024, 2048, 2304, 2560, 3072),
                                                       max_nonzero=3072),
            "every cell capped (max_nonzero 1,024)": dict(buckets=(512, 1024), max_nonzero=1024)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("--baseline-src", required=True, help="a folder holding another scfm_jax")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    source = Path(args.baseline_src) / "scfm_jax" / "data" / "pipeline.py"
    spec = importlib.util.spec_from_file_location("baseline_pipeline", source)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    store = CellStore.open(args.store)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    for label, options in SETTINGS.items():
        pipelines = {name: cls(store, global_batch_size=256, seed=0, block_size=64,
                               window_blocks=16, process_index=0, process_count=1, **options)
                     for name, cls in (("baseline", baseline.Pipeline), ("this tree", Pipeline))}
        steps = range(args.steps)
        for pipeline in pipelines.values():
            for step in steps:
                pipeline.batch(step)        # the pages into the store's cache
        best = dict.fromkeys(pipelines, float("inf"))
        for _ in range(args.repeats):
            for name, pipeline in pipelines.items():
                start = time.perf_counter()
                for step in steps:
                    pipeline.batch(step)
                best[name] = min(best[name], time.perf_counter() - start)
        for step in steps:
            ours, theirs = pipelines["this tree"].batch(step), pipelines["baseline"].batch(step)
            assert all(np.array_equal(ours[k], theirs[k]) for k in theirs), f"step {step} differs"
        rates = {name: 256 * len(steps) / seconds for name, seconds in best.items()}
        print(f"{label}: baseline {rates['baseline']:,.0f} cells/s, this tree "
              f"{rates['this tree']:,.0f} cells/s, {rates['this tree'] / rates['baseline']:.2f}x; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
