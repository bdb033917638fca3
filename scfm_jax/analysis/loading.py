"""`load(path)`: a ready model from any checkpoint, on whatever devices this machine has.

Three sources:
  * a scfm-jax training workdir (or its `checkpoints/` folder, or one `checkpoints/<step>/`, or a
    gs:// URL of the checkpoints folder when `train.checkpoint_dir` put them on a bucket), written
    on any mesh: only the parameters and buffers are read (an Orbax partial restore; the optimiser
    state, which is twice the parameters, stays on disk) onto a one-device mesh here;
  * an official scFoundation `models.ckpt` (weight set `key`: cell, gene or rde);
  * an official scMulan `.pt` (`{'model_args', 'model'}`).
The result carries the model, its config and its gene vocabulary, so `embed_cells` and friends need
nothing else.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from scfm_jax.data.vocabulary import Vocabulary
from scfm_jax.errors import CheckpointError, MissingCheckpoint, UsageError
from scfm_jax.objectives import get_objective


@dataclasses.dataclass
class LoadedModel:
    """A model ready for analysis, with what is needed to feed it."""

    kind: str                           # the model's name (`config.model.name`)
    model: nnx.Module
    config: ml_collections.ConfigDict   # has `.model`; the whole experiment config for our runs
    vocabulary: Vocabulary | None       # model gene position i is vocabulary.symbols[i]
    source: str                         # the file or workdir it came from
    step: int | None = None             # training step of a workdir checkpoint
    key: str | None = None              # weight set of an official scFoundation checkpoint

    def __repr__(self) -> str:
        parts = [self.kind, f"{len(self.vocabulary)} genes ({self.vocabulary.name})"
                 if self.vocabulary else "no vocabulary", f"from {self.source}"]
        if self.step is not None:
            parts.append(f"step {self.step}")
        if self.key is not None:
            parts.append(f"key {self.key!r}")
        return f"LoadedModel({', '.join(parts)})"


def _configured_checkpoint_dir(workdir: Path) -> str | None:
    """`train.checkpoint_dir` of a workdir's config.json (checkpoints kept elsewhere, e.g. on a
    gs:// bucket), or None."""
    import json

    path = workdir / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("train", {}).get("checkpoint_dir") or None


def _workdir_and_step(path: Path, step: int | None) -> tuple[Path, int | None] | None:
    """The training workdir a folder refers to (and a step it names), or None if it is not one."""
    if (path / "checkpoints").is_dir() or _configured_checkpoint_dir(path):
        return path, step
    if path.name == "checkpoints":
        return path.parent, step
    if path.name.isdigit() and path.parent.name == "checkpoints":
        if step is not None and step != int(path.name):
            raise CheckpointError(f"{path} is step {path.name} but step={step} was asked for")
        return path.parent.parent, int(path.name)
    if (path / "train" / "checkpoints").is_dir():  # `scfm-jax demo --workdir` puts training in train/
        return path / "train", step
    return None


def _restore_params_and_buffers(checkpoints, step: int, trainer):
    """Partial restore of the TrainState: params and buffers only, placed as `trainer` says."""
    abstract = trainer.abstract_sharded_state()
    target = {"params": abstract.params, "buffers": abstract.buffers}
    restored = checkpoints.restore_partial(step, target)
    return restored["params"], restored["buffers"]


def load_workdir(workdir: str | Path | None, step: int | None = None, *,
                 directory: str | None = None) -> LoadedModel:
    """The model of a scfm-jax training workdir at `step` (default: the latest checkpoint); its
    checkpoints are `directory` when given (e.g. gs://bucket/run/checkpoints, with or without a
    workdir), else where the workdir's config.json says (`train.checkpoint_dir`)."""
    from scfm_jax.train import partitioning
    from scfm_jax.train.checkpointing import Checkpoints
    from scfm_jax.train.trainer import Trainer

    workdir = None if workdir is None else Path(workdir)
    if directory is None and workdir is not None:
        directory = _configured_checkpoint_dir(workdir)
    checkpoints = Checkpoints(workdir, directory=directory, read_only=True)
    try:
        steps = checkpoints.all_steps()
        if not steps:
            raise MissingCheckpoint(f"{checkpoints.directory} holds no finished checkpoint yet "
                                    "(training writes one every train.checkpoint_every steps)")
        if step is not None and step not in steps:
            raise CheckpointError(f"{checkpoints.directory} has no checkpoint at step {step}; it has "
                                  f"{sorted(steps)}")
        metadata = checkpoints.restore_metadata(step)
        config = ml_collections.ConfigDict(metadata["config"])
        mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
        trainer = Trainer(config, get_objective(config.model.name), mesh)
        params, buffers = _restore_params_and_buffers(checkpoints, metadata["step"], trainer)
    finally:
        checkpoints.close()
    saved = metadata["vocabulary"]
    vocabulary = Vocabulary(name=saved["name"], symbols=tuple(saved["symbols"]))
    return LoadedModel(kind=config.model.name, model=nnx.merge(trainer.graphdef, params, buffers),
                       config=config, vocabulary=vocabulary,
                       source=str(workdir if workdir is not None else checkpoints.directory),
                       step=int(metadata["step"]))


def checkpoint_kind(path: Path) -> str:
    """The model name of a released torch checkpoint, from the top-level keys of its pickle (the
    objective whose `official_checkpoint` recognises them)."""
    from scfm_jax.interop import torch_checkpoint
    from scfm_jax.objectives import OBJECTIVES

    checkpoint = torch_checkpoint.load(path, read_tensors=False)  # the pickle only, not the weights
    keys = frozenset(map(str, checkpoint)) if isinstance(checkpoint, dict) else frozenset()
    formats = {name: objective.official_checkpoint for name, objective in OBJECTIVES.items()
               if objective.official_checkpoint is not None}
    for name, official in formats.items():
        if official.recognises(keys):
            return name
    raise CheckpointError(f"{path} is none of: " + "; ".join(o.description for o in formats.values())
                     + f". Its top-level keys are {sorted(keys)}")




def with_compute_dtype(loaded: LoadedModel, dtype: str | None) -> LoadedModel:
    """The same weights computing in `dtype` (e.g. "bfloat16"; parameters stay float32), or
    `loaded` itself when `dtype` is None or already its config's `model.dtype`."""
    import jax.numpy as jnp

    if dtype is None or jnp.dtype(dtype) == jnp.dtype(loaded.config.model.dtype):
        return loaded
    config = ml_collections.ConfigDict(loaded.config.to_dict())
    config.model.dtype = jnp.dtype(dtype).name
    objective = get_objective(loaded.kind)
    graphdef, _ = nnx.split(nnx.eval_shape(
        lambda: objective.build_model(config.model, rngs=nnx.Rngs(0))))
    _, *state = nnx.split(loaded.model)
    return dataclasses.replace(loaded, model=nnx.merge(graphdef, *state), config=config)


def load(path: str | Path, *, key: str | None = None, step: int | None = None,
         vocabulary: str | Path | Vocabulary | None = None) -> LoadedModel:
    """A ready model from a training workdir or an official checkpoint file.

    `key`: weight set of an official scFoundation `models.ckpt` (`cell`, the default, for cell
    embeddings, `gene` for gene embeddings, `rde` for read-depth enhancement). `step`: checkpoint step of a workdir
    (default the latest). `vocabulary`: the gene list of an official checkpoint (`"scfoundation"`,
    the default for the released 19,264-gene model, or a `gene_name<TAB>index` file); for scMulan
    the 42,117-symbol list its genes are aligned through. A workdir carries its own vocabulary.
    """
    if "://" in str(path):   # a bucket: the checkpoints folder of a run (train.checkpoint_dir)
        if vocabulary is not None:
            raise UsageError(f"{path} holds training checkpoints, which carry their own "
                             "vocabulary; drop vocabulary=")
        return load_workdir(None, step, directory=str(path))
    path = Path(path).expanduser()
    if path.is_dir():
        found = _workdir_and_step(path, step)
        if found is None:
            raise MissingCheckpoint(f"{path} is a folder without checkpoints/: give a scfm-jax "
                                    "training workdir (scfm-jax train/demo --workdir) or a "
                                    "checkpoint file")
        if vocabulary is not None:
            raise UsageError(f"{path} is a training workdir, which carries its own vocabulary; "
                             "drop vocabulary=")
        return load_workdir(*found)
    if not path.is_file():
        raise MissingCheckpoint(f"{path}: no such checkpoint file or training workdir")
    kind = checkpoint_kind(path)
    official = get_objective(kind).official_checkpoint.load(path, key=key, vocabulary=vocabulary)
    return LoadedModel(kind=kind, model=official.model,
                       config=ml_collections.ConfigDict({"model": official.model_config.to_dict()}),
                       vocabulary=official.vocabulary, source=str(path), key=official.weight_set)
