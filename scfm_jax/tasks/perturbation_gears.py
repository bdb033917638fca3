"""The GEARS-style predictor: graphs, GEARS's loss, training with optax on the device mesh, Orbax.

Training pairs every training cell with a control cell of its context (GEARS's pairing; control
cells are their own input), reads that control cell's frozen FM embeddings from the cache, and
steps the head (`scfm_jax.models.gears_head`) with plain optax under `jax.jit`, the batch sharded
over `jax.devices()` and the parameters replicated. The parameters are saved with an Orbax
CheckpointManager after every epoch. A prediction is the head's output averaged over the control
cells of the context.

Loss (GEARS `loss_fct`, gamma = 2): for each condition p in the batch, over its cells i and its
retained genes g (those with a non-zero mean expression in p's training cells),

  L_p = 1/(n_p G_p) * sum_{i,g} [(pred_ig - y_ig)^4
                                 + λ (sign(y_ig - ctrl_g) - sign(pred_ig - ctrl_g))^2],

ctrl the control mean of the cell's context, λ = 0.1; the loss is the mean of L_p over the
conditions present (control cells count as one condition).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from scfm_jax.errors import InputError
from scfm_jax.models.gears_head import GearsHead
from scfm_jax.tasks.perturbation_data import genes_of
from scfm_jax.tasks.perturbation_fm import ControlEmbeddings
from scfm_jax.tasks.perturbation_predictors import Predictor, TrainingView

DIRECTION_LAMBDA = 0.1
COEXPRESSION_NEIGHBOURS = 20      # GEARS: top 20 |Pearson| partners per gene ...
COEXPRESSION_THRESHOLD = 0.4      # ... kept above 0.4
PERTURBATION_NEIGHBOURS = 5


@dataclasses.dataclass
class HeadSettings:
    epochs: int = 15
    batch_size: int = 32
    hidden: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 5e-4     # GEARS: Adam(lr 1e-3, weight_decay 5e-4), StepLR(1, 0.5)
    seed: int = 0
    max_prediction_controls: int = 128


def coexpression_graph(expression: np.ndarray, neighbours: int = COEXPRESSION_NEIGHBOURS,
                       threshold: float = COEXPRESSION_THRESHOLD) -> np.ndarray:
    """GEARS's co-expression graph of the training cells: each gene's `neighbours` largest
    |Pearson r| partners above `threshold`, weight |r|, symmetrised (max)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.abs(np.corrcoef(expression.T))
    correlation = np.nan_to_num(correlation)
    np.fill_diagonal(correlation, 0.0)
    adjacency = np.zeros_like(correlation)
    top = np.argsort(-correlation, axis=1)[:, :neighbours]
    rows = np.arange(len(correlation))[:, None]
    adjacency[rows, top] = correlation[rows, top]
    adjacency[adjacency <= threshold] = 0.0
    return np.maximum(adjacency, adjacency.T)


def knn_graph(vectors: np.ndarray, neighbours: int = PERTURBATION_NEIGHBOURS) -> np.ndarray:
    """Each row's `neighbours` most cosine-similar rows, weight max(cosine, 0), symmetrised."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    adjacency = np.zeros_like(similarity)
    k = min(neighbours, len(vectors) - 1)
    if k > 0:
        top = np.argsort(-similarity, axis=1)[:, :k]
        rows = np.arange(len(vectors))[:, None]
        adjacency[rows, top] = np.maximum(similarity[rows, top], 0.0)
    return np.maximum(adjacency, adjacency.T)


def graph_from_file(path: str | Path, genes: list[str]) -> np.ndarray:
    """A gene graph from a TSV/CSV of `source`, `target` and optional `weight` columns (e.g. GO
    similarity from GEARS's `gene2go`), over `genes`; edges of other genes are ignored."""
    import pandas as pd

    table = pd.read_csv(path, sep=None, engine="python")
    for column in ("source", "target"):
        if column not in table:
            raise InputError(f"{path}: a gene graph needs columns source, target (and optionally "
                             f"weight); it has {list(table.columns)}")
    index = {g: i for i, g in enumerate(genes)}
    adjacency = np.zeros((len(genes), len(genes)))
    weights = table["weight"] if "weight" in table else np.ones(len(table))
    for source, target, weight in zip(table["source"], table["target"], weights):
        if source in index and target in index and source != target:
            adjacency[index[source], index[target]] = float(weight)
    return np.maximum(adjacency, adjacency.T)


def gears_loss(pred, y, control_mean, retained, condition_ids, num_conditions):
    """GEARS's loss (module docstring). pred, y, control_mean, retained [B, genes];
    condition_ids [B] in [0, num_conditions)."""
    error = (pred - y) ** 4 + DIRECTION_LAMBDA * (
        jnp.sign(y - control_mean) - jnp.sign(pred - control_mean)) ** 2
    per_cell = jnp.sum(error * retained, axis=1) / jnp.maximum(jnp.sum(retained, axis=1), 1.0)
    total = jax.ops.segment_sum(per_cell, condition_ids, num_segments=num_conditions)
    cells = jax.ops.segment_sum(jnp.ones_like(per_cell), condition_ids,
                                num_segments=num_conditions)
    present = cells > 0
    return jnp.sum(jnp.where(present, total / jnp.maximum(cells, 1.0), 0.0)) / jnp.sum(present)


class GearsPredictor(Predictor):
    """GEARS-style head on frozen scFoundation decoder embeddings of control cells."""

    name = "gears_scfoundation"

    def __init__(self, embeddings: ControlEmbeddings, control_cells: np.ndarray,
                 perturbed_genes: list[str], *, settings: HeadSettings | None = None,
                 gene_graph: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                 progress: bool = True):
        """`embeddings` are of the training view's control cells `control_cells` (indices into the
        view's cells, in the same order); `perturbed_genes`: every gene a condition may name."""
        self.embeddings, self.control_cells = embeddings, np.asarray(control_cells)
        self.perturbed_genes = list(perturbed_genes)
        self.settings = settings or HeadSettings()
        self.gene_graph, self.checkpoint_dir, self.progress = gene_graph, checkpoint_dir, progress
        self.checkpoint = embeddings.checkpoint
        self.losses: list[float] = []
        self.fixed_sample_loss: list[float] = []     # before and after training
        self.steps_per_second = float("nan")

    def perturbation_graph(self) -> np.ndarray:
        if self.gene_graph is not None:
            return graph_from_file(self.gene_graph, self.perturbed_genes)
        return knn_graph(self.embeddings.mean_table().rows(self.perturbed_genes, missing="zero"))

    def multi_hot(self, conditions) -> np.ndarray:
        index = {g: i for i, g in enumerate(self.perturbed_genes)}
        out = np.zeros((len(conditions), len(self.perturbed_genes)), np.float32)
        for row, condition in enumerate(conditions):
            for gene in genes_of(condition):
                out[row, index[gene]] = 1.0
        return out

    def fit(self, view: TrainingView) -> None:
        super().fit(view)
        data, s = view.data, self.settings
        self.genes = list(data.genes)
        self.fm = self.embeddings.rows_of(self.genes)                      # [controls, G, F]
        self.control_expression = data.expression[self.control_cells]
        self.control_contexts = data.contexts[self.control_cells]
        names = [""] + list(view.train)
        condition_ids = np.array([names.index(c) for c in data.conditions], np.int32)
        retained = np.stack([data.expression[data.conditions == c].mean(axis=0) > 0
                             for c in names]).astype(np.float32)
        rng = np.random.default_rng(s.seed)
        partner = self._partners(data.contexts, rng)
        partner[self.control_cells] = np.arange(len(self.control_cells))
        model = GearsHead(num_genes=len(self.genes), num_perturbation_genes=len(self.perturbed_genes),
                          fm_width=self.fm.shape[-1], coexpression=coexpression_graph(
                              data.expression), perturbation_graph=self.perturbation_graph(),
                          hidden=s.hidden, rngs=nnx.Rngs(s.seed))
        batch_size = -(-s.batch_size // len(jax.devices())) * len(jax.devices())
        steps_per_epoch = -(-len(data.conditions) // batch_size)
        optimiser = optax.chain(optax.add_decayed_weights(s.weight_decay), optax.adam(
            optax.exponential_decay(s.learning_rate, steps_per_epoch, 0.5, staircase=True)))
        self.graphdef, params, constants = nnx.split(model, nnx.Param, ...)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        replicated, sharded = (NamedSharding(mesh, PartitionSpec()),
                               NamedSharding(mesh, PartitionSpec("data")))
        params, constants = jax.device_put((params, constants), replicated)
        opt_state = jax.device_put(optimiser.init(params), replicated)
        graphdef, num_conditions = self.graphdef, len(names)

        def loss_of(params, batch):
            head = nnx.merge(graphdef, params, constants)
            pred = head(batch["fm"], batch["control"], batch["perturbed"])
            return gears_loss(pred, batch["y"], batch["control_mean"], batch["retained"],
                              batch["condition"], num_conditions)

        @jax.jit
        def train_step(params, opt_state, batch):
            loss, grads = jax.value_and_grad(loss_of)(params, batch)
            updates, opt_state = optimiser.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        control_means = np.stack([self.control(x) for x in data.contexts])
        multi_hot = self.multi_hot(data.conditions)

        def batch_of(cells):
            return jax.device_put(dict(
                fm=self.fm[partner[cells]], control=self.control_expression[partner[cells]],
                perturbed=multi_hot[cells], y=data.expression[cells],
                control_mean=control_means[cells], retained=retained[condition_ids[cells]],
                condition=condition_ids[cells]), sharded)

        # a fixed sample with fixed partners: its loss before and after training shows learning
        # apart from the cell-to-cell noise of the per-step losses
        fixed = batch_of(rng.choice(len(data.conditions), batch_size * 4, replace=False))
        fixed_loss = jax.jit(loss_of)
        self.fixed_sample_loss = [float(fixed_loss(params, fixed))]
        manager = self._checkpoint_manager()
        progress = tqdm(total=s.epochs * steps_per_epoch, desc="GEARS head training",
                        disable=not self.progress, unit="step")
        started, steps = None, 0
        for epoch in range(s.epochs):
            order = rng.permutation(len(data.conditions))
            order = np.concatenate([order, order[:(-len(order)) % batch_size]])
            partner = self._partners(data.contexts, rng, keep=partner)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                batch = batch_of(order[start:start + batch_size])
                params, opt_state, loss = train_step(params, opt_state, batch)
                self.losses.append(float(loss))
                progress.update()
                progress.set_postfix(epoch=epoch, loss=f"{self.losses[-1]:.4f}")
                if started is None:   # the first step compiles
                    started = time.perf_counter()
                else:
                    steps += 1
            if manager is not None:
                manager.save(epoch, args=_orbax().args.StandardSave(nnx.to_pure_dict(params)))
        self.fixed_sample_loss.append(float(fixed_loss(params, fixed)))
        progress.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
        self.steps_per_second = steps / (time.perf_counter() - started) if steps else float("nan")
        self.params, self.constants = params, constants

    def _partners(self, contexts, rng, keep=None) -> np.ndarray:
        """A random control cell (index into the control cells) of the same context per cell."""
        partner = np.zeros(len(contexts), np.int64) if keep is None else keep.copy()
        for context in np.unique(contexts):
            cells = np.flatnonzero(contexts == context)
            pool = np.flatnonzero(self.control_contexts == context)
            is_control = np.isin(cells, self.control_cells)
            chosen = rng.choice(pool, len(cells))
            partner[cells[~is_control]] = chosen[~is_control]
        return partner

    def _checkpoint_manager(self):
        if self.checkpoint_dir is None:
            return None
        ocp = _orbax()
        return ocp.CheckpointManager(Path(self.checkpoint_dir).absolute(),
                                     options=ocp.CheckpointManagerOptions(max_to_keep=1))

    def restore(self, directory: str | Path) -> None:
        """Load the parameters of the latest epoch saved under `directory` (after a fit)."""
        ocp = _orbax()
        with ocp.CheckpointManager(Path(directory).absolute()) as manager:
            target = nnx.to_pure_dict(self.params)
            restored = manager.restore(manager.latest_step(),
                                       args=ocp.args.StandardRestore(target))
        nnx.replace_by_pure_dict(self.params, restored)

    def predict(self, condition: str, context: str) -> np.ndarray:
        pool = np.flatnonzero(self.control_contexts == context)
        if not len(pool):
            raise InputError(f"context {context!r} has no control cells in the training data")
        pool = pool[:self.settings.max_prediction_controls]
        head = nnx.merge(self.graphdef, self.params, self.constants)
        perturbed = np.repeat(self.multi_hot([condition]), len(pool), axis=0)
        return np.asarray(_predict(head, self.fm[pool], self.control_expression[pool],
                                   perturbed)).mean(axis=0)


@nnx.jit
def _predict(head, fm, control, perturbed):
    return head(fm, control, perturbed)


def _orbax():
    import orbax.checkpoint as ocp

    return ocp
