"""`scfm-jax annotate`: scMulan zero-shot cell types and embeddings for an h5ad file or a store.

    scfm-jax annotate --checkpoint ckpt_scMulan.pt --vocabulary DIR --input cells.h5ad \\
        --output annotated.h5ad [--counts] [--smooth 15]
    scfm-jax annotate --checkpoint runs/scmulan --input cells.h5ad --output annotated.h5ad --counts
    scfm-jax annotate --checkpoint runs/scmulan --store gs://bucket/store --output gs://bucket/types

`--checkpoint` is an official `.pt` (with `--vocabulary`, the official token-set folder) or a
scfm-jax training workdir (its config carries the token set, its store vocabulary the genes).

The input's genes (symbols or Ensembl IDs in var_names or `--gene-column`) are mapped onto scMulan's
42,117-symbol list with the vocabulary module (duplicates summed, absent genes zero), then the
model's 2,000 genes are taken. `X` must be log1p of counts normalised to 1e4 (what the official tool
expects); `--counts` normalises raw counts first, over all the input's genes. The output is the input
with `obs["cell_type_scmulan"]`, `obs["cell_type_scmulan_coarse"]`, their probabilities
(`..._probability`: what the model gave the generated type; NaN for Unclassified) and
`obsm["X_scmulan"]` added. With `--store`, every device of every process annotates the store's cells
into a resumable zarr output (types as codes, probabilities, embeddings);
`scfm_jax.analysis.store_inference.to_anndata` reads it back.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scfm_jax.analysis import store_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scfm-jax annotate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="official scMulan checkpoint ({'model_args','model'} .pt) or a scfm-jax "
                        "training workdir")
    p.add_argument("--vocabulary", default=None,
                   help="for a .pt: folder with token_set.tsv, gene_set.txt, meta_categories.json")
    p.add_argument("--input", default=None, help="h5ad file")
    p.add_argument("--output", required=True,
                   help="h5ad file to write; with --store a folder or gs:// / s3:// URL")
    p.add_argument("--counts", action="store_true",
                   help="the input holds raw counts: normalise to 1e4 per cell and log1p first")
    p.add_argument("--layer", default=None, help="read this layer instead of X")
    p.add_argument("--gene-list", default=None,
                   help="the symbol list to align onto: a file, or 'scmulan' (downloaded); "
                        "default: total_gene_list_42117.txt in the vocabulary folder, else "
                        "'scmulan'")
    p.add_argument("--gene-column", default=None, help="var column holding the gene names")
    p.add_argument("--min-coverage", type=store_cli.fraction, default=0.5,
                   help="refuse when less than this fraction of the expression maps (default 0.5)")
    p.add_argument("--batch-size", type=store_cli.positive_int, default=None,
                   help="cells per forward (default 16; with --store 16 per device)")
    p.add_argument("--smooth", type=int, default=0, metavar="K",
                   help="also write a kNN-smoothed type over K neighbours of the embedding")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    store_cli.add_arguments(p)
    return p


def main(argv=None) -> int:
    """Errors are reported in one line by scfm_jax.main."""
    args = _parser().parse_args(argv)
    store_cli.check_source(args)
    store_cli.join_processes(args)
    from scfm_jax.analysis import scmulan_tasks
    from scfm_jax.data.anndata_io import check_writable, read_h5ad, write_h5ad
    from scfm_jax.output_safety import OWNER_KEY, owner_record, staged_output

    store_cli.check_output(args, "annotate")
    if args.store:
        annotator = scmulan_tasks.load_annotator(args.checkpoint, vocabulary=args.vocabulary,
                                                 gene_list=args.gene_list)
        summary = scmulan_tasks.annotate_store(
            annotator, args.store, args.output,
            selection=args.selection,
            counts=args.counts, batch_size=args.batch_size, chunk_cells=args.chunk_cells,
            overwrite=args.overwrite, progress=not args.quiet)
        store_cli.report(args.output, summary)
        return 0
    adata = read_h5ad(args.input)
    check_writable(adata, Path(args.output).absolute().parent)
    annotator = scmulan_tasks.load_annotator(args.checkpoint, vocabulary=args.vocabulary,
                                             gene_list=args.gene_list)
    scmulan_tasks.annotate_anndata(
        annotator, adata, layer=args.layer, counts=args.counts, gene_column=args.gene_column,
        min_coverage=args.min_coverage, batch_size=args.batch_size or 16, smooth=args.smooth,
        progress=not args.quiet)
    adata.uns[OWNER_KEY] = owner_record("annotate")
    with staged_output(args.output) as temporary:
        write_h5ad(adata, temporary)
    counts = adata.obs["cell_type_scmulan"].value_counts()
    print(f"wrote {args.output}: {adata.n_obs} cells; types: "
          + ", ".join(f"{k} {v}" for k, v in counts.head(10).items()), file=sys.stderr)
    return 0
