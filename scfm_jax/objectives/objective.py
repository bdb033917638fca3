"""The plug-in contract between a model and the train loop: what the loop needs from each model.

Each objective module (`scfm_jax.objectives.scfoundation`, `.scmulan`) exports one `OBJECTIVE`;
`scfm_jax.objectives.get_objective(config.model.name)` looks it up in an explicit table.
"""
import dataclasses
from collections.abc import Callable

import jax
from flax import nnx


def never_refreshed(model_config) -> int:
    return 0


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str  # the `config.model.name` that selects it
    # (config.model, *, rngs) -> module
    build_model: Callable[..., nnx.Module]
    # (model, batch, key, config.objective) -> (loss, metrics); every metric a scalar
    loss: Callable[..., tuple[jax.Array, dict]]
    # (config, store) -> a copy of config with the store-dependent fields filled in and checked
    resolve_config: Callable[..., object]
    # the metric that counts the loss's terms: gradient accumulation weights micro-batches by it,
    # so k micro-batches follow the gradient of one batch of the same cells
    weight_metric: str
    # refresh non-trained model variables in place from a key (e.g. random features), or None
    refresh_buffers: Callable[[nnx.Module, jax.Array], None] | None = None
    # (config.model) -> train steps between refreshes; 0: never
    refresh_interval: Callable[..., int] = never_refreshed
