"""Tiny checkpoints and real cells for the analysis tests and the notebook test."""
from pathlib import Path

import jax
import numpy as np

from scfm_jax.configs import scfoundation_tiny
from scfm_jax.data.datasets import pbmc68k_reduced_counts
from scfm_jax.data.vocabulary import Vocabulary
from scfm_jax.objectives import get_objective
from scfm_jax.train import partitioning
from scfm_jax.train.checkpointing import Checkpoints
from scfm_jax.train.metrics import MetricsWriter
from scfm_jax.train.trainer import Trainer

# pbmc68k_reduced cells with 193..224 expressed genes: one inference bucket (224) and one training
# width (256), so each test compiles a forward once.
NNZ_RANGE = (193, 224)
TYPES = ("CD14+ Monocyte", "CD19+ B", "CD4+/CD25 T Reg")


def pbmc_cells(per_type: int = 12, types=TYPES):
    """Real PBMCs with integer counts in X (and a log-normalised copy in layers['lognorm'])."""
    adata = pbmc68k_reduced_counts()
    nnz = np.diff(adata.X.indptr)
    keep = (nnz >= NNZ_RANGE[0]) & (nnz <= NNZ_RANGE[1])
    chosen = np.concatenate([np.flatnonzero(keep & (adata.obs["bulk_labels"] == t).to_numpy())
                             [:per_type] for t in types])
    subset = adata[np.sort(chosen)].copy()
    subset.obs["bulk_labels"] = subset.obs["bulk_labels"].astype(str).astype("category")
    return subset


def tiny_config(num_genes: int):
    config = scfoundation_tiny.get_config()
    config.model.num_genes = num_genes
    config.model.bin_num = 8
    config.model.encoder.update(width=16, depth=1, heads=2, mlp_dim=32)
    config.model.decoder.update(width=16, depth=1, heads=2, head_dim=8, mlp_dim=32,
                                chunk_size=256)
    config.train.steps = 10
    return config


def write_workdir(folder: Path, symbols, *, mesh=(1, 1, 1), step: int = 7, seed: int = 0):
    """A training workdir with one checkpoint of a freshly initialised tiny model, saved from a
    (data, fsdp, tensor) mesh, and a short metrics log. Returns (workdir, state)."""
    config = tiny_config(len(symbols))
    size = int(np.prod(mesh))
    device_mesh = partitioning.make_mesh(dict(zip(partitioning.MESH_AXES, mesh)),
                                         devices=jax.devices()[:size])
    trainer = Trainer(config, get_objective("scfoundation"), device_mesh)
    state = trainer.init_state(seed)
    vocabulary = Vocabulary(name="pbmc-test", symbols=tuple(symbols))
    checkpoints = Checkpoints(folder)
    checkpoints.save(step, state, config=config, seed=seed,
                     vocabulary={"name": vocabulary.name, "digest": vocabulary.digest,
                                 "symbols": list(vocabulary.symbols)})
    checkpoints.close()
    metrics = MetricsWriter(folder)
    for index in range(1, step + 1):
        metrics.write(index, {"loss": 2.0 / index})
    metrics.write(step, {"loss": 0.5}, prefix="eval")
    metrics.close()
    return folder, state
