"""The toy, tiny: scfoundation_tiny's data, train, mesh and sharding rules with the toy's model and
objective groups (a config in `configs/` would start with `base_config(__file__,
"scfoundation_tiny")`; this one lives in tests/, so it names the file)."""
from pathlib import Path

import ml_collections

from scfm_jax.train.config_checks import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def get_config():
    config = load_config(str(CONFIGS / "scfoundation_tiny.py"))
    config.model = ml_collections.ConfigDict(dict(
        name="toy",
        num_genes=-1,      # -1: the size of the training store's vocabulary
        width=16,
        dtype="float32",   # the compute dtype; the training log reads its peak FLOP/s for MFU
    ))
    config.objective = ml_collections.ConfigDict(dict(hidden_fraction=0.5))
    config.data.update(global_batch_size=8, buckets=(64,), max_nonzero=64, block_size=8,
                       window_blocks=4, eval_fraction=0.0)
    config.train.update(steps=2, warmup_steps=1, log_every=1, checkpoint_every=2)
    return config
