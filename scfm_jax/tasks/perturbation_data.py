"""Perturb-seq input for the perturbation task: conditions, expression, pseudobulks and the split.

A condition names the perturbed genes joined by `+` (`KLF1`, `KLF1+MAP2K6`); GEARS's `A+ctrl`
spelling is read as `A`. Expression is log1p(count / total * 1e4) of the measured genes (GEARS
works in that space; the total is the cell's whole-transcriptome count when an obs column gives
it); the control mean, the pseudobulks and every prediction are per context
(cell line, cell type, donor) when a context column is given.

The split is GEARS's `simulation` split (`gears.data_utils.DataSplitter.get_simulation_split`):
a seeded fraction of the perturbed genes is kept for training; the test set holds the singles of
the other genes (`unseen_single`), the combinations with one training gene (`combo_seen1`) or
none (`combo_seen0`), and a seeded share of the combinations of two training genes
(`combo_seen2`). Or the user gives a split column (`train` / `test` per cell).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm_jax.data.host_ops import COUNT_TOLERANCE, non_count_positions
from scfm_jax.errors import InputError, UnknownName, UsageError

SUBGROUPS = ("unseen_single", "combo_seen0", "combo_seen1", "combo_seen2")
NO_CONTEXT = "all"


def genes_of(condition: str) -> tuple[str, ...]:
    """The perturbed genes of a condition name, in order (`A+ctrl` -> (`A`,))."""
    return tuple(gene for gene in condition.split("+") if gene and gene != "ctrl")


def canonical(condition: str) -> str:
    """`A+ctrl` / `ctrl+A` -> `A`; other names unchanged."""
    return "+".join(genes_of(condition))


@dataclasses.dataclass
class PerturbationData:
    """Cells of one Perturb-seq experiment, ready for the predictors."""

    expression: np.ndarray        # [cells, genes] float32, log1p(count / total * 1e4)
    counts: sp.csr_matrix         # [cells, genes] raw counts (the FM's input)
    genes: tuple[str, ...]        # measured genes
    conditions: np.ndarray        # [cells] canonical condition name ('' for control cells)
    contexts: np.ndarray          # [cells] context name (NO_CONTEXT without a context column)
    control: str                  # the control label as the user wrote it

    @property
    def is_control(self) -> np.ndarray:
        return self.conditions == ""

    @property
    def perturbations(self) -> list[str]:
        return sorted(set(self.conditions[~self.is_control]))

    @property
    def perturbed_genes(self) -> list[str]:
        return sorted({gene for condition in self.perturbations for gene in genes_of(condition)})

    @property
    def context_names(self) -> list[str]:
        return sorted(set(self.contexts))

    def control_mean(self, context: str) -> np.ndarray:
        return self.expression[self.is_control & (self.contexts == context)].mean(axis=0)

    def pseudobulk(self, condition: str, context: str) -> np.ndarray:
        return self.expression[(self.conditions == condition) & (self.contexts == context)
                               ].mean(axis=0)

    def pairs(self, conditions) -> list[tuple[str, str]]:
        """(condition, context) pairs with cells, for the given conditions."""
        wanted = set(conditions)
        present = {(c, x) for c, x in zip(self.conditions, self.contexts) if c in wanted}
        return sorted(present)


def _counts_matrix(adata: anndata.AnnData, layer: str | None) -> tuple[sp.csr_matrix, str]:
    if layer is None:
        layer = "counts" if "counts" in adata.layers else None
    if layer is not None and layer not in adata.layers:
        raise UnknownName(f"the input has no layer {layer!r} (layers: {list(adata.layers)}); "
                       "name the layer that holds raw counts")
    matrix = adata.X if layer is None else adata.layers[layer]
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    csr = sp.csr_matrix(matrix, dtype=np.float64)
    if len(non_count_positions(csr.data, COUNT_TOLERANCE)):
        raise InputError(f"{where} does not hold raw counts (non-integer values); give the layer "
                         "with integer counts (--layer)")
    return csr, where


def log_normalise(counts: sp.csr_matrix, totals: np.ndarray | None = None) -> np.ndarray:
    """log1p(count / total * 1e4), dense float32 (cells with no counts stay zero); `totals`
    default to the row sums."""
    if totals is None:
        totals = np.asarray(counts.sum(axis=1)).ravel()
    totals = np.asarray(totals, np.float64)
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(np.asarray((sp.diags(scale) @ counts).todense())).astype(np.float32)


def read_perturbations(adata: anndata.AnnData, *, condition_key: str = "condition",
                       control: str = "control", context_key: str | None = None,
                       layer: str | None = None, total_key: str | None = None
                       ) -> PerturbationData:
    """The cells of `adata` as PerturbationData; bad input raises a one-line error.

    `total_key`: an obs column with each cell's total count over the whole transcriptome, used
    to normalise when the matrix holds a gene subset (the Norman subset's `ncounts`: then the
    expression is the published log1p-normalised X); default the row sums of the matrix.
    """
    for key, what in ((condition_key, "--condition-key"), (context_key, "--context-key"),
                      (total_key, "--total-key")):
        if key is not None and key not in adata.obs:
            raise UnknownName(f"obs has no column {key!r} ({what}); columns: {list(adata.obs)}")
    raw = adata.obs[condition_key].astype(str).to_numpy()
    is_control = raw == control
    if not is_control.any():
        examples = ", ".join(sorted(set(raw))[:5])
        raise InputError(f"no control cells: no cell has {condition_key} == {control!r} "
                         f"(values include {examples}); name the control label with --control")
    conditions = np.array(["" if c else canonical(name) for name, c in zip(raw, is_control)],
                          dtype=object)
    empty = sorted(set(raw[~is_control & (conditions == "")]))
    if empty:
        raise InputError(f"condition {empty[0]!r} names no perturbed gene; if it is a control, "
                         f"relabel it {control!r}")
    contexts = (np.full(adata.n_obs, NO_CONTEXT, dtype=object) if context_key is None
                else adata.obs[context_key].astype(str).to_numpy().astype(object))
    for context in sorted(set(contexts)):
        if not (is_control & (contexts == context)).any():
            raise InputError(f"context {context!r} ({context_key}) has no control cells; "
                             "control means are per context: add its controls or drop its cells")
    counts, _ = _counts_matrix(adata, layer)
    totals = None
    if total_key is not None:
        totals = adata.obs[total_key].to_numpy(np.float64)
        if not np.all(totals > 0):
            raise InputError(f"obs[{total_key!r}] (--total-key) has totals <= 0; it must hold "
                             "each cell's total count")
    return PerturbationData(expression=log_normalise(counts, totals), counts=counts,
                            genes=tuple(map(str, adata.var_names)), conditions=conditions,
                            contexts=contexts, control=control)


@dataclasses.dataclass
class Split:
    """Training and test conditions (canonical names) and the test subgroups."""

    train: list[str]
    test: list[str]
    subgroups: dict[str, list[str]]     # subgroup -> test conditions
    settings: dict

    def subgroup_of(self, condition: str) -> str:
        for name, members in self.subgroups.items():
            if condition in members:
                return name
        return "test"

    def to_json(self) -> dict:
        return dict(self.settings, train=self.train, test=self.test, subgroups=self.subgroups)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")


def simulation_split(perturbations, *, seed: int = 1, train_gene_fraction: float = 0.75,
                     combo_seen2_train_fraction: float = 0.75) -> Split:
    """GEARS's simulation split of the perturbation names (see the module docstring)."""
    if not 0 < train_gene_fraction < 1:
        raise UsageError(f"the training gene fraction must be in (0, 1), got {train_gene_fraction}")
    perturbations = sorted(set(perturbations))
    genes = sorted({gene for p in perturbations for gene in genes_of(p)})
    rng = np.random.RandomState(seed)
    train_genes = set(rng.choice(genes, int(len(genes) * train_gene_fraction), replace=False))
    singles = [p for p in perturbations if len(genes_of(p)) == 1]
    combos = [p for p in perturbations if len(genes_of(p)) > 1]

    def seen(p):
        return sum(gene in train_genes for gene in genes_of(p))

    train = [p for p in singles if seen(p) == 1]
    unseen_single = [p for p in singles if seen(p) == 0]
    combo_seen0 = [p for p in combos if seen(p) == 0]
    combo_seen1 = [p for p in combos if 0 < seen(p) < len(genes_of(p))]
    both_seen = [p for p in combos if seen(p) == len(genes_of(p))]
    rng = np.random.RandomState(seed)
    combo_train = (set(rng.choice(both_seen, int(len(both_seen) * combo_seen2_train_fraction),
                                  replace=False)) if both_seen else set())
    combo_seen2 = [p for p in both_seen if p not in combo_train]
    train += sorted(combo_train)
    subgroups = dict(unseen_single=unseen_single, combo_seen0=combo_seen0,
                     combo_seen1=combo_seen1, combo_seen2=combo_seen2)
    test = [p for name in SUBGROUPS for p in subgroups[name]]
    return Split(train=sorted(train), test=test, subgroups=subgroups,
                 settings=dict(kind="simulation", seed=seed,
                               train_gene_fraction=train_gene_fraction,
                               combo_seen2_train_fraction=combo_seen2_train_fraction,
                               train_genes=sorted(train_genes)))


def column_split(adata: anndata.AnnData, data: PerturbationData, split_key: str) -> Split:
    """The split a user's obs column gives (`train` / `test` per cell; a condition is one or the
    other); test conditions get the simulation subgroups by which of their genes train has."""
    if split_key not in adata.obs:
        raise UnknownName(f"obs has no split column {split_key!r}; columns: {list(adata.obs)}")
    labels = adata.obs[split_key].astype(str).to_numpy()
    unknown = sorted(set(labels[~data.is_control]) - {"train", "test"})
    if unknown:
        raise InputError(f"split column {split_key!r} holds {unknown[0]!r}; perturbed cells must "
                         "be 'train' or 'test'")
    frame = pd.DataFrame({"condition": data.conditions, "split": labels})[~data.is_control]
    both = frame.groupby("condition")["split"].nunique()
    if (both > 1).any():
        raise InputError(f"condition {both[both > 1].index[0]!r} has cells in train and test in "
                         f"{split_key!r}; a condition belongs to one side")
    by_condition = frame.groupby("condition")["split"].first()
    train = sorted(by_condition[by_condition == "train"].index)
    test = sorted(by_condition[by_condition == "test"].index)
    train_genes = {gene for p in train if len(genes_of(p)) == 1 for gene in genes_of(p)}
    subgroups = {name: [] for name in SUBGROUPS}
    for p in test:
        seen = sum(gene in train_genes for gene in genes_of(p))
        name = ("unseen_single" if seen == 0 else "seen_single") if len(genes_of(p)) == 1 else (
            "combo_seen0" if seen == 0 else "combo_seen1" if seen < len(genes_of(p))
            else "combo_seen2")
        subgroups.setdefault(name, []).append(p)
    return Split(train=train, test=test, subgroups=subgroups,
                 settings=dict(kind="column", column=split_key))
