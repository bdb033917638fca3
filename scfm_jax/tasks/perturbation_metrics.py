"""Perturbation metrics (GEARS's `inference.py` definitions), per condition, in numpy.

Notation for one test condition p in one context: `pred` and `true` are the predicted and the
measured mean expression profiles over the G measured genes (log1p-normalised), `ctrl` the control
mean of that context, `DE` the condition's top-20 differentially expressed genes (`de_genes`).

  mse            = 1/G * sum_g (pred_g - true_g)^2
  pearson        = corr(pred, true)                      (over all genes)
  mse_de         = 1/20 * sum_{g in DE} (pred_g - true_g)^2
  pearson_de     = corr(pred[DE], true[DE])
  pearson_delta  = corr(pred - ctrl, true - ctrl)         (the change from control, all genes)
  pearson_delta_de = corr((pred - ctrl)[DE], (true - ctrl)[DE])
  direction_de   = 1/20 * #{g in DE : sign(pred_g - ctrl_g) == sign(true_g - ctrl_g)}

corr is Pearson's r; it is NaN when either side is constant (e.g. the no-change predictor's
delta), and NaN conditions are left out of subgroup means (the count of conditions is reported).
"""
from __future__ import annotations

import numpy as np

METRICS = ("mse", "pearson", "mse_de", "pearson_de", "pearson_delta", "pearson_delta_de",
           "direction_de")
TOP_DE = 20


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r = sum((x - mean x)(y - mean y)) / sqrt(sum (x - mean x)^2 sum (y - mean y)^2);
    NaN when either is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    return float(np.sum(dx * dy) / denominator) if denominator > 0 else float("nan")


def de_genes(perturbed: np.ndarray, control: np.ndarray, top: int = TOP_DE) -> np.ndarray:
    """Indices of the `top` genes with the largest |Welch t| between the perturbed and the control
    cells ([cells, genes] log-normalised), as GEARS ranks them (scanpy `rank_genes_groups`,
    method 't-test', `rankby_abs=True`, against the control group):

      t_g = (mean_p,g - mean_c,g) / sqrt(var_p,g / n_p + var_c,g / n_c)   (variances with ddof 1)

    A gene constant in both groups has t = 0 (scanpy turns its NaN score into 0). Ties keep the
    lower gene index first.
    """
    perturbed, control = np.asarray(perturbed, np.float64), np.asarray(control, np.float64)
    difference = perturbed.mean(axis=0) - control.mean(axis=0)
    spread = np.sqrt(perturbed.var(axis=0, ddof=1) / len(perturbed)
                     + control.var(axis=0, ddof=1) / len(control))
    t = np.divide(difference, spread, out=np.zeros_like(difference), where=spread > 0)
    return np.argsort(-np.abs(t), kind="stable")[:top]


def condition_metrics(pred: np.ndarray, true: np.ndarray, ctrl: np.ndarray,
                      de: np.ndarray) -> dict[str, float]:
    """Every metric of the module docstring for one condition."""
    pred, true, ctrl = (np.asarray(v, np.float64) for v in (pred, true, ctrl))
    error = (pred - true) ** 2
    pred_delta, true_delta = pred - ctrl, true - ctrl
    return dict(
        mse=float(error.mean()), pearson=pearson(pred, true),
        mse_de=float(error[de].mean()), pearson_de=pearson(pred[de], true[de]),
        pearson_delta=pearson(pred_delta, true_delta),
        pearson_delta_de=pearson(pred_delta[de], true_delta[de]),
        direction_de=float(np.mean(np.sign(pred_delta[de]) == np.sign(true_delta[de]))))
