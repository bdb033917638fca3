"""scMulan annotation + embedding throughput at the released size (368M, random weights), on CPU.

Compares, on the same machine and in one run:
  * ours: `annotate` (batched prompts grouped by length, one prefill + KV-cache decode steps);
  * the official algorithm re-run in JAX: one cell at a time, a full forward over the whole
    sequence for each of the three generated tokens (no cache), as `generate_cellGenesis` does;
  * the official PyTorch tool's rate measured on this machine (quoted: 4 cells in 27-67 s).
Cells: the scMulan fixture's six real cells (97-331 expressed genes), repeated; else synthetic cells
with ~250 expressed genes. Prints a table; not a test.

    python benchmarks/bench_scmulan.py [--cells 16] [--batch-sizes 1,8,16]
"""
import argparse
import os
import time
from pathlib import Path

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse
from flax import nnx

from scfm_jax.analysis import scmulan_tasks
from scfm_jax.configs import scmulan_368m
from scfm_jax.data import cell_sentence
from scfm_jax.data.cell_sentence import TokenSet
from scfm_jax.models import scmulan

OFFICIAL_CELLS, OFFICIAL_SECONDS = 4, (27.0, 67.0)


def _shared() -> Path:
    configured = os.environ.get("SCFM_SHARED_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parents[1].parent / "shared"


def _cells(token_set: TokenSet, n: int) -> anndata.AnnData:
    fixture = _shared() / "fixtures" / "scmulan-tiny" / "cells.npz"
    if fixture.is_file():
        expr, source = np.load(fixture)["expr"], "fixture's real cells"
    else:
        rng = np.random.default_rng(0)
        expr = np.where(rng.random((6, len(token_set.genes))) < 0.125,
                        rng.gamma(2.0, 0.8, (6, len(token_set.genes))), 0).astype(np.float32)
        source = "synthetic cells"
    expr = np.concatenate([expr] * (-(-n // len(expr))))[:n]
    adata = anndata.AnnData(scipy.sparse.csr_matrix(expr),
                            obs=pd.DataFrame(index=[f"cell{i}" for i in range(n)]),
                            var=pd.DataFrame(index=list(token_set.genes)))
    return adata, source


def _token_set() -> TokenSet:
    folder = _shared() / "data" / "scmulan"
    if (folder / "token_set.tsv").is_file():
        return TokenSet.from_folder(folder)
    genes = [f"GENE{i:04d}" for i in range(2000)]
    return TokenSet.build(genes, {"cell_type": [f"type{i}" for i in range(205)]})


@nnx.jit
def _last_position_heads(model, ids, levels):
    return model.heads(model(ids, levels)[:, -1])


def _official_loop(model, prompts):
    """generate_cellGenesis with top_k=1: full forward per step, one cell at a time."""
    for ids, levels in prompts:
        ids, levels = list(ids), list(levels)
        for _ in range(3):
            logits, exp = (np.array(a[0]) for a in _last_position_heads(
                model, jnp.asarray([ids]), jnp.asarray([levels])))
            logits[np.array(ids[:-1])] = -np.inf
            token = int(np.argmax(logits))
            ids.append(token)
            levels.append(int(np.clip(np.round(exp[token]), 0, 10)))
            if token == 0:
                break


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--baseline-cells", type=int, default=2)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    config = scmulan_368m.get_config().model
    token_set = _token_set()
    started = time.perf_counter()
    model = scmulan.ScMulan(config, rngs=nnx.Rngs(0))
    print(f"368M model: {scmulan.count_parameters(config):,} parameters, "
          f"initialised in {time.perf_counter() - started:.0f} s; devices: {jax.devices()}")
    adata, source = _cells(token_set, args.cells)
    prompts = cell_sentence.annotation_prompts(adata.X, token_set)
    lengths = [len(p[0]) for p in prompts]
    print(f"{args.cells} cells ({source}), prompt lengths {min(lengths)}-{max(lengths)} "
          f"(mean {np.mean(lengths):.0f})")

    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        # a first pass compiles every (batch, width) shape; the second is timed
        scmulan_tasks.annotate(model, token_set, adata.copy(), batch_size=batch_size,
                               progress=False)
        started = time.perf_counter()
        scmulan_tasks.annotate(model, token_set, adata.copy(), batch_size=batch_size,
                               progress=False)
        seconds = time.perf_counter() - started
        rows.append((f"ours, batch {batch_size}, KV cache", args.cells, seconds))
        print(f"  measured {rows[-1][0]}: {seconds:.1f} s", flush=True)

    baseline = prompts[:args.baseline_cells]
    _official_loop(model, baseline)  # compiles every sequence length it meets; timed again below
    started = time.perf_counter()
    _official_loop(model, baseline)
    rows.append(("official algorithm in JAX, 1 cell/pass, no cache", len(baseline),
                 time.perf_counter() - started))

    official_rates = [OFFICIAL_CELLS / s for s in OFFICIAL_SECONDS]
    print("\nCPU: this machine's 2 cores, shared with other agents' jobs while measuring; "
          "absolute rates vary with their load.")
    print(f"{'method':<52} {'cells':>5} {'seconds':>8} {'cells/s':>8} {'vs official':>14}")
    for name, cells, seconds in rows:
        rate = cells / seconds
        ratio = f"{rate / official_rates[0]:.1f}-{rate / official_rates[1]:.1f}x"
        print(f"{name:<52} {cells:>5} {seconds:>8.1f} {rate:>8.3f} {ratio:>14}")
    print(f"{'official PyTorch tool (measured here earlier)':<52} {OFFICIAL_CELLS:>5} "
          f"{'27-67':>8} {official_rates[1]:.3f}-{official_rates[0]:.3f}")


if __name__ == "__main__":
    main()
