"""Gene embeddings of a checkpoint, gene modules, and TF -> target networks scored on a reference.

`gene_embeddings` returns an AnnData with the model's genes as rows: `X` is the user's
log-normalised expression (genes x cells), `obsm` holds each kind of gene embedding:
  X_scfoundation_token     scFoundation's static gene token table (`pos_emb`, encoder width)
  X_scfoundation_context   scFoundation's decoder context embeddings averaged over the cells
                           (decoder width), and `X_scfoundation_context_<label>` per label
  X_scmulan_token          scMulan's token embeddings of its 2,000 genes
`gene_modules` clusters genes (kNN graph + Leiden, as scFoundation's gene-module notebook),
`score_modules` / `module_specificity` bring the modules back to the cells.

`evaluate_networks` scores each TF's ranking of all other genes against a reference edge list:
  * candidates: the embedding's genes with a non-zero count in at least `min_cells` (3) cells;
  * evaluated TFs: reference TFs among the candidates with at least `min_targets` (5) reference
    targets among the other candidates;
  * per TF: AUROC and average precision (scikit-learn's) of its reference targets among all other
    candidates ranked by the method's score; reported as means over the evaluated TFs;
  * early precision ratio (BEELINE): over every (evaluated TF, other candidate) pair, k = the number
    of reference edges; the pairs scoring at least the k-th highest score are predicted; their
    precision over the edge density k / (number of pairs).
Methods: each embedding kind (cosine similarity), `coexpression` (absolute Pearson correlation of
the log-normalised expression over the user's cells) and `random` (cosine of a Gaussian embedding
with seed `seed`), all on the same candidates.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm_jax.errors import InputError, UnknownName
from scfm_jax.output_safety import staged_folder
from scfm_jax.tasks.task_models import (TaskModel, add_task_arguments, counts_on_model_genes,
                                         load_task_model, parse_task_arguments)

TOKEN_KEYS = {"scfoundation": "X_scfoundation_token", "scmulan": "X_scmulan_token"}
CONTEXT_KEY = "X_scfoundation_context"
MIN_CELLS = 3
MIN_TARGETS = 5
MODULE_KEY = "module"
MODULE_SCORE_PREFIX = "gene_module_"
METRICS = ["mean_auroc", "mean_average_precision", "n_tfs", "early_precision_ratio"]


# ------------------------------------------------------------------------------ embeddings

class _GroupSums:
    """An `out` for the inference loop that sums each cell's gene embeddings into its group."""

    def __init__(self, groups: np.ndarray, num_groups: int):
        self.groups, self.num_groups, self.sums = groups, num_groups, None

    def __setitem__(self, rows, values):
        if self.sums is None:
            self.sums = np.zeros((self.num_groups,) + values.shape[1:], np.float64)
        groups = self.groups[rows]
        for group in np.unique(groups):
            self.sums[group] += values[groups == group].sum(axis=0, dtype=np.float64)


def _safe_name(label) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", str(label)).strip("_") or "label"


def _context_embeddings(task_model: TaskModel, counts: sp.csr_matrix, labels, cell_names, *,
                        batch_size: int, progress: bool) -> dict:
    """{obsm key: [genes, decoder width]}: the mean over all cells with an expressed model gene,
    and per label."""
    from scfm_jax.analysis import scfoundation_inference as inference

    kept = np.flatnonzero(np.diff(counts.indptr) > 0)
    if len(kept) < counts.shape[0]:
        print(f"context embeddings: {counts.shape[0] - len(kept)} cells without any of the model's "
              "genes are left out", file=sys.stderr)
    if not len(kept):
        raise InputError("no cell expresses any of the model's genes; check --gene-column")
    categories = pd.Categorical(labels[kept]) if labels is not None else None
    codes = categories.codes.copy() if categories is not None else np.zeros(len(kept), int)
    num_groups = (len(categories.categories) if categories is not None else 0) + 1
    codes[codes < 0] = num_groups - 1     # unlabelled cells count in the overall mean only
    sums = _GroupSums(codes, num_groups)
    inference.gene_embeddings(task_model.model.model, counts[kept], batch_size=batch_size,
                              stabilizer_scope="cell", out=sums,
                              cell_names=[cell_names[i] for i in kept], progress=progress)
    cells_per_group = np.bincount(codes, minlength=num_groups)
    out = {CONTEXT_KEY: (sums.sums.sum(axis=0) / len(kept)).astype(np.float32)}
    if categories is not None:
        for code, label in enumerate(categories.categories):
            if cells_per_group[code]:
                out[f"{CONTEXT_KEY}_{_safe_name(label)}"] = (
                    sums.sums[code] / cells_per_group[code]).astype(np.float32)
    return out


def token_table(task_model: TaskModel) -> np.ndarray:
    """The model's static gene token embeddings [model genes, width]."""
    if task_model.kind == "scmulan":
        return np.asarray(task_model.model.wte[...], np.float32)[task_model.token_set.gene_ids]
    model = task_model.model.model
    return np.asarray(model.pos_emb.embedding[...], np.float32)[:model.num_genes]


def expression_by_gene(genes, cells: anndata.AnnData, *, label_key: str | None = None,
                       layer: str | None = None, gene_column: str | None = None,
                       min_coverage: float | None = 0.5, progress: bool = True):
    """(the cells' expression with `genes`' genes as rows, the counts [cells, genes] as CSR).

    `genes`: a `TaskModel` (its genes) or a gene `Vocabulary` (for the baselines alone). `cells`
    holds raw counts (X, `layer`, or 'raw'); its genes (var_names or `gene_column`, symbols or
    Ensembl IDs) are aligned onto them. The AnnData's `X` is log1p(count / cell total * 1e4)
    [genes, cells] (the total over all the input's genes), `obs["n_cells_expressed"]` the number
    of cells with a non-zero count, `var` the cells (with `label_key`).
    """
    from scfm_jax.analysis.embedding import matrix_source, require_counts
    from scfm_jax.data.host_ops import log_normalise

    task_model = genes if isinstance(genes, TaskModel) else TaskModel(
        "scfoundation", None, genes, f"vocabulary {genes.name}")
    matrix, var, where = matrix_source(cells, layer)
    require_counts(cells, layer, matrix, where)
    if label_key is not None and label_key not in cells.obs:
        raise UnknownName(f"the cells' obs has no label column {label_key!r} (columns: "
                       f"{list(cells.obs.columns)})")
    counts, report = counts_on_model_genes(task_model, matrix, var, gene_column=gene_column,
                                           min_coverage=min_coverage)
    if progress:
        print(f"genes: {report.summary()}", file=sys.stderr)
    expression, _ = counts_on_model_genes(task_model, log_normalise(sp.csr_matrix(matrix)), var,
                                          gene_column=gene_column, min_coverage=None)
    cell_frame = (cells.obs[[label_key]].copy() if label_key is not None
                  else pd.DataFrame(index=cells.obs_names))
    by_gene = anndata.AnnData(sp.csr_matrix(expression.T, dtype=np.float32),
                              obs=pd.DataFrame(index=pd.Index(task_model.genes, name="gene")),
                              var=cell_frame)
    by_gene.obs["n_cells_expressed"] = np.asarray((counts > 0).sum(axis=0)).ravel()
    by_gene.uns["gene_embeddings"] = {"checkpoint": task_model.source, "kind": task_model.kind,
                                      "coverage": report.summary(), "cells": int(cells.n_obs),
                                      "label_key": label_key or ""}
    return by_gene, counts


def gene_embeddings(task_model: TaskModel, cells: anndata.AnnData, *, label_key: str | None = None,
                    layer: str | None = None, gene_column: str | None = None,
                    min_coverage: float = 0.5, context: bool = True, batch_size: int = 4,
                    progress: bool = True) -> anndata.AnnData:
    """Gene embeddings of `task_model` and the cells' expression, genes as rows: the AnnData of
    `expression_by_gene` with the embedding kinds in `obsm` (see the module docstring).
    `context`: also run scFoundation's decoder over every cell (per label too with `label_key`).
    """
    genes, counts = expression_by_gene(task_model, cells, label_key=label_key, layer=layer,
                                       gene_column=gene_column, min_coverage=min_coverage,
                                       progress=progress)
    genes.obsm[TOKEN_KEYS[task_model.kind]] = token_table(task_model)
    if context and task_model.kind == "scfoundation":
        labels = cells.obs[label_key].to_numpy() if label_key is not None else None
        for key, table in _context_embeddings(task_model, counts, labels, list(cells.obs_names),
                                              batch_size=batch_size, progress=progress).items():
            genes.obsm[key] = table
    return genes


def default_key(genes: anndata.AnnData) -> str:
    """The context embedding when there is one, else the token table."""
    for key in (CONTEXT_KEY, *TOKEN_KEYS.values()):
        if key in genes.obsm:
            return key
    raise UnknownName(f"the genes' obsm has no gene embedding (keys: {list(genes.obsm)})")


def candidates(genes: anndata.AnnData, min_cells: int = MIN_CELLS) -> np.ndarray:
    """Positions of the genes with a non-zero count in at least `min_cells` cells."""
    if "n_cells_expressed" not in genes.obs:
        raise UnknownName("genes.obs has no 'n_cells_expressed': make the genes with "
                       "gene_embeddings(model, cells)")
    return np.flatnonzero(genes.obs["n_cells_expressed"].to_numpy() >= min_cells)


# ------------------------------------------------------------------------------ modules

def gene_modules(genes: anndata.AnnData, key: str | None = None, *, resolution: float = 1.0,
                 n_neighbors: int = 15, min_size: int = 5, min_cells: int = MIN_CELLS,
                 seed: int = 0) -> pd.DataFrame:
    """Modules of the candidate genes: a cosine kNN graph over `obsm[key]` and Leiden.

    Modules with at least `min_size` genes are numbered 0, 1, ... from the largest; the others'
    genes get none. Writes `genes.obs["module"]` and returns the (gene, module) table.
    """
    import scanpy as sc

    key = key or default_key(genes)
    chosen = candidates(genes, min_cells)
    if len(chosen) < 3:
        raise InputError(f"only {len(chosen)} genes are expressed in at least {min_cells} cells; "
                         "modules need more (check the gene alignment)")
    sub = anndata.AnnData(obs=pd.DataFrame(index=genes.obs_names[chosen]),
                          obsm={key: np.asarray(genes.obsm[key], np.float32)[chosen]})
    sc.pp.neighbors(sub, n_neighbors=min(n_neighbors, len(chosen) - 1), use_rep=key,
                    metric="cosine", random_state=seed)
    sc.tl.leiden(sub, resolution=resolution, flavor="igraph", n_iterations=2, directed=False,
                 random_state=seed)
    sizes = sub.obs["leiden"].value_counts()
    kept = [cluster for cluster, size in sizes.items() if size >= min_size]
    number = {cluster: i for i, cluster in enumerate(kept)}
    modules = pd.Series(pd.NA, index=genes.obs_names, dtype="Int64")
    modules.iloc[chosen] = [number.get(c, pd.NA) for c in sub.obs["leiden"]]
    genes.obs[MODULE_KEY] = modules.array
    genes.uns["modules"] = {"key": key, "resolution": resolution, "n_neighbors": n_neighbors,
                            "min_size": min_size, "min_cells": min_cells}
    table = modules.dropna().rename(MODULE_KEY).rename_axis("gene").reset_index()
    return table.sort_values([MODULE_KEY, "gene"], ignore_index=True)


def score_modules(cells: anndata.AnnData, genes: anndata.AnnData, *, seed: int = 0) -> list[str]:
    """Each module's score per cell (scanpy's `score_genes` on the log-normalised expression in
    `genes.X`), written to `cells.obs["gene_module_<m>"]`; returns those column names."""
    import scanpy as sc

    if MODULE_KEY not in genes.obs:
        raise UnknownName("genes.obs has no 'module': run gene_modules first")
    if list(genes.var_names) != list(cells.obs_names):
        raise InputError("genes and cells do not belong together: make the genes from these cells")
    expression = anndata.AnnData(sp.csr_matrix(genes.X.T), obs=pd.DataFrame(index=cells.obs_names),
                                 var=pd.DataFrame(index=genes.obs_names))
    modules = genes.obs[MODULE_KEY].dropna()
    columns = []
    for module in sorted(modules.unique()):
        name = f"{MODULE_SCORE_PREFIX}{module}"
        sc.tl.score_genes(expression, list(modules.index[modules == module]), score_name=name,
                          random_state=seed, use_raw=False)
        cells.obs[name] = expression.obs[name].to_numpy()
        columns.append(name)
    return columns


def module_specificity(cells: anndata.AnnData, label_key: str, columns) -> pd.DataFrame:
    """Module x label: (mean score in the label - mean score in the other cells) / the score's
    standard deviation over all cells. Large positive: the module is specific to that label."""
    labels = cells.obs[label_key]
    rows = {}
    for column in columns:
        score = cells.obs[column].astype(np.float64)
        spread = score.std() or 1.0
        rows[column.removeprefix(MODULE_SCORE_PREFIX)] = {
            label: (score[labels == label].mean() - score[labels != label].mean()) / spread
            for label in labels.dropna().unique()}
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis(MODULE_KEY)
    return table[sorted(table.columns, key=str)]


def plot_module_specificity(table: pd.DataFrame, path) -> Path:
    """Heatmap PNG of `module_specificity`."""
    import matplotlib.pyplot as plt

    values = table.to_numpy(np.float64)
    limit = max(np.nanmax(np.abs(values)), 1e-9) if values.size else 1.0
    figure, axis = plt.subplots(figsize=(1.2 + 0.9 * table.shape[1], 1.2 + 0.35 * table.shape[0]))
    image = axis.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    axis.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=45,
                    ha="right")
    axis.set_yticks(range(table.shape[0]), [f"module {m}" for m in table.index])
    figure.colorbar(image, ax=axis, label="score difference (SD)")
    axis.set_title("gene module specificity")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


# ------------------------------------------------------------------------------ networks

def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def tf_rankings(genes: anndata.AnnData, tfs, key: str | None = None, *, top: int = 100,
                min_cells: int | None = None) -> pd.DataFrame:
    """For each TF among the genes, the `top` other genes by cosine similarity of `obsm[key]`
    (rows tf, rank (1 = most similar), target, cosine). `min_cells`: rank the candidates only."""
    key = key or default_key(genes)
    pool = np.arange(genes.n_obs) if min_cells is None else candidates(genes, min_cells)
    names = np.asarray(genes.obs_names)[pool]
    position = {name: i for i, name in enumerate(names)}
    found = [tf for tf in tfs if tf in position]
    if not found:
        raise UnknownName(f"none of the TFs {list(tfs)[:5]} is among the genes")
    unit = _unit_rows(np.asarray(genes.obsm[key])[pool])
    frames = []
    for tf in found:
        similarity = unit @ unit[position[tf]]
        similarity[position[tf]] = -np.inf
        order = np.argsort(-similarity, kind="stable")[:min(top, len(names) - 1)]
        frames.append(pd.DataFrame({"tf": tf, "rank": np.arange(1, len(order) + 1),
                                    "target": names[order], "cosine": similarity[order]}))
    return pd.concat(frames, ignore_index=True)


def read_reference(reference) -> pd.DataFrame:
    """A TF -> target edge list (a TSV path or a DataFrame with `tf` and `target` columns)."""
    frame = reference if isinstance(reference, pd.DataFrame) else pd.read_csv(reference, sep="\t")
    missing = {"tf", "target"} - set(frame.columns)
    if missing:
        raise InputError(f"the reference edge list needs columns tf and target; it lacks "
                         f"{sorted(missing)} (columns: {list(frame.columns)})")
    return frame[["tf", "target"]].astype(str).drop_duplicates(ignore_index=True)


def _evaluated_tfs(names: np.ndarray, reference: pd.DataFrame, min_targets: int):
    """[(TF position among the candidates, boolean target mask over the candidates)]."""
    position = {name: i for i, name in enumerate(names)}
    evaluated = []
    for tf, edges in reference.groupby("tf", sort=True):
        if tf not in position:
            continue
        mask = np.zeros(len(names), bool)
        mask[[position[t] for t in edges["target"] if t in position and t != tf]] = True
        if mask.sum() >= min_targets:
            evaluated.append((position[tf], mask))
    return evaluated


def _coexpression_scores(expression: np.ndarray):
    """|Pearson r| of each candidate's row of `expression` [candidates, cells] with the others."""
    centred = expression - expression.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    standard = np.divide(centred, norms, out=np.zeros_like(centred), where=norms > 0)
    return lambda rows: np.abs(standard[rows] @ standard.T)


def _cosine_scores(embedding: np.ndarray):
    unit = _unit_rows(embedding)
    return lambda rows: unit[rows] @ unit.T


def network_metrics(score_rows, evaluated) -> tuple[dict, pd.DataFrame]:
    """(summary, per-TF table) of one method. `score_rows(positions)` gives the scores of those
    TFs' rows over all candidates; `evaluated` comes from `_evaluated_tfs`."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if not evaluated:
        empty = pd.DataFrame(columns=["auroc", "average_precision"])
        return dict(mean_auroc=np.nan, mean_average_precision=np.nan, n_tfs=0,
                    early_precision_ratio=np.nan), empty
    rows = np.array([tf for tf, _ in evaluated])
    scores = score_rows(rows)
    per_tf, pooled_scores, pooled_truth = {}, [], []
    for (tf, mask), row in zip(evaluated, scores):
        others = np.ones(len(mask), bool)
        others[tf] = False
        truth, score = mask[others], row[others]
        per_tf[tf] = {"auroc": roc_auc_score(truth, score),
                      "average_precision": average_precision_score(truth, score)}
        pooled_scores.append(score)
        pooled_truth.append(truth)
    pooled_scores, pooled_truth = np.concatenate(pooled_scores), np.concatenate(pooled_truth)
    k = int(pooled_truth.sum())
    threshold = np.partition(pooled_scores, len(pooled_scores) - k)[len(pooled_scores) - k]
    predicted = pooled_scores >= threshold
    early_precision = pooled_truth[predicted].mean()
    table = pd.DataFrame.from_dict(per_tf, orient="index")
    return dict(mean_auroc=float(table["auroc"].mean()),
                mean_average_precision=float(table["average_precision"].mean()),
                n_tfs=len(evaluated),
                early_precision_ratio=float(early_precision / (k / len(pooled_truth)))), table


def evaluate_networks(genes: anndata.AnnData, reference, keys=None, *, min_cells: int = MIN_CELLS,
                      min_targets: int = MIN_TARGETS, random_dim: int | None = None,
                      seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary: one row per method with `METRICS`, per-TF table: method, tf, auroc,
    average_precision) for the embeddings `keys` (default: every obsm key), `coexpression` (from
    `genes.X`) and `random` (`random_dim` wide, default the first embedding's width or 64); the
    definitions are in the module docstring."""
    reference = read_reference(reference)
    keys = list(genes.obsm) if keys is None else list(keys)
    chosen = candidates(genes, min_cells)
    names = np.asarray(genes.obs_names)[chosen]
    evaluated = _evaluated_tfs(names, reference, min_targets)
    expression = genes.X[chosen]
    expression = expression.toarray() if sp.issparse(expression) else np.asarray(expression)
    dim = random_dim or (np.asarray(genes.obsm[keys[0]]).shape[1] if keys else 64)
    methods = {key: _cosine_scores(np.asarray(genes.obsm[key])[chosen]) for key in keys}
    methods["coexpression"] = _coexpression_scores(np.asarray(expression, np.float64))
    methods["random"] = _cosine_scores(np.random.default_rng(seed).standard_normal(
        (len(chosen), dim)))
    summary, per_tf = {}, []
    for method, score_rows in methods.items():
        summary[method], table = network_metrics(score_rows, evaluated)
        table.index = names[table.index.to_numpy(int)]
        per_tf.append(table.rename_axis("tf").reset_index().assign(method=method))
    frame = pd.DataFrame.from_dict(summary, orient="index")[METRICS].rename_axis("method")
    frame.attrs.update(candidates=len(chosen), min_cells=min_cells, min_targets=min_targets)
    return frame, pd.concat(per_tf, ignore_index=True)[["method", "tf", "auroc",
                                                         "average_precision"]]


def plot_network_evaluation(table: pd.DataFrame, path, title: str = "") -> Path:
    """Bars of mean AUROC, mean average precision and early precision ratio per method, with the
    chance levels (0.5 AUROC, EPR 1)."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(4 + 1.2 * len(table), 3.6))
    names = [str(m).removeprefix("X_") for m in table.index]
    colours = [f"C{i % 10}" for i in range(len(table))]
    for axis, column, chance in zip(axes, ["mean_auroc", "mean_average_precision",
                                           "early_precision_ratio"], [0.5, None, 1.0]):
        axis.bar(range(len(table)), table[column].to_numpy(np.float64), color=colours)
        if chance is not None:
            axis.axhline(chance, color="grey", linestyle="--", linewidth=1)
        axis.set_xticks(range(len(table)), names, rotation=45, ha="right")
        axis.set_title(column.replace("_", " "))
    n_tfs = table["n_tfs"].max() if len(table) else 0
    figure.suptitle(title or f"TF -> target ranking against the reference ({n_tfs} TFs)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


# ------------------------------------------------------------------------------ command

def _parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="scfm-jax genes", description="Gene embeddings of a checkpoint, gene modules, and "
        "TF -> target networks scored against a reference edge list, beside co-expression and a "
        "random embedding.")
    p.add_argument("--checkpoint", required=True,
                   help="official scFoundation models.ckpt, official scMulan .pt (with "
                        "--token-set), or a scfm-jax training workdir")
    p.add_argument("--input", required=True, help="h5ad of cells with raw counts")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--reference", default=None,
                   help="TSV of TF -> target edges (columns tf, target) to score networks against")
    p.add_argument("--label-key", default=None,
                   help="obs column of labels: context embeddings and module specificity per label")
    p.add_argument("--key", default="gene", choices=("gene", "cell", "rde"),
                   help="weight set of an official scFoundation checkpoint (default gene)")
    p.add_argument("--no-context", action="store_true",
                   help="skip scFoundation's decoder context embeddings (token table only)")
    p.add_argument("--resolution", type=float, default=1.0, help="Leiden resolution (default 1)")
    p.add_argument("--min-module-size", type=int, default=5)
    add_task_arguments(p, batch_size=4)
    return p


def main(argv=None) -> int:
    from scfm_jax.data.anndata_io import read_h5ad, write_h5ad

    args = parse_task_arguments(_parser(), argv, "genes")
    output = args.output
    cells = read_h5ad(args.input)
    if args.label_key is not None and args.label_key not in cells.obs:
        raise UnknownName(f"--label-key {args.label_key!r} is not a column of {args.input}'s obs "
                       f"(columns: {list(cells.obs.columns)})")
    reference = read_reference(args.reference) if args.reference else None
    task_model = load_task_model(args.checkpoint, vocabulary=args.vocabulary,
                                 token_set=args.token_set, key=args.key)
    genes = gene_embeddings(task_model, cells, label_key=args.label_key, layer=args.layer,
                            gene_column=args.gene_column, min_coverage=args.min_coverage,
                            context=not args.no_context, batch_size=args.batch_size,
                            progress=not args.quiet)
    modules = gene_modules(genes, resolution=args.resolution, min_size=args.min_module_size)
    columns = score_modules(cells, genes)
    with staged_folder(output, command="genes") as folder:
        modules.to_csv(folder / "modules.csv", index=False)
        cells.obs[columns].rename_axis("cell").to_csv(folder / "module_scores.csv")
        if args.label_key is not None and columns:
            specificity = module_specificity(cells, args.label_key, columns)
            specificity.to_csv(folder / "module_specificity.csv")
            plot_module_specificity(specificity, folder / "module_specificity.png")
        if reference is not None:
            table, per_tf = evaluate_networks(genes, reference)
            table.to_csv(folder / "network_eval.csv")
            per_tf.to_csv(folder / "network_eval_per_tf.csv", index=False)
            plot_network_evaluation(table, folder / "network_eval.png",
                                    f"{Path(args.checkpoint).name}: TF -> target ranking "
                                    f"({table['n_tfs'].max()} TFs, {table.attrs['candidates']} "
                                    "candidate genes)")
            tfs = sorted(set(reference["tf"]) & set(genes.obs_names[candidates(genes)]))
            if tfs:
                tf_rankings(genes, tfs, min_cells=MIN_CELLS).to_csv(folder / "tf_targets.csv",
                                                                   index=False)
            print(table.to_string(float_format=lambda v: f"{v:.3f}"), file=sys.stderr)
        write_h5ad(genes, folder / "gene_embeddings.h5ad")
    print(f"wrote {output}: {genes.n_obs} genes, embeddings {list(genes.obsm)}, "
          f"{modules['module'].nunique()} modules", file=sys.stderr)
    return 0
