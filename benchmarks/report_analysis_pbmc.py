"""The real-data check of the analysis API on scanpy's pbmc68k_reduced (prints tables; not a test).

    scfm-jax demo --workdir runs/demo          # pretrains the tiny model on these cells
    python benchmarks/report_analysis_pbmc.py --workdir runs/demo

On the 700 PBMCs (10 `bulk_labels`, integer counts recovered as in the demo), with the
demo-pretrained model:
  1. scib-metrics' bio-conservation table (isolated labels, Leiden NMI/ARI, label silhouette,
     cLISI) of the scFoundation cell embedding vs PCA of the log-normalised counts (its summary
     plot in --plot-dir), and kNN label transfer (accuracy, macro-F1), same cells, same split;
  2. logistic regression on each frozen embedding, and the fine-tuned encoder + head (held out);
  3. read-depth enhancement: counts thinned binomially to --rate, enhanced back to the original
     depth, per-cell Pearson r with the unthinned profiles vs that of the thinned profiles
     (genes predicted while masked, as pretrained, and all visible as the official tool).
The demo pretrains on 90% of these cells without labels, so the embedding has seen most of them
(as any foundation model applied to its own atlas); the label splits are the same for every method.
"""
import argparse
import time

import jax

from scfm_jax import analysis
from scfm_jax.data.datasets import pbmc68k_reduced_counts

jax.config.update("jax_default_matmul_precision", "highest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="demo or training workdir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    parser.add_argument("--rate", type=float, default=0.2, help="binomial thinning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-dir", default=None,
                        help="folder for scib-metrics' summary plot (default: <workdir>/scib)")
    args = parser.parse_args()

    start = time.perf_counter()
    model = analysis.load(args.workdir, step=args.step)
    print(f"model: {model}")
    adata = pbmc68k_reduced_counts()
    label = "bulk_labels"
    analysis.embed_cells(model, adata, batch_size=32, progress=False)
    plot_dir = args.plot_dir or f"{args.workdir}/scib"
    table = analysis.compare_embeddings(adata, label, ["X_scfoundation"], plot_dir=plot_dir)
    print(f"\n## scib-metrics bio conservation, {adata.n_obs} PBMCs "
          f"({adata.obs[label].nunique()} {label}); plot in {plot_dir}/scib_results.svg")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    transfer = analysis.label_transfer(adata, label, ["X_scfoundation"], seed=args.seed)
    print(f"\n## kNN label transfer (k=15) onto a held-out 20% (stratified, seed {args.seed})")
    print(transfer.to_string(float_format=lambda v: f"{v:.3f}"))

    rows = []
    for key in ("X_scfoundation", "X_pca_baseline"):
        report = analysis.fit_classifier(adata, label, key, seed=args.seed, verbose=False).report
        rows.append((f"logistic regression on {key}", report))
    tuned = analysis.fine_tune(model, adata, label, epochs=args.epochs, seed=args.seed,
                               progress=False)
    rows.append((f"fine-tuned encoder + head ({args.epochs} epochs)", tuned.report))
    print("\n| classifier | held-out accuracy | macro-F1 |\n|---|---|---|")
    for name, report in rows:
        print(f"| {name} | {report['accuracy']:.3f} | {report['macro_f1']:.3f} |")
    print(f"fine-tuning loss per epoch: {[round(v, 4) for v in tuned.report['losses']]}")

    print(f"\n## Read-depth enhancement (counts thinned to {args.rate:.0%})")
    print("| prediction | target | cells | r(thinned, original) | r(enhanced, original) | "
          "r(model on original, original) |\n|---|---|---|---|---|---|")
    for masked, target in ((True, None), (True, "a5"), (False, None)):
        result = analysis.enhancement_check(model, adata, rate=args.rate, target=target,
                                            masked=masked, seed=args.seed, batch_size=16)
        print(f"| {'masked genes' if masked else 'all visible (official)'} | {result['target']} | "
              f"{result['cells']} | {result['thinned_r']:.3f} | {result['enhanced_r']:.3f} | "
              f"{result['reconstructed_r']:.3f} |", flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s on {jax.devices()[0].device_kind})")


if __name__ == "__main__":
    main()
