"""The functional train state and the one way scfm-jax takes an optimiser step.

A `TrainState` is a pytree of arrays: trainable `params` (nnx.Param), `buffers` (every other model
variable, e.g. the performer's random projections), the optax state, the step and the RNG key.
Pretraining (`train.trainer.Trainer`) and fine-tuning (`analysis.scfoundation_classifier`) both
create it with `init_train_state` and update it with `apply_gradients`.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
    step: jax.Array      # int32 scalar: the number of optimiser updates applied
    params: nnx.State    # trainable parameters (float32)
    buffers: nnx.State   # non-trainable model variables
    opt_state: Any
    key: jax.Array       # uint32 raw key data (Orbax stores plain arrays)


def make_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine decay to `end_learning_rate_fraction` of it."""
    warmup = min(int(train.warmup_steps), max(int(train.steps) - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate, warmup_steps=warmup,
        decay_steps=max(int(train.steps), warmup + 1),
        end_value=train.learning_rate * train.end_learning_rate_fraction)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    transforms = []
    if train.grad_clip_norm:
        transforms.append(optax.clip_by_global_norm(train.grad_clip_norm))
    transforms.append(optax.adamw(make_schedule(train), b1=train.adam_b1, b2=train.adam_b2,
                                  weight_decay=train.weight_decay))
    return optax.chain(*transforms)


def split_model(model: nnx.Module):
    return nnx.split(model, nnx.Param, ...)


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation,
                     key_data: jax.Array) -> TrainState:
    """Step 0 of a model: its parameters, its other variables, fresh optimiser moments."""
    _, params, buffers = split_model(model)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                      opt_state=optimizer.init(params), key=key_data)


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation,
                    **changes) -> TrainState:
    """One optimiser step: the state with updated params and moments, the step counted, and any
    other `changes` (e.g. refreshed buffers) applied."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, **changes)

