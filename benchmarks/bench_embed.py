"""Cells/s of `analysis.embed_cells` for the released scFoundation size (prints a table; not a test).

    python benchmarks/bench_embed.py [--cells 64] [--expressed 1100] [--batch-sizes 1 8 32]

The 100M architecture (configs/scfoundation_100m.py, random weights, float32 compute as the
official tool) embeds synthetic cells with about --expressed genes (±5%, one length bucket) out of
the 19,264-gene vocabulary, through the public AnnData path: vocabulary alignment, length
bucketing, batched encoder forwards, pooling into obsm. Each batch size runs once to compile, then
is timed over --cells cells (best of --repeats). The peer runs in the same process on the same
weights and cells: the PyTorch reference (`benchmarks/torch_reference`, checked against the
original code's fixtures) doing what the official `get_embedding.py --output_type cell` does, one
cell per forward with float64 preprocessing, with `torch.set_num_threads` = the cores JAX uses,
over the first --reference-cells cells after one untimed cell. Needs torch; without it the peer
is skipped and no ratio is printed. MFU is each side's encoder matmul FLOPs on the cells' real
tokens (expressed genes + T and S; padding is not useful work) per second, against a float32
matmul's FLOP/s measured in the same run (start and end averaged). On a shared CPU, numbers vary
with the other processes' load.
"""
import argparse
import os
import time

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp
from flax import nnx

from scfm_jax import analysis
from scfm_jax.configs import scfoundation_100m
from scfm_jax.data.vocabulary import Vocabulary
from scfm_jax.models.scfoundation import ScFoundation
from scfm_jax.train.metrics import measure_matmul_peak

from bench_cpu_attention import layer_flops


def reference_rate(model, adata, cells: int, repeats: int, threads: int):
    """(cells/s, settings, embeddings) of the PyTorch reference's one-cell-per-pass
    `get_embedding` on the first `cells` cells; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from torch_reference import scfoundation as reference

    torch.set_num_threads(threads)
    peer = reference.MaeAutobin.from_scfm_jax(model)
    counts = adata.X[:cells]
    reference.get_embedding(peer, counts[:1])  # first-call allocations, untimed
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        embeddings = reference.get_embedding(peer, counts, output_type="cell", tgthighres="t4",
                                             pool_type="all")
        best = min(best, time.perf_counter() - start)
    return cells / best, f"torch {torch.__version__}, {torch.get_num_threads()} threads", embeddings


def synthetic_cells(num_cells: int, num_genes: int, expressed: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows, cols, values = [], [], []
    for cell in range(num_cells):
        count = min(int(rng.integers(int(expressed * 0.95), int(expressed * 1.05) + 1)), num_genes)
        genes = np.sort(rng.choice(num_genes, count, replace=False))
        rows.append(np.full(count, cell))
        cols.append(genes)
        values.append(rng.negative_binomial(2, 0.5, count) + 1)
    counts = sp.csr_matrix((np.concatenate(values).astype(np.float32),
                            (np.concatenate(rows), np.concatenate(cols))),
                           shape=(num_cells, num_genes))
    symbols = [f"GENE{i}" for i in range(num_genes)]
    return anndata.AnnData(counts, obs=pd.DataFrame(index=[f"cell{i}" for i in range(num_cells)]),
                           var=pd.DataFrame(index=symbols)), Vocabulary("synthetic", tuple(symbols))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=32, help="cells timed per batch size")
    parser.add_argument("--expressed", type=int, default=1100)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--reference-cells", type=int, default=8,
                        help="cells the PyTorch reference embeds (one per pass), 0 to skip")
    parser.add_argument("--reference-threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads for the reference (default: the cores JAX "
                             "uses)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (the config's is bfloat16)")
    args = parser.parse_args()

    config = scfoundation_100m.get_config()
    config.model.dtype = args.dtype
    config.model.remat_policy = "none"
    model = ScFoundation(config.model, rngs=nnx.Rngs(0))
    parameters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    adata, vocabulary = synthetic_cells(args.cells, config.model.num_genes, args.expressed)

    print(f"device: {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs visible, "
          f"{len(os.sched_getaffinity(0))} usable), load average {os.getloadavg()[0]:.1f} at "
          "start; "
          f"{parameters / 1e6:.1f}M parameters, {args.dtype} compute, {args.cells} cells with "
          f"{args.expressed} ± 5% expressed genes")
    peer = None
    if args.reference_cells:
        peer = reference_rate(model, adata, min(args.reference_cells, args.cells), args.repeats,
                              args.reference_threads)
        if peer is None:
            print("PyTorch reference skipped: torch is not installed (pip install torch)")
        else:
            print(f"PyTorch reference (official get_embedding algorithm, one cell per pass, "
                  f"{peer[1]}): {peer[0]:.3f} cells/s over {min(args.reference_cells, args.cells)}"
                  " cells")
    encoder = config.model.encoder
    tokens = np.diff(adata.X.indptr) + 2   # each cell's expressed genes, T and S
    cell_flops = np.array([encoder.depth * layer_flops(encoder.width, encoder.mlp_dim, int(t))
                           for t in tokens])
    peak = measure_matmul_peak(jnp.float32)
    rows = []
    ratio_header = " x PyTorch reference |" if peer else ""
    for batch_size in args.batch_sizes:
        warmup = adata[:batch_size].copy()
        start = time.perf_counter()
        analysis.embed_cells(model, warmup, vocabulary=vocabulary, batch_size=batch_size,
                             progress=False)
        first = time.perf_counter() - start
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            analysis.embed_cells(model, adata, vocabulary=vocabulary, batch_size=batch_size,
                                 progress=False)
            best = min(best, time.perf_counter() - start)
        rate = args.cells / best
        ratio = ""
        if peer:
            # the two sides must compute the same embeddings, or the ratio compares nothing
            difference = np.abs(adata.obsm["X_scfoundation"][:len(peer[2])] - peer[2]).max()
            ratio = f" {rate / peer[0]:.2f} (max abs diff {difference:.1e}) |"
        rows.append((batch_size, first, rate, cell_flops.sum() / best, ratio))
        print(f"batch {batch_size}: {rate:.2f} cells/s (load {os.getloadavg()[0]:.1f})", flush=True)
    peak = (peak + measure_matmul_peak(jnp.float32)) / 2
    print(f"\nfloat32 matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s; "
          f"{cell_flops.mean() / 1e9:.1f} encoder GFLOP per cell on its real tokens")
    if peer:
        peer_flops = cell_flops[:len(peer[2])].sum() / (len(peer[2]) / peer[0])
        print(f"PyTorch reference: {peer[0]:.3f} cells/s, MFU {peer_flops / peak:.0%}")
    print(f"\n| batch size | compile + first pass (s) | cells/s | MFU |{ratio_header}")
    print("|---|---|---|---|" + ("---|" if peer else ""))
    for batch_size, first, rate, flops_per_s, ratio in rows:
        print(f"| {batch_size} | {first:.1f} | {rate:.2f} | {flops_per_s / peak:.0%} |{ratio}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
