"""The toy, tiny: scfoundation_tiny's data, train, mesh and sharding rules with the toy's model and
objective groups. It sits in configs/ beside scfoundation_tiny.py (tests/test_model_recipe.py
copies both into a configs/ folder, where the recipe puts a model's config)."""
import ml_collections

from scfm_jax.train.config_checks import base_config


def get_config():
    config = base_config(__file__, "scfoundation_tiny")
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
