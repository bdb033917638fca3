"""`scfm-jax perturb`: perturbation response prediction with the field's baselines on one split.

Thin: parse, call `scfm_jax.tasks.perturbation.run`, print the subgroup table. Without
`--checkpoint` the baselines and the PCA linear model run alone.
"""
import argparse
import sys

from scfm_jax.errors import UsageError
from scfm_jax.output_safety import OVERWRITE_FOLDER_HELP


def _parser() -> argparse.ArgumentParser:
    from scfm_jax.tasks.perturbation import PREDICTORS

    parser = argparse.ArgumentParser(prog="scfm-jax perturb", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="AnnData (.h5ad) with raw counts")
    parser.add_argument("--output", required=True, help="folder for metrics.csv, split.json, "
                        "predictions.h5ad, perturbation.png")
    parser.add_argument("--condition-key", default="condition",
                        help="obs column: control / A / A+B (A+ctrl accepted)")
    parser.add_argument("--control", default="control", help="the control label")
    parser.add_argument("--context-key", help="obs column of contexts (cell line, cell type, "
                        "donor): control means and predictions per context")
    parser.add_argument("--layer", help="layer with raw counts (default: 'counts' if present, "
                        "else X)")
    parser.add_argument("--total-key", help="obs column with each cell's whole-transcriptome "
                        "total count, to normalise a gene subset (default: row sums)")
    parser.add_argument("--split", help="obs column with train/test per cell (default: GEARS's "
                        "simulation split)")
    parser.add_argument("--seed", type=int, default=1, help="simulation split seed (GEARS: 1)")
    parser.add_argument("--train-gene-fraction", type=float, default=0.75,
                        help="share of perturbed genes seen in training (GEARS: 0.75)")
    parser.add_argument("--checkpoint", help="scFoundation checkpoint: official models.ckpt or "
                        "scfm-jax workdir")
    parser.add_argument("--key", default="gene", help="weight set of an official models.ckpt")
    parser.add_argument("--vocabulary", help="gene list of --checkpoint when it is not the "
                        "released 19,264 genes (gene_name<TAB>index)")
    parser.add_argument("--scmulan-checkpoint", help="scMulan .pt for its gene token table")
    parser.add_argument("--scmulan-vocabulary", help="folder with scMulan's token_set.tsv "
                        "(default: beside the .pt)")
    parser.add_argument("--predictors", help=f"comma-separated, of {', '.join(PREDICTORS)} "
                        "(default: all the given checkpoints allow)")
    parser.add_argument("--gene-graph", help="TSV/CSV source,target[,weight]: perturbation graph "
                        "(default: kNN over the FM's gene embeddings)")
    parser.add_argument("--epochs", type=int, default=15, help="GEARS head epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="GEARS head batch")
    parser.add_argument("--hidden", type=int, default=64, help="GEARS head width")
    parser.add_argument("--max-controls", type=int,
                        help="embed at most this many control cells (seeded choice)")
    parser.add_argument("--embed-batch-size", type=int, default=8)
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"),
                        help="compute dtype of the control-cell embedding (default: the "
                        "checkpoint config's model.dtype; parameters stay float32)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_FOLDER_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from scfm_jax.tasks import perturbation
    from scfm_jax.tasks.perturbation_gears import HeadSettings

    if args.epochs < 1 or args.batch_size < 1 or args.hidden < 1:
        raise UsageError("--epochs, --batch-size and --hidden must be at least 1")
    predictors = None if args.predictors is None else [
        p.strip() for p in args.predictors.split(",") if p.strip()]
    try:
        perturbation.chosen_predictors(predictors, args.checkpoint, args.scmulan_checkpoint)
    except ValueError as error:
        raise UsageError(str(error)) from None
    result = perturbation.run(
        args.input, condition_key=args.condition_key, control=args.control,
        context_key=args.context_key, layer=args.layer, total_key=args.total_key,
        split_key=args.split, seed=args.seed,
        train_gene_fraction=args.train_gene_fraction, checkpoint=args.checkpoint,
        scfoundation_key=args.key, vocabulary=args.vocabulary,
        scmulan_checkpoint=args.scmulan_checkpoint, scmulan_vocabulary=args.scmulan_vocabulary,
        predictors=predictors,
        head=HeadSettings(epochs=args.epochs, batch_size=args.batch_size, hidden=args.hidden),
        gene_graph=args.gene_graph, max_controls=args.max_controls,
        embed_batch_size=args.embed_batch_size, compute_dtype=args.compute_dtype,
        output=args.output, overwrite=args.overwrite,
        progress=not args.quiet)
    print(perturbation.table(result.metrics, ("mse_de", "pearson_de", "pearson_delta",
                                              "direction_de")))
    print(f"wrote {args.output}: metrics.csv, split.json, predictions.h5ad, perturbation.png",
          file=sys.stderr)
    return 0
