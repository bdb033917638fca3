"""scMulan: the nanoGPT-style cell-sentence decoder of Bian et al. (SPEC.md II.3).

`x = wte[token] + wee[level]` (no positional embedding: order enters only through the causal mask),
pre-LN blocks (causal attention, tanh-GELU MLP), a final LayerNorm, and two untied heads over the
vocabulary: `lm_head` (next-entity logits) and `epx_head` (a real-valued expression level per
candidate entity).

Batches are right-padded with per-cell lengths. Because attention is causal and there is no
positional table, the valid positions of a padded row are exactly those of the unpadded cell, so no
padding mask is needed; outputs are read at each cell's last valid index. `decode_step` extends a
key/value cache by one token per cell at per-cell positions (see `scfm_jax.models.generation`).

The pretraining objective (`pretraining_loss`) is in this module; the c-sentences it trains on are
built on the device by `scfm_jax.data.cell_sentence.build_sentences`.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from scfm_jax.models import layers
from scfm_jax.models.layers import BATCH, EMBED, HEAD_DIM, HEADS, LENGTH, MLP, VOCAB

INIT_STD = 0.02  # nanoGPT's initialisation (new models only; official weights are imported)


@dataclasses.dataclass(frozen=True)
class ScMulanConfig:
    """The architecture fields of `config.model` (hashable, so it can live inside the module)."""
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    expression_level: int = 10
    bias: bool = False
    dtype: str = "float32"
    remat_policy: str = "none"
    attention: str = "dot_product"

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any]) -> "ScMulanConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: model_config[k] for k in fields if k in model_config}
        config = cls(**values)
        if config.vocab_size <= 0:
            raise ValueError(
                f"scMulan vocab_size is {config.vocab_size}: resolve it from the token set first "
                "(scfm_jax.data.cell_sentence.pretraining_setup or an official checkpoint)")
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        if config.attention != "dot_product":
            raise ValueError(f"scMulan attention {config.attention!r}: only 'dot_product' (exact "
                             "causal softmax attention) is available")
        layers.check_remat_policy(config.remat_policy)
        return config

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _param(rngs, shape, names, std, dtype=jnp.float32):
    init = nnx.with_partitioning(nnx.initializers.normal(std), names)
    return nnx.Param(init(rngs.params(), shape, dtype))


def _zeros(shape, names):
    return nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), names)(
        jax.random.key(0), shape, jnp.float32))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi).astype(x.dtype)
                                     * (x + 0.044715 * x ** 3)))


class Block(nnx.Module):
    """Pre-LN transformer block: causal self-attention then a 4x tanh-GELU MLP."""

    def __init__(self, cfg: ScMulanConfig, *, rngs: nnx.Rngs):
        d, h, hd = cfg.n_embd, cfg.n_head, cfg.head_dim
        proj_std = INIT_STD / (2 * cfg.n_layer) ** 0.5
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        self.ln_1 = layers.layer_norm(d, rngs=rngs, use_bias=cfg.bias, dtype=self.dtype)
        self.ln_2 = layers.layer_norm(d, rngs=rngs, use_bias=cfg.bias, dtype=self.dtype)
        # q, k, v stacked on axis 1 (the order of the original's c_attn output split)
        self.qkv_kernel = _param(rngs, (d, 3, h, hd), (EMBED, None, HEADS, HEAD_DIM), INIT_STD)
        self.out_kernel = _param(rngs, (h, hd, d), (HEADS, HEAD_DIM, EMBED), proj_std)
        self.fc_kernel = _param(rngs, (d, 4 * d), (EMBED, MLP), INIT_STD)
        self.proj_kernel = _param(rngs, (4 * d, d), (MLP, EMBED), proj_std)
        if cfg.bias:
            self.qkv_bias = _zeros((3, h, hd), (None, HEADS, HEAD_DIM))
            self.out_bias = _zeros((d,), (EMBED,))
            self.fc_bias = _zeros((4 * d,), (MLP,))
            self.proj_bias = _zeros((d,), (EMBED,))

    def _w(self, p):
        return p[...].astype(self.dtype)

    def qkv(self, x):
        """q, k, v of LN1(x): each [B, T, heads, head_dim]."""
        qkv = jnp.einsum("btd,dshk->sbthk", self.ln_1(x), self._w(self.qkv_kernel))
        if self.cfg.bias:
            qkv = qkv + self._w(self.qkv_bias)[:, None, None]
        return qkv[0], qkv[1], qkv[2]

    def finish(self, x, attended):
        """Residual update from the attention output [B, T, heads, head_dim], then the MLP."""
        y = jnp.einsum("bthk,hkd->btd", attended, self._w(self.out_kernel))
        if self.cfg.bias:
            y = y + self._w(self.out_bias)
        x = x + y
        hidden = jnp.einsum("btd,dm->btm", self.ln_2(x), self._w(self.fc_kernel))
        if self.cfg.bias:
            hidden = hidden + self._w(self.fc_bias)
        hidden = layers.constrain(gelu_tanh(hidden), (BATCH, LENGTH, MLP))
        y = jnp.einsum("btm,md->btd", hidden, self._w(self.proj_kernel))
        if self.cfg.bias:
            y = y + self._w(self.proj_bias)
        return layers.constrain(x + y, (BATCH, LENGTH, EMBED))

    def __call__(self, x):
        q, k, v = self.qkv(x)
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.finish(x, attended), (k, v)

    def decode(self, x, cache_k, cache_v, positions):
        """One new token per cell (x [B, 1, D]) at `positions` [B]; returns x and the new cache."""
        q, k, v = self.qkv(x)
        rows = jnp.arange(x.shape[0])
        cache_k = cache_k.at[rows, positions].set(k[:, 0].astype(cache_k.dtype))
        cache_v = cache_v.at[rows, positions].set(v[:, 0].astype(cache_v.dtype))
        visible = jnp.arange(cache_k.shape[1])[None, :] <= positions[:, None]  # [B, S]
        attended = jax.nn.dot_product_attention(
            q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), mask=visible[:, None, None, :])
        return self.finish(x, attended), cache_k, cache_v


class ScMulan(nnx.Module):
    """The scMulan decoder. `model_config` is `config.model` (or any mapping with its fields)."""

    def __init__(self, model_config: Mapping[str, Any], *, rngs: nnx.Rngs):
        cfg = model_config if isinstance(model_config, ScMulanConfig) else \
            ScMulanConfig.from_config(model_config)
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        d = cfg.n_embd
        self.wte = _param(rngs, (cfg.vocab_size, d), (VOCAB, EMBED), INIT_STD)
        self.wee = _param(rngs, (cfg.expression_level + 1, d), (None, EMBED), INIT_STD)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.ln_f = layers.layer_norm(d, rngs=rngs, use_bias=cfg.bias, dtype=self.dtype)
        self.lm_head = _param(rngs, (d, cfg.vocab_size), (EMBED, VOCAB), INIT_STD)
        self.epx_head = _param(rngs, (d, cfg.vocab_size), (EMBED, VOCAB), INIT_STD)

    def embed(self, ids, levels):
        x = (jnp.take(self.wte[...], ids, axis=0) + jnp.take(self.wee[...], levels, axis=0))
        return layers.constrain(x.astype(self.dtype), (BATCH, LENGTH, EMBED))

    def __call__(self, ids: jax.Array, levels: jax.Array, *, return_kv: bool = False):
        """Final-LayerNorm output [B, T, D] of right-padded ids/levels [B, T] (int).

        With `return_kv`, also the per-layer keys and values ([B, T, heads, head_dim] each), the
        prefill of a generation cache.
        """
        x = self.embed(ids, levels)
        x, kv = layers.apply_layers(self.blocks, x, lambda block, h, _: block(h),
                                    self.cfg.remat_policy)
        hidden = self.ln_f(x)
        return (hidden, tuple(kv)) if return_kv else hidden

    def decode_step(self, ids, levels, cache, positions):
        """Extends the cache by one token per cell: ids/levels/positions [B]; returns (hidden [B, D],
        cache). `cache` is a tuple of (keys, values) per layer, [B, S, heads, head_dim]."""
        x = self.embed(ids[:, None], levels[:, None])
        new_cache = []
        for block, (cache_k, cache_v) in zip(self.blocks, cache):
            x, cache_k, cache_v = block.decode(x, cache_k, cache_v, positions)
            new_cache.append((cache_k, cache_v))
        return self.ln_f(x)[:, 0], tuple(new_cache)

    def heads(self, hidden):
        """(next-entity logits, expression-level outputs) over the vocabulary, float32."""
        cls = jnp.einsum("...d,dv->...v", hidden, self.lm_head[...].astype(self.dtype))
        exp = jnp.einsum("...d,dv->...v", hidden, self.epx_head[...].astype(self.dtype))
        return cls.astype(jnp.float32), exp.astype(jnp.float32)


def last_valid(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """x[b, lengths[b] - 1] for a right-padded [B, T, ...] array."""
    index = jnp.clip(lengths - 1, 0, x.shape[1] - 1)
    return jnp.take_along_axis(x, index.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]


def count_parameters(model_config: Mapping[str, Any]) -> int:
    """Number of parameters, counted from abstract shapes (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: ScMulan(model_config, rngs=nnx.Rngs(0)))
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# ---------------------------------------------------------------------------------------------
# Pretraining. The original training code is not released; SPEC.md II.4 infers the criterion
# `Masked_BCE_logits_loss_ignore_prefix_pretrain(BCEWithLogitsLoss, MSELoss)`. Our reading of it:
# the entities of a sentence form a set, so at each position from the task token on, the target of
# lm_head is multi-hot over the targets not yet emitted (<E> alone once all are), and epx_head is
# regressed onto the integer level of each of those targets (0 for <E>); prompt positions carry no
# loss. Greedy decoding with the ban on emitted tokens then walks through that set.


def _objective_columns(objective) -> list[str]:
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
    import ml_collections

    from scfm_jax.data.cell_sentence import SentenceTables, TokenSet

    config = ml_collections.ConfigDict(config.to_dict())
    objective = config.objective
    columns = _objective_columns(objective)
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
    config.model.vocab_size = len(token_set)
    objective.gene_set = tuple(token_set.genes)
    objective.gene_positions = tuple(int(p) for p in tables.gene_positions)
    objective.categories = ml_collections.ConfigDict({c: v for c, v in categories.items()})
    config.data.obs_keys = tuple(dict.fromkeys([*config.data.get("obs_keys", ()), *columns]))
    return config


@functools.lru_cache(maxsize=8)
def _cached_tables(token_set_dir, gene_set, gene_positions, categories, metadata, cell_type,
                   organ):
    from scfm_jax.data.cell_sentence import SentenceTables, TokenSet, obs_token_table

    categories = dict(categories)
    token_set = (TokenSet.from_folder(token_set_dir) if token_set_dir
                 else TokenSet.build(gene_set, categories, cell_type))
    obs_tokens = {c: obs_token_table(token_set, terms) for c, terms in categories.items()}
    return SentenceTables(token_set, gene_positions, obs_tokens, metadata, cell_type, organ)


def sentence_tables(objective):
    """The `SentenceTables` described by a resolved `config.objective`."""
    if not objective.get("gene_positions"):
        raise ValueError("config.objective has no gene_positions: the config was not resolved "
                         "against the store (scfm_jax.models.scmulan.resolve_config)")
    categories = tuple((c, tuple(objective.categories[c])) for c in _objective_columns(objective))
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
    metrics = {"bce": bce, "level_mse": mse,
               "next_entity_accuracy": jnp.sum(hit * weight) / num_positions}
    return bce + mse_weight * mse, metrics


def pretraining_loss(model: ScMulan, batch: Mapping[str, jax.Array], key: jax.Array,
                     objective) -> tuple[jax.Array, dict]:
    """The train loop's loss: pipeline batch -> sentences (one sampled task per cell) -> loss."""
    from scfm_jax.data.cell_sentence import build_sentences

    sentences = build_sentences(batch, sentence_tables(objective), key,
                                tuple(objective.task_weights), model.cfg.expression_level)
    return sentence_loss(model, sentences, objective.mse_weight)
