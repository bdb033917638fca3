"""Small real stores and configs for the train-loop tests (shared by fast and slow tests)."""
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from scfm_jax.configs import scfoundation_tiny
from scfm_jax.data.convert import convert


def synthetic_counts(num_cells: int = 192, num_genes: int = 120, seed: int = 0) -> ad.AnnData:
    """Negative-binomial counts with gene-specific means, so there is structure to learn."""
    rng = np.random.default_rng(seed)
    gene_means = rng.gamma(0.6, 2.0, num_genes)
    cell_depth = rng.lognormal(0.0, 0.4, num_cells)[:, None]
    mean = gene_means[None, :] * cell_depth
    counts = rng.negative_binomial(2, 2 / (2 + mean)).astype(np.float32)
    counts[counts.sum(axis=1) == 0, 0] = 1
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = [f"GENE{i:04d}" for i in range(num_genes)]
    adata.obs_names = [f"cell{i}" for i in range(num_cells)]
    return adata


def make_store(folder: Path, **kwargs) -> str:
    store = folder / "store"
    if not (store / "manifest.json").exists():
        convert([synthetic_counts(**kwargs)], str(store), vocabulary="from-data", shard_size=64)
    return str(store)


def tiny_config(store: str, steps: int = 6):
    config = scfoundation_tiny.get_config()
    config.data.store = store
    config.data.global_batch_size = 8
    config.data.buckets = (64, 128)
    config.data.max_nonzero = 128
    config.data.block_size = 8
    config.data.window_blocks = 4
    config.data.eval_batches = 1
    config.model.bin_num = 8
    config.model.encoder.update(width=16, depth=1, heads=2, mlp_dim=32)
    config.model.decoder.update(width=16, depth=1, heads=2, head_dim=8, mlp_dim=32, chunk_size=64,
                                redraw_interval=4)
    config.train.update(steps=steps, warmup_steps=2, log_every=1, eval_every=3,
                        checkpoint_every=3, learning_rate=3e-3)
    return config
