"""A GEARS-style perturbation head over frozen foundation-model gene embeddings (Flax NNX).

The network of GEARS (Roohani et al. 2023, `gears/model.py`) as scFoundation runs it (`mode='v1'`):
the learned gene embedding is replaced by the foundation model's per-cell, per-gene decoder
embedding of a control cell ([cells, genes, fm width], computed once outside and fed in), while the
co-expression stream keeps its own learned table.

  gene stream   h = MLP(LN(fm_embedding) W_in) + 0.2 * SGConv_coexpression(E_pos)
  perturbation  e = pert_fuse(sum of SGConv_perturbation(E_pert) over the cell's perturbed genes),
                added to every gene of a perturbed cell
  decoder       h = recovery(transform(relu(LN(h + e))));  o_g = <h_g, w1_g> + b1_g  (gene-specific)
                c = cross_gene(o);  y_g = <[c, o_g], w2_g> + b2_g + control_g  (residual)

SGConv with K = 1 (PyG `SGConv`): X' = Â X W with Â = D^-1/2 (A + I) D^-1/2. GEARS's BatchNorm
layers are LayerNorms here (no batch statistics to carry or shard).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

COEXPRESSION_WEIGHT = 0.2   # GEARS: base_emb + 0.2 * pos_emb


class Graph(nnx.Variable):
    """A normalised adjacency: a constant of the module, not trained."""


def normalised_adjacency(adjacency: np.ndarray) -> np.ndarray:
    """Â = D^-1/2 (A + I) D^-1/2 with D the row sums of A + I (weights kept)."""
    with_loops = np.asarray(adjacency, np.float64) + np.eye(len(adjacency))
    scale = 1.0 / np.sqrt(with_loops.sum(axis=1))
    return (scale[:, None] * with_loops * scale[None, :]).astype(np.float32)


class MLP(nnx.Module):
    """Linear -> LayerNorm -> ReLU blocks, the last layer linear (GEARS's `MLP`, last_layer_act
    'linear')."""

    def __init__(self, sizes: list[int], *, rngs: nnx.Rngs):
        self.linears = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
        self.norms = nnx.List([nnx.LayerNorm(b, rngs=rngs) for b in sizes[1:-1]])

    def __call__(self, x):
        for linear, norm in zip(self.linears[:-1], self.norms):
            x = jax.nn.relu(norm(linear(x)))
        return self.linears[-1](x)


class SGConv(nnx.Module):
    """K = 1 simplified graph convolution: Â X W + b."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x, adjacency):
        return self.linear(adjacency @ x)


class GearsHead(nnx.Module):
    """Predicts every measured gene's expression of a perturbed cell from its control cell."""

    def __init__(self, *, num_genes: int, num_perturbation_genes: int, fm_width: int,
                 coexpression: np.ndarray, perturbation_graph: np.ndarray, hidden: int = 64,
                 rngs: nnx.Rngs):
        self.coexpression = Graph(jnp.asarray(normalised_adjacency(coexpression)))
        self.perturbation_graph = Graph(jnp.asarray(normalised_adjacency(perturbation_graph)))
        self.fm_norm = nnx.LayerNorm(fm_width, rngs=rngs)
        self.fm_in = nnx.Linear(fm_width, hidden, rngs=rngs)
        self.gene_position = nnx.Embed(num_genes, hidden, rngs=rngs)
        self.coexpression_conv = SGConv(hidden, rngs=rngs)
        self.gene_mlp = MLP([hidden, hidden, hidden], rngs=rngs)
        self.perturbation_embedding = nnx.Embed(num_perturbation_genes, hidden, rngs=rngs)
        self.perturbation_conv = SGConv(hidden, rngs=rngs)
        self.perturbation_fuse = MLP([hidden, hidden, hidden], rngs=rngs)
        self.perturbed_norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.transform = MLP([hidden, hidden, hidden], rngs=rngs)
        self.recovery = MLP([hidden, 2 * hidden, hidden], rngs=rngs)
        init = nnx.initializers.xavier_normal()
        self.gene_w1 = nnx.Param(init(rngs.params(), (num_genes, hidden)))
        self.gene_b1 = nnx.Param(jnp.zeros((num_genes,)))
        self.cross_gene = MLP([num_genes, hidden, hidden], rngs=rngs)
        self.gene_w2 = nnx.Param(init(rngs.params(), (num_genes, hidden + 1)))
        self.gene_b2 = nnx.Param(jnp.zeros((num_genes,)))

    def __call__(self, fm_embeddings, control_expression, perturbed):
        """fm_embeddings [B, genes, fm width], control_expression [B, genes], perturbed
        [B, perturbation genes] (1 where the cell's condition perturbs that gene) -> [B, genes]."""
        h = self.fm_in(self.fm_norm(fm_embeddings.astype(jnp.float32)))
        position = self.coexpression_conv(self.gene_position.embedding[...],
                                          self.coexpression[...])
        h = self.gene_mlp(h + COEXPRESSION_WEIGHT * position[None])
        per_gene = self.perturbation_conv(self.perturbation_embedding.embedding[...],
                                          self.perturbation_graph[...])
        fused = self.perturbation_fuse(perturbed @ per_gene)                # [B, hidden]
        is_perturbed = (perturbed.sum(axis=-1, keepdims=True) > 0).astype(h.dtype)
        h = h + (is_perturbed * fused)[:, None, :]
        h = self.recovery(self.transform(jax.nn.relu(self.perturbed_norm(h))))
        out = jnp.sum(h * self.gene_w1[...][None], axis=-1) + self.gene_b1[...]
        cross = self.cross_gene(out)                                        # [B, hidden]
        both = jnp.concatenate(
            [jnp.broadcast_to(cross[:, None, :], out.shape + cross.shape[-1:]), out[..., None]],
            axis=-1)
        out = jnp.sum(both * self.gene_w2[...][None], axis=-1) + self.gene_b2[...]
        return out + control_expression
