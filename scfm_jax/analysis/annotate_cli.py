"""`scfm-jax annotate`: scMulan zero-shot cell types and embeddings for an h5ad file.

    scfm-jax annotate --checkpoint ckpt_scMulan.pt --vocabulary DIR --input cells.h5ad \\
        --output annotated.h5ad [--counts] [--smooth 15]
    scfm-jax annotate --checkpoint runs/scmulan --input cells.h5ad --output annotated.h5ad --counts

`--checkpoint` is an official `.pt` (with `--vocabulary`, the official token-set folder) or a
scfm-jax training workdir (its config carries the token set, its store vocabulary the genes).

The input's genes (symbols or Ensembl IDs in var_names or `--gene-column`) are mapped onto scMulan's
42,117-symbol list with the vocabulary module (duplicates summed, absent genes zero), then the
model's 2,000 genes are taken. `X` must be log1p of counts normalised to 1e4 (what the official tool
expects); `--counts` normalises raw counts first, over all the input's genes. The output is the input
with `obs["cell_type_scmulan"]`, `obs["cell_type_scmulan_coarse"]` and `obsm["X_scmulan"]` added.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from scfm_jax.errors import (CheckpointError, InputError, MissingCheckpoint, UnknownName,
                             UsageError)

GENE_LIST_FILE = "total_gene_list_42117.txt"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scfm-jax annotate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="official scMulan checkpoint ({'model_args','model'} .pt) or a scfm-jax "
                        "training workdir")
    p.add_argument("--vocabulary", default=None,
                   help="for a .pt: folder with token_set.tsv, gene_set.txt, meta_categories.json")
    p.add_argument("--input", required=True, help="h5ad file")
    p.add_argument("--output", required=True, help="h5ad file to write")
    p.add_argument("--counts", action="store_true",
                   help="the input holds raw counts: normalise to 1e4 per cell and log1p first")
    p.add_argument("--layer", default=None, help="read this layer instead of X")
    p.add_argument("--gene-list", default=None,
                   help=f"the symbol list to align onto: a file, or 'scmulan' (downloaded); "
                        f"default: {GENE_LIST_FILE} in the vocabulary folder, else 'scmulan'")
    p.add_argument("--gene-column", default=None, help="var column holding the gene names")
    p.add_argument("--min-coverage", type=float, default=0.5,
                   help="refuse when less than this fraction of the expression maps (default 0.5)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--smooth", type=int, default=0, metavar="K",
                   help="also write a kNN-smoothed type over K neighbours of the embedding")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output file (never the input)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def gene_set_expression(adata: anndata.AnnData, token_set, gene_list, *, layer=None,
                        counts=False, gene_column=None, min_coverage=0.5):
    """[cells, 2,000 gene-set genes] log1p-normalised CSR, aligned through the symbol list, and
    the alignment report."""
    from scfm_jax.data.host_ops import log_normalise
    from scfm_jax.data import vocabulary

    matrix = adata.layers[layer] if layer is not None else adata.X
    if counts:
        matrix = log_normalise(matrix)
    alignment = vocabulary.align_genes(adata.var, gene_list, gene_column=gene_column)
    aligned = alignment.apply(matrix, min_fraction=min_coverage)
    columns = np.array([gene_list.index_of(g) for g in token_set.genes])
    return aligned[:, columns].tocsr(), alignment.report


def _official_model(args):
    from scfm_jax.analysis.loading import _checkpoint_kind
    from scfm_jax.data import vocabulary
    from scfm_jax.data.cell_sentence import TokenSet
    from scfm_jax.interop.scmulan_torch import load_official_checkpoint

    if not Path(args.checkpoint).is_file():
        raise MissingCheckpoint(f"--checkpoint {args.checkpoint}: no such file or training workdir")
    if _checkpoint_kind(Path(args.checkpoint)) != "scmulan":
        raise CheckpointError(f"--checkpoint {args.checkpoint} is a scFoundation checkpoint; "
                              "`scfm-jax annotate` runs scMulan models (use `scfm-jax embed` for it)")
    if args.vocabulary is None:
        raise UsageError("an official .pt checkpoint needs --vocabulary: the folder with "
                         "token_set.tsv, gene_set.txt and meta_categories.json")
    token_set = TokenSet.from_folder(args.vocabulary)
    gene_list_spec = args.gene_list
    if gene_list_spec is None:
        local = Path(args.vocabulary) / GENE_LIST_FILE
        gene_list_spec = str(local) if local.is_file() else "scmulan"
    gene_list = vocabulary.load_vocabulary(gene_list_spec)
    symbols = set(gene_list.symbols)
    missing = [g for g in token_set.genes if g not in symbols]
    if missing:
        raise InputError(f"{len(missing)} scMulan genes are not in the gene list {gene_list_spec} "
                         f"(e.g. {missing[:5]}); use the 42,117-symbol list of scMulan")
    _, model = load_official_checkpoint(args.checkpoint)
    if model.cfg.vocab_size != len(token_set):
        raise CheckpointError(f"the checkpoint has {model.cfg.vocab_size} tokens but the vocabulary "
                              f"folder {args.vocabulary} has {len(token_set)}; they do not belong together")
    return token_set, gene_list, model


def _trained_model(workdir):
    from scfm_jax.analysis.loading import load
    from scfm_jax.objectives.scmulan import token_set_from_config

    loaded = load(workdir)
    if loaded.kind != "scmulan":
        raise CheckpointError(f"{workdir} holds a {loaded.kind} model, not scMulan")
    return token_set_from_config(loaded.config), loaded.vocabulary, loaded.model


def main(argv=None) -> int:
    """Errors are reported in one line by scfm_jax.main."""
    args = _parser().parse_args(argv)
    from scfm_jax.analysis import scmulan_tasks
    from scfm_jax.analysis.output_checks import require_finite
    from scfm_jax.data.anndata_io import check_writable, read_h5ad, write_h5ad
    from scfm_jax.output_safety import (OWNER_KEY, check_output, owner_record, publish,
                                        temporary_path)

    check_output(args.output, command="annotate", inputs=[args.input], overwrite=args.overwrite)
    adata = read_h5ad(args.input)
    check_writable(adata, Path(args.output).absolute().parent)
    if Path(args.checkpoint).is_dir() or "://" in args.checkpoint:   # a workdir / its bucket
        token_set, gene_list, model = _trained_model(args.checkpoint)
    else:
        token_set, gene_list, model = _official_model(args)
    if args.layer is not None and args.layer not in adata.layers:
        raise UnknownName(f"{args.input} has no layer {args.layer!r} (layers: {list(adata.layers)})")
    expression, report = gene_set_expression(
        adata, token_set, gene_list, layer=args.layer, counts=args.counts,
        gene_column=args.gene_column, min_coverage=args.min_coverage)
    print(f"genes: {report.summary()}", file=sys.stderr)
    work = anndata.AnnData(expression, obs=pd.DataFrame(index=adata.obs_names),
                           var=pd.DataFrame(index=list(token_set.genes)))
    scmulan_tasks.annotate(model, token_set, work, batch_size=args.batch_size,
                           progress=not args.quiet)
    require_finite(work.obsm["X_scmulan"], adata.obs_names, f"X_scmulan of {args.checkpoint}")
    for column in ("cell_type_scmulan", "cell_type_scmulan_coarse"):
        adata.obs[column] = work.obs[column].values
    adata.obsm["X_scmulan"] = work.obsm["X_scmulan"]
    if args.smooth:
        scmulan_tasks.smooth_cell_types(adata, n_neighbors=args.smooth)
    adata.uns[OWNER_KEY] = owner_record("annotate")
    tmp = temporary_path(args.output)
    write_h5ad(adata, tmp)
    publish(tmp, args.output)
    counts = adata.obs["cell_type_scmulan"].value_counts()
    print(f"wrote {args.output}: {adata.n_obs} cells; types: "
          + ", ".join(f"{k} {v}" for k, v in counts.head(10).items()), file=sys.stderr)
    return 0
