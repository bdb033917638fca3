"""Scale benchmark: a million synthetic cells from several sources, converted and read back.

Writes --cells synthetic cells x 19,264 genes (default 1,000,000) with a realistic non-zero
distribution (500-5,000 expressed genes per cell, log-normal around --median-genes; gene-specific
heavy-tailed negative-binomial counts; popular genes expressed more often) as --sources .h5ad files
(optionally also as TileDB-SOMA experiments, --soma), then:

* converts them with `scfm-jax convert --workers 1` and `--workers 2` (each in a fresh process:
  wall time, cells/s per worker, peak RSS of the converter and of its workers);
* reports bytes per cell of the store, of the raw .h5ad, and of the .h5ad's X arrays compressed
  with zstd level 3 in the file's 1 Mi-element chunks (what a zstd-filtered h5ad holds);
* reads 200 batches of 256 cells at random steps with the pipeline in a fresh process (cold: empty
  in-process caches; the OS page cache is dropped first only with --drop-caches, which needs root
  and slows every other process on the machine), then the same steps again (warm); a random step's
  batch is a quarter of a window no other batch read, the pipeline's worst case;
* reads 200 consecutive steps from a random one as the train loop does (`Pipeline.iterate`, its
  prefetch threads), on a freshly opened store: what a training run gets;
* projects the wall time of converting 50M cells with N tasks from the 1-worker rate, and the
  cells/s an 8-accelerator host consumes for the 100M config (FLOPs per cell from bench_train,
  the accelerator's peak) against the training-stream rate;
* runs annbatch's Loader on the same .h5ad files in its own Python (>= 3.12, --annbatch-python),
  with `annbatch_rates.py` (its recommended and default setups, as bench_loader.py).

    python benchmarks/bench_scale.py --workdir /tmp/scfm-scale              # 1,000,000 cells
    python benchmarks/bench_scale.py --workdir /tmp/scfm-scale-20k --cells 20000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BATCH = 256
MIN_GENES, MAX_GENES = 500, 5000
H5AD_CHUNK = 1 << 20


def make_h5ad(path: Path, cells: int, genes: int, median_genes: int, seed: int) -> int:
    """One CSR .h5ad written in row chunks (memory bounded by the chunk); returns its non-zeros."""
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    rng = np.random.default_rng(seed)
    gene_rng = np.random.default_rng(0)   # the same genes in every source
    popularity = gene_rng.lognormal(0.0, 1.0, genes)
    popularity /= popularity.sum()
    mean = gene_rng.lognormal(0.0, 1.2, genes)      # per-gene mean count when expressed
    chunk = 2048
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": [cells, genes]})
        data = x.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(H5AD_CHUNK,))
        indices = x.create_dataset("indices", (0,), np.int32, maxshape=(None,),
                                   chunks=(H5AD_CHUNK,))
        indptr, total = [np.zeros(1, np.int64)], 0
        for start in range(0, cells, chunk):
            n = min(chunk, cells - start)
            lengths = np.clip(rng.lognormal(np.log(median_genes), 0.6, n), MIN_GENES,
                              MAX_GENES).astype(np.int64)
            # Genes by popularity without replacement: the smallest exponential keys / weight.
            cols, vals = [], []
            for length in lengths.tolist():
                keys = rng.exponential(size=genes) / popularity
                chosen = np.sort(np.argpartition(keys, length - 1)[:length]).astype(np.int32)
                cols.append(chosen)
            cols = np.concatenate(cols)
            shape = 0.6
            vals = 1 + rng.negative_binomial(shape, shape / (shape + mean[cols]))
            data.resize((total + len(cols),))
            indices.resize((total + len(cols),))
            data[total:] = vals.astype(np.float32)
            indices[total:] = cols
            indptr.append(total + np.cumsum(lengths))
            total += len(cols)
        x.create_dataset("indptr", data=np.concatenate(indptr))
        obs = pd.DataFrame({
            "cell_type": pd.Categorical(rng.choice([f"type{i}" for i in range(40)], cells)),
            "donor_id": pd.Categorical(rng.choice([f"donor{seed}-{i}" for i in range(8)], cells))},
            index=[f"s{seed}-cell{i}" for i in range(cells)])
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=[f"GENE{i}" for i in range(genes)]))
        for group in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
            write_elem(f, group, {})
    return total


def zstd_bytes(path: Path) -> int:
    """Bytes of the .h5ad's X arrays compressed with zstd-3 in the file's chunks."""
    import h5py
    from numcodecs import Zstd

    codec, size = Zstd(level=3), 0
    with h5py.File(path, "r") as f:
        for name in ("data", "indices", "indptr"):
            array = f["X"][name]
            for start in range(0, array.shape[0], H5AD_CHUNK):
                size += len(codec.encode(array[start:start + H5AD_CHUNK]))
    return size


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() \
        else path.stat().st_size


def peak_rss_mb(pid: int | str = "self") -> float:
    """The process's resident-memory high-water mark (VmHWM; ru_maxrss would carry the parent's
    peak over fork + exec)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:   # the thread or process ended meanwhile
            continue
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found


def timed_convert(command: list[str]) -> dict:
    """Run a conversion; its wall time and the peak RSS of the converter and of its workers."""
    t = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    peaks: dict[int, float] = {}
    while process.poll() is None:
        for pid in [process.pid, *_descendants(process.pid)]:
            try:
                peaks[pid] = max(peaks.get(pid, 0.0), peak_rss_mb(pid))
            except OSError:   # it ended between the listing and the read
                pass
        time.sleep(0.1)
    seconds = time.perf_counter() - t
    if process.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{process.stderr.read()[-3000:]}")
    workers = [v for k, v in peaks.items() if k != process.pid]
    return {"seconds": seconds, "rss_mb": peaks.get(process.pid, 0.0),
            "workers_rss_mb": max(workers, default=0.0)}


def child_read(store_path: str, batches: int, seed: int):
    """Pipeline batches at random steps, twice (cold, then warm), then the training stream: the
    loop's own `Pipeline.iterate` (consecutive steps, its prefetch threads) from a random step, on
    a freshly opened store; prints cells/s of each."""
    from scfm_jax.data.pipeline import Pipeline
    from scfm_jax.data.store import CellStore

    def open_pipeline():
        store = CellStore.open(store_path)
        return Pipeline(store, global_batch_size=BATCH, seed=seed,
                        buckets=(1024, 2048, 3072, 4096, MAX_GENES), max_nonzero=MAX_GENES,
                        process_index=0, process_count=1)

    t = time.perf_counter()
    pipeline = open_pipeline()
    opened = time.perf_counter() - t
    steps_per_epoch = max(1, len(pipeline.cells) // pipeline.global_batch_size)
    steps = np.random.default_rng(seed).integers(0, 100 * steps_per_epoch, batches + 1)
    rates = []
    for _ in ("cold", "warm"):
        t = time.perf_counter()
        cells = sum(pipeline.batch(int(s))["gene_ids"].shape[0] for s in steps[:batches])
        rates.append(cells / (time.perf_counter() - t))
    stream = open_pipeline()   # its own page cache: the stream starts cold in-process
    t = time.perf_counter()
    with stream.iterate(int(steps[-1]), batches) as batches_of_the_loop:
        cells = sum(batch["gene_ids"].shape[0] for _, batch in batches_of_the_loop)
    stream_rate = cells / (time.perf_counter() - t)
    print(json.dumps({"open_s": opened, "cold": rates[0], "warm": rates[1], "stream": stream_rate,
                      "prefetch": stream.prefetch, "rss_mb": peak_rss_mb()}))


ANNBATCH_RATES = Path(__file__).with_name("annbatch_rates.py")


def run_json(command: list[str], **kwargs) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode:
        sys.exit(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def drop_page_cache():
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/scfm-scale")
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=19_264)
    parser.add_argument("--median-genes", type=int, default=1_500)
    parser.add_argument("--sources", type=int, default=4, help=".h5ad files the cells are split in")
    parser.add_argument("--soma", action="store_true",
                        help="also write the sources as TileDB-SOMA experiments and convert those")
    parser.add_argument("--compression", choices=["none", "zstd", "blosc"], default="blosc")
    parser.add_argument("--shard-size", type=int, default=65_536)
    parser.add_argument("--batches", type=int, default=200, help="pipeline batches of 256 cells")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the OS page cache before the cold read (root; machine-wide)")
    parser.add_argument("--tasks", default="1,8,32,128", help="N of the 50M-cell projection")
    parser.add_argument("--flops-per-cell", type=float, default=4.105e12,
                        help="train-step FLOPs per cell of the 100M config (bench_train)")
    parser.add_argument("--accelerator-tflops", type=float, default=989.0,
                        help="peak TFLOP/s of one accelerator (default: H100 SXM bf16 dense)")
    parser.add_argument("--accelerators", type=int, default=8)
    parser.add_argument("--annbatch-python", default="/work/venv-annbatch/bin/python",
                        help="a Python >= 3.12 with annbatch installed ('' to skip)")
    parser.add_argument("--reconvert", action="store_true",
                        help="convert again even where an earlier run left a store and its figures")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the sources (.h5ad, --soma experiments) and stop: the measured "
                             "part can then run on a quiet machine")
    parser.add_argument("--child-read", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_read:
        return child_read(args.child_read, args.batches, seed=0)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.cells}x{args.genes}x{args.median_genes}x{args.sources}"
    per_cell = args.median_genes * 1.2 * 8   # float32 value + int32 index, log-normal mean
    stores = (2 if args.soma else 1) * 2 * (1.0 if args.compression == "none" else 0.3)
    copies = 1 + stores + (0.5 if args.soma else 0) + (1 if args.annbatch_python else 0)
    needed = max(0.0, args.cells * per_cell * copies - folder_bytes(work))   # less what is there
    free = shutil.disk_usage(work).free
    print(f"about {needed / 1e9:,.0f} GB to write under {work} ({free / 1e9:,.0f} GB free)")
    if needed > 0.9 * free:
        sys.exit("not enough free disk for this --cells; choose a smaller --cells or --workdir")

    sizes = [args.cells // args.sources + (i < args.cells % args.sources)
             for i in range(args.sources)]
    h5ads = [work / f"source{i}-{tag}.h5ad" for i in range(args.sources)]
    nnz = 0
    t = time.perf_counter()
    for i, (path, n) in enumerate(zip(h5ads, sizes)):
        if not path.exists():
            partial = path.with_suffix(".partial")
            make_h5ad(partial, n, args.genes, args.median_genes, seed=i + 1)
            partial.rename(path)
    import h5py
    for path in h5ads:
        with h5py.File(path, "r") as f:
            nnz += f["X"]["data"].shape[0]
    print(f"{args.sources} .h5ad sources ready ({time.perf_counter() - t:.0f} s), "
          f"{nnz / args.cells:,.0f} non-zero genes per cell", flush=True)

    inputs = {"h5ad": [str(p) for p in h5ads]}
    if args.soma:
        import tiledbsoma.io
        somas = []
        for path in h5ads:
            uri = path.with_suffix(".soma")
            if not (uri / "ms").exists():
                shutil.rmtree(uri, ignore_errors=True)
                tiledbsoma.io.from_h5ad(str(uri), str(path), measurement_name="RNA",
                                        X_layer_name="raw")
            somas.append(str(uri))
        inputs["soma"] = somas
    if args.prepare_only:
        return None

    conversions = []
    for kind, paths in inputs.items():
        for workers in (1, 2):
            store = work / f"store-{kind}-w{workers}-{tag}"
            # each conversion's figures are kept beside its store, so a run that fails later
            # (reading, annbatch) resumes with them instead of converting again (--reconvert does)
            saved = store.with_name(store.name + ".json")
            if saved.exists() and not args.reconvert:
                conversions.append(json.loads(saved.read_text()))
                print(f"converted {kind} with {workers} worker(s): {saved} (an earlier run)",
                      flush=True)
                continue
            command = [sys.executable, "-m", "scfm_jax.main", "convert", *paths, "--output", str(store),
                       "--vocabulary", "from-data", "--shard-size", str(args.shard_size),
                       "--compression", args.compression, "--workers", str(workers),
                       "--no-progress", *(["--soma"] if kind == "soma" else [])]
            shutil.rmtree(store, ignore_errors=True)
            result = timed_convert(command)
            conversions.append({"kind": kind, "workers": workers, "store": str(store), **result,
                                "bytes": folder_bytes(store), "load_average": os.getloadavg()[0]})
            saved.write_text(json.dumps(conversions[-1]))
            print(f"converted {kind} with {workers} worker(s) in {result['seconds']:.0f} s",
                  flush=True)

    store = conversions[0]["store"]
    # the conversions leave gigabytes of dirty pages: the reads must not compete with their writeback
    os.sync()
    if args.drop_caches:
        drop_page_cache()
    read = run_json([sys.executable, __file__, "--child-read", store, "--batches",
                     str(args.batches)])
    annbatch = None
    if args.annbatch_python and Path(args.annbatch_python).exists():
        if args.drop_caches:
            drop_page_cache()
        annbatch = run_json([args.annbatch_python, str(ANNBATCH_RATES), ",".join(inputs["h5ad"]),
                             str(work / f"annbatch-{tag}.zarr"), str(args.batches * BATCH), "3"])
        annbatch = {f"{r['setup']} {r['batch_size']}": r["rate"] for r in annbatch["rows"]} | {
            "build_s": annbatch["build_s"], "versions": annbatch["versions"]}

    raw = sum(folder_bytes(p) for p in h5ads)
    zstd = sum(zstd_bytes(p) for p in h5ads)
    print(f"\nsynthetic {args.cells:,} cells x {args.genes:,} genes in {args.sources} sources, "
          f"{nnz / args.cells:,.0f} non-zero genes per cell; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; store compression {args.compression}")
    header = f"{'conversion':<24}{'wall s':>9}{'cells/s':>11}{'cells/s/worker':>16}" \
             f"{'peak RSS MB':>13}{'workers MB':>12}{'bytes/cell':>12}"
    print(header + "\n" + "-" * len(header))
    for c in conversions:
        rate = args.cells / c["seconds"]
        print(f"{c['kind'] + ', ' + str(c['workers']) + ' worker(s)':<24}{c['seconds']:>9.1f}"
              f"{rate:>11,.0f}{rate / c['workers']:>16,.0f}{c['rss_mb']:>13,.0f}"
              f"{c['workers_rss_mb']:>12,.0f}"
              f"{c['bytes'] / args.cells:>12,.0f}")
    print("-" * len(header))
    print(f"raw .h5ad: {raw / args.cells:,.0f} bytes/cell; its X arrays with zstd-3: "
          f"{zstd / args.cells:,.0f} bytes/cell; store / zstd h5ad = "
          f"{conversions[0]['bytes'] / zstd:.2f}")
    print(f"pipeline, {args.batches} batches of {BATCH} at random steps (each from a window no "
          f"other batch read): cold {read['cold']:,.0f} cells/s, warm {read['warm']:,.0f} cells/s "
          f"(open {read['open_s']:.1f} s, peak RSS {read['rss_mb']:,.0f} MB)"
          + ("" if args.drop_caches else "; OS page cache not dropped (--drop-caches)"))
    print(f"pipeline, the training stream ({args.batches} consecutive steps from a random one, "
          f"Pipeline.iterate with {read['prefetch']} prefetch threads, as `scfm-jax train` reads): "
          f"{read['stream']:,.0f} cells/s")
    if annbatch:
        recommended, default = annbatch["recommended 256"], annbatch["default 256"]
        print(f"annbatch {annbatch['versions']['annbatch']} Loader on the same .h5ad cells, batches "
              f"of {BATCH} (median of 3 runs of {args.batches} batches): recommended setup (zarrs, "
              f"X-only load_adata) {recommended:,.0f} cells/s, default setup {default:,.0f} cells/s"
              + (f" (collection built in {annbatch['build_s']:.0f} s)" if annbatch["build_s"] else "")
              + f"; pipeline training stream / annbatch recommended: "
                f"{read['stream'] / recommended:.2f}x, / annbatch default: {read['stream'] / default:.2f}x")
    consumed = args.accelerators * args.accelerator_tflops * 1e12 / args.flops_per_cell
    print(f"an {args.accelerators}-accelerator host at 100% MFU of {args.accelerator_tflops:g} "
          f"TFLOP/s, {args.flops_per_cell / 1e12:.2f} TFLOP per cell (100M config): "
          f"{consumed:,.0f} cells/s; the pipeline (one process) feeds {read['stream'] / consumed:.1f}x "
          f"that in the training stream (target >= 10x), {read['cold'] / consumed:.1f}x at cold "
          f"random steps")
    per_worker = args.cells / conversions[0]["seconds"]
    projection = ", ".join(f"{n} tasks {50e6 / (per_worker * n) / 3600:,.1f} h"
                           for n in (int(x) for x in args.tasks.split(",")))
    print(f"50M cells at {per_worker:,.0f} cells/s per task (linear in tasks): {projection}")
    (work / f"results-{tag}.json").write_text(json.dumps(
        {"conversions": conversions, "read": read, "annbatch": annbatch, "raw_bytes": raw,
         "zstd_bytes": zstd, "cells": args.cells, "nnz": nnz}, indent=1))
    return None


if __name__ == "__main__":
    main()
