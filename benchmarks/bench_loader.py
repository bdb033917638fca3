"""Loader throughput: our pipeline and reader vs anndata backed mode vs annbatch (a table).

Builds a synthetic dataset (default 200,000 cells x 19,264 genes, ~2,000 non-zero genes per cell,
negative-binomial counts) as an .h5ad, converts it with `scfm-jax convert` (rate and peak memory),
then measures cells/s, each the median of --runs runs over --batches batches of 256 cells:

* pipeline: `Pipeline.iterate` end to end (shuffled, padded [256, K] batches, 2 prefetch threads)
* reader:   `CellStore.read` of the same batches (sorted cell indices), no padding; and
            `CellStore.row_views`, the zero-copy views into the page cache the pipeline uses
* anndata:  `read_h5ad(backed="r")`, random batches `X[sorted(idx)]` from the same data
* annbatch: `annbatch.Loader` on its own pre-shuffled zarr collection of the same cells, in its own
            Python >= 3.12 (`--annbatch-python`: a venv with `pip install annbatch zarrs`), run by
            `annbatch_rates.py`: its README's recommended setup (zarrs codec pipeline, a
            `load_adata` opening only X as a sparse dataset) at batch 256 and 4,096, and its
            default setup at batch 256; our rows' ratios to each are printed

    python benchmarks/bench_loader.py --workdir /tmp/scfm-bench [--cells 200000]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BATCH = 256


def make_h5ad(path: Path, cells: int, genes: int, nonzero: int, seed: int = 0):
    """Write a CSR .h5ad in row chunks (never the whole matrix in memory)."""
    import anndata
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    rng = np.random.default_rng(seed)
    p = nonzero / genes
    chunk = 4096
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": [cells, genes]})
        data = x.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(1 << 20,))
        indices = x.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(1 << 20,))
        indptr = [np.zeros(1, np.int64)]
        total = 0
        for start in range(0, cells, chunk):
            n = min(chunk, cells - start)
            # Sorted random genes per cell: cumulative geometric gaps, cut at the gene count.
            gaps = rng.geometric(p, size=(n, int(nonzero * 1.4)))
            positions = np.cumsum(gaps, axis=1) - 1
            keep = positions < genes
            lengths = keep.sum(1)
            cols = positions[keep].astype(np.int32)
            values = (1 + rng.negative_binomial(2, 0.4, size=len(cols))).astype(np.float32)
            data.resize((total + len(cols),))
            indices.resize((total + len(cols),))
            data[total:] = values
            indices[total:] = cols
            indptr.append(total + np.cumsum(lengths))
            total += len(cols)
        x.create_dataset("indptr", data=np.concatenate(indptr))
        obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice([f"type{i}" for i in range(20)],
                                                                   cells))},
                           index=[f"cell{i}" for i in range(cells)])
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=[f"GENE{i}" for i in range(genes)]))
        for group in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
            write_elem(f, group, {})
    return anndata.read_h5ad(path, backed="r").shape


def timed(function, runs: int) -> float:
    rates = []
    for _ in range(runs):
        rates.append(function())
    return statistics.median(rates)


ANNBATCH_RATES = Path(__file__).with_name("annbatch_rates.py")


# glibc returns every large freed array to the OS and page-faults the next one in; a loader that
# allocates fresh batches at 100k+ cells/s spends most of its time in those faults. Raising the
# mmap threshold (or using tcmalloc/jemalloc) keeps the memory in the heap for reuse.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(2 << 30)}


def measure(args, h5ad: Path, store_path: Path) -> list[tuple[str, float]]:
    """Loader rates in this process (run as a child with the allocator settings under test)."""
    from scfm_jax.data.pipeline import Pipeline
    from scfm_jax.data.store import CellStore

    store = CellStore.open(store_path)
    pipeline = Pipeline(store, global_batch_size=BATCH, seed=0,
                        buckets=(1024, 2048, 2304, 2560, 3072), max_nonzero=3072, block_size=64,
                        window_blocks=16, process_index=0, process_count=1, prefetch=2)
    run_counter = iter(range(10_000))

    def pipeline_rate():
        start = next(run_counter) * args.batches
        t = time.perf_counter()
        with pipeline.iterate(start, args.batches) as batches:
            n = sum(batch["gene_ids"].shape[0] for _, batch in batches)
        return n / (time.perf_counter() - t)

    def reader_rate():
        start = next(run_counter) * args.batches
        orders = [np.sort(pipeline.global_cells(s)) for s in range(start, start + args.batches)]
        t = time.perf_counter()
        n = sum(store.read(cells).num_rows for cells in orders)
        return n / (time.perf_counter() - t)

    def views_rate():
        start = next(run_counter) * args.batches
        orders = [np.sort(pipeline.global_cells(s)) for s in range(start, start + args.batches)]
        t = time.perf_counter()
        n = sum(len(store.row_views(cells)[0]) for cells in orders)
        return n / (time.perf_counter() - t)

    def anndata_rate():
        import anndata
        adata = anndata.read_h5ad(h5ad, backed="r")
        rng = np.random.default_rng(next(run_counter))
        t = time.perf_counter()
        n = 0
        for _ in range(args.batches):
            n += adata.X[np.sort(rng.choice(adata.n_obs, BATCH, replace=False))].shape[0]
        adata.file.close()
        return n / (time.perf_counter() - t)

    rows = [("scfm-jax pipeline, padded batches of 256", timed(pipeline_rate, args.runs)),
            ("scfm-jax reader, CellStore.read", timed(reader_rate, args.runs)),
            ("scfm-jax reader, CellStore.row_views (no copy)", timed(views_rate, args.runs))]
    if args.measure == "all":
        rows.append(("anndata backed h5ad, random batches", timed(anndata_rate, args.runs)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/scfm-bench")
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=19_264)
    parser.add_argument("--nonzero", type=int, default=2_000)
    parser.add_argument("--batches", type=int, default=100, help="batches of 256 per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="scfm-jax convert --workers")
    parser.add_argument("--measure", choices=["ours", "all"], help=argparse.SUPPRESS)
    parser.add_argument("--annbatch-python", default="/work/venv-annbatch/bin/python",
                        help="a Python with annbatch installed ('' to skip)")
    parser.add_argument("--baseline-src", default="",
                        help="a folder holding another scfm_jax package (e.g. `git archive REV "
                             "scfm_jax | tar -x -C DIR`): its loader is measured in the same run "
                             "and labelled 'baseline'")
    args = parser.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.cells}x{args.genes}x{args.nonzero}"
    h5ad = work / f"synthetic-{tag}.h5ad"
    store_path = work / f"store-{tag}"
    if args.measure:
        print(json.dumps(measure(args, h5ad, store_path)))
        return None
    if not h5ad.exists():
        t = time.perf_counter()
        shape = make_h5ad(h5ad, args.cells, args.genes, args.nonzero)
        print(f"wrote {h5ad} {shape} in {time.perf_counter() - t:.0f} s", flush=True)

    # Conversion: a separate process, so its peak RSS is measured alone.
    if not (store_path / "manifest.json").exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "scfm_jax.main", "convert", str(h5ad), "--output",
                        str(store_path), "--vocabulary", "from-data", "--overwrite",
                        "--no-progress", "--workers", str(args.workers)], check=True)
        convert_seconds = time.perf_counter() - t
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        (work / f"convert-{tag}.json").write_text(json.dumps(
            {"seconds": convert_seconds, "peak_mb": peak_mb}))
    conversion = json.loads((work / f"convert-{tag}.json").read_text())

    rows = []
    versions = [("", os.environ.get("PYTHONPATH", ""))]
    if args.baseline_src:
        versions.append(("baseline ", str(Path(args.baseline_src).resolve())))
    for env_name, env in (("glibc defaults", {}), ("MALLOC_MMAP_THRESHOLD_=1GiB", TUNED_MALLOC)):
        which = "ours" if not env else "all"
        for label, source in versions:   # interleaved, so both versions see the same load
            result = subprocess.run(
                [sys.executable, __file__, "--measure", which, "--workdir", str(work), "--cells",
                 str(args.cells), "--genes", str(args.genes), "--nonzero", str(args.nonzero),
                 "--batches", str(args.batches), "--runs", str(args.runs)],
                env={**os.environ, **env, "PYTHONPATH": source}, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"measurement failed:\n{result.stderr}")
            for name, rate in json.loads(result.stdout.strip().splitlines()[-1]):
                if label and not name.startswith("scfm-jax"):
                    continue   # anndata once is enough
                rows.append((f"{label}{name} [{env_name}]", rate))
    annbatch_note, annbatch_rows, peers = "", [], []
    if args.annbatch_python and Path(args.annbatch_python).exists():
        result = subprocess.run(
            [args.annbatch_python, str(ANNBATCH_RATES), str(h5ad),
             str(work / f"annbatch-{tag}.zarr"), str(args.batches * BATCH), str(args.runs)],
            capture_output=True, text=True, env={**os.environ, **TUNED_MALLOC})
        if result.returncode == 0:
            out = json.loads(result.stdout.strip().splitlines()[-1])
            versions = ", ".join(f"{k} {v}" for k, v in out["versions"].items())
            for row in out["rows"]:
                settings = ("zarrs codec pipeline, X-only load_adata"
                            if row["setup"] == "recommended"
                            else "zarr codec pipeline, default load_adata")
                peers.append((f"{row['setup']} batch {row['batch_size']}", row["rate"]))
                annbatch_rows.append((f"annbatch {row['setup']} ({settings}), batch "
                                      f"{row['batch_size']} [MALLOC_MMAP_THRESHOLD_=1GiB]",
                                      row["rate"]))
            annbatch_note = (f"annbatch: {versions}; Loader(chunk_size=32, preload_nchunks=256, "
                             "shuffle=True) on its own pre-shuffled collection of the same cells")
            if out["build_s"]:
                annbatch_note += f"; collection built in {out['build_s']:.0f} s"
        else:
            annbatch_note = "annbatch failed: " + result.stderr.strip().splitlines()[-1]
    else:
        annbatch_note = (f"annbatch skipped: no Python at --annbatch-python "
                         f"{args.annbatch_python!r} (python3.12 -m venv V && "
                         "V/bin/pip install annbatch zarrs)")
    rows += annbatch_rows
    manifest = json.loads((store_path / "manifest.json").read_text())
    print(f"\nsynthetic {args.cells:,} cells x {args.genes:,} genes, ~{args.nonzero:,} non-zero per "
          f"cell, {manifest['nnz'] / manifest['num_cells']:,.0f} measured; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}; median of "
          f"{args.runs} runs x {args.batches} batches of {BATCH}")
    print(f"{'loader [allocator]':<100} {'cells/s':>10}")
    print("-" * 111)
    for name, rate in rows:
        print(f"{name:<100} {rate:>10,.0f}")
    print("-" * 111)
    rates = dict(rows)
    if peers:
        print(f"{'ratio to annbatch [same allocator]':<50}"
              + "".join(f"{label:>24}" for label, _ in peers))
        for name, rate in rows:
            if "MALLOC" in name and not name.startswith(("annbatch", "anndata")):
                print(f"{name.split(' [')[0]:<50}"
                      + "".join(f"{rate / peer:>23.2f}x" for _, peer in peers))
    for name, rate in rows:
        if f"baseline {name}" in rates:
            print(f"{name}: {rate / rates[f'baseline {name}']:.2f}x the baseline")
    print(f"scfm-jax convert: {args.cells / conversion['seconds']:,.0f} cells/s "
          f"({conversion['seconds']:.0f} s), peak RSS {conversion['peak_mb']:,.0f} MB")
    if annbatch_note:
        print(annbatch_note)
    return rates


if __name__ == "__main__":
    main()
