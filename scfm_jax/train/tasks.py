"""What the train loop needs from each model: build it, its loss, and its periodic buffer redraw.

The loop is model-agnostic; `config.model.name` picks the task. Model modules are imported lazily so
the CLI and tests of one model never pay for the other.
"""
import dataclasses
import importlib
from collections.abc import Callable

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    build_model: Callable[..., nnx.Module]       # (config.model, *, rngs) -> module
    loss: Callable[..., tuple[jax.Array, dict]]  # (model, batch, key, config.objective) -> (loss, metrics)
    redraw: Callable[[nnx.Module, jax.Array], None] | None  # refresh random features in place
    redraw_interval: Callable[..., int]           # (config.model) -> steps between redraws, 0: never
    resolve_config: Callable[..., object]        # (config, store) -> config with store fields set


_TASKS = {
    "scfoundation": ("scfm_jax.models.scfoundation", "ScFoundation"),
    "scmulan": ("scfm_jax.models.scmulan", "ScMulan"),
}


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"config.model.name={name!r} is not a known model; choose one of "
                         f"{sorted(_TASKS)}")
    module_name, class_name = _TASKS[name]
    module = importlib.import_module(module_name)
    redraw = getattr(module, "redraw_features", None)

    def redraw_interval(model_config) -> int:
        decoder = model_config.get("decoder")
        if redraw is None or decoder is None or decoder.get("attention") != "performer":
            return 0
        return int(decoder.get("redraw_interval", 0))

    return Task(name=name, build_model=getattr(module, class_name),
                loss=module.pretraining_loss, redraw=redraw, redraw_interval=redraw_interval,
                resolve_config=getattr(module, "resolve_config", resolve_num_genes))


def resolve_num_genes(config, store):
    """A copy of the config whose `model.num_genes` is the store's vocabulary size (-1) or checked
    against it."""
    import ml_collections

    config = ml_collections.ConfigDict(config.to_dict())
    if config.model.num_genes in (-1, None):
        config.model.num_genes = len(store.vocabulary)
    elif config.model.num_genes != len(store.vocabulary):
        raise ValueError(
            f"config.model.num_genes={config.model.num_genes} but the store {config.data.store} "
            f"has a {len(store.vocabulary)}-gene vocabulary ({store.vocabulary.name}); set "
            f"--config.model.num_genes=-1 to take the store's")
    return config
