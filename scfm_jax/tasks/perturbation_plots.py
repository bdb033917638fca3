"""The perturbation task's figure: pearson_delta per predictor and subgroup, and predicted against
true change on the top DE genes of a few test conditions."""
from __future__ import annotations

from pathlib import Path

import anndata
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from scfm_jax.tasks.perturbation_data import SUBGROUPS  # noqa: E402
from scfm_jax.tasks.perturbation_metrics import TOP_DE  # noqa: E402

EXAMPLE_CONDITIONS = 3


def plot_results(metrics: pd.DataFrame, predictions: anndata.AnnData, path: str | Path) -> None:
    """Write the PNG: top, a bar per predictor and subgroup; below, one scatter per example
    condition (the change from control of its `TOP_DE` largest true changes)."""
    means = metrics[metrics.level == "subgroup"]
    predictors = list(dict.fromkeys(means.predictor))
    order = {name: i for i, name in enumerate(SUBGROUPS)}
    subgroups = sorted(dict.fromkeys(means.subgroup), key=lambda s: order.get(s, len(order)))
    obs = predictions.obs
    truth = obs[obs.predictor == "truth"]
    examples = list(dict.fromkeys(zip(truth.condition, truth.context)))[:EXAMPLE_CONDITIONS]
    figure = plt.figure(figsize=(4 * max(len(examples), 2), 8), constrained_layout=True)
    grid = figure.add_gridspec(2, max(len(examples), 1))
    bars = figure.add_subplot(grid[0, :])
    width = 0.8 / max(len(predictors), 1)
    for i, predictor in enumerate(predictors):
        values = [means[(means.predictor == predictor) & (means.subgroup == s)].pearson_delta
                  .mean() for s in subgroups]
        bars.bar(np.arange(len(subgroups)) + i * width, values, width, label=predictor,
                 color=f"C{i % 10}")
    bars.set_xticks(np.arange(len(subgroups)) + width * (len(predictors) - 1) / 2, subgroups)
    bars.set_ylabel("pearson_delta (mean over conditions)")
    bars.set_title("change from control, predicted vs true (no_change has none: undefined)")
    bars.axhline(0, color="black", linewidth=0.5)
    bars.legend(fontsize="small", ncol=2)
    control_rows = _control_profiles(predictions)
    for column, (condition, context) in enumerate(examples):
        axis = figure.add_subplot(grid[1, column])
        rows = (obs.condition == condition) & (obs.context == context)
        true_row = np.flatnonzero(rows & (obs.predictor == "truth"))[0]
        ctrl = control_rows[context]
        true_change = predictions.X[true_row] - ctrl
        top = np.argsort(-np.abs(true_change))[:TOP_DE]
        for i, predictor in enumerate(predictors):
            row = np.flatnonzero(rows & (obs.predictor == predictor))
            if len(row):
                axis.scatter(true_change[top], predictions.X[row[0]][top] - ctrl[top], s=12,
                             color=f"C{i % 10}", label=predictor)
        limit = float(np.abs(true_change[top]).max()) * 1.1 or 1.0
        axis.plot([-limit, limit], [-limit, limit], color="grey", linewidth=0.5)
        axis.set_title(f"{condition}" + (f" ({context})" if context != "all" else ""))
        axis.set_xlabel(f"true change, top {TOP_DE} changed genes")
        axis.set_ylabel("predicted change")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _control_profiles(predictions) -> dict[str, np.ndarray]:
    """The control mean of each context (the `control` rows of predictions.h5ad)."""
    obs = predictions.obs
    rows = np.flatnonzero(obs.predictor == "control")
    return {obs.context.iloc[row]: predictions.X[row] for row in rows}
