"""`Trainer`: one experiment's init, train step and eval step, compiled for a mesh.

`trainer.train_step(state, batch)` runs a step, compiling it the first time a batch shape (a
bucket) is seen. The state (`train.train_state.TrainState`, a pytree of global arrays) is
initialised directly sharded (abstract shapes first, then a jitted init with output
shardings), so no host ever holds the whole model. Random draws inside a step come from
`fold_in(key, step)` only, so a step is a pure function of (state, batch).
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scfm_jax.objectives import Objective
from scfm_jax.train import partitioning
from scfm_jax.train.train_state import (TrainState, apply_gradients, init_train_state,
                                        make_optimizer, make_schedule, split_model)


@dataclasses.dataclass
class Trainer:
    """Everything compiled for one experiment: init, train step and eval step on `mesh`."""
    config: ml_collections.ConfigDict
    objective: Objective
    mesh: Mesh

    def __post_init__(self):
        self.rules = partitioning.logical_rules(self.config)
        self.optimizer = make_optimizer(self.config.train)
        self.schedule = make_schedule(self.config.train)
        self.refresh_interval = self.objective.refresh_interval(self.config.model)
        abstract_model = nnx.eval_shape(
            lambda: self.objective.build_model(self.config.model, rngs=nnx.Rngs(0)))
        self.graphdef, _, _ = split_model(abstract_model)
        self.abstract_state = jax.eval_shape(self._init, jax.random.key_data(jax.random.key(0)))
        self.state_sharding = self._state_sharding(self.abstract_state)
        partitioning.check_replication(self.abstract_state.params, self.mesh, self.rules,
                                       float(self.config.sharding_tolerance))
        self._compiled = {}

    # -- state ------------------------------------------------------------------------------
    def _init(self, key_data) -> TrainState:
        key = jax.random.wrap_key_data(key_data)
        model = self.objective.build_model(self.config.model, rngs=nnx.Rngs(params=key))
        return init_train_state(model, self.optimizer, key_data)

    def _state_sharding(self, abstract_state: TrainState) -> TrainState:
        params = partitioning.state_shardings(abstract_state.params, self.mesh, self.rules)
        buffers = partitioning.state_shardings(abstract_state.buffers, self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        # Optimiser moments mirror the parameters; counters are replicated.
        opt_state = optax.tree_map_params(
            self.optimizer, lambda _, sharding: sharding, abstract_state.opt_state, params,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, NamedSharding))
        return TrainState(step=replicated, params=params, buffers=buffers, opt_state=opt_state,
                          key=replicated)

    def abstract_sharded_state(self) -> TrainState:
        """The restore target: shapes, dtypes and shardings, no memory."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_sharding)

    def init_state(self, seed: int) -> TrainState:
        key_data = jax.random.key_data(jax.random.key(seed))
        init = jax.jit(self._init, out_shardings=self.state_sharding)
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            return init(key_data)

    # -- steps ------------------------------------------------------------------------------
    def _loss(self, params, buffers, batch, key, graphdef=None):
        # Fresh Variables for the buffers: merge reuses the State's Variable objects, and NNX
        # transforms inside the model (remat) refuse to update Variables of an outer trace.
        graphdef = self.graphdef if graphdef is None else graphdef
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, buffers))
        return self.objective.loss(model, batch, key, self.config.objective)

    def _grads(self, params, buffers, batch, key):
        """(loss, metrics, grads) of the batch, over `train.grad_accum_steps` micro-batches.

        Micro-batches are weighted by the objective's count of loss terms (masked positions), so
        k micro-batches follow the gradient of one batch of the same cells, not a mean of means.
        That count is summed; the other metrics are averaged with the same weights.
        """
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        accum = max(int(self.config.train.grad_accum_steps), 1)
        if accum == 1:
            (loss, metrics), grads = grad_fn(params, buffers, batch, key)
            return loss, metrics, grads
        weight_name = self.objective.weight_metric
        micro_spec = PartitionSpec(None, *partitioning.batch_spec(self.rules, 1))

        def split(x):
            micro = x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
            spec = PartitionSpec(*micro_spec, *([None] * (x.ndim - 1)))
            return jax.lax.with_sharding_constraint(micro, NamedSharding(self.mesh, spec))

        def body(carry, inputs):
            index, micro_batch = inputs
            (loss, metrics), grads = grad_fn(params, buffers, micro_batch,
                                             jax.random.fold_in(key, index))
            weight = metrics[weight_name]
            weighted = jax.tree.map(lambda x: x * weight, (loss, metrics, grads))
            return jax.tree.map(jnp.add, carry, (weighted, weight)), None

        shapes = jax.eval_shape(grad_fn, params, buffers, jax.tree.map(lambda x: x[:1], batch),
                                key)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32),
                             ((shapes[0][0], shapes[0][1], shapes[1]), shapes[0][1][weight_name]))
        micro_batches = jax.tree.map(split, batch)
        ((loss, metrics, grads), total), _ = jax.lax.scan(
            body, zeros, (jnp.arange(accum), micro_batches))
        scale = 1.0 / jnp.maximum(total, 1e-12)
        loss, metrics, grads = jax.tree.map(lambda x: x * scale, (loss, metrics, grads))
        return loss, dict(metrics, **{weight_name: total}), grads

    def _refreshed(self, params, buffers, key):
        """The buffers after the objective's refresh (e.g. new performer random features)."""
        # merge shares Variable objects with the State it is given; refresh copies
        model = nnx.merge(self.graphdef, params, jax.tree.map(lambda x: x, buffers))
        self.objective.refresh_buffers(model, key)
        return split_model(model)[2]

    def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        buffers = state.buffers
        if self.refresh_interval:
            due = (state.step > 0) & (state.step % self.refresh_interval == 0)
            buffers = jax.lax.cond(due, self._refreshed, lambda _, b, __: b, state.params, buffers,
                                   jax.random.fold_in(key, 1))
        loss, metrics, grads = self._grads(state.params, buffers, batch, jax.random.fold_in(key, 0))
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                       learning_rate=self.schedule(state.step))
        return apply_gradients(state, grads, self.optimizer, buffers=buffers), metrics

    def _eval_step(self, state: TrainState, batch, key_data) -> dict:
        loss, metrics = self._loss(state.params, state.buffers, batch,
                                   jax.random.wrap_key_data(key_data))
        return dict(metrics, loss=loss)

    def _batch_sharding(self, batch):
        return {name: partitioning.batch_sharding(self.mesh, value.ndim, self.rules)
                for name, value in batch.items()}

    @staticmethod
    def _signature(kind: str, batch) -> tuple:
        return (kind,) + tuple(sorted((k, v.shape) for k, v in batch.items()))

    def has_train_step(self, batch) -> bool:
        """Whether the train step for this batch's shapes is compiled and its FLOPs counted."""
        return all(self._signature(kind, batch) in self._compiled for kind in ("train", "flops"))

    def compile_train_step(self, state: TrainState, batch):
        """The train step compiled for this batch's shapes (one executable per bucket, kept);
        `state` and `batch` may be abstract (shapes and shardings)."""
        signature = self._signature("train", batch)
        if signature not in self._compiled:
            jitted = jax.jit(self._train_step,
                             in_shardings=(self.state_sharding, self._batch_sharding(batch)),
                             out_shardings=(self.state_sharding, None), donate_argnums=0)
            with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
                self._compiled[signature] = jitted.lower(state, batch).compile()
        return self._compiled[signature]

    def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
        """(new state, metrics on the device) of one optimiser step; `state` is donated."""
        return self.compile_train_step(state, batch)(state, batch)

    def model_flops(self, batch) -> float:
        """Model FLOPs per device of one train step: forward and backward of the loss.

        XLA's cost analysis counts a loop body once, and the compiled step loops over layers,
        attention chunks and micro-batches. So the count comes from the loss gradient of the
        loop-free model (`loop_free_model_config`: layers unrolled, one chunk, no remat) on one
        micro-batch, lowered and not compiled, times the micro-batches, over the devices.
        Recomputation is not counted: this is the numerator of MFU, not of hardware utilisation.
        """
        signature = self._signature("flops", batch)
        if signature not in self._compiled:
            accum = max(int(self.config.train.grad_accum_steps), 1)
            model_config = loop_free_model_config(self.config.model)
            graphdef, _, _ = split_model(nnx.eval_shape(
                lambda: self.objective.build_model(model_config, rngs=nnx.Rngs(0))))

            def loss(params, buffers, micro_batch, key):
                return self._loss(params, buffers, micro_batch, key, graphdef)[0]

            micro_batch = {k: jax.ShapeDtypeStruct((v.shape[0] // accum, *v.shape[1:]), v.dtype)
                           for k, v in batch.items()}
            lowered = jax.jit(jax.grad(loss)).lower(
                self.abstract_state.params, self.abstract_state.buffers, micro_batch,
                jax.random.key(0))
            analysis = lowered.cost_analysis() or {}
            self._compiled[signature] = (float(analysis.get("flops", 0.0)) * accum
                                         / self.mesh.size)
        return self._compiled[signature]

    def eval_step(self, state: TrainState, batch, key_data) -> dict:
        """The loss and metrics of a batch under a fixed key, compiled on first use per shape."""
        signature = self._signature("eval", batch)
        if signature not in self._compiled:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            jitted = jax.jit(self._eval_step, in_shardings=(
                self.state_sharding, self._batch_sharding(batch), replicated))
            with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
                self._compiled[signature] = jitted.lower(state, batch, key_data).compile()
        return self._compiled[signature](state, batch, key_data)


# The `config.model` fields that make a model loop, and their loop-free values: no remat, the
# layer scan unrolled, exact attention as XLA ops (the blockwise and flash paths loop over key
# blocks). A model sets only those its config has (a model without a layer scan has none).
LOOP_FREE_FIELDS = {"remat_policy": "none", "unroll_layers": True, "attention_impl": "xla"}


def loop_free_model_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same model with fewer loops: `LOOP_FREE_FIELDS` and one attention chunk."""
    config = ml_collections.ConfigDict(model_config.to_dict())
    for name, value in LOOP_FREE_FIELDS.items():
        if name in config:
            config[name] = value

    def unchunk(node):
        for name in node.keys():
            if isinstance(node[name], ml_collections.ConfigDict):
                unchunk(node[name])
            elif name == "chunk_size":
                node[name] = 2**31 - 1
    unchunk(config)
    return config
