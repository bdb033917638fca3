"""Perturbation response prediction: scFoundation's GEARS experiment beside the field's baselines.

`run(adata, ...)` reads the cells (`perturbation_data`), splits the conditions (GEARS simulation
split or a user column), fits every predictor on the training view only (`perturbation_predictors`,
`perturbation_gears`; FM gene tables and frozen control-cell embeddings from `perturbation_fm`),
predicts each test condition's mean profile per context and scores it (`perturbation_metrics`).
With `output`, it writes metrics.csv, split.json, predictions.h5ad and perturbation.png (and the
GEARS head's checkpoints) into a folder, as every command writes (`scfm_jax.output_safety`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from scfm_jax.errors import InputError, UsageError
from scfm_jax.output_safety import check_output, staged_folder
from scfm_jax.tasks.perturbation_data import (SUBGROUPS, PerturbationData, Split, column_split,
                                              read_perturbations, simulation_split)
from scfm_jax.tasks.perturbation_gears import GearsPredictor, HeadSettings
from scfm_jax.tasks.perturbation_metrics import METRICS, condition_metrics, de_genes
from scfm_jax.tasks.perturbation_predictors import (Additive, Linear, LinearPCA, NoChange,
                                                    TrainingView, TrainMean)

BASELINES = ("no_change", "train_mean", "additive", "linear_pca")
SCFOUNDATION_PREDICTORS = ("linear_scfoundation_tokens", "linear_scfoundation_decoder",
                           "gears_scfoundation")
SCMULAN_PREDICTORS = ("linear_scmulan_tokens",)
PREDICTORS = BASELINES + SCFOUNDATION_PREDICTORS + SCMULAN_PREDICTORS


@dataclasses.dataclass
class PerturbationResult:
    metrics: pd.DataFrame           # one row per predictor x test (condition, context), + means
    split: Split
    predictions: anndata.AnnData    # rows: predictor x test (condition, context), the truth
                                    # ("truth") and the control means ("control")
    predictors: dict                # name -> fitted predictor
    embedding_seconds: float | None = None
    embedded_cells: int = 0


def _load(checkpoint, **options):
    from scfm_jax.analysis.loading import LoadedModel, load

    return checkpoint if isinstance(checkpoint, LoadedModel) else load(checkpoint, **options)


def chosen_predictors(predictors, checkpoint, scmulan_checkpoint) -> list[str]:
    available = list(BASELINES)
    if checkpoint is not None:
        available += SCFOUNDATION_PREDICTORS
    if scmulan_checkpoint is not None:
        available += SCMULAN_PREDICTORS
    if predictors is None:
        return available
    unknown = [p for p in predictors if p not in PREDICTORS]
    if unknown:
        raise UsageError(f"unknown predictor {unknown[0]!r}; choose from {', '.join(PREDICTORS)}")
    needs = [p for p in predictors if p not in available]
    if needs:
        flag = "--scmulan-checkpoint" if needs[0] in SCMULAN_PREDICTORS else "--checkpoint"
        raise UsageError(f"predictor {needs[0]!r} needs a model: give {flag}")
    return list(predictors)


def _fm_predictors(chosen, data: PerturbationData, view: TrainingView, checkpoint, *,
                   scfoundation_key, vocabulary, compute_dtype, max_controls, embed_batch_size,
                   head, gene_graph, seed, checkpoint_dir, progress):
    """The scFoundation-based predictors, with the control cells embedded once."""
    from scfm_jax.tasks.perturbation_fm import (checkpoint_label, control_embeddings,
                                                require_genes, scfoundation_token_table)

    from scfm_jax.analysis.loading import with_compute_dtype

    loaded = with_compute_dtype(_load(checkpoint, key=scfoundation_key, vocabulary=vocabulary),
                                compute_dtype)
    if loaded.kind != "scfoundation":
        raise InputError(f"--checkpoint {loaded.source} holds a {loaded.kind} model; the "
                         "perturbation head runs on scFoundation (scMulan: --scmulan-checkpoint)")
    require_genes(data.perturbed_genes, loaded.vocabulary.symbols, checkpoint_label(loaded))
    out, embedding = {}, None
    if {"linear_scfoundation_decoder", "gears_scfoundation"} & set(chosen):
        controls = np.flatnonzero(view.data.is_control)
        if max_controls is not None and len(controls) > max_controls:
            controls = np.sort(np.random.default_rng(seed).choice(controls, max_controls,
                                                                  replace=False))
        embedding = control_embeddings(loaded, view.data.counts[controls], view.data.genes,
                                       list(view.data.genes) + data.perturbed_genes,
                                       batch_size=embed_batch_size, progress=progress)
    if "linear_scfoundation_tokens" in chosen:
        out["linear_scfoundation_tokens"] = Linear(scfoundation_token_table(loaded))
    if "linear_scfoundation_decoder" in chosen:
        out["linear_scfoundation_decoder"] = Linear(embedding.mean_table())
    if "gears_scfoundation" in chosen:
        out["gears_scfoundation"] = GearsPredictor(
            embedding, controls, data.perturbed_genes, settings=head,
            gene_graph=gene_graph, checkpoint_dir=checkpoint_dir, progress=progress)
    return out, embedding


def _evaluate(data: PerturbationData, split: Split, predictors: dict, progress: bool):
    rows, profiles, labels = [], [], []
    pairs = data.pairs(split.test)
    for context in sorted({context for _, context in pairs}):
        profiles.append(data.control_mean(context))
        labels.append(dict(predictor="control", checkpoint="", condition=data.control,
                           context=context, subgroup=""))
    for condition, context in tqdm(pairs, desc="scoring test conditions", disable=not progress):
        cells = (data.conditions == condition) & (data.contexts == context)
        controls = data.is_control & (data.contexts == context)
        truth, ctrl = data.expression[cells].mean(axis=0), data.expression[controls].mean(axis=0)
        de = de_genes(data.expression[cells], data.expression[controls])
        subgroup = split.subgroup_of(condition)
        profiles.append(truth)
        labels.append(dict(predictor="truth", checkpoint="", condition=condition,
                           context=context, subgroup=subgroup))
        for name, predictor in predictors.items():
            predicted = np.asarray(predictor.predict(condition, context), np.float64)
            profiles.append(predicted)
            labels.append(dict(predictor=name, checkpoint=predictor.checkpoint or "",
                               condition=condition, context=context, subgroup=subgroup))
            rows.append(dict(level="condition", predictor=name,
                             checkpoint=predictor.checkpoint or "", condition=condition,
                             context=context, subgroup=subgroup, n_conditions=1,
                             **condition_metrics(predicted, truth, ctrl, de)))
    per_condition = pd.DataFrame(rows)
    predictions = anndata.AnnData(np.asarray(profiles, np.float32),
                                  obs=pd.DataFrame(labels, index=[str(i) for i in
                                                                  range(len(labels))]),
                                  var=pd.DataFrame(index=list(data.genes)))
    return per_condition, predictions


def summarise(per_condition: pd.DataFrame) -> pd.DataFrame:
    """Per predictor, the mean of each metric over the conditions of each subgroup and over all
    test conditions (NaN values left out; `n_conditions` counts the conditions)."""
    summaries = []
    for (predictor, checkpoint), frame in per_condition.groupby(["predictor", "checkpoint"],
                                                                 sort=False):
        groups = [(s, frame[frame.subgroup == s]) for s in frame.subgroup.unique()]
        for subgroup, part in groups + [("all", frame)]:
            summaries.append(dict(level="subgroup" if subgroup != "all" else "all",
                                  predictor=predictor, checkpoint=checkpoint, condition="",
                                  context="", subgroup=subgroup, n_conditions=len(part),
                                  **{m: float(part[m].mean()) for m in METRICS}))
    return pd.DataFrame(summaries)


def run(adata: anndata.AnnData | str | Path, *, condition_key: str = "condition",
        control: str = "control", context_key: str | None = None, layer: str | None = None,
        total_key: str | None = None, split_key: str | None = None, seed: int = 1, train_gene_fraction: float = 0.75,
        checkpoint=None, scfoundation_key: str = "gene", vocabulary=None, scmulan_checkpoint=None,
        scmulan_vocabulary: str | Path | None = None, predictors=None,
        head: HeadSettings | None = None, gene_graph: str | Path | None = None,
        max_controls: int | None = None, embed_batch_size: int = 8,
        compute_dtype: str | None = None, output: str | Path | None = None, overwrite: bool = False,
        progress: bool = True) -> PerturbationResult:
    """Every chosen predictor fitted on the training conditions and scored on the test ones.

    `checkpoint`: an scFoundation checkpoint (anything `scfm_jax.analysis.load` reads, or a
    LoadedModel; weight set `scfoundation_key` of an official models.ckpt, `gene` by default as in
    the official GEARS experiment; `vocabulary` its gene list when it is not the released one).
    Without it the baselines and the PCA linear model run alone.
    `max_controls` caps the control cells embedded for the FM predictors (seeded choice);
    `compute_dtype` ("bfloat16", "float32") overrides the checkpoint config's `model.dtype` for
    that embedding (None: the config's).
    """
    chosen = chosen_predictors(predictors, checkpoint, scmulan_checkpoint)
    if output is not None:
        check_output(output, command="perturb", overwrite=overwrite, folder=True,
                     inputs=[] if isinstance(adata, anndata.AnnData) else [adata])
    if not isinstance(adata, anndata.AnnData):
        adata = anndata.read_h5ad(adata)
    data = read_perturbations(adata, condition_key=condition_key, control=control,
                              context_key=context_key, layer=layer, total_key=total_key)
    split = (column_split(adata, data, split_key) if split_key is not None else
             simulation_split(data.perturbations, seed=seed,
                              train_gene_fraction=train_gene_fraction))
    split.settings.update(condition_key=condition_key, control=control, context_key=context_key,
                          total_key=total_key)
    if not split.test:
        raise InputError("the split leaves no test condition; use more perturbations or a "
                         "smaller training gene fraction")
    view = TrainingView.of(data, split.train)
    leaked = set(view.data.perturbations) & set(split.test)
    assert not leaked, f"test conditions in the training view: {sorted(leaked)}"
    baselines = dict(no_change=NoChange(), train_mean=TrainMean(), additive=Additive(),
                     linear_pca=LinearPCA())
    fitted = {name: baselines[name] for name in chosen if name in baselines}
    embedding = None
    with (staged_folder(output, command="perturb") if output is not None else
          contextlib.nullcontext()) as staging:
        if set(chosen) & set(SCFOUNDATION_PREDICTORS):
            fm, embedding = _fm_predictors(
                chosen, data, view, checkpoint, scfoundation_key=scfoundation_key,
                vocabulary=vocabulary, compute_dtype=compute_dtype,
                max_controls=max_controls, embed_batch_size=embed_batch_size,
                head=head or HeadSettings(), gene_graph=gene_graph, seed=seed,
                checkpoint_dir=None if staging is None else staging / "gears_checkpoints",
                progress=progress)
            fitted.update(fm)
        if "linear_scmulan_tokens" in chosen:
            from scfm_jax.tasks.perturbation_fm import scmulan_token_table

            table = scmulan_token_table(_load(scmulan_checkpoint), scmulan_vocabulary)
            fitted["linear_scmulan_tokens"] = Linear(table, missing="zero")
            covered = sum(g in set(table.symbols) for g in data.perturbed_genes)
            print(f"scMulan gene tokens cover {covered} of {len(data.perturbed_genes)} perturbed "
                  "genes; the others get a zero row (their part of the prediction is the "
                  "training mean)", file=sys.stderr)
        fitted = {name: fitted[name] for name in chosen}
        for name, predictor in tqdm(fitted.items(), desc="fitting predictors",
                                    disable=not progress):
            predictor.fit(view)
        per_condition, predictions = _evaluate(data, split, fitted, progress)
        metrics = pd.concat([per_condition, summarise(per_condition)], ignore_index=True)
        result = PerturbationResult(
            metrics=metrics, split=split, predictions=predictions, predictors=fitted,
            embedding_seconds=None if embedding is None else embedding.seconds,
            embedded_cells=0 if embedding is None else len(embedding.embeddings))
        if staging is not None:
            _write(result, staging)
    return result


def _write(result: PerturbationResult, folder: Path) -> None:
    result.metrics.to_csv(folder / "metrics.csv", index=False)
    result.split.write(folder / "split.json")
    result.predictions.write_h5ad(folder / "predictions.h5ad")
    from scfm_jax.tasks.perturbation_plots import plot_results

    plot_results(result.metrics, result.predictions, folder / "perturbation.png")


def table(metrics: pd.DataFrame, metric_names=METRICS) -> str:
    """The subgroup means as a Markdown table (predictor x subgroup rows, metric columns)."""
    means = metrics[metrics.level != "condition"]
    order = {s: i for i, s in enumerate(SUBGROUPS + ("all",))}
    means = means.sort_values(["predictor", "subgroup"],
                              key=lambda c: c.map(order) if c.name == "subgroup" else c,
                              kind="stable")
    header = "| predictor | subgroup | n | " + " | ".join(metric_names) + " |"
    lines = [header, "|" + "---|" * (3 + len(metric_names))]
    for row in means.itertuples():
        values = " | ".join(f"{getattr(row, m):.4f}" for m in metric_names)
        lines.append(f"| {row.predictor} | {row.subgroup} | {row.n_conditions} | {values} |")
    return "\n".join(lines)
