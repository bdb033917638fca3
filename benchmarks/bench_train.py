"""Training throughput of the scFoundation configs on this machine: a table, not a test.

For each config: the train step's model FLOPs (`Trainer.model_flops`: XLA's cost analysis of the
loop-free loss gradient, recomputation not counted), its median step time over a
few steps after compilation, cells/s, non-zero genes/s and MFU against the float32 matmul peak
measured in the same run. Synthetic cells with a fixed number of expressed genes are fed straight
to the step (the loader has its own benchmark, bench_loader.py).

  python benchmarks/bench_train.py [--configs scfoundation_tiny,scfoundation_100m] [--cells 32,1]
      [--steps 3] [--remat full]
"""
import argparse
import importlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from scfm_jax.data.host_ops import smallest_bucket
from scfm_jax.objectives import get_objective
from scfm_jax.train import partitioning
from scfm_jax.train.metrics import measure_matmul_peak
from scfm_jax.train.trainer import Trainer


def synthetic_batch(cells: int, genes: int, expressed: int, width: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    gene_ids = np.full((cells, width), -1, np.int32)
    counts = np.zeros((cells, width), np.float32)
    for row in range(cells):
        gene_ids[row, :expressed] = np.sort(rng.choice(genes, expressed, replace=False))
        counts[row, :expressed] = rng.negative_binomial(2, 0.4, expressed) + 1
    return {"gene_ids": gene_ids, "counts": counts, "total_counts": counts.sum(1),
            "num_nonzero": np.full(cells, expressed, np.int32)}


def bench(name: str, cells: int, expressed: int, steps: int, peak: float,
          remat_policy: str | None = None) -> dict:
    config = importlib.import_module(f"scfm_jax.configs.{name}").get_config()
    if config.model.num_genes <= 0:  # the tiny config takes its vocabulary from the store
        config.model.num_genes = 765 if name.endswith("tiny") else 19264  # 765: the demo's
    config.model.dtype = "float32"  # this CPU has no fast bf16 matmul; MFU is against f32 peak
    config.data.global_batch_size = cells
    if remat_policy:
        config.model.remat_policy = remat_policy
    config.train.grad_accum_steps = 1
    mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    trainer = Trainer(config, get_objective(config.model.name), mesh)
    width = smallest_bucket(expressed, config.data.buckets, expressed)
    batch = partitioning.global_batch(
        synthetic_batch(cells, config.model.num_genes, expressed, width), mesh, trainer.rules)
    state = trainer.init_state(0)
    start = time.perf_counter()
    compiled = trainer.compile_train_step(state, batch)
    compile_seconds = time.perf_counter() - start
    flops = trainer.model_flops(batch)  # forward + backward, recomputation not counted
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    memory = compiled.memory_analysis()
    return {"config": name, "remat": config.model.remat_policy, "params": params,
            "temp_gb": memory.temp_size_in_bytes / 1e9, "cells": cells, "expressed": expressed,
            "compile_s": compile_seconds, "step_s": step_time, "cells_s": cells / step_time,
            "genes_s": cells * expressed / step_time, "gflop_step": flops / 1e9,
            "mfu": flops / step_time / peak}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="scfoundation_tiny,scfoundation_100m")
    parser.add_argument("--cells", default="32,4", help="batch size per config")
    parser.add_argument("--expressed", type=int, default=1100, help="non-zero genes per cell")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--remat", default="", help="override model.remat_policy (none/full/dots)")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    peak = measure_matmul_peak(jnp.float32, size=2048)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.device_count()} device(s)), float32 matmul peak "
          f"measured now: {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for name, cells in zip(args.configs.split(","), (int(c) for c in args.cells.split(","))):
        # the demo's pbmc68k_reduced cells express ~200-400 of its 765 genes
        expressed = min(args.expressed, 300) if name.endswith("tiny") else args.expressed
        rows.append(bench(name, cells, expressed, args.steps, peak, args.remat or None))
    peak_after = measure_matmul_peak(jnp.float32, size=2048)
    print(f"float32 matmul peak measured after the runs: {peak_after / 1e9:.1f} GFLOP/s "
          "(MFU below is against the first)")
    header = (f"{'config':20}{'remat':>6}{'params':>13}{'cells':>6}{'nnz':>6}{'compile s':>10}"
              f"{'step s':>9}{'cells/s':>9}{'genes/s':>10}{'GFLOP/step':>11}{'MFU':>7}{'XLA temp GB':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:20}{r['remat']:>6}{r['params']:>13,}{r['cells']:>6}"
              f"{r['expressed']:>6}{r['compile_s']:>10.1f}{r['step_s']:>9.3f}{r['cells_s']:>9.2f}{r['genes_s']:>10.0f}"
              f"{r['gflop_step']:>11.1f}{r['mfu']:>7.1%}{r['temp_gb']:>12.2f}")


if __name__ == "__main__":
    main()
