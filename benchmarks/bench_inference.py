"""Cells/s of store inference (`embed_store`) on 1, 2, 4 and 8 CPU devices of one process, against
the one-device AnnData path (`embed_cells`) on the same cells (prints tables; not a test).

    python benchmarks/bench_inference.py [--models tiny 100m] [--devices 1 2 4 8]

Random-weight scFoundation models (configs/scfoundation_tiny.py and scfoundation_100m.py, float32)
embed synthetic cells with about --expressed genes (one length bucket) of a 19,264-gene vocabulary,
written to a cell store first. Every run compiles into a scratch output, then is timed into a fresh
one (the same task object, so the compiled programs are reused); the same global batch is used everywhere, so more devices split the same work. The reader's
share is the time spent reading and preparing chunks from the store over the whole run.

On a host with 2 cores, simulated CPU devices share those cores: the table measures the engine's
overhead per device (mesh, sharded batches, per-device launches), not a speed-up.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--models", nargs="+", default=["tiny", "100m"], choices=["tiny", "100m"])
parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
parser.add_argument("--cells", type=int, default=256, help="cells embedded by the tiny model")
parser.add_argument("--cells-100m", type=int, default=32, help="cells embedded by the 100M model")
parser.add_argument("--expressed", type=int, default=200)
parser.add_argument("--batch-size", type=int, default=8, help="global batch, every run")
ARGS = parser.parse_args()

import jax  # noqa: E402  (the device count is set before JAX starts)

jax.config.update("jax_num_cpu_devices", max(ARGS.devices))

from flax import nnx  # noqa: E402

from bench_embed import synthetic_cells  # noqa: E402
from scfm_jax.analysis import embedding, scfoundation_inference, store_inference  # noqa: E402
from scfm_jax.analysis.loading import LoadedModel  # noqa: E402
from scfm_jax.configs import scfoundation_100m, scfoundation_tiny  # noqa: E402
from scfm_jax.data.convert import convert  # noqa: E402
from scfm_jax.data.store import CellStore  # noqa: E402
from scfm_jax.models.scfoundation import ScFoundation  # noqa: E402

NUM_GENES = 19264


def _model(name: str) -> LoadedModel:
    config = (scfoundation_tiny if name == "tiny" else scfoundation_100m).get_config()
    config.model.num_genes = NUM_GENES
    config.model.dtype = "float32"
    config.model.remat_policy = "none"
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    return config, ScFoundation(config.model, rngs=nnx.Rngs(0))


def _timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def bench(name: str, root: Path) -> None:
    config, net = _model(name)
    cells = ARGS.cells if name == "tiny" else ARGS.cells_100m
    adata, vocabulary = synthetic_cells(cells, NUM_GENES, ARGS.expressed)
    model = LoadedModel(kind="scfoundation", model=net, config=config, vocabulary=vocabulary,
                        source=f"random {name}")
    adata.write_h5ad(root / f"{name}.h5ad")
    store = root / f"{name}_store"
    convert([root / f"{name}.h5ad"], store, vocabulary=vocabulary)
    parameters = sum(x.size for x in jax.tree.leaves(nnx.state(net, nnx.Param)))

    def anndata_path():
        embedding.embed_cells(model, adata.copy(), batch_size=ARGS.batch_size, progress=False)

    opened = CellStore.open(store)
    # one task for the warm-up and the timed run, so the timed run reuses the compiled programs
    task = scfoundation_inference.store_cell_task(net, vocabulary, opened.vocabulary)

    def store_path(devices, output):
        return store_inference.run(
            task, opened, str(root / output), selection=store_inference.Selection(),
            checkpoint={"source": model.source}, config=config, options={},
            batch_size=ARGS.batch_size, chunk_cells=64, progress=False,
            devices=jax.devices()[:devices])

    anndata_path()   # compile
    baseline, _ = _timed(anndata_path)
    print(f"\n{name}: {parameters / 1e6:.1f}M parameters, {cells} cells with {ARGS.expressed} "
          f"± 5% expressed genes, global batch {ARGS.batch_size}, float32; load average "
          f"{os.getloadavg()[0]:.1f} at start")
    print("\n| run | devices | cells/s | x one-device AnnData path | reader's share |")
    print("|---|---|---|---|---|")
    print(f"| AnnData path (`embed_cells`) | 1 | {cells / baseline:.1f} | 1.00 | - |", flush=True)
    for devices in ARGS.devices:
        store_path(devices, f"{name}_warm_{devices}")
        seconds, summary = _timed(lambda: store_path(devices, f"{name}_out_{devices}"))
        print(f"| store (`embed_store`) | {devices} | {cells / seconds:.1f} | "
              f"{baseline / seconds:.2f} | {summary['read_seconds'] / summary['seconds']:.1%} |",
              flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def main() -> None:
    print(f"{os.cpu_count()} CPUs visible, {len(os.sched_getaffinity(0))} usable; "
          f"{len(jax.devices())} simulated CPU devices")
    with tempfile.TemporaryDirectory() as scratch:
        for name in ARGS.models:
            bench(name, Path(scratch))


if __name__ == "__main__":
    sys.exit(main())
