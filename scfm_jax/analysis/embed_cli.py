"""`scfm-jax embed`: scFoundation cell / gene embeddings, the batched `get_embedding.py`.

    scfm-jax embed --checkpoint models.ckpt --input cells.h5ad --output embedded.h5ad
    scfm-jax embed --checkpoint models.ckpt --output-type gene --input cells.h5ad --output genes.zarr

The input's genes (var_names, `--gene-column`, or the csv's columns) are aligned with the
vocabulary (missing genes as zeros, columns reordered, extra genes dropped). Outputs:
  cell             the input cells (h5ad) with obsm["X_scfoundation"]
  gene, gene_batch a zarr array [cells, vocabulary genes, decoder width]; gene_batch runs all
                   cells as one batch (the key stabiliser spans them), as the official tool does
  gene_expression  an h5ad whose X is the predicted expression, var the vocabulary
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from scfm_jax.errors import (CheckpointError, InputError, MissingCheckpoint, MissingInput,
                             UnknownName, UsageError)

OUTPUT_TYPES = ("cell", "gene", "gene_batch", "gene_expression")
# get_embedding.py's --version: cell embeddings come from `cell`, gene modes from `gene`.
DEFAULT_KEY = {"cell": "cell", "gene": "gene", "gene_batch": "gene", "gene_expression": "gene"}
OBSM_KEY = "X_scfoundation"


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
    p.add_argument("--step", type=int, default=None,
                   help="checkpoint step of a training workdir (default: the latest)")
    p.add_argument("--vocabulary", default=None,
                   help="'scfoundation' (default for official checkpoints) or a "
                        "gene_name<TAB>index file; a workdir's own vocabulary by default")
    p.add_argument("--input", required=True, help="h5ad, or csv with cells as rows, genes as columns")
    p.add_argument("--output", required=True, help="h5ad (cell, gene_expression) or zarr (gene)")
    p.add_argument("--output-type", choices=OUTPUT_TYPES, default="cell")
    p.add_argument("--pool", choices=("all", "max"), default="all",
                   help="cell pooling: all = [S, T, max, mean] (4x width), max = max over tokens")
    p.add_argument("--tgthighres", default="t4",
                   help="T token: tX (T = X), fX (log10(total * X)), aX (log10(total) + X)")
    p.add_argument("--pre-normalized", choices=("F", "T", "A"), default="F",
                   help="F: raw counts; T: log1p-normalised values; A: normalised values plus a "
                        "last column with the raw total count")
    p.add_argument("--input-type", choices=("singlecell", "bulk"), default="singlecell")
    p.add_argument("--batch-size", type=int, default=None,
                   help="cells per forward (default 16 for cell, 4 for gene outputs; gene_batch "
                        "always runs all cells as one batch)")
    p.add_argument("--layer", default=None,
                   help="h5ad: read this layer instead of X ('raw' reads adata.raw)")
    p.add_argument("--gene-column", default=None, help="h5ad var column holding the gene symbols")
    p.add_argument("--min-coverage", type=float, default=0.5,
                   help="refuse inputs of which less than this fraction of the expression maps "
                        "onto the vocabulary (default 0.5)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output file (never a folder of other files)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _load_model(args):
    """(model, vocabulary or None) from an official .ckpt or a training workdir."""
    path = Path(args.checkpoint)
    if path.is_dir() or "://" in args.checkpoint:   # a workdir, or its checkpoints on a bucket
        from scfm_jax.analysis.loading import load
        loaded = load(args.checkpoint, step=args.step)
        if loaded.kind != "scfoundation":
            raise CheckpointError(f"{path} holds a {loaded.kind!r} model, not scfoundation")
        return loaded.model, loaded.vocabulary
    if not path.is_file():
        raise MissingCheckpoint(f"--checkpoint {path}: no such file or training workdir")
    from scfm_jax.analysis.loading import _checkpoint_kind
    if _checkpoint_kind(path) == "scmulan":
        raise CheckpointError(f"--checkpoint {path} is an scMulan checkpoint; `scfm-jax embed` runs "
                              f"scFoundation models. Use `scfm-jax annotate --checkpoint {path}` for "
                              "scMulan embeddings and cell types")
    from scfm_jax.interop.scfoundation_torch import load_official_checkpoint
    _, model = load_official_checkpoint(path, args.key or DEFAULT_KEY[args.output_type])
    return model, None


def _read_input(path: Path, layer: str | None, pre_normalized: str):
    """(AnnData with the matrix to embed in X, A-mode totals or None)."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    from scfm_jax.data.anndata_io import read_csv_matrix, read_h5ad

    if not path.is_file():
        raise MissingInput(f"--input {path}: no such file")
    if path.suffix == ".h5ad":
        adata = read_h5ad(path)
        if layer == "raw":
            if adata.raw is None:
                raise InputError(f"{path} has no .raw; drop --layer raw")
            adata = anndata.AnnData(adata.raw.X, obs=adata.obs, var=adata.raw.var,
                                    obsm=dict(adata.obsm), uns=dict(adata.uns))
        elif layer is not None:
            if layer not in adata.layers:
                raise UnknownName(f"{path} has no layer {layer!r} (layers: {list(adata.layers)})")
            adata.X = adata.layers[layer]
    elif path.suffix == ".csv":
        adata = read_csv_matrix(path)
    else:
        raise InputError(f"--input {path}: expected a .h5ad or .csv file")
    if adata.n_obs == 0:
        raise InputError(f"--input {path} has no cells")
    totals = None
    if pre_normalized == "A":
        matrix = adata.X
        last = matrix[:, -1]
        totals = np.asarray(last.toarray() if sp.issparse(last) else last, np.float64).ravel()
        adata = adata[:, :-1].copy()
    return adata, totals


def _aligned_matrix(adata, vocabulary, gene_column, min_coverage, totals):
    import scipy.sparse as sp

    from scfm_jax.data.vocabulary import align_genes

    alignment = align_genes(adata.var, vocabulary, gene_column=gene_column)
    aligned = alignment.apply(adata.X, min_fraction=min_coverage)
    print(f"genes: {alignment.report.summary()}", file=sys.stderr)
    if totals is not None:
        aligned = sp.hstack([aligned, sp.csr_matrix(totals[:, None])], format="csr")
    return aligned


def run(args) -> None:
    import anndata
    import pandas as pd
    import zarr

    from scfm_jax.analysis import scfoundation_inference as inference
    from scfm_jax.analysis.output_checks import require_finite, require_finite_array
    from scfm_jax.data.anndata_io import check_writable, write_h5ad
    from scfm_jax.data.vocabulary import load_vocabulary
    from scfm_jax.output_safety import (OWNER_KEY, check_output, owner_record, publish,
                                        temporary_path)

    output = Path(args.output)
    if args.output_type in ("gene", "gene_batch") and output.suffix != ".zarr":
        raise UsageError(f"--output-type {args.output_type} writes a zarr array; name the output "
                         f"*.zarr (got {output})")
    if args.output_type in ("cell", "gene_expression") and output.suffix != ".h5ad":
        raise UsageError(f"--output-type {args.output_type} writes an h5ad file (got {output})")
    check_output(output, command="embed", inputs=[args.input], overwrite=args.overwrite)
    adata, totals = _read_input(Path(args.input), args.layer, args.pre_normalized)
    if output.suffix == ".h5ad":
        check_writable(adata, output.absolute().parent)
    model, own_vocabulary = _load_model(args)
    vocabulary = (load_vocabulary(args.vocabulary) if args.vocabulary
                  else own_vocabulary or load_vocabulary("scfoundation"))
    if len(vocabulary) != model.num_genes:
        raise InputError(f"vocabulary {vocabulary.name!r} has {len(vocabulary)} genes but the "
                         f"checkpoint's model has {model.num_genes}; pass the --vocabulary the "
                         "checkpoint was trained with (a gene_name<TAB>index file)")
    matrix = _aligned_matrix(adata, vocabulary, args.gene_column, args.min_coverage, totals)
    options = dict(tgthighres=args.tgthighres, pre_normalized=args.pre_normalized,
                   input_type=args.input_type, cell_names=list(adata.obs_names),
                   progress=not args.quiet)
    settings = {"checkpoint": str(args.checkpoint), "key": args.key or DEFAULT_KEY[args.output_type],
                "output_type": args.output_type, "tgthighres": args.tgthighres,
                "pre_normalized": args.pre_normalized, "input_type": args.input_type,
                "vocabulary": vocabulary.name}
    temporary = temporary_path(output)
    try:
        if args.output_type == "cell":
            embeddings = inference.cell_embeddings(
                model, matrix, pool=args.pool, batch_size=args.batch_size or 16, **options)
            require_finite(embeddings, adata.obs_names, f"{OBSM_KEY} of {args.checkpoint}")
            adata.obsm[OBSM_KEY] = embeddings
            adata.uns["scfoundation"] = dict(settings, pool=args.pool)
            adata.uns[OWNER_KEY] = owner_record("embed")
            write_h5ad(adata, temporary)
        elif args.output_type == "gene_expression":
            predicted = inference.predicted_expression(model, matrix,
                                                       batch_size=args.batch_size or 4, **options)
            require_finite(predicted, adata.obs_names, f"expression predicted by {args.checkpoint}")
            result = anndata.AnnData(predicted, obs=adata.obs.copy(),
                                     var=pd.DataFrame(index=pd.Index(vocabulary.symbols,
                                                                     name="gene_name")))
            result.uns["scfoundation"] = settings
            result.uns[OWNER_KEY] = owner_record("embed")
            write_h5ad(result, temporary)
        else:
            width = model.decoder_norm.num_features
            array = zarr.open_array(str(temporary), mode="w", dtype="float32",
                                    shape=(adata.n_obs, model.num_genes, width),
                                    chunks=(1, model.num_genes, width))
            array.attrs.update(dict(settings, cells=list(map(str, adata.obs_names)),
                                    genes=list(vocabulary.symbols),
                                    **{OWNER_KEY: owner_record("embed")}))
            if args.output_type == "gene_batch":
                inference.gene_embeddings(model, matrix, batch_size=adata.n_obs,
                                          stabilizer_scope="batch", out=array, **options)
            else:
                inference.gene_embeddings(model, matrix, batch_size=args.batch_size or 4,
                                          stabilizer_scope="cell", out=array, **options)
            require_finite_array(array, adata.obs_names, f"gene embeddings of {args.checkpoint}")
        publish(temporary, output)
    finally:
        shutil.rmtree(temporary.parent, ignore_errors=True)
    print(f"wrote {output}", file=sys.stderr)


def main(argv=None) -> int:
    run(_parser().parse_args(argv))   # errors: one line from scfm_jax.main
    return 0


if __name__ == "__main__":
    sys.exit(main())
