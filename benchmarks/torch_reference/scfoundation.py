"""scFoundation (MaeAutobin) in PyTorch, run as the official `get_embedding.py` runs it.

SPEC.md I.2-I.6: the auto-discretisation value embedding, the learned gene table, a post-norm ReLU
`nn.TransformerEncoderLayer` encoder over the expressed genes and a pre-norm Performer (FAVOR+,
softmax kernel, key features stabilised by one max over the whole batch) over all positions.
`get_embedding` takes one cell per forward with float64 preprocessing, as the official tool does.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

POOLS = ("all", "max")
OUTPUTS = ("cell", "gene", "gene_batch", "gene_expression")


class AutoDiscretizationEmbedding2(nn.Module):
    """Scalar value -> soft mixture of `bin_num` learned bin vectors; 102 / 103 are mask / pad."""

    def __init__(self, dim: int, bin_num: int, bin_alpha: float, mask_value: float,
                 pad_value: float):
        super().__init__()
        self.mlp = nn.Linear(1, bin_num)
        self.mlp2 = nn.Linear(bin_num, bin_num)
        self.emb = nn.Embedding(bin_num, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)
        self.bin_alpha, self.mask_value, self.pad_value = bin_alpha, mask_value, pad_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = values.float().unsqueeze(-1)
        h1 = nn.functional.leaky_relu(self.mlp(x), 0.1)
        weights = torch.softmax(self.bin_alpha * h1 + self.mlp2(h1), dim=-1)
        out = weights @ self.emb.weight
        out = torch.where((values == self.mask_value).unsqueeze(-1), self.emb_mask.weight[0], out)
        return torch.where((values == self.pad_value).unsqueeze(-1), self.emb_pad.weight[0], out)


class TransformerEncoder(nn.Module):
    """`pytorchTransformerModule`: post-norm ReLU layers, then one more LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        self.transformer_encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=0.0, batch_first=True,
                                       norm_first=False) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.transformer_encoder:
            x = layer(x, src_key_padding_mask=padding_mask)
        return self.norm(x)


class FastAttention(nn.Module):
    """FAVOR+ with the softmax kernel and a loaded projection (SPEC.md I.4(f))."""

    def __init__(self, features: int, head_dim: int):
        super().__init__()
        self.register_buffer("projection_matrix", torch.zeros(features, head_dim))

    def _features(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        c = x.shape[-1] ** -0.25
        u = (c * x) @ self.projection_matrix.T
        delta = (c * c / 2) * (x * x).sum(-1, keepdim=True)
        # queries: a max per token; keys: one max over the whole tensor, batch included
        stabiliser = u.amax(-1, keepdim=True) if is_query else u.amax()
        return self.projection_matrix.shape[0] ** -0.5 * (torch.exp(u - delta - stabiliser) + 1e-4)

    def forward(self, q, k, v):
        q, k = self._features(q, True), self._features(k, False)
        context = k.transpose(-1, -2) @ v
        normaliser = q @ k.sum(-2).unsqueeze(-1)
        return (q @ context) / normaliser


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, features: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.fast_attention = FastAttention(features, head_dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.heads, -1).transpose(1, 2)  # noqa: E731
        out = self.fast_attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)))
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)

    def forward(self, x):
        return self.w2(nn.functional.gelu(self.w1(x)))


class Chunk(nn.Module):
    """Holds the feed-forward under `fn` (the original's key path); ff_chunks is 1."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class PreLayerNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class _Layers(nn.Module):
    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        for attention, feed_forward in self.layers:
            x = x + attention(x)
            x = x + feed_forward(x)
        return x


class _Performer(nn.Module):
    def __init__(self, dim, depth, heads, head_dim, mlp_dim, features):
        super().__init__()
        self.net = _Layers(nn.ModuleList(nn.ModuleList([
            PreLayerNorm(dim, SelfAttention(dim, heads, head_dim, features)),
            PreLayerNorm(dim, Chunk(FeedForward(dim, mlp_dim)))]) for _ in range(depth)))
        self.register_buffer("calls_since_last_redraw", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return self.net(x)


class PerformerDecoder(nn.Module):
    """`PerformerModule`: the performer, then its own LayerNorm; the padding mask is never used."""

    def __init__(self, dim, depth, heads, head_dim, mlp_dim, features):
        super().__init__()
        self.performer = _Performer(dim, depth, heads, head_dim, mlp_dim, features)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.performer(x))


class MaeAutobin(nn.Module):
    def __init__(self, *, num_genes: int, bin_num: int, bin_alpha: float, mask_value: float,
                 pad_value: float, encoder: Mapping, decoder: Mapping):
        super().__init__()
        self.num_genes, self.seq_len = num_genes, num_genes + 2
        self.mask_value, self.pad_value = mask_value, pad_value
        enc_dim, dec_dim = encoder["width"], decoder["width"]
        self.token_emb = AutoDiscretizationEmbedding2(enc_dim, bin_num, bin_alpha, mask_value,
                                                      pad_value)
        self.pos_emb = nn.Embedding(self.seq_len + 1, enc_dim)
        self.encoder = TransformerEncoder(enc_dim, encoder["depth"], encoder["heads"],
                                          encoder["mlp_dim"])
        self.decoder_embed = nn.Linear(enc_dim, dec_dim)
        self.decoder = PerformerDecoder(dec_dim, decoder["depth"], decoder["heads"],
                                        decoder["head_dim"], decoder["mlp_dim"],
                                        decoder["features"])
        self.norm = nn.LayerNorm(dec_dim)
        self.to_final = nn.Linear(dec_dim, 1)

    @classmethod
    def from_official(cls, official_config: Mapping, state_dict: Mapping) -> "MaeAutobin":
        """The model of one weight set of an official `models.ckpt` (`{'config', 'state_dict'}`)."""
        flat = dict(official_config["model_config"][official_config["model"]])
        flat.update(official_config.get("dataset_config", {}).get("rnaseq", {}))
        weights = {k.removeprefix("model."): torch.as_tensor(np.asarray(v))
                   for k, v in state_dict.items()}
        enc, dec = flat["encoder"], flat["decoder"]
        model = cls(
            num_genes=int(flat["seq_len"]) - 2, bin_num=int(flat["bin_num"]),
            bin_alpha=float(flat["bin_alpha"]), mask_value=float(flat["mask_token_id"]),
            pad_value=float(flat["pad_token_id"]),
            encoder=dict(width=enc["hidden_dim"], depth=enc["depth"], heads=enc["heads"],
                         mlp_dim=weights["encoder.transformer_encoder.0.linear1.weight"].shape[0]),
            decoder=dict(width=dec["hidden_dim"], depth=dec["depth"], heads=dec["heads"],
                         head_dim=dec["dim_head"],
                         mlp_dim=weights["decoder.performer.net.layers.0.1.fn.fn.w1.weight"].shape[0],
                         features=weights["decoder.performer.net.layers.0.0.fn.fast_attention."
                                          "projection_matrix"].shape[0]))
        model.load_state_dict(weights, strict=True)
        return model.eval()

    @classmethod
    def from_scfm_jax(cls, model) -> "MaeAutobin":
        """The same network and weights as an `scfm_jax` ScFoundation (via its official export)."""
        from scfm_jax.interop.scfoundation_torch import export_official_state_dict

        weights = export_official_state_dict(model)
        config = model.cfg  # ScFoundationConfig: depths, heads, head_dim; widths from the shapes
        reference = cls(
            num_genes=model.num_genes, bin_num=weights["token_emb.emb.weight"].shape[0],
            bin_alpha=float(model.token_emb.bin_alpha), mask_value=float(model.mask_value),
            pad_value=float(model.pad_value),
            encoder=dict(width=weights["token_emb.emb.weight"].shape[1],
                         depth=config.encoder.depth, heads=config.encoder.heads,
                         mlp_dim=weights["encoder.transformer_encoder.0.linear1.weight"].shape[0]),
            decoder=dict(width=weights["decoder_embed.weight"].shape[0],
                         depth=config.decoder.depth, heads=config.decoder.heads,
                         head_dim=config.decoder.head_dim,
                         mlp_dim=weights["decoder.performer.net.layers.0.1.fn.fn.w1.weight"].shape[0],
                         features=weights["decoder.performer.net.layers.0.0.fn.fast_attention."
                                          "projection_matrix"].shape[0]))
        reference.load_state_dict({k: torch.tensor(np.asarray(v))
                                   for k, v in weights.items()}, strict=True)
        return reference.eval()

    def encode(self, values, gene_ids, padding_mask):
        h = self.token_emb(values) + self.pos_emb(gene_ids)
        return self.encoder(h, padding_mask)

    def forward(self, values, gene_ids, padding_mask, encoder_positions, decoder_values, *,
                head: bool = True):
        """`MaeAutobin.forward`: encoder over the gathered tokens, decoder over every position.

        `encoder_positions` [B, L] bool marks the positions the encoder saw (row-major order of
        the non-padded encoder slots); `decoder_values` [B, L] holds every position's value.
        """
        encoded = self.encode(values, gene_ids, padding_mask)
        decoder_input = self.token_emb(decoder_values)
        rows, columns = encoder_positions.nonzero(as_tuple=True)
        decoder_input[rows, columns] = encoded[~padding_mask]
        positions = torch.arange(decoder_values.shape[1], device=decoder_values.device)
        decoder_input = decoder_input + self.pos_emb(positions)
        out = self.norm(self.decoder(self.decoder_embed(decoder_input)))
        return self.to_final(out).squeeze(-1) if head else out


def gather(values: torch.Tensor, keep: torch.Tensor, pad_value: float, pad_gene_id: int):
    """`gatherData`: kept entries in index order, right-padded to the batch maximum.

    Returns (values, gene ids, padding mask); padded slots hold `pad_value` and `pad_gene_id`.
    """
    lengths = keep.sum(1)
    width = int(lengths.max())
    slots = torch.arange(width).expand(len(values), width)
    padding = slots >= lengths.unsqueeze(1)
    gene_ids = torch.full((len(values), width), pad_gene_id, dtype=torch.long)
    gathered = torch.full((len(values), width), pad_value, dtype=values.dtype)
    rows, columns = keep.nonzero(as_tuple=True)
    gene_ids[~padding] = columns
    gathered[~padding] = values[rows, columns]
    return gathered, gene_ids, padding


def model_input(counts: np.ndarray, tgthighres: str = "t4") -> np.ndarray:
    """`get_embedding.py`'s input of one raw count row (singlecell, pre_normalized F), float64.

    Genes `log1p(x / sum(x) * 1e4)`, then T (`tX`: X, `fX`: log10(total·X), `aX`:
    log10(total) + X) and S = log10(total).
    """
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    kind, amount = tgthighres[0], float(tgthighres[1:])
    target = {"t": lambda: amount, "f": lambda: np.log10(total * amount),
              "a": lambda: np.log10(total) + amount}.get(kind)
    if target is None:
        raise ValueError(f"tgthighres must start with t, f or a, got {tgthighres!r}")
    return np.concatenate([np.log1p(counts / total * 1e4), [target(), np.log10(total)]])


@torch.inference_mode()
def get_embedding(model: MaeAutobin, counts, *, output_type: str = "cell",
                  tgthighres: str = "t4", pool_type: str = "all") -> np.ndarray:
    """The official `get_embedding.py` loop on aligned raw counts [cells, num_genes].

    `cell`: encoder only, one cell per forward, pooled [S, T, max, mean] (`all`) or max over every
    token (`max`). `gene` / `gene_expression`: encoder + decoder, one cell per forward, the
    decoder output (without / with `to_final`) cut to the genes. `gene_batch`: every cell in one
    forward. `counts` may be dense or scipy sparse; each row is densified as the official reads it.
    """
    if output_type not in OUTPUTS or pool_type not in POOLS:
        raise ValueError(f"output_type must be one of {OUTPUTS} and pool_type one of {POOLS}")
    rows = [np.asarray(counts[i].toarray()).ravel() if hasattr(counts, "toarray")
            else np.asarray(counts[i]) for i in range(counts.shape[0])]
    inputs = [torch.from_numpy(model_input(row, tgthighres)).float().unsqueeze(0) for row in rows]
    if output_type == "gene_batch":
        return _full_forward(model, torch.cat(inputs), head=False).numpy()
    out = []
    for x in inputs:
        if output_type == "cell":
            values, gene_ids, padding = gather(x, x > 0, model.pad_value, int(model.pad_value))
            g = model.encode(values, gene_ids, padding)
            if pool_type == "all":
                genes = g[:, :-2]
                out.append(torch.cat([g[:, -1], g[:, -2], genes.amax(1), genes.mean(1)], 1))
            else:
                out.append(g.amax(1))
        else:
            out.append(_full_forward(model, x, head=output_type == "gene_expression"))
    return torch.cat(out).numpy()


def _full_forward(model: MaeAutobin, x: torch.Tensor, *, head: bool) -> torch.Tensor:
    """`getEncoerDecoderData` + forward on model inputs [B, L]; keeps the gene positions."""
    values, gene_ids, padding = gather(x, x > 0, model.pad_value, model.seq_len)
    return model(values, gene_ids, padding, x > 0, x, head=head)[:, :model.num_genes]


@torch.inference_mode()
def masked_forward(model: MaeAutobin, inputs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The pretraining forward: the encoder sees the non-zero unmasked positions, the decoder
    every position with masked ones set to the mask value; predictions for all positions."""
    x = torch.as_tensor(inputs, dtype=torch.float32)
    mask = torch.as_tensor(mask)
    keep = (x > 0) & ~mask
    values, gene_ids, padding = gather(x, keep, model.pad_value, model.seq_len)
    decoder_values = torch.where(mask, torch.tensor(model.mask_value), x)
    return model(values, gene_ids, padding, keep, decoder_values).numpy()


def load_official_checkpoint(path, key: str = "cell") -> MaeAutobin:
    """One weight set (`gene`, `cell`, `rde`) of an official `models.ckpt`."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if key not in checkpoint:
        raise KeyError(f"{path} has no weight set {key!r}; it holds {sorted(checkpoint)}")
    return MaeAutobin.from_official(checkpoint[key]["config"], checkpoint[key]["state_dict"])

