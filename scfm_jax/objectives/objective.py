"""The plug-in contract between a model and the rest of scfm-jax: what training, the plan and
inference need from each model.

Each objective module (`scfm_jax.objectives.scfoundation`, `.scmulan`) exports one `OBJECTIVE`;
`scfm_jax.objectives.get_objective(config.model.name)` looks it up in an explicit table. Code in
`train/`, `data/`, the CLI entry and `analysis.loading` goes through these fields and never branches
on a model's name (a test greps for it), so a third model is one objective module and one table row
(docs/adding_a_model.md).
"""
import dataclasses
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import ml_collections
from flax import nnx


def never_refreshed(model_config) -> int:
    return 0


class OfficialModel(NamedTuple):
    """A released checkpoint read into our model."""
    model_config: ml_collections.ConfigDict
    model: nnx.Module
    vocabulary: object | None          # scfm_jax.data.vocabulary.Vocabulary, or None if unknown
    weight_set: str | None = None      # which weight set of the file (scFoundation: cell/gene/rde)


@dataclasses.dataclass(frozen=True)
class OfficialCheckpoint:
    """How a model's released PyTorch checkpoint is recognised and read."""
    # what the file is, for messages: "an official scFoundation checkpoint (keys gene/cell/rde)"
    description: str
    # (top-level keys of the checkpoint's pickle, as a frozenset of str) -> whether it is this model's
    recognises: Callable[[frozenset], bool]
    # (path, *, key, vocabulary) -> OfficialModel. `key`: the weight set to read, for files holding
    # several (None: the model's default); `vocabulary`: a Vocabulary, a vocabulary name/file, or None
    load: Callable[..., OfficialModel]


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str  # the `config.model.name` that selects it

    # -- training
    # (config.model, *, rngs) -> module
    build_model: Callable[..., nnx.Module]
    # (model, batch, key, config.objective) -> (loss, metrics); every metric a scalar
    loss: Callable[..., tuple[jax.Array, dict]]
    # (config, store) -> a copy of config with the store-dependent fields filled in and checked
    resolve_config: Callable[..., ml_collections.ConfigDict]
    # the metric that counts the loss's terms: gradient accumulation weights micro-batches by it,
    # so k micro-batches follow the gradient of one batch of the same cells
    weight_metric: str
    # refresh non-trained model variables in place from a key (e.g. random features), or None
    refresh_buffers: Callable[[nnx.Module, jax.Array], None] | None = None
    # (config.model) -> train steps between refreshes; 0: never
    refresh_interval: Callable[..., int] = never_refreshed

    # -- planning: `scfm-jax plan` compiles without a store
    # (config) -> a copy of config with the store-dependent fields filled in from the config alone,
    # with the shapes a store would give (e.g. scMulan: a synthetic token set of the configured
    # size); raises ValueError naming the field to set when the config does not say enough.
    # The plan's abstract batch is then the pipeline's schema (scfm_jax.data.pipeline.batch_schema)
    # for that config: the fields training feeds, `obs/<key>` for every key in config.data.obs_keys.
    plan_config: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict] | None = None

    # -- inference
    # embed(model, batch, objective_config) -> cell embeddings, float32 [B, D].
    #   model: the module (e.g. `LoadedModel.model`, or nnx.merge of a train state), read only;
    #   batch: a mapping of the pipeline's device fields (scfm_jax.data.pipeline.batch_schema):
    #     gene_ids [B, K] int32 (store gene index, -1 pads), counts [B, K] float32 (raw counts),
    #     total_counts [B] float32 (the cell's total over all genes), num_nonzero [B] int32, and
    #     `obs/<key>` [B] int32 codes; a model reads the fields it needs (extra fields are ignored);
    #   objective_config: `config.objective` of the checkpoint's resolved config (models whose
    #     embedding needs none, e.g. scFoundation, accept None).
    #   Pure and jit-able with fixed shapes (jit it with the model split by nnx.split, or nnx.jit);
    #   None: the model has no cell embedding.
    embed: Callable[[nnx.Module, Mapping[str, jax.Array], object], jax.Array] | None = None
    # the AnnData `obsm` key its cell embeddings are written under, e.g. "X_scfoundation"
    embedding_key: str = ""
    # its released checkpoint format, or None (`analysis.load` tries every objective's)
    official_checkpoint: OfficialCheckpoint | None = None
