"""Batched scMulan generation with a key/value cache, following the official decoding rules.

The official `generate_cellGenesis` (SPEC.md II.5) runs one cell at a time and a full forward per
step. Here a whole right-padded batch is prefilled once, then each step feeds one token per cell at
its own position (cells have different prompt lengths). The rules are the original's:

* logits of every token at positions `[:-1]` of the current sequence are set to -inf (the last
  token stays allowed), plus any `ignore_ids`;
* top-k filtering then sampling; top_k=1 is greedy (ties go to the lowest id; the original samples
  among tied maxima, which never happens with real-valued logits);
* `probs[<E>] *= gamma`;
* the new token's level is `clip(round(epx_head[token]), 0, expression_level)`, round half to even;
* a cell stops after emitting `<E>` (id 0) or when its sequence reaches `prompt_len +
  max_new_tokens` tokens.

`probabilities` is, for every generated token, the probability the model gave it: the softmax of the
logits over the tokens allowed at that step (the bans above applied; before top-k, temperature and
gamma, which are sampling choices, not the model's). The official code reports none.

`embedding` is what the official embedding reads: the final-LayerNorm output at index -2 of the last
forward pass, i.e. position `prompt_len + generated - 3`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scfm_jax.models.scmulan import ScMulan, last_valid

END_ID = 0


@dataclasses.dataclass
class Generated:
    """Per cell: generated tokens, levels and probabilities ([B, max_new_tokens], -1 (NaN) after
    the end), their count [B], and the official embedding [B, D]."""
    ids: np.ndarray
    levels: np.ndarray
    probabilities: np.ndarray
    num_generated: np.ndarray
    embedding: np.ndarray

    def tokens(self, cell: int) -> np.ndarray:
        return self.ids[cell, :self.num_generated[cell]]

    def token_levels(self, cell: int) -> np.ndarray:
        return self.levels[cell, :self.num_generated[cell]]

    def token_probabilities(self, cell: int) -> np.ndarray:
        return self.probabilities[cell, :self.num_generated[cell]]


def _choose(logits, key, top_k: int, temperature: float, gamma: float):
    if top_k == 1 and gamma > 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    logp = logp.at[:, END_ID].add(jnp.log(jnp.float32(gamma)))
    return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)


def generate_tokens(model: ScMulan, ids, levels, lengths, key, ignore_mask, *, max_new_tokens: int,
                    top_k: int, temperature: float, gamma: float):
    """The jit-able core of `generate`: (tokens, levels, probabilities, counts, embedding) as
    device arrays; `ignore_mask` [vocab] bool bans tokens."""
    batch, width = ids.shape
    vocab = model.cfg.vocab_size
    max_level = model.cfg.expression_level
    rows = jnp.arange(batch)
    hidden, kv = model(ids, levels, return_kv=True)
    pad = ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0))  # [layers, B, S, heads, d]
    cache = (jnp.pad(kv[0], pad), jnp.pad(kv[1], pad))

    # banned[b, v]: token v sits at a position before the last one of cell b's sequence
    before_last = jnp.arange(width)[None, :] < (lengths - 1)[:, None]
    banned = jnp.zeros((batch, vocab), bool).at[rows[:, None], ids].max(before_last)
    last_token = jnp.take_along_axis(ids, (lengths - 1)[:, None], axis=1)[:, 0]
    h_last = last_valid(hidden, lengths)
    h_prev = last_valid(hidden, jnp.maximum(lengths - 1, 1))

    def pick(h_last, banned, done, key):
        logits, exp = model.heads(h_last)
        logits = jnp.where(banned | ignore_mask, -jnp.inf, logits)
        token = _choose(logits, key, top_k, temperature, gamma)
        level = jnp.clip(jnp.round(exp[rows, token]), 0, max_level).astype(jnp.int32)
        probability = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[rows, token]
        return (jnp.where(done, -1, token), jnp.where(done, -1, level),
                jnp.where(done, jnp.nan, probability))

    def step(carry, i):
        cache, banned, last_token, h_prev, h_last, done, key = carry
        key, sample_key = jax.random.split(key)
        token, level, probability = pick(h_last, banned, done, sample_key)
        active = ~done
        banned = banned.at[rows, last_token].max(active)
        last_token = jnp.where(active, token, last_token)
        done = done | (token == END_ID)
        # the forward runs for every cell; the finished ones keep their state
        new_hidden, cache = model.decode_step(jnp.maximum(token, 0), jnp.maximum(level, 0),
                                              cache, lengths + i)
        advance = (~done)[:, None]
        h_prev = jnp.where(advance, h_last, h_prev)
        h_last = jnp.where(advance, new_hidden, h_last)
        return (cache, banned, last_token, h_prev, h_last, done, key), (token, level, probability)

    done = jnp.zeros((batch,), bool)
    carry = (cache, banned, last_token, h_prev, h_last, done, key)
    carry, scanned = jax.lax.scan(step, carry, jnp.arange(max_new_tokens - 1))
    _, banned, _, h_prev, h_last, done, key = carry
    # the last token needs no forward pass after it
    last = pick(h_last, banned, done, jax.random.split(key)[1])
    tokens, token_levels, probabilities = (jnp.concatenate([steps.T, final[:, None]], axis=1)
                                           for steps, final in zip(scanned, last))
    return tokens, token_levels, probabilities, jnp.sum(tokens >= 0, axis=1), h_prev


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k",
                                             "temperature", "gamma"))
def _generate_jit(graphdef, state, ids, levels, lengths, key, ignore_mask, **kwargs):
    return generate_tokens(nnx.merge(graphdef, state), ids, levels, lengths, key, ignore_mask, **kwargs)


def generate(model: ScMulan, ids, levels, lengths, *, max_new_tokens: int, top_k: int = 1,
             temperature: float = 1.0, gamma: float = 1.0, ignore_ids=(), key=None) -> Generated:
    """Generates up to `max_new_tokens` tokens per cell from right-padded prompts
    (ids/levels [B, T], lengths [B]); one compiled program per (shapes, options)."""
    ids = jnp.asarray(ids, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if ids.ndim != 2 or lengths.shape != ids.shape[:1]:
        raise ValueError(f"ids must be [B, T] with lengths [B]; got {ids.shape}, {lengths.shape}")
    if int(jnp.min(lengths)) < 1:
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if top_k < 0 or temperature <= 0 or gamma < 0:
        raise ValueError("need top_k >= 0 (0: no filter), temperature > 0 and gamma >= 0")
    ignore_mask = np.zeros((model.cfg.vocab_size,), bool)
    ignore_mask[np.asarray(ignore_ids, np.int64)] = True
    graphdef, state = nnx.split(model)
    tokens, token_levels, probabilities, count, embedding = _generate_jit(
        graphdef, state, ids, jnp.asarray(levels, jnp.int32), lengths,
        jax.random.key(0) if key is None else key, jnp.asarray(ignore_mask),
        max_new_tokens=int(max_new_tokens), top_k=int(top_k), temperature=float(temperature),
        gamma=float(gamma))
    return Generated(np.asarray(tokens), np.asarray(token_levels), np.asarray(probabilities),
                     np.asarray(count), np.asarray(embedding, np.float32))
