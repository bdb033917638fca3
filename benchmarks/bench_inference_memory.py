"""Host memory of store inference against the number of cells: the peak RSS of `embed_store` with
the tiny scFoundation model on stores of increasing size, each embedded in a fresh subprocess
(prints a table; not a test).

    python benchmarks/bench_inference_memory.py [--cells 2000 8000 32000] [--chunk-cells 4096]

For each size, a cell store of synthetic cells (about --expressed genes each, of a 19,264-gene
vocabulary) is written through `scfm_jax.data.convert` in this process. A child process then
builds the random-weight tiny model, embeds the store's first chunk into a scratch output (so
everything is compiled and the caches are warm) and notes its peak RSS, embeds the whole store, and
exits; this process reads the child's peak RSS from `wait4` (ru_maxrss). Memory is flat in the
number of cells when the whole-store peak does not grow with the store.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

NUM_GENES = 19264


def child(store: str, output: str, chunk_cells: int, batch_size: int) -> None:
    """Embed `store` into `output` with the random tiny model; print one JSON line."""
    from flax import nnx

    from scfm_jax.analysis import scfoundation_inference, store_inference
    from scfm_jax.configs import scfoundation_tiny
    from scfm_jax.models.scfoundation import ScFoundation

    config = scfoundation_tiny.get_config()
    config.model.num_genes = NUM_GENES
    config.model.dtype = "float32"
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    net = ScFoundation(config.model, rngs=nnx.Rngs(0))
    opened = store_inference.open_store(store)   # as embed_store opens it
    task = scfoundation_inference.store_cell_task(net, opened.vocabulary, opened.vocabulary)

    def run(selection, into):
        return store_inference.run(
            task, opened, into, selection=selection, checkpoint={"source": "random tiny"},
            config=config, options={}, batch_size=batch_size, chunk_cells=chunk_cells,
            progress=False)

    run(store_inference.Selection(0, chunk_cells), output + "_warm")
    warm_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = run(store_inference.Selection(), output)
    print(json.dumps({"warm_kb": warm_kb, "seconds": summary["seconds"],
                      "cells": summary["cells"]}))


def write_store(root: Path, cells: int, expressed: int) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_embed import synthetic_cells
    from scfm_jax.data.convert import convert

    adata, vocabulary = synthetic_cells(cells, NUM_GENES, expressed)
    adata.write_h5ad(root / f"{cells}.h5ad")
    convert([root / f"{cells}.h5ad"], root / f"store_{cells}", vocabulary=vocabulary)
    (root / f"{cells}.h5ad").unlink()
    return root / f"store_{cells}"


def measure(store: Path, output: Path, args) -> dict:
    command = [sys.executable, __file__, "--child", str(store), str(output),
               "--chunk-cells", str(args.chunk_cells), "--batch-size", str(args.batch_size)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, JAX_PLATFORMS="cpu"))
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"the child for {store} failed ({status}); see its output above")
    result = json.loads(stdout.strip().splitlines()[-1])
    return dict(result, peak_kb=usage.ru_maxrss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[2000, 8000, 32000])
    parser.add_argument("--expressed", type=int, default=100)
    parser.add_argument("--chunk-cells", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--child", nargs=2, metavar=("STORE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.chunk_cells, args.batch_size)
        return
    print(f"tiny scFoundation (random weights, float32), synthetic cells with {args.expressed} "
          f"± 5% expressed genes of {NUM_GENES}; --chunk-cells {args.chunk_cells}, global batch "
          f"{args.batch_size}, every CPU device of one process")
    print("\n| cells | chunks | peak RSS after the first chunk (MiB) | peak RSS, whole store (MiB) "
          "| growth (MiB) | cells/s | load average (1 min) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for cells in args.cells:
            store = write_store(root, cells, args.expressed)
            result = measure(store, root / f"out_{cells}", args)
            warm, peak = result["warm_kb"] / 1024, result["peak_kb"] / 1024
            print(f"| {cells:,} | {-(-cells // args.chunk_cells)} | {warm:.0f} | {peak:.0f} | "
                  f"{peak - warm:+.0f} | {cells / result['seconds']:.0f} | "
                  f"{os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
