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
                loss=module.pretraining_loss, redraw=redraw, redraw_interval=redraw_interval)
