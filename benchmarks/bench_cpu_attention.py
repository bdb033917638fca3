"""The CPU blockwise attention's tiling, before and after, inside the scFoundation 100M encoder
(prints a table; not a test).

    python benchmarks/bench_cpu_attention.py [--depth 1] [--tokens 1280] [--real 1102]
                                             [--batch-sizes 1 8 32]

Encoder layers at the 100M widths (float32, random weights) over cells of --real tokens padded to
--tokens (bench_embed's 1,100 +-5% expressed genes plus T and S fall in the 1,280 bucket). Two
tilings, compiled side by side and timed interleaved: "before", 512-blocks over the whole batch
(the tiling every platform used), and "after", this tree's CPU tiling (attention.CPU_BLOCK_SIZE,
a few cells per pass under attention.CPU_TILE_BYTES). Wall time per cell, the process's CPU
time per cell, which the other programs on a shared machine disturb much less than wall time, and
the MFU of the wall time against a float32 matmul's FLOP/s measured in the same run (before and
after the table; the mean is used).
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from scfm_jax.configs import scfoundation_100m
from scfm_jax.models import attention
from scfm_jax.models.scfoundation import ScFoundation
from scfm_jax.train.metrics import measure_matmul_peak


def layer_flops(width: int, mlp: int, tokens: int) -> float:
    """Matmul FLOPs of one encoder layer for one cell: q, k, v, out and the MLP, QK^T and PV."""
    return 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=1280)
    parser.add_argument("--real", type=int, default=1102)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = scfoundation_100m.get_config().model
    config.update(dtype="float32", remat_policy="none")
    config.encoder.depth = args.depth
    graphdef, state = nnx.split(ScFoundation(config, rngs=nnx.Rngs(0)))
    tilings = {"before: 512-blocks, whole batch": (512, 1 << 62),
               "after: CPU tiling": (attention.CPU_BLOCK_SIZE, attention.CPU_TILE_BYTES)}
    peak = measure_matmul_peak(jnp.float32)
    flops = args.depth * layer_flops(config.encoder.width, config.encoder.mlp_dim, args.tokens)
    rows = []
    print(f"{args.depth} encoder layer(s) of the 100M, {args.real} of {args.tokens} tokens real; "
          f"{len(os.sched_getaffinity(0))} usable cores, load average {os.getloadavg()[0]:.1f} at "
          "start")
    for batch in args.batch_sizes:
        values = jnp.ones((batch, args.tokens))
        gene_ids = jnp.tile(jnp.arange(args.tokens)[None], (batch, 1))
        padding = jnp.tile(jnp.arange(args.tokens)[None] >= args.real, (batch, 1))
        compiled = {}
        for name, (block, tile) in tilings.items():
            attention.CPU_BLOCK_SIZE, attention.CPU_TILE_BYTES = block, tile   # read at trace
            compiled[name] = jax.jit(lambda s, x, g, m: nnx.merge(graphdef, s).encode(x, g, m)
                                     ).lower(state, values, gene_ids, padding).compile()
            compiled[name](state, values, gene_ids, padding).block_until_ready()
        best = {name: (float("inf"), float("inf")) for name in tilings}
        for _ in range(args.repeats):
            for name, encode in compiled.items():
                wall, cpu = time.perf_counter(), time.process_time()
                encode(state, values, gene_ids, padding).block_until_ready()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        for name, (wall, cpu) in best.items():
            rows.append((batch, name, wall / batch, cpu / batch, os.getloadavg()[0]))
            print(f"  batch {batch}, {name}: {wall / batch:.2f} s per cell", flush=True)
    peak = (peak + measure_matmul_peak(jnp.float32)) / 2
    print(f"\nfloat32 matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s; "
          f"{flops / 1e9:.1f} GFLOP per cell")
    print("| batch | tiling | wall ms per cell | CPU ms per cell | MFU (wall) | load average |\n"
          "|---|---|---|---|---|---|")
    for batch, name, wall, cpu, load in rows:
        print(f"| {batch} | {name} | {wall * 1e3:,.0f} | {cpu * 1e3:,.0f} | "
              f"{flops / wall / peak:.0%} | {load:.1f} |")


if __name__ == "__main__":
    main()
