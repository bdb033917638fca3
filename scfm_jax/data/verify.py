"""`scfm-jax verify STORE`: read every byte of a cell store and report each damaged shard.

`CellStore.open` only checks that every file is present and reading checks the chunks it touches;
this reads all of them: each file's SHA-256 against the manifest, each X chunk's CRC32C, each X
array's SHA-256, indptr against the shard's counts, gene ids in range and sorted, counts finite
and positive.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np

from scfm_jax.data import store as store_lib
from scfm_jax.data.vocabulary import Vocabulary


def _shard_problem(url: str, kvstore, entry: dict, num_genes: int) -> str | None:
    shard = store_lib._Shard(url, kvstore, entry)
    root = kvstore.read(entry["key"] + "zarr.json").result()
    try:
        stats = json.loads(root.value)["attributes"][store_lib.SHARD_ATTRIBUTE]
    except (ValueError, KeyError, TypeError):
        return "zarr.json: missing or not the shard's metadata"
    if any(stats.get(k) != entry[k] for k in ("num_cells", "nnz", "chunks", "sha256", "files")):
        return "zarr.json: its shard stats do not match the manifest"
    try:
        shard.check_files("")
        indptr = shard.indptr
        arrays = {"indptr": indptr}
        for name in ("data", "indices"):
            arrays[name] = shard.read(f"X/{name}", shard._open(f"X/{name}"))
    except store_lib.StoreDamaged as e:
        return f"{e.name}: {e.problem}"
    for name, values in arrays.items():
        dtype = {"data": "<f4", "indices": "<i4", "indptr": "<i8"}[name]
        if hashlib.sha256(values.astype(dtype).tobytes()).hexdigest() != entry["sha256"][name]:
            return f"X/{name}: its values do not match the manifest's SHA-256"
    data, indices = arrays["data"], arrays["indices"]
    if len(indices) and (indices.min() < 0 or indices.max() >= num_genes):
        return f"X/indices: gene ids outside [0, {num_genes})"
    starts = np.zeros(len(indices), bool)
    starts[indptr[:-1][np.diff(indptr) > 0]] = True
    if np.any((np.diff(indices) <= 0) & ~starts[1:]):
        return "X/indices: gene ids are not increasing within a cell"
    if not np.all(np.isfinite(data) & (data > 0)):
        return "X/data: counts that are not finite and positive"
    return None


def _problems(url: str, kvstore, entries: list[dict], num_genes: int) -> dict[str, str]:
    """{shard key: its first problem} of the shards described by `entries` (manifest entries)."""
    missing = store_lib.missing_files(kvstore, entries)
    problems = {}
    for entry in entries:
        key = entry["key"].rstrip("/")
        if entry["key"] in missing:
            names = missing[entry["key"]]
            problems[key] = f"{names[0]}: missing" + (f" (and {len(names) - 1} more files)"
                                                      if len(names) > 1 else "")
            continue
        problem = _shard_problem(url, kvstore, entry, num_genes)
        if problem:
            problems[key] = problem
    return problems


def shard_problems(url, kvstore, indices: list[int], num_genes: int) -> dict[int, str]:
    """{index: first problem} of complete shards, each checked against the stats it carries (a
    rerun of `convert` checks the shards it would skip; there may be no manifest yet)."""
    entries = []
    for index in indices:
        stats = store_lib.shard_stats(kvstore, index)
        entries.append({"key": store_lib.shard_key(index)} | {
            name: stats.get(name) for name in ("num_cells", "nnz", "chunks", "sha256", "files")})
    found = _problems(str(url), kvstore, entries, num_genes)
    return {index: found[store_lib.shard_key(index).rstrip("/")] for index in indices
            if store_lib.shard_key(index).rstrip("/") in found}


def verify(url) -> tuple[dict, dict[str, str]]:
    """(manifest, {shard key: its first problem}) of the store at `url`; empty dict: intact."""
    kvstore = store_lib.open_kvstore(url)
    manifest = store_lib.read_json(kvstore, store_lib.MANIFEST)
    if manifest is None:   # CellStore.open words the unfinished / not-a-store cases
        store_lib.CellStore.open(url)
    if manifest.get("format_version") != store_lib.FORMAT_VERSION:
        store_lib.CellStore.open(url)   # raises the version error
    genes = kvstore.read(store_lib.GENES).result()
    problems: dict[str, str] = {}
    if genes.state != "value":
        problems[store_lib.GENES] = "missing"
    else:
        vocabulary = Vocabulary.from_text(genes.value.decode(), manifest["vocabulary"]["name"])
        if vocabulary.digest != manifest["vocabulary"]["digest"]:
            problems[store_lib.GENES] = "does not match the manifest's vocabulary digest"
    num_genes = int(manifest["vocabulary"]["size"])
    problems.update(_problems(str(url), kvstore, manifest["shards"], num_genes))
    return manifest, problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scfm-jax verify", description=__doc__.split("\n\n")[0])
    p.add_argument("store", help="store folder or kvstore URL")
    args = p.parse_args(argv)
    manifest, problems = verify(args.store)
    for where, problem in problems.items():
        print(f"damaged: {where}: {problem}")
    shards = len(manifest["shards"])
    what = (f"{args.store}: {shards} shards, {manifest['num_cells']} cells, {manifest['nnz']} "
            "non-zeros")
    if problems:
        print(f"{what}: {len(problems)} damaged; run the same `scfm-jax convert` again: it writes "
              "the damaged shards again", file=sys.stderr)
        return 1
    print(f"{what}: all intact")
    return 0
