"""The toy architecture: a bag of genes. A cell is the tanh of the expression-weighted mean of its
genes' vectors; a gene's expression is read back as its vector's dot product with the cell plus a
per-gene bias. Architecture only, as everything under `scfm_jax/models/`."""
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from scfm_jax.errors import UsageError
from scfm_jax.models import layers
from scfm_jax.models.layers import BATCH, EMBED, GENES, LENGTH


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """The architecture fields of `config.model`."""
    num_genes: int
    width: int = 16
    dtype: str = "float32"    # compute dtype; parameters stay float32

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any]) -> "ToyConfig":
        config = cls(**layers.config_fields(cls, model_config, "config.model"))
        if config.num_genes <= 0:
            raise UsageError(f"model.num_genes is {config.num_genes}: resolve it from the store "
                             "first (or set it for a plan)")
        return config


class ToyModel(nnx.Module):
    def __init__(self, model_config: Mapping[str, Any], *, rngs: nnx.Rngs):
        self.cfg = cfg = ToyConfig.from_config(model_config)
        self.dtype = jnp.dtype(cfg.dtype)
        self.gene_vectors = layers.param(rngs, nnx.initializers.normal(0.5),
                                         (cfg.num_genes, cfg.width), (GENES, EMBED))
        self.gene_bias = layers.param(rngs, nnx.initializers.zeros_init(), (cfg.num_genes,),
                                      (GENES,))

    def _vectors(self, gene_ids: jax.Array) -> jax.Array:
        vectors = jnp.take(self.gene_vectors[...].astype(self.dtype), jnp.maximum(gene_ids, 0),
                           axis=0)
        return layers.constrain(vectors, (BATCH, LENGTH, EMBED))

    def encode(self, gene_ids: jax.Array, values: jax.Array) -> jax.Array:
        """Cells [B, width] from genes [B, K] (-1: absent) and their values [B, K]."""
        weights = jnp.where(gene_ids >= 0, values, 0.0).astype(self.dtype)
        total = jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-6)
        cells = jnp.einsum("bk,bkd->bd", weights, self._vectors(gene_ids)) / total
        return layers.constrain(jnp.tanh(cells), (BATCH, EMBED))

    def predict(self, cells: jax.Array, gene_ids: jax.Array) -> jax.Array:
        """Expression [B, K] of genes [B, K] in cells [B, width]."""
        bias = jnp.take(self.gene_bias[...], jnp.maximum(gene_ids, 0))
        return jnp.einsum("bd,bkd->bk", cells, self._vectors(gene_ids)).astype(jnp.float32) + bias
