"""The perturbation predictors with one interface, and the gene tables the linear model uses.

Every predictor is fitted on a `TrainingView` (the control cells and the cells of the training
conditions only; the runner builds it, so no test condition can reach a fit) and then predicts a
condition's mean expression profile over the measured genes in a context:

  no_change   ctrl(context): the control mean;
  train_mean  ctrl(context) + the mean change of the training (condition, context) pseudobulks;
  additive    ctrl(context) + sum over the condition's genes of Δ(gene), Δ(gene) the change of the
              gene's training single in that context (else its mean over the contexts where it was
              trained; a gene without a training single adds nothing);
  linear_*    Ahlmann-Eltze et al. 2025: Y (genes x training pairs, pseudobulk - ctrl) centred by
              its row means b, fitted as Y - b ≈ G W Pᵀ in closed form,
              W = (GᵀG + λI)⁻¹ Gᵀ (Y - b) P (PᵀP + λI)⁻¹, λ = 0.1;
              prediction ctrl(context) + b + G W p. G: the measured genes' rows of a gene table;
              p: the sum of the condition's perturbed genes' rows.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from scfm_jax.errors import InputError
from scfm_jax.tasks.perturbation_data import PerturbationData, genes_of

RIDGE = 0.1
PCA_DIMENSIONS = 10


@dataclasses.dataclass
class TrainingView:
    """What a predictor may learn from: control cells and training-condition cells only."""

    data: PerturbationData        # already restricted to control + training cells
    train: list[str]

    @classmethod
    def of(cls, data: PerturbationData, train: list[str]) -> "TrainingView":
        keep = data.is_control | np.isin(data.conditions, list(train))
        restricted = dataclasses.replace(
            data, expression=data.expression[keep], counts=data.counts[keep],
            conditions=data.conditions[keep], contexts=data.contexts[keep])
        return cls(data=restricted, train=sorted(set(train)))

    def changes(self) -> tuple[list[tuple[str, str]], np.ndarray]:
        """(training (condition, context) pairs, their pseudobulk changes [pairs, genes])."""
        pairs = self.data.pairs(self.train)
        controls = {context: self.data.control_mean(context) for context in
                    self.data.context_names}
        deltas = np.stack([self.data.pseudobulk(c, x) - controls[x] for c, x in pairs]) if pairs \
            else np.zeros((0, len(self.data.genes)), np.float32)
        return pairs, deltas


class Predictor:
    """fit(view) once, then predict(condition, context) -> [genes]."""

    name = "predictor"
    checkpoint: str | None = None      # the checkpoint a model row comes from; None for baselines

    def fit(self, view: TrainingView) -> None:
        self.controls = {x: view.data.control_mean(x) for x in view.data.context_names}

    def predict(self, condition: str, context: str) -> np.ndarray:
        raise NotImplementedError

    def control(self, context: str) -> np.ndarray:
        if context not in self.controls:
            raise InputError(f"context {context!r} has no control cells in the training data")
        return self.controls[context]


class NoChange(Predictor):
    name = "no_change"

    def predict(self, condition, context):
        return self.control(context)


class TrainMean(Predictor):
    name = "train_mean"

    def fit(self, view):
        super().fit(view)
        _, deltas = view.changes()
        self.mean_change = deltas.mean(axis=0) if len(deltas) else 0.0

    def predict(self, condition, context):
        return self.control(context) + self.mean_change


class Additive(Predictor):
    name = "additive"

    def fit(self, view):
        super().fit(view)
        pairs, deltas = view.changes()
        self.single = {}
        for (condition, context), delta in zip(pairs, deltas):
            if len(genes_of(condition)) == 1:
                self.single.setdefault(condition, {})[context] = delta

    def change(self, gene: str, context: str) -> np.ndarray | float:
        by_context = self.single.get(gene)
        if not by_context:
            return 0.0
        return by_context.get(context, np.mean(list(by_context.values()), axis=0))

    def predict(self, condition, context):
        return self.control(context) + sum(self.change(g, context) for g in genes_of(condition))


@dataclasses.dataclass
class GeneTable:
    """Gene embeddings by symbol: `symbols[i]` has row `vectors[i]`."""

    name: str                     # e.g. "scfoundation_tokens"
    symbols: tuple[str, ...]
    vectors: np.ndarray           # [symbols, dimensions]
    checkpoint: str | None = None

    def rows(self, genes, *, missing: str) -> np.ndarray:
        """The rows of `genes`; an absent gene is a zero row (`missing="zero"`) or an error."""
        index = {symbol: i for i, symbol in enumerate(self.symbols)}
        absent = [g for g in genes if g not in index]
        if absent and missing == "error":
            raise InputError(f"perturbed gene {absent[0]!r} is not in the vocabulary of "
                             f"{self.checkpoint or self.name} ({len(absent)} such genes: "
                             f"{', '.join(absent[:5])}); drop those conditions or use a model "
                             "whose vocabulary has them")
        out = np.zeros((len(genes), self.vectors.shape[1]), np.float64)
        for row, gene in enumerate(genes):
            if gene in index:
                out[row] = self.vectors[index[gene]]
        return out


def ridge_fit(G: np.ndarray, Y: np.ndarray, P: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """W = (GᵀG + λI)⁻¹ Gᵀ Y P (PᵀP + λI)⁻¹ for Y [genes, pairs], G [genes, k], P [pairs, l]."""
    left = np.linalg.solve(G.T @ G + ridge * np.eye(G.shape[1]), G.T @ Y @ P)
    return np.linalg.solve(P.T @ P + ridge * np.eye(P.shape[1]), left.T).T


class Linear(Predictor):
    """The linear model with a fixed gene table (FM tables): G and P from the same table."""

    def __init__(self, table: GeneTable, *, missing: str = "error", ridge: float = RIDGE):
        self.table, self.missing, self.ridge = table, missing, ridge
        self.name = f"linear_{table.name}"
        self.checkpoint = table.checkpoint

    def perturbation_rows(self, conditions) -> np.ndarray:
        return np.stack([self.table.rows(list(genes_of(c)), missing=self.missing).sum(axis=0)
                         for c in conditions])

    def measured_gene_rows(self, view: TrainingView) -> np.ndarray:
        return self.table.rows(list(view.data.genes), missing="zero")

    def fit(self, view):
        super().fit(view)
        pairs, deltas = view.changes()
        self.centre = deltas.mean(axis=0)
        self.G = self.measured_gene_rows(view)
        P = self.perturbation_rows([c for c, _ in pairs])
        self.W = ridge_fit(self.G, (deltas - self.centre).T, P, self.ridge)

    def predict(self, condition, context):
        p = self.perturbation_rows([condition])[0]
        return self.control(context) + self.centre + self.G @ self.W @ p


class LinearPCA(Linear):
    """G: the top-K principal gene loadings U of the centred training changes. The perturbed genes
    of Norman-like data are mostly not measured (Ahlmann-Eltze take the perturbed gene's row of G),
    so here a gene's row of P is its training single's centred change in those coordinates
    (Uᵀ(Δ - b)); a gene without a training single gets a zero row, i.e. the training mean."""

    name = "linear_pca"

    def __init__(self, dimensions: int = PCA_DIMENSIONS, ridge: float = RIDGE):
        self.dimensions, self.ridge, self.missing = dimensions, ridge, "zero"

    def measured_gene_rows(self, view):
        pairs, deltas = view.changes()
        centred = (deltas - deltas.mean(axis=0)).T           # [genes, pairs]
        loadings = np.linalg.svd(centred, full_matrices=False)[0][:, :self.dimensions]
        singles = {}
        for (condition, _), column in zip(pairs, centred.T):
            if len(genes_of(condition)) == 1:
                singles.setdefault(condition, []).append(loadings.T @ column)
        symbols = tuple(singles)
        vectors = (np.stack([np.mean(singles[s], axis=0) for s in symbols]) if symbols
                   else np.zeros((0, loadings.shape[1])))
        self.table = GeneTable("pca", symbols, vectors)
        return loadings
