"""annbatch's cells/s on bench_loader.py's collection, in annbatch's own Python (>= 3.12).

Run by `bench_loader.py` as a subprocess (annbatch needs Python 3.12, the project 3.11):

    /work/venv-annbatch/bin/python benchmarks/annbatch_rates.py H5AD[,H5AD...] COLLECTION CELLS RUNS

(`bench_scale.py` passes its several sources, comma-separated.) Builds annbatch's pre-shuffled zarr
collection from the .h5ad files once (with the zarrs codec pipeline),
then measures two setups on it, each at the batch sizes given:
* recommended (annbatch's README): the zarrs codec pipeline and a `load_adata` that opens only `X`
  as a sparse dataset; `Loader(batch_size, chunk_size=32, preload_nchunks=256)`;
* default: zarr's own codec pipeline and `use_collection`'s default `load_adata` (every backable
  element and all of obs), the same Loader settings.
Both shuffle (random chunks of the pre-shuffled collection). A run reads at least CELLS cells and
8 batches; the median over RUNS runs is printed as one JSON object on the last line.
"""
import json
import statistics
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import numpy as np
import zarr
from annbatch import DatasetCollection, Loader

ZARRS = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}
BATCH_SIZES = {"recommended": (256, 4096), "default": (256,)}


def x_only(group: zarr.Group) -> ad.AnnData:
    return ad.AnnData(X=ad.io.sparse_dataset(group["X"]))


def rate(collection_path: str, batch_size: int, cells: int, seed: int, load_adata) -> float:
    loader = Loader(batch_size=batch_size, chunk_size=32, preload_nchunks=256, shuffle=True,
                    preload_to_gpu=False, rng=np.random.default_rng(seed))
    collection = DatasetCollection(collection_path, mode="r")
    loader = (loader.use_collection(collection, load_adata=load_adata) if load_adata
              else loader.use_collection(collection))
    cells = max(cells, 8 * batch_size)
    seen, start = 0, time.perf_counter()
    for batch in loader:
        seen += batch["X"].shape[0]
        if seen >= cells:
            break
    return seen / (time.perf_counter() - start)


def main():
    h5ads, collection_path = sys.argv[1].split(","), sys.argv[2]
    cells, runs = int(sys.argv[3]), int(sys.argv[4])
    warnings.simplefilter("ignore")
    build = None
    if not Path(collection_path).exists():
        start = time.perf_counter()
        with zarr.config.set(ZARRS):
            # 2 GB datasets bound the memory of the shuffle (annbatch holds a dataset in memory)
            DatasetCollection(collection_path).add_adatas(
                h5ads, dataset_size="2GB", shard_size="256MB", shuffle=True,
                rng=np.random.default_rng(0))
        build = time.perf_counter() - start
    rows = []
    for setup, batch_sizes in BATCH_SIZES.items():
        config = ZARRS if setup == "recommended" else {}
        load_adata = x_only if setup == "recommended" else None
        for batch_size in batch_sizes:
            with zarr.config.set(config):
                rates = [rate(collection_path, batch_size, cells, run, load_adata)
                         for run in range(runs)]
            rows.append({"setup": setup, "batch_size": batch_size,
                         "rate": statistics.median(rates)})
    print(json.dumps({"rows": rows, "build_s": build,
                      "versions": {name: version(name) for name in
                                   ("annbatch", "zarrs", "zarr", "anndata")}}))


if __name__ == "__main__":
    main()
