"""scMulan annotation + embedding throughput at the released size (368M, random weights), on CPU.

Compares, on the same machine, weights and cells, in one run:
  * ours: `annotate` (batched prompts grouped by length, one prefill + KV-cache decode steps);
  * the peer: the PyTorch reference (`benchmarks/torch_reference`, checked against the original
    code's fixtures) annotating as the official `get_cell_types_and_embds_for_adata` does: per
    cell its prompt, then `generate_cellGenesis` with top-1, a full forward over the whole
    sequence for each of the three generated tokens (no cache), one cell at a time, with
    `torch.set_num_threads` = the cores JAX uses; over the first --reference-cells cells, after
    one untimed cell. Its cell types and embeddings are compared with ours.
Cells: the scMulan fixture's six real cells (97-331 expressed genes), repeated; else synthetic cells
with ~250 expressed genes. Prints a table; not a test. Needs torch for the peer.
MFU is the annotation's useful matmul FLOPs per second (each cell's prompt and its three generated
tokens once through the layers, causal attention, the head at the generated tokens; the
reference's recomputation without a cache is not useful work) against a float32 matmul's FLOP/s
measured in the same run (start and end averaged).

    python benchmarks/bench_scmulan.py [--cells 16] [--batch-sizes 1,8,16] [--reference-cells 4]

`--n-layer/--n-embd/--n-head` shrink the model for a quick end-to-end check.
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
from scfm_jax.train.metrics import measure_matmul_peak


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


def _reference(model, token_set, adata, cells: int, threads: int):
    """(seconds, settings, types, embeddings) of the PyTorch reference's official-style
    annotation of the first `cells` cells; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from torch_reference import scmulan as reference

    torch.set_num_threads(threads)
    peer = reference.ScMulanModel.from_scfm_jax(model)
    expr = adata.X[:cells]
    arguments = (token_set.tokens, token_set.genes, token_set.cell_type_terms)
    reference.annotate(peer, expr[:1], *arguments)  # first-call allocations, untimed
    started = time.perf_counter()
    types, embeddings, _ = reference.annotate(peer, expr, *arguments)
    return (time.perf_counter() - started, f"torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads", types, embeddings)


def annotation_flops(config, prompt_tokens: int, generated: int = 3) -> float:
    """Matmul FLOPs of annotating one cell: its prompt and generated tokens through every layer
    (q, k, v, out, the 4x MLP; causal QK^T and PV), and the head at the generated tokens."""
    tokens, width = prompt_tokens + generated, config.n_embd
    layer = 2 * tokens * (4 * width * width + 8 * width * width) + 2 * tokens * tokens * width
    return config.n_layer * layer + generated * 2 * width * config.vocab_size


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--reference-cells", type=int, default=4,
                        help="cells the PyTorch reference annotates (0: skip it)")
    parser.add_argument("--reference-threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads (default: the cores JAX uses)")
    for name in ("n-layer", "n-embd", "n-head"):
        parser.add_argument(f"--{name}", type=int, help="override the 368M config's value")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    config = scmulan_368m.get_config().model
    config.dtype = "float32"   # the reference's precision (the config trains in bfloat16)
    for name in ("n_layer", "n_embd", "n_head"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    token_set = _token_set()
    started = time.perf_counter()
    model = scmulan.ScMulan(config, rngs=nnx.Rngs(0))
    print(f"model: {scmulan.count_parameters(config):,} parameters ({config.n_layer} layers, "
          f"width {config.n_embd}, {config.n_head} heads), initialised in "
          f"{time.perf_counter() - started:.0f} s; devices: {jax.devices()}; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    adata, source = _cells(token_set, args.cells)
    prompts = cell_sentence.annotation_prompts(adata.X, token_set)
    lengths = [len(p[0]) for p in prompts]
    print(f"{args.cells} cells ({source}), prompt lengths {min(lengths)}-{max(lengths)} "
          f"(mean {np.mean(lengths):.0f})")

    cell_flops = np.array([annotation_flops(config, length) for length in lengths])
    peak = measure_matmul_peak(jnp.float32)
    rows, annotated = [], None
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        # a first pass compiles every (batch, width) shape; the second is timed
        scmulan_tasks.annotate(model, token_set, adata.copy(), batch_size=batch_size,
                               progress=False)
        started = time.perf_counter()
        annotated = scmulan_tasks.annotate(model, token_set, adata.copy(), batch_size=batch_size,
                                           progress=False)
        seconds = time.perf_counter() - started
        rows.append((f"ours, batch {batch_size}, KV cache", args.cells, seconds))
        print(f"  measured {rows[-1][0]}: {seconds:.1f} s", flush=True)

    peer = None
    if args.reference_cells:
        cells = min(args.reference_cells, args.cells)
        peer = _reference(model, token_set, adata, cells, args.reference_threads)
        if peer is None:
            print("PyTorch reference skipped: torch is not installed (pip install torch)")
        else:
            seconds, settings, types, embeddings = peer
            rows.append(("PyTorch reference, 1 cell/pass, 3 full forwards, no cache", cells,
                         seconds))
            print(f"  PyTorch reference: {settings}")
            same = sum(a == b for a, b in zip(types, annotated.obs["cell_type_scmulan"]))
            difference = np.abs(annotated.obsm["X_scmulan"][:cells] - embeddings).max()
            print(f"  reference vs ours on {cells} cells: {same}/{cells} identical cell types, "
                  f"embeddings max abs diff {difference:.1e}")

    print(f"\nCPU: {len(os.sched_getaffinity(0))} usable cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end")
    peak = (peak + measure_matmul_peak(jnp.float32)) / 2
    print(f"float32 matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s; "
          f"{cell_flops.mean() / 1e9:.1f} GFLOP of useful work per cell")
    peer_rate = rows[-1][1] / rows[-1][2] if peer else None
    print(f"{'method':<66} {'cells':>5} {'seconds':>8} {'cells/s':>8} {'MFU':>5} {'vs PyTorch':>11}")
    for name, cells, seconds in rows:
        rate = cells / seconds
        mfu = cell_flops[:cells].sum() / seconds / peak
        ratio = f"{rate / peer_rate:.2f}x" if peer_rate else "-"
        print(f"{name:<66} {cells:>5} {seconds:>8.1f} {rate:>8.3f} {mfu:>5.0%} {ratio:>11}")


if __name__ == "__main__":
    main()
