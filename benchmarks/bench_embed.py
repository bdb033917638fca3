"""Cells/s of `analysis.embed_cells` for the released scFoundation size (prints a table; not a test).

    python benchmarks/bench_embed.py [--cells 64] [--expressed 1100] [--batch-sizes 1 8 32]

The 100M architecture (configs/scfoundation_100m.py, random weights, float32 compute as the
official tool) embeds synthetic cells with about --expressed genes (±5%, one length bucket) out of
the 19,264-gene vocabulary, through the public AnnData path: vocabulary alignment, length
bucketing, batched encoder forwards, pooling into obsm. Each batch size runs once to compile, then
is timed over --cells cells (best of --repeats). The reference is the official `get_embedding.py`,
one cell per forward: ~0.44 cells/s for ~1,100 expressed genes on this kind of 2-core CPU
(issue 5). On a shared CPU, numbers vary with the other processes' load.
"""
import argparse
import os
import time

import anndata
import jax
import numpy as np
import pandas as pd
import scipy.sparse as sp
from flax import nnx

from scfm_jax import analysis
from scfm_jax.configs import scfoundation_100m
from scfm_jax.data.vocabulary import Vocabulary
from scfm_jax.models.scfoundation import ScFoundation

OFFICIAL_CELLS_PER_SECOND = 0.44


def synthetic_cells(num_cells: int, num_genes: int, expressed: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows, cols, values = [], [], []
    for cell in range(num_cells):
        count = int(rng.integers(int(expressed * 0.95), int(expressed * 1.05) + 1))
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
    parser.add_argument("--dtype", default="float32", help="compute dtype (the config's is bfloat16)")
    args = parser.parse_args()

    config = scfoundation_100m.get_config()
    config.model.dtype = args.dtype
    config.model.remat_policy = "none"
    model = ScFoundation(config.model, rngs=nnx.Rngs(0))
    parameters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    adata, vocabulary = synthetic_cells(args.cells, config.model.num_genes, args.expressed)

    print(f"device: {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs visible), "
          f"{parameters / 1e6:.1f}M parameters, {args.dtype} compute, {args.cells} cells with "
          f"{args.expressed} ± 5% expressed genes")
    print("\n| batch size | compile + first pass (s) | cells/s | x official (0.44 cells/s) |")
    print("|---|---|---|---|")
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
        print(f"| {batch_size} | {first:.1f} | {rate:.2f} | {rate / OFFICIAL_CELLS_PER_SECOND:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
