"""Batch integration: cell embeddings of checkpoints scored by scib-metrics beside PCA, Harmony.

`integration_benchmark` computes the cell embeddings of the given checkpoints (scFoundation
`X_scfoundation`: the encoder's pooled cell embedding; scMulan `X_scmulan`: the last layer's hidden
state at the first generated cell-type token, as its authors take it), takes embeddings already in
`obsm`, and scores them with `analysis.compare_embeddings` (scib-metrics' Benchmarker) against two
baselines computed in the same run from the counts: `pca` (PCA of the log-normalised highly
variable genes, chosen per batch as scIB does; unintegrated) and `harmony` (Harmony on that PCA,
with the batch key).
"""
from __future__ import annotations

import sys
from pathlib import Path

import anndata
import pandas as pd

from scfm_jax.errors import UnknownName
from scfm_jax.output_safety import staged_folder
from scfm_jax.tasks.task_models import (add_task_arguments, load_task_model,
                                         parse_task_arguments)

PCA_ROW, HARMONY_ROW = "pca", "harmony"
PCA_KEY, HARMONY_KEY = "X_pca_hvg", "X_harmony"  # where the baselines are kept in the user's obsm
N_TOP_GENES = 2000


def _unused_key(key: str, taken) -> str:
    candidate, number = key, 2
    while candidate in taken:
        candidate, number = f"{key}_{number}", number + 1
    return candidate


def integration_benchmark(adata: anndata.AnnData, label_key: str, batch_key: str, *,
                          checkpoints=(), obsm_keys=(), layer: str | None = None,
                          gene_column: str | None = None, vocabulary=None, token_set=None,
                          min_coverage: float = 0.5, n_top_genes: int = N_TOP_GENES,
                          output_dir: str | Path | None = None, umaps: bool = True,
                          batch_size: int = 16, batch_correction=None,
                          progress: bool = True) -> pd.DataFrame:
    """scib-metrics' table: one row per embedding (its obsm key), then `pca` and `harmony`.

    `checkpoints`: scFoundation / scMulan checkpoints (see `task_models.load_task_model`; an
    official scFoundation checkpoint's weight set `cell`) whose embeddings are computed from the
    raw counts (X or `layer`) into `adata.obsm` (`X_scfoundation`, `X_scmulan`; `_2`, ... for a
    second of the same model); `obsm_keys`: embeddings already there. The baselines go to
    `obsm["X_pca_hvg"]` (`n_top_genes` HVGs chosen per batch, 50 PCs) and `obsm["X_harmony"]`.
    Columns: the `source` of each row, scib-metrics' metrics and its `Batch correction`,
    `Bio conservation` and `Total`. `output_dir`: also scib-metrics' summary plot
    (`scib_results.svg`) and, with `umaps`, `umap_<row>.png` coloured by label and batch.
    """
    from scfm_jax.analysis import evaluation, plots

    evaluation.scored_cells(adata, label_key, batch_key)   # bad keys fail before any compute
    for key in obsm_keys:
        if key not in adata.obsm:
            raise UnknownName(f"the input's obsm has no {key!r} (keys: {list(adata.obsm)})")
    sources = {key: "obsm of the input" for key in obsm_keys}
    for checkpoint in checkpoints:
        task_model = load_task_model(checkpoint, vocabulary=vocabulary, token_set=token_set,
                                     key="cell")
        key = _unused_key(task_model.embedding_key, sources)
        task_model.embed(adata, key, layer=layer, gene_column=gene_column,
                         min_coverage=min_coverage, batch_size=batch_size, progress=progress)
        sources[key] = f"{task_model.kind} {task_model.source}"
    evaluation.pca_baseline(adata, layer=layer, n_top_genes=n_top_genes, hvg_batch_key=batch_key,
                            key_added=PCA_KEY)
    evaluation.harmony_baseline(adata, batch_key, basis=PCA_KEY, key_added=HARMONY_KEY)
    sources[PCA_ROW] = f"PCA of the log-normalised {n_top_genes} HVGs (chosen per batch)"
    sources[HARMONY_ROW] = "Harmony (harmonypy) on pca"
    work = anndata.AnnData(obs=adata.obs[[label_key, batch_key]].copy(), obsm={
        **{key: adata.obsm[key] for key in sources if key in adata.obsm},
        PCA_ROW: adata.obsm[PCA_KEY], HARMONY_ROW: adata.obsm[HARMONY_KEY]})
    table = evaluation.compare_embeddings(
        work, label_key, [key for key in sources if key != PCA_ROW], batch_key=batch_key,
        baseline_key=PCA_ROW, plot_dir=output_dir, batch_correction=batch_correction,
        progress=progress)
    table = table.loc[list(sources)]
    table.insert(0, "source", [sources[key] for key in table.index])
    table.index.name = "embedding"
    if output_dir is not None and umaps:
        for key in table.index:
            plots.umap(work, key, color=[label_key, batch_key],
                       save=Path(output_dir) / f"umap_{key.removeprefix('X_')}.png")
    return table


def _parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="scfm-jax evaluate", description="Batch integration of cell embeddings (of "
        "checkpoints, or already in obsm) scored with scib-metrics beside PCA and Harmony.")
    p.add_argument("--input", required=True, help="h5ad of cells with raw counts")
    p.add_argument("--label-key", required=True, help="obs column of the cell labels")
    p.add_argument("--batch-key", required=True, help="obs column of the batches")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--checkpoint", nargs="+", action="extend", default=[], metavar="C",
                   help="checkpoints whose cell embeddings to score (official scFoundation "
                        "models.ckpt, official scMulan .pt with --token-set, or training workdirs)")
    p.add_argument("--obsm", nargs="+", action="extend", default=[], metavar="KEY",
                   help="embeddings already in the input's obsm to score")
    add_task_arguments(p, batch_size=16)
    p.add_argument("--n-top-genes", type=int, default=N_TOP_GENES,
                   help=f"highly variable genes of the PCA baseline (default {N_TOP_GENES})")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP plots")
    return p


def main(argv=None) -> int:
    from scfm_jax.data.anndata_io import read_h5ad

    args = parse_task_arguments(_parser(), argv, "evaluate")
    output = args.output
    adata = read_h5ad(args.input)
    with staged_folder(output, command="evaluate") as folder:
        table = integration_benchmark(
            adata, args.label_key, args.batch_key, checkpoints=args.checkpoint,
            obsm_keys=args.obsm, layer=args.layer, gene_column=args.gene_column,
            vocabulary=args.vocabulary, token_set=args.token_set,
            min_coverage=args.min_coverage, n_top_genes=args.n_top_genes, output_dir=folder,
            umaps=not args.no_umap, batch_size=args.batch_size, progress=not args.quiet)
        table.to_csv(folder / "integration.csv")
    columns = ["Batch correction", "Bio conservation", "Total"]
    print(table[columns].to_string(float_format=lambda v: f"{v:.3f}"), file=sys.stderr)
    print(f"wrote {output}", file=sys.stderr)
    return 0
