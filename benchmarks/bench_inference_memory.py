"""Host memory of store inference against the number of cells: the RSS of `embed_store` with the
tiny scFoundation model after warm-up and at the end, on stores of increasing size, each embedded in
a fresh subprocess (prints a table; not a test).

    python benchmarks/bench_inference_memory.py [--cells 4000 16000 64000] [--chunk-cells 4096]
        [--baseline-tree /path/to/another/checkout]

For each size, a cell store of synthetic cells (about --expressed genes each, of a 19,264-gene
vocabulary) is written through `scfm_jax.data.convert` in this process. A child process then
builds the random-weight tiny model and embeds the store's first chunk into a scratch output, so
that every bucket width of the store is compiled (the synthetic cells all fall in one bucket; the
child checks that the whole run compiles no further program) and the caches are warm. It notes
its resident set (VmRSS) then, embeds the whole store noting VmRSS after each chunk's marker is
written, and at the end notes VmRSS before and after `malloc_trim(0)` (which returns the free
memory that glibc's arenas hold to the system: the allocator's share of the growth; the child
trims once after the warm-up as well, so the two trimmed figures compare live memory). This process
reads the child's peak RSS from `wait4` (ru_maxrss). Memory is flat in the number of cells when the
growth after warm-up does not grow with the store. `--baseline-tree` runs the same children on
another checkout's `scfm_jax` too, side by side (before/after a change).
"""
import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

NUM_GENES = 19264


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


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
    after_chunk = []
    mark_done = store_inference._Output.mark_done

    def noting_mark_done(self, chunk):
        mark_done(self, chunk)
        after_chunk.append(resident_mib())

    store_inference._Output.mark_done = noting_mark_done

    def run(selection, into):
        return store_inference.run(
            task, opened, into, selection=selection, checkpoint={"source": "random tiny"},
            config=config, options={}, batch_size=batch_size, chunk_cells=chunk_cells,
            progress=False)

    def programs():
        return sum(step._cache_size() for step in task._steps.values())

    run(store_inference.Selection(0, chunk_cells), output + "_warm")
    warm, compiled = resident_mib(), programs()
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    trim(0)
    warm_trimmed = resident_mib()
    after_chunk.clear()
    summary = run(store_inference.Selection(), output)
    end = resident_mib()
    trim(0)
    print(json.dumps({"warm_mib": warm, "warm_trimmed_mib": warm_trimmed, "end_mib": end, "trimmed_mib": resident_mib(),
                      "chunk_max_mib": max(after_chunk), "new_programs": programs() - compiled,
                      "seconds": summary["seconds"], "cells": summary["cells"]}))


def write_store(root: Path, cells: int, expressed: int) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_embed import synthetic_cells
    from scfm_jax.data.convert import convert

    adata, vocabulary = synthetic_cells(cells, NUM_GENES, expressed)
    adata.write_h5ad(root / f"{cells}.h5ad")
    convert([root / f"{cells}.h5ad"], root / f"store_{cells}", vocabulary=vocabulary)
    (root / f"{cells}.h5ad").unlink()
    return root / f"store_{cells}"


def measure(store: Path, output: Path, args, tree: str) -> dict:
    command = [sys.executable, __file__, "--child", str(store), str(output),
               "--chunk-cells", str(args.chunk_cells), "--batch-size", str(args.batch_size)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=tree))
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"the child for {store} failed ({status}); see its output above")
    result = json.loads(stdout.strip().splitlines()[-1])
    if result["new_programs"]:
        raise SystemExit(f"{store}: the whole run compiled {result['new_programs']} programs the "
                         "warm-up did not: growth would include compilation")
    return dict(result, peak_mib=usage.ru_maxrss / 1024, load=os.getloadavg()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[4000, 16000, 64000])
    parser.add_argument("--expressed", type=int, default=100)
    parser.add_argument("--chunk-cells", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--baseline-tree", help="another checkout whose scfm_jax to measure too")
    parser.add_argument("--child", nargs=2, metavar=("STORE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.chunk_cells, args.batch_size)
        return
    trees = {"this tree": str(Path(__file__).resolve().parent.parent)}
    if args.baseline_tree:
        trees = {"baseline": str(Path(args.baseline_tree).resolve()), **trees}
    print(f"tiny scFoundation (random weights, float32), synthetic cells with {args.expressed} "
          f"± 5% expressed genes of {NUM_GENES} (one bucket width); --chunk-cells "
          f"{args.chunk_cells}, global batch {args.batch_size}, every CPU device of one process; "
          f"RSS in MiB; {', '.join(f'{k}: {v}' for k, v in trees.items())}")
    print("\n| code | cells | chunks | after warm-up | highest after a chunk | end | after "
          "malloc_trim: warm-up / end | growth (end − warm-up) | growth after malloc_trim | peak (ru_maxrss) "
          "| cells/s | load average (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for cells in args.cells:
            store = write_store(root, cells, args.expressed)
            for name, tree in trees.items():
                r = measure(store, root / f"out_{cells}_{len(name)}", args, tree)
                print(f"| {name} | {cells:,} | {-(-cells // args.chunk_cells)} | "
                      f"{r['warm_mib']:.0f} | {r['chunk_max_mib']:.0f} | {r['end_mib']:.0f} | "
                      f"{r['warm_trimmed_mib']:.0f} / {r['trimmed_mib']:.0f} | "
                      f"{r['end_mib'] - r['warm_mib']:+.0f} | "
                      f"{r['trimmed_mib'] - r['warm_trimmed_mib']:+.0f} | {r['peak_mib']:.0f} | "
                      f"{cells / r['seconds']:.0f} | {r['load']:.1f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
