"""scMulan in PyTorch, annotating as the official `get_cell_types_and_embds_for_adata` does.

SPEC.md II.2-II.5: c-sentence prompts built per cell, a NoPE pre-LN GPT (tanh GELU, causal SDPA,
untied `lm_head` / `epx_head`), and greedy generation of up to three tokens per cell with a full
forward over the whole sequence at every step (no KV cache), one cell at a time.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch
from torch import nn

PCT = "<PCT>"
GENERATED = 3  # max_new_tokens = prompt length + 3, i.e. three tokens


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(dim, 3 * dim, bias=bias)
        self.c_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2)
                   for t in self.c_attn(x).split(d, dim=2))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=bias)
        self.c_proj = nn.Linear(4 * dim, dim, bias=bias)

    def forward(self, x):
        return self.c_proj(nn.functional.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, bias=bias)
        self.attn = CausalSelfAttention(dim, heads, bias)
        self.ln_2 = nn.LayerNorm(dim, bias=bias)
        self.mlp = MLP(dim, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ScMulanModel(nn.Module):
    """The released GPT; `forward` returns both heads at the last position and the ln_f output."""

    def __init__(self, *, vocab_size: int, n_layer: int, n_head: int, n_embd: int,
                 expression_level: int = 10, bias: bool = False, **_unused_model_args):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wee=nn.Embedding(expression_level + 1, n_embd),
            h=nn.ModuleList(Block(n_embd, n_head, bias) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(n_embd, bias=bias)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.epx_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.expression_level = expression_level

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping) -> "ScMulanModel":
        """From an official `{'model_args', 'model'}` dict (as `torch.load` returns it)."""
        model = cls(**checkpoint["model_args"])
        model.load_state_dict({k: torch.as_tensor(np.asarray(v))
                               for k, v in checkpoint["model"].items()}, strict=True)
        return model.eval()

    @classmethod
    def from_scfm_jax(cls, model) -> "ScMulanModel":
        """The same network and weights as an `scfm_jax` ScMulan (via its official export)."""
        from scfm_jax.interop.scmulan_torch import state_dict_arrays

        cfg = model.cfg
        return cls.from_checkpoint({
            "model_args": dict(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                               n_embd=cfg.n_embd, expression_level=cfg.expression_level,
                               bias=cfg.bias),
            "model": state_dict_arrays(model)})

    def forward(self, ids: torch.Tensor, levels: torch.Tensor):
        x = self.transformer.wte(ids) + self.transformer.wee(levels)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        return self.lm_head(x[:, [-1]]), self.epx_head(x[:, [-1]]), x


def cell_sentence(expr: np.ndarray, gene_ids: np.ndarray, pct_id: int):
    """(token ids, levels) of one cell's annotation prompt from its log-normalised `gene_set` row.

    The expressed genes in `gene_set` order, reversed, then `<PCT>`; levels `digitize(v,
    linspace(0, cell max, 11), right=True)` and 0 for `<PCT>`.
    """
    expr = np.asarray(expr)
    expressed = np.flatnonzero(expr > 0)[::-1]
    bins = np.linspace(0, expr.max(), 11)
    levels = np.digitize(expr[expressed], bins, right=True)
    return (np.append(gene_ids[expressed], pct_id).astype(np.int64),
            np.append(levels, 0).astype(np.int64))


@torch.inference_mode()
def generate_cell_genesis(model: ScMulanModel, ids: Sequence[int], levels: Sequence[int]):
    """`generate_cellGenesis(top_k=1)` for one cell: (all ids, all levels, last hidden states).

    Each step runs the whole sequence; every token already in it but the last is banned.
    """
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long).unsqueeze(0)
    levels = torch.as_tensor(np.asarray(levels), dtype=torch.long).unsqueeze(0)
    for _ in range(GENERATED):
        logits, expression, hidden = model(ids, levels)
        logits, expression = logits[:, -1], expression[:, -1]
        logits[:, ids[0, :-1]] = float("-inf")
        token = logits.argmax(-1, keepdim=True)
        level = expression.gather(1, token).round().clamp(0, model.expression_level).long()
        ids, levels = torch.cat([ids, token], 1), torch.cat([levels, level], 1)
        if int(token) == 0:
            break
    return ids[0].numpy(), levels[0].numpy(), hidden[0].numpy()


def annotate(model: ScMulanModel, expr, tokens: Sequence[str], genes: Sequence[str],
             cell_types: Collection[str]):
    """Per cell: prompt, generation, fine type (t2 if a cell type, else 'Unclassified') and the
    embedding (ln_f output at position -2 of the last forward). Returns (types, embeddings,
    generated ids per cell)."""
    stoi = {token: i for i, token in enumerate(tokens)}
    gene_ids = np.array([stoi[gene] for gene in genes])
    types, embeddings, generated = [], [], []
    for i in range(expr.shape[0]):
        row = np.asarray(expr[i].toarray()).ravel() if hasattr(expr, "toarray") else expr[i]
        prompt_ids, prompt_levels = cell_sentence(row, gene_ids, stoi[PCT])
        ids, _, hidden = generate_cell_genesis(model, prompt_ids, prompt_levels)
        fine = tokens[ids[-2]]
        types.append(fine if fine in cell_types else "Unclassified")
        embeddings.append(hidden[-2])
        generated.append(ids[len(prompt_ids):])
    return types, np.stack(embeddings), generated
