"""scMulan: the nanoGPT-style cell-sentence decoder of Bian et al. (SPEC.md II.3).

`x = wte[token] + wee[level]` (no positional embedding: order enters only through the causal mask),
pre-LN blocks (causal attention, tanh-GELU MLP), a final LayerNorm, and two untied heads over the
vocabulary: `lm_head` (next-entity logits) and `epx_head` (a real-valued expression level per
candidate entity).

Batches are right-padded with per-cell lengths. Because attention is causal and there is no
positional table, the valid positions of a padded row are exactly those of the unpadded cell, so no
padding mask is needed; outputs are read at each cell's last valid index. `decode_step` extends a
key/value cache by one token per cell at per-cell positions (see `scfm_jax.models.generation`).

The pretraining objective and the token set it needs are in `scfm_jax.objectives.scmulan`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from scfm_jax.errors import UsageError
from scfm_jax.models import attention as attention_impls
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
    attention_impl: str = "auto"  # see scfm_jax.models.attention
    unroll_layers: bool = False   # unroll the layer scan (FLOP counting; see layers.scan)

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any]) -> "ScMulanConfig":
        config = cls(**layers.config_fields(cls, model_config, "config.model"))
        if config.vocab_size <= 0:
            raise UsageError(
                f"scMulan vocab_size is {config.vocab_size}: resolve it from the token set first "
                "(scfm_jax.objectives.scmulan.resolve_config or an official checkpoint)")
        if config.n_embd % config.n_head:
            raise UsageError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        if config.attention != "dot_product":
            raise UsageError(f"scMulan attention {config.attention!r}: only 'dot_product' (exact "
                             "causal softmax attention) is available")
        layers.check_remat_policy(config.remat_policy)
        attention_impls.check_implementation(config.attention_impl)
        return config

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _param(rngs, shape, names, std):
    return layers.param(rngs, nnx.initializers.normal(std), shape, names)


def _zeros(shape, names):
    # zeros need no random key; the parameter stream stays that of the weights
    return nnx.Param(layers.with_axes(nnx.initializers.zeros_init(), names)(
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
        attended = attention_impls.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation=self.cfg.attention_impl)
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
        self.blocks = layers.stack(lambda: Block(cfg, rngs=rngs), cfg.n_layer)
        self.ln_f = layers.layer_norm(d, rngs=rngs, use_bias=cfg.bias, dtype=self.dtype)
        self.lm_head = _param(rngs, (d, cfg.vocab_size), (EMBED, VOCAB), INIT_STD)
        self.epx_head = _param(rngs, (d, cfg.vocab_size), (EMBED, VOCAB), INIT_STD)

    def embed(self, ids, levels):
        x = (jnp.take(self.wte[...], ids, axis=0) + jnp.take(self.wee[...], levels, axis=0))
        return layers.constrain(x.astype(self.dtype), (BATCH, LENGTH, EMBED))

    def __call__(self, ids: jax.Array, levels: jax.Array, *, return_kv: bool = False):
        """Final-LayerNorm output [B, T, D] of right-padded ids/levels [B, T] (int).

        With `return_kv`, also the keys and values of every layer ([layers, B, T, heads,
        head_dim] each), the prefill of a generation cache.
        """
        x = self.embed(ids, levels)
        x, kv = layers.scan(self.blocks, x, lambda block, h, *_: block(h), self.cfg.remat_policy,
                            unroll=self.cfg.unroll_layers)
        hidden = self.ln_f(x)
        return (hidden, kv) if return_kv else hidden

    def decode_step(self, ids, levels, cache, positions):
        """Extends the cache by one token per cell: ids/levels/positions [B]; returns (hidden [B, D],
        cache). `cache` is (keys, values), each [layers, B, S, heads, head_dim]."""
        x = self.embed(ids[:, None], levels[:, None])

        def step(block, x, _, layer_cache):
            x, cache_k, cache_v = block.decode(x, *layer_cache, positions)
            return x, (cache_k, cache_v)

        x, cache = layers.scan(self.blocks, x, step, "none", per_layer=cache)
        return self.ln_f(x)[:, 0], cache

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
