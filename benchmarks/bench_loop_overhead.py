"""Host overhead per train step of the loop's body, with and without a per-step sync: a table.

The loop (`scfm_jax.train.loop.train`) keeps metrics on the device until a log or checkpoint step,
so the host can run ahead of the device. This measures what that buys on the tiny config: the
same body (next pipeline batch -> global batch -> compiled step -> metrics) over N steps

  device   the compiled step alone, dispatched back to back on one batch (the device's time)
  async    the loop body, metrics kept on the device (fetched once at the end)
  sync     the loop body plus `float(metrics["loss"])` every step (the old loop)

and reports each per step, the host overhead (async/sync minus device), and when the host had
dispatched the last step (a loop that never waits is done long before the device). A synthetic
store of `--cells` cells is written to a temporary folder first.

  python benchmarks/bench_loop_overhead.py [--steps 50] [--cells 512] [--batch 32]
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import anndata as ad
import jax
import numpy as np
import scipy.sparse as sp

from scfm_jax.configs import scfoundation_tiny
from scfm_jax.data.convert import convert
from scfm_jax.data.store import CellStore
from scfm_jax.objectives import get_objective
from scfm_jax.train import loop, partitioning
from scfm_jax.train.trainer import Trainer


def synthetic_store(folder: Path, cells: int, genes: int = 765, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    mean = rng.gamma(0.6, 2.0, genes)[None, :] * rng.lognormal(0.0, 0.4, cells)[:, None]
    counts = rng.negative_binomial(2, 2 / (2 + mean)).astype(np.float32)
    counts[counts.sum(axis=1) == 0, 0] = 1
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = [f"GENE{i:04d}" for i in range(genes)]
    adata.obs_names = [f"cell{i}" for i in range(cells)]
    store = folder / "store"
    convert([adata], str(store), vocabulary="from-data", shard_size=256)
    return str(store)


def run(trainer, state, pipeline, steps: int, sync: bool):
    """(wall seconds per step, seconds per step until the host has dispatched the last step, state)
    of the loop body over `steps` steps, after a warm-up step."""
    pending = loop.PendingMetrics()
    with pipeline.iterate(0) as batches:
        _, local = next(batches)
        batch = loop.host_to_device(local, trainer)
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            _, local = next(batches)
            batch = loop.host_to_device(local, trainer)
            state, metrics = trainer.train_step(state, batch)
            if sync:
                float(metrics["loss"])
            else:
                pending.add(0, metrics)
        host = time.perf_counter() - start   # the loop has dispatched every step
        jax.block_until_ready(state)
        pending.fetch()
        return (time.perf_counter() - start) / steps, host / steps, state


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cells", type=int, default=512, help="cells in the synthetic store")
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store_path = synthetic_store(Path(folder), args.cells)
        config = scfoundation_tiny.get_config()
        config.data.store = store_path
        config.data.global_batch_size = args.batch
        config.data.buckets = (512,)  # one bucket: one executable, no compilation in the runs
        config = loop.resolve_config(config, CellStore.open(store_path))
        mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
        trainer = Trainer(config, get_objective("scfoundation"), mesh)
        state = trainer.init_state(0)
        pipeline, _ = loop.make_pipelines(config, CellStore.open(store_path))
        batch = loop.host_to_device(pipeline.batch(0), trainer)
        step = trainer.compile_train_step(state, batch)
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(state)
        device = (time.perf_counter() - start) / args.steps
        timings = {}
        for name, sync in (("async", False), ("sync", True)):
            timings[name] = run(trainer, state, pipeline, args.steps, sync)
            state = timings[name][2]
    print(f"{jax.devices()[0].device_kind}, scfoundation_tiny, {args.batch} cells/step, "
          f"{args.steps} steps; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'':8}{'wall ms/step':>14}{'host overhead ms/step':>24}"
          f"{'host done dispatching after (ms/step)':>40}")
    print(f"{'device':8}{device * 1e3:14.2f}")
    for name, (seconds, host, _) in timings.items():
        print(f"{name:8}{seconds * 1e3:14.2f}{(seconds - device) * 1e3:24.2f}{host * 1e3:40.2f}")
    print("host done dispatching: when the Python loop had issued every step; a loop that never "
          "waits finishes long before the device (it runs ahead), a per-step sync not before")


if __name__ == "__main__":
    main()
