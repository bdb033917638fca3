"""`scfm-jax embed`: scFoundation cell / gene embeddings, the batched `get_embedding.py`.

    scfm-jax embed --checkpoint models.ckpt --input cells.h5ad --output embedded.h5ad
    scfm-jax embed --checkpoint models.ckpt --output-type gene --input cells.h5ad --output genes.zarr
    scfm-jax embed --checkpoint runs/100m --store gs://bucket/store --output gs://bucket/embeddings

The input's genes (var_names, `--gene-column`, or the csv's columns) are aligned with the
vocabulary (missing genes as zeros, columns reordered, extra genes dropped). Outputs:
  cell             the input cells (h5ad) with obsm["X_scfoundation"]
  gene, gene_batch a zarr array [cells, vocabulary genes, decoder width]; gene_batch runs all
                   cells as one batch (the key stabiliser spans them), as the official tool does
  gene_expression  an h5ad whose X is the predicted expression, var the vocabulary
With `--store`, every device of every process embeds a cell store's cells into a resumable zarr
output (docs/inference.md); `scfm_jax.analysis.store_inference.to_anndata` reads it back.
"""
from __future__ import annotations

import argparse
import sys

from scfm_jax.analysis import store_cli
from scfm_jax.errors import UsageError

OUTPUT_TYPES = ("cell", "gene", "gene_batch", "gene_expression")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scfm-jax embed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", required=True,
                   help="official models.ckpt (with --key), a scfm-jax training workdir, or "
                        "its checkpoints on a bucket (gs://bucket/run/checkpoints)")
    p.add_argument("--key", choices=("cell", "gene", "rde"), default=None,
                   help="weight set of an official checkpoint (default: cell for --output-type "
                        "cell, gene otherwise)")
    p.add_argument("--step", type=store_cli.non_negative_int, default=None,
                   help="checkpoint step of a training workdir (default: the latest)")
    p.add_argument("--vocabulary", default=None,
                   help="'scfoundation' (default for official checkpoints) or a "
                        "gene_name<TAB>index file; a workdir's own vocabulary by default")
    p.add_argument("--input", help="h5ad, or csv with cells as rows, genes as columns")
    p.add_argument("--output", required=True,
                   help="h5ad (cell, gene_expression) or zarr (gene); with --store a folder or "
                        "gs:// / s3:// URL of the resumable output")
    p.add_argument("--output-type", choices=OUTPUT_TYPES, default="cell")
    p.add_argument("--pool", choices=("all", "max"), default="all",
                   help="cell pooling: all = [S, T, max, mean] (4x width), max = max over tokens")
    p.add_argument("--tgthighres", default="t4",
                   help="T token: tX (T = X), fX (log10(total * X)), aX (log10(total) + X)")
    p.add_argument("--pre-normalized", choices=("F", "T", "A"), default="F",
                   help="F: raw counts; T: log1p-normalised values; A: normalised values plus a "
                        "last column with the raw total count")
    p.add_argument("--input-type", choices=("singlecell", "bulk"), default="singlecell")
    p.add_argument("--batch-size", type=store_cli.positive_int, default=None,
                   help="cells per forward (default 16 for cell, 4 for gene outputs; gene_batch "
                        "always runs all cells as one batch)")
    p.add_argument("--layer", default=None,
                   help="h5ad: read this layer instead of X ('raw' reads adata.raw)")
    p.add_argument("--gene-column", default=None, help="h5ad var column holding the gene symbols")
    p.add_argument("--min-coverage", type=store_cli.fraction, default=0.5,
                   help="refuse inputs of which less than this fraction of the expression maps "
                        "onto the vocabulary (default 0.5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    store_cli.add_arguments(p)
    return p


def run(args) -> None:
    from scfm_jax.analysis import embedding

    key = args.key or embedding.DEFAULT_KEY[args.output_type]
    if not args.store:
        embedding.require_output_suffix(args.output_type, args.output)
    store_cli.check_output(args, "embed")
    if args.store:
        return _run_store(args, embedding.load_scfoundation(
            args.checkpoint, key=key, step=args.step, vocabulary=args.vocabulary))
    adata, totals = embedding.read_cells(args.input, layer=args.layer,
                                         pre_normalized=args.pre_normalized)
    model = embedding.load_scfoundation(args.checkpoint, key=key, step=args.step,
                                        vocabulary=args.vocabulary)
    output = embedding.embed_file(
        model, adata, args.output, totals=totals, output_type=args.output_type, pool=args.pool,
        tgthighres=args.tgthighres, pre_normalized=args.pre_normalized,
        input_type=args.input_type, batch_size=args.batch_size, gene_column=args.gene_column,
        min_coverage=args.min_coverage, progress=not args.quiet)
    print(f"wrote {output}", file=sys.stderr)


def _run_store(args, model) -> None:
    from scfm_jax.analysis import embedding

    if args.output_type != "cell":
        raise UsageError("--store computes cell embeddings (--output-type cell)")
    summary = embedding.embed_store(
        model, args.store, args.output,
        selection=args.selection,
        tgthighres=args.tgthighres, pool=args.pool, pre_normalized=args.pre_normalized,
        min_coverage=args.min_coverage, batch_size=args.batch_size, chunk_cells=args.chunk_cells,
        overwrite=args.overwrite, progress=not args.quiet)
    store_cli.report(args.output, summary)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    store_cli.check_source(args)
    store_cli.join_processes(args)
    run(args)   # errors: one line from scfm_jax.main
    return 0


if __name__ == "__main__":
    sys.exit(main())
