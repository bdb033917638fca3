"""The toy's objective: hide a random part of each cell's expressed genes from the encoder and
regress their log-normalised expression from the rest. `OBJECTIVE` is what training, the plan and
inference need from the toy (the contract of `scfm_jax.objectives.objective`)."""
import jax
import jax.numpy as jnp
import ml_collections

from scfm_jax.errors import UsageError
from scfm_jax.objectives.objective import Objective
from toy_model.model import ToyModel


def log_normalised(batch) -> jax.Array:
    """log1p(counts / total * 1e4) of a pipeline batch's genes [B, K]."""
    total = jnp.maximum(batch["total_counts"], 1.0)[:, None]
    return jnp.log1p(batch["counts"] / total * 1e4)


def loss(model: ToyModel, batch, key, objective_config):
    """Mean squared error over the hidden genes of the batch."""
    gene_ids, values = batch["gene_ids"], log_normalised(batch)
    hidden = (gene_ids >= 0) & (jax.random.uniform(key, gene_ids.shape)
                                < objective_config.hidden_fraction)
    cells = model.encode(jnp.where(hidden, -1, gene_ids), values)
    errors = jnp.where(hidden, (model.predict(cells, gene_ids) - values) ** 2, 0.0)
    hidden_genes = hidden.sum().astype(jnp.float32)
    return errors.sum() / jnp.maximum(hidden_genes, 1.0), {"hidden_genes": hidden_genes}


def embed(model: ToyModel, batch, objective_config=None) -> jax.Array:
    return model.encode(batch["gene_ids"], log_normalised(batch)).astype(jnp.float32)


def resolve_config(config, store):
    """`model.num_genes` from the store's vocabulary (-1), or checked against it."""
    config = ml_collections.ConfigDict(config.to_dict())
    genes = len(store.vocabulary)
    if config.model.num_genes not in (-1, genes):
        raise UsageError(f"config.model.num_genes={config.model.num_genes} but the store has "
                         f"{genes} genes; set it to -1 to take the store's")
    config.model.num_genes = genes
    return config


def plan_config(config):
    if config.model.num_genes == -1:
        raise UsageError("config.model.num_genes is -1 (taken from a store): set it for a plan")
    return ml_collections.ConfigDict(config.to_dict())


OBJECTIVE = Objective(name="toy", build_model=ToyModel, loss=loss, resolve_config=resolve_config,
                      weight_metric="hidden_genes", plan_config=plan_config, embed=embed,
                      embedding_key="X_toy")
