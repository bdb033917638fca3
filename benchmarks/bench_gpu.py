"""Accelerator throughput table (run by bench_gpu.sh): the 100M train step, cell embedding at
batch 1/64/256 and scMulan annotation at batch 1/64, with cells/s, MFU against the card's
published bf16 peak (scfm_jax.train.chips.GPUS) and memory. Random weights, synthetic cells.

  python benchmarks/bench_gpu.py --output bench_gpu.md            # released sizes
  python benchmarks/bench_gpu.py --tiny --output bench_gpu.md     # tiny configs (CPU check)
"""
import argparse
import statistics
import time

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse
from flax import nnx

from bench_scmulan import _cells, _token_set
from bench_train import synthetic_batch
from scfm_jax.analysis import scmulan_tasks
from scfm_jax.configs import scfoundation_100m, scfoundation_tiny, scmulan_368m, scmulan_tiny
from scfm_jax.data.cell_sentence import TokenSet
from scfm_jax.models import scmulan
from scfm_jax.train import chips, partitioning, plan
from scfm_jax.train.metrics import measure_matmul_peak
from scfm_jax.train.trainer import Trainer, loop_free_model_config
from scfm_jax.train.train_state import split_model
from scfm_jax.objectives import get_objective


def peak_memory() -> str:
    stats = jax.local_devices()[0].memory_stats() or {}
    return plan._si(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else "-"


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` (blocking on its result) after one untimed call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scfoundation_config(tiny: bool):
    config = (scfoundation_tiny if tiny else scfoundation_100m).get_config()
    if config.model.num_genes <= 0:
        config.model.num_genes = 765  # the demo store's vocabulary
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    return config


def bench_train(config, batch_size: int, expressed: int, steps: int, peak: float) -> dict:
    config.data.global_batch_size = batch_size
    mesh = partitioning.make_mesh(config.mesh)
    trainer = Trainer(config, get_objective("scfoundation"), mesh)
    width = next(b for b in sorted(config.data.buckets) + [expressed] if b >= expressed)
    batch = partitioning.global_batch(
        synthetic_batch(batch_size, config.model.num_genes, expressed, width), mesh, trainer.rules)
    state = [trainer.init_state(0)]
    compiled = trainer.compile_train_step(state[0], batch)

    def step():
        state[0], metrics = compiled(state[0], batch)
        return metrics

    seconds = timed(step, steps)
    memory = compiled.memory_analysis()
    return {"task": f"train {config.model.encoder.width}w, {expressed} genes", "batch": batch_size,
            "cells_s": batch_size / seconds, "step_ms": seconds * 1e3,
            "mfu": trainer.model_flops(batch) / seconds / peak,
            "xla_memory": memory.argument_size_in_bytes + memory.temp_size_in_bytes,
            "peak_memory": peak_memory()}


def bench_embed(config, batch_sizes, expressed: int, repeats: int, peak: float) -> list[dict]:
    mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    trainer = Trainer(config, get_objective("scfoundation"), mesh)
    state = trainer.init_state(0)
    loop_free = loop_free_model_config(config.model)
    loop_free_graphdef, _, _ = split_model(nnx.eval_shape(
        lambda: get_objective("scfoundation").build_model(loop_free, rngs=nnx.Rngs(0))))
    rows = []
    for batch_size in batch_sizes:
        width = next(b for b in sorted(config.data.buckets) + [expressed] if b >= expressed)
        sparse = synthetic_batch(batch_size, config.model.num_genes, expressed, width)
        batch = {k: jnp.asarray(v) for k, v in sparse.items() if k != "num_nonzero"}
        embed = jax.jit(plan.embed_step(trainer.graphdef, trainer.objective, None))
        seconds = timed(lambda: embed(state.params, state.buffers, batch), repeats)
        # FLOPs of the same step on the loop-free model (XLA counts a loop body once)
        flops = jax.jit(plan.embed_step(loop_free_graphdef, trainer.objective, None)).lower(
            state.params, state.buffers, batch).cost_analysis()["flops"]
        memory = embed.lower(state.params, state.buffers, batch).compile().memory_analysis()
        rows.append({"task": f"embed {config.model.encoder.width}w, {expressed} genes",
                     "batch": batch_size, "cells_s": batch_size / seconds,
                     "step_ms": seconds * 1e3, "mfu": flops / seconds / peak,
                     "xla_memory": memory.argument_size_in_bytes + memory.temp_size_in_bytes,
                     "peak_memory": peak_memory()})
    return rows


def _synthetic_cells(token_set: TokenSet, n: int) -> anndata.AnnData:
    """log1p-normalised cells expressing about an eighth of the token set's genes."""
    rng = np.random.default_rng(0)
    shape = (n, len(token_set.genes))
    expr = np.where(rng.random(shape) < 0.125, rng.gamma(2.0, 0.8, shape), 0).astype(np.float32)
    return anndata.AnnData(scipy.sparse.csr_matrix(expr),
                           obs=pd.DataFrame(index=[f"cell{i}" for i in range(n)]),
                           var=pd.DataFrame(index=list(token_set.genes)))


def bench_annotate(tiny: bool, batch_sizes, cells: int) -> list[dict]:
    if tiny:
        genes = [f"GENE{i:04d}" for i in range(64)]
        token_set = TokenSet.build(genes, {"cell_type": [f"type{i}" for i in range(8)]})
        config = scmulan_tiny.get_config().model
        config.vocab_size = len(token_set)
    else:
        token_set = _token_set()
        config = scmulan_368m.get_config().model
    model = scmulan.ScMulan(config, rngs=nnx.Rngs(0))
    adata = _synthetic_cells(token_set, cells) if tiny else _cells(token_set, cells)[0]
    rows = []
    for batch_size in (min(b, cells) for b in batch_sizes):
        # the first pass compiles every (batch, prompt width) shape; the second is timed
        scmulan_tasks.annotate(model, token_set, adata.copy(), batch_size=batch_size,
                               progress=False)
        start = time.perf_counter()
        scmulan_tasks.annotate(model, token_set, adata.copy(), batch_size=batch_size,
                               progress=False)
        seconds = time.perf_counter() - start
        rows.append({"task": f"scMulan annotate {config.n_layer}x{config.n_embd}",
                     "batch": batch_size, "cells_s": cells / seconds,
                     "step_ms": seconds / -(-cells // batch_size) * 1e3, "mfu": None,
                     "xla_memory": None, "peak_memory": peak_memory()})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a quick CPU check)")
    parser.add_argument("--output", required=True, help="markdown table written here")
    parser.add_argument("--train-batch", type=int, default=0,
                        help="global batch of the train step (default: the config's, which "
                             "`scfm-jax plan --sweep` sized)")
    parser.add_argument("--expressed", type=int, default=2048, help="expressed genes per cell")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--embed-batches", default="1,64,256")
    parser.add_argument("--annotate-batches", default="1,64")
    parser.add_argument("--annotate-cells", type=int, default=128)
    args = parser.parse_args()

    device = jax.local_devices()[0]
    chip = chips.chip_of_devices([device])
    config = scfoundation_config(args.tiny)
    if chip is not None:
        peak, peak_source = chip.peak_flops, f"{chip.name} bf16 peak, {chip.source}"
    else:
        config.model.dtype = "float32"
        peak, peak_source = measure_matmul_peak(jnp.float32), "float32 matmul measured here"
    started = time.perf_counter()
    rows = [bench_train(config, args.train_batch or config.data.global_batch_size,
                        args.expressed, args.steps, peak)]
    print(f"train done ({time.perf_counter() - started:.0f} s)", flush=True)
    rows += bench_embed(config, [int(b) for b in args.embed_batches.split(",")],
                        args.expressed, args.steps, peak)
    print(f"embed done ({time.perf_counter() - started:.0f} s)", flush=True)
    rows += bench_annotate(args.tiny, [int(b) for b in args.annotate_batches.split(",")],
                           args.annotate_cells)
    print(f"annotate done ({time.perf_counter() - started:.0f} s)", flush=True)

    lines = [f"device: {device.device_kind} x{jax.local_device_count()}; MFU against "
             f"{peak / 1e12:.1f} TFLOP/s ({peak_source}); jax {jax.__version__}", "",
             "| task | batch | cells/s | ms per batch | MFU | XLA args+temp | device peak memory |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(f"| {r['task']} | {r['batch']} | {r['cells_s']:.1f} | {r['step_ms']:.1f} | "
                     f"{mfu} | {plan._si(r['xla_memory'])} | {r['peak_memory']} |")
    table = "\n".join(lines)
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
