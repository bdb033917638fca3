"""Host overhead per train step of the loop's body, with and without a per-step sync: a table.

The loop (`scfm_jax.train.loop.train`) keeps metrics on the device until a log or checkpoint step,
so the host can run ahead of the device. This measures what that buys on the tiny config: the
same body (next pipeline batch -> global batch -> compiled step -> metrics) over N steps

  device   the compiled step alone, dispatched back to back on one batch (the device's time)
  async    the loop body, metrics kept on the device (fetched once at the end)
  sync     the loop body plus `float(metrics["loss"])` every step (the old loop)

and reports each per step and the host overhead (async/sync minus device). A synthetic store of
`--cells` cells is written to a temporary folder first.

  python benchmarks/bench_loop_overhead.py [--steps 50] [--cells 512] [--batch 32]
"""
import argparse
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
from scfm_jax.train.state import Trainer


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
    """Seconds per step of the loop body over `steps` steps (after a warm-up step)."""
    pending = loop.PendingMetrics()
    with pipeline.iterate(0) as batches:
        _, local = next(batches)
        batch = loop.host_to_device(local, trainer)
        state, metrics = trainer.compiled_train_step(state, batch)(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            _, local = next(batches)
            batch = loop.host_to_device(local, trainer)
            state, metrics = trainer.compiled_train_step(state, batch)(state, batch)
            if sync:
                float(metrics["loss"])
            else:
                pending.add(0, metrics)
        jax.block_until_ready(state)
        pending.fetch()
        return (time.perf_counter() - start) / steps, state


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
        step = trainer.compiled_train_step(state, batch)
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(state)
        device = (time.perf_counter() - start) / args.steps
        timings = {"device": device}
        for name, sync in (("async", False), ("sync", True)):
            timings[name], state = run(trainer, state, pipeline, args.steps, sync)
    print(f"{jax.devices()[0].device_kind}, scfoundation_tiny, {args.batch} cells/step, "
          f"{args.steps} steps")
    print(f"{'':8}{'ms/step':>10}{'host overhead ms/step':>24}")
    for name, seconds in timings.items():
        overhead = "" if name == "device" else f"{(seconds - device) * 1e3:24.2f}"
        print(f"{name:8}{seconds * 1e3:10.2f}{overhead}")


if __name__ == "__main__":
    main()
