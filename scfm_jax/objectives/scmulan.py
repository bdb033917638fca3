"""scMulan's pretraining objective: token set from the store, c-sentences, and the loss.

The c-sentences are built on the device by `scfm_jax.data.cell_sentence.build_sentences`, one
sampled task per cell (annotation, organ or generation); `embed_cells` is the cell embedding of
`annotate` on a pipeline batch, and `OBJECTIVE` what training, the plan and inference need from
scMulan.
"""
import functools
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from scfm_jax.data.cell_sentence import (CELL_TYPE_TASK, SentenceTables, TokenSet, build_sentences,
                                         expressed_gene_tokens, obs_token_table)
from scfm_jax.data.vocabulary import Vocabulary, load_vocabulary
from scfm_jax.models import generation
from scfm_jax.models.scmulan import ScMulan
from scfm_jax.objectives.objective import Objective, OfficialCheckpoint, OfficialModel

# The original training code is not released; SPEC.md II.4 infers the criterion
# `Masked_BCE_logits_loss_ignore_prefix_pretrain(BCEWithLogitsLoss, MSELoss)`. Our reading of it:
# the entities of a sentence form a set, so at each position from the task token on, the target of
# lm_head is multi-hot over the targets not yet emitted (<E> alone once all are), and epx_head is
# regressed onto the integer level of each of those targets (0 for <E>); prompt positions carry no
# loss. Greedy decoding with the ban on emitted tokens then walks through that set.


def objective_columns(objective) -> list[str]:
    """The obs columns the objective reads (metadata, cell types, organs), each once."""
    return list(dict.fromkeys([*objective.metadata_columns, *objective.cell_type_columns,
                               *objective.organ_columns]))


def _select_genes(store, objective) -> list[str]:
    symbols = list(store.vocabulary.symbols)
    if objective.gene_list:
        wanted = [g for g in Path(objective.gene_list).read_text().split() if g]
        present = set(symbols)
        genes = [g for g in wanted if g in present]
        if not genes:
            raise ValueError(f"none of the genes of {objective.gene_list} is in the store's "
                             f"vocabulary {store.vocabulary.name!r}")
        return genes
    cells = np.arange(min(store.num_cells, objective.gene_selection_cells))
    rows = store.read(cells)
    expressed_in = np.bincount(rows.gene_ids[rows.counts > 0], minlength=len(symbols))
    top = np.argsort(-expressed_in, kind="stable")[:objective.num_genes]
    return [symbols[i] for i in np.sort(top[expressed_in[top] > 0])]


def resolve_config(config, store):
    """A copy of the config with the store-dependent scMulan fields filled in: the token set
    (built from the store's genes and obs categories, or `objective.token_set`, an official-layout
    folder), `model.vocab_size`, the gene-set-to-store table and `data.obs_keys`."""
    config = ml_collections.ConfigDict(config.to_dict())
    objective = config.objective
    columns = objective_columns(objective)
    categories = {c: tuple(map(str, store.obs_categories(c))) for c in columns}
    if objective.token_set:
        token_set = TokenSet.from_folder(objective.token_set)
    else:
        token_set = TokenSet.build(_select_genes(store, objective), categories,
                                   objective.cell_type_columns)
    tables = SentenceTables.create(token_set, list(store.vocabulary.symbols), categories,
                                   objective.metadata_columns, objective.cell_type_columns,
                                   objective.organ_columns)
    if config.model.vocab_size not in (-1, None, len(token_set)):
        raise ValueError(f"config.model.vocab_size={config.model.vocab_size} but the token set "
                         f"has {len(token_set)} tokens; set it to -1 to take the token set's")
    return _with_token_set(config, token_set, tables, categories)


def _with_token_set(config, token_set: TokenSet, tables: SentenceTables, categories: dict):
    """`config` (changed in place) with the token set's fields: vocab size, gene set, its
    positions in the store's genes, the categories and the obs keys the pipeline must read."""
    objective = config.objective
    config.model.vocab_size = len(token_set)
    objective.gene_set = tuple(token_set.genes)
    objective.gene_positions = tuple(int(p) for p in tables.gene_positions)
    objective.categories = ml_collections.ConfigDict(dict(categories))
    config.data.obs_keys = tuple(dict.fromkeys([*config.data.get("obs_keys", ()),
                                                *objective_columns(objective)]))
    return config


@functools.lru_cache(maxsize=8)
def _cached_tables(token_set_dir, gene_set, gene_positions, categories, metadata, cell_type,
                   organ):
    categories = dict(categories)
    token_set = (TokenSet.from_folder(token_set_dir) if token_set_dir
                 else TokenSet.build(gene_set, categories, cell_type))
    obs_tokens = {c: obs_token_table(token_set, terms) for c, terms in categories.items()}
    return SentenceTables(token_set, gene_positions, obs_tokens, metadata, cell_type, organ)


def sentence_tables(objective):
    """The `SentenceTables` described by a resolved `config.objective`."""
    if not objective.get("gene_positions"):
        raise ValueError("config.objective has no gene_positions: the config was not resolved "
                         "against the store (scfm_jax.objectives.scmulan.resolve_config)")
    categories = tuple((c, tuple(objective.categories[c])) for c in objective_columns(objective))
    return _cached_tables(objective.token_set, tuple(objective.gene_set),
                          tuple(objective.gene_positions), categories,
                          tuple(objective.metadata_columns), tuple(objective.cell_type_columns),
                          tuple(objective.organ_columns))


def token_set_from_config(config):
    """The token set a model was pretrained with, from its resolved config (e.g. the config saved
    in one of our checkpoints): what `annotate` / `generate_cells` need next to the model."""
    return sentence_tables(config.objective).token_set


def sentence_loss(model: ScMulan, sentences: Mapping[str, jax.Array], mse_weight: float = 1.0):
    """(loss, metrics) of sentences from `build_sentences` (see the note above)."""
    ids, levels = sentences["ids"], sentences["levels"]
    prefix, num_targets = sentences["prefix_length"][:, None], sentences["target_length"][:, None]
    batch, length = ids.shape
    vocab = model.cfg.vocab_size
    logits, exp = model.heads(model(ids, levels))

    t = jnp.arange(length)[None, :]
    is_target = (t >= prefix) & (t < prefix + num_targets)
    rows = jnp.arange(batch)[:, None]
    last_index = jnp.full((batch, vocab), -1, jnp.int32).at[rows, ids].max(
        jnp.where(is_target, t - prefix, -1))
    target_level = jnp.zeros((batch, vocab), jnp.float32).at[rows, ids].max(
        jnp.where(is_target, levels, 0).astype(jnp.float32))
    # position t predicts the targets from index t - (prefix - 1) on
    next_index = t - (prefix - 1)
    at_loss = (next_index >= 0) & (next_index <= num_targets) & sentences["valid"][:, None]
    positive = next_index[..., None] <= last_index[:, None, :]
    positive = positive.at[..., 0].set(next_index == num_targets) & at_loss[..., None]

    weight = at_loss.astype(jnp.float32)
    num_positions = jnp.maximum(weight.sum(), 1.0)
    bce = optax.sigmoid_binary_cross_entropy(logits, positive.astype(jnp.float32)).mean(-1)
    bce = jnp.sum(bce * weight) / num_positions
    squared = jnp.where(positive, (exp - target_level[:, None, :]) ** 2, 0.0)
    mse = squared.sum() / jnp.maximum(positive.sum(), 1)
    top1 = jnp.argmax(logits, axis=-1)
    hit = jnp.take_along_axis(positive, top1[..., None], axis=-1)[..., 0]
    metrics = {"bce": bce, "level_mse": mse, "loss_positions": weight.sum(),
               "next_entity_accuracy": jnp.sum(hit * weight) / num_positions}
    return bce + mse_weight * mse, metrics


def pretraining_loss(model: ScMulan, batch: Mapping[str, jax.Array], key: jax.Array,
                     objective) -> tuple[jax.Array, dict]:
    """The train loop's loss: pipeline batch -> sentences (one sampled task per cell) -> loss."""
    sentences = build_sentences(batch, sentence_tables(objective), key,
                                tuple(objective.task_weights), model.cfg.expression_level)
    return sentence_loss(model, sentences, objective.mse_weight)


def plan_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with a token set of the configured size (genes G0..Gn, two categories per
    objective column) in place of one built from a store: the same shapes for a plan."""
    config = ml_collections.ConfigDict(config.to_dict())
    objective = config.objective
    columns = objective_columns(objective)
    categories = {column: ("a", "b") for column in columns}
    genes = [f"G{i}" for i in range(int(objective.num_genes))]
    token_set = TokenSet.build(genes, categories, objective.cell_type_columns)
    tables = SentenceTables.create(token_set, genes, categories, objective.metadata_columns,
                                   objective.cell_type_columns, objective.organ_columns)
    vocab_size = config.model.vocab_size
    config = _with_token_set(config, token_set, tables, categories)
    if vocab_size not in (-1, None):   # a configured vocabulary size stands in a plan
        config.model.vocab_size = vocab_size
    return config


def embed_cells(model: ScMulan, batch: Mapping[str, jax.Array], objective) -> jax.Array:
    """Cell embeddings [B, D] of a pipeline batch as `annotate` computes them: the prompt
    `expressed genes + <PCT>`, three greedy tokens generated, the official embedding read."""
    tables = sentence_tables(objective)
    genes, levels, count = expressed_gene_tokens(batch, tables, model.cfg.expression_level)
    cells, width = genes.shape[0], genes.shape[1] + 1
    position = jnp.arange(width)[None, :]
    count = count[:, None]
    ids = jnp.where(position < count, jnp.pad(jnp.maximum(genes, 0), ((0, 0), (0, 1))), 0)
    ids = jnp.where(position == count, tables.token_set.id(CELL_TYPE_TASK), ids)
    levels = jnp.where(position < count, jnp.pad(levels, ((0, 0), (0, 1))), 0)
    *_, embedding = generation.generate_tokens(
        model, ids.astype(jnp.int32), levels.astype(jnp.int32), (count[:, 0] + 1).astype(jnp.int32),
        jax.random.key(0), jnp.zeros((model.cfg.vocab_size,), bool), max_new_tokens=3, top_k=1,
        temperature=1.0, gamma=1.0)
    return embedding.astype(jnp.float32)


def load_official(path, *, key: str | None = None, vocabulary=None) -> OfficialModel:
    """An official scMulan `.pt` (`{'model_args', 'model'}`; one weight set, so `key` is not
    used); `vocabulary`: the symbol list its genes are aligned through, if given."""
    from scfm_jax.interop.scmulan_torch import load_official_checkpoint

    model_config, model = load_official_checkpoint(path)
    if vocabulary is not None and not isinstance(vocabulary, Vocabulary):
        vocabulary = load_vocabulary(vocabulary)
    return OfficialModel(model_config, model, vocabulary)


OFFICIAL_CHECKPOINT = OfficialCheckpoint(
    description="an scMulan checkpoint (keys model_args/model)",
    recognises=lambda keys: {"model_args", "model"} <= keys, load=load_official)

OBJECTIVE = Objective(name="scmulan", build_model=ScMulan, loss=pretraining_loss,
                      resolve_config=resolve_config, weight_metric="loss_positions",
                      plan_config=plan_config, embed=embed_cells, embedding_key="X_scmulan",
                      official_checkpoint=OFFICIAL_CHECKPOINT)
