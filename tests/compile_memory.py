"""Compile (lower + compile, nothing run) a train step on simulated CPU devices and print the
per-device memory XLA plans for it, as JSON lines. Run in its own process:

  python tests/compile_memory.py DEVICES CONFIG_MODULE "fsdp,tensor" ["fsdp,tensor" ...]
"""
import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", int(sys.argv[1]))

import importlib  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from scfm_jax.objectives import get_objective  # noqa: E402
from scfm_jax.train import partitioning  # noqa: E402
from scfm_jax.train.trainer import Trainer  # noqa: E402


def main():
    config = importlib.import_module(f"scfm_jax.configs.{sys.argv[2]}").get_config()
    config.data.global_batch_size = 64
    config.train.grad_accum_steps = 1
    for layout in sys.argv[3:]:
        fsdp, tensor = (int(x) for x in layout.split(","))
        config.mesh.update(data=1, fsdp=fsdp, tensor=tensor)
        devices = jax.devices()[:fsdp * tensor]
        mesh = partitioning.make_mesh(config.mesh, devices=devices)
        trainer = Trainer(config, get_objective(config.model.name), mesh)
        batch = {}
        for name, shape, dtype in (("gene_ids", (64, 512), jnp.int32),
                                   ("counts", (64, 512), jnp.float32),
                                   ("total_counts", (64,), jnp.float32),
                                   ("num_nonzero", (64,), jnp.int32)):
            batch[name] = jax.ShapeDtypeStruct(
                shape, dtype, sharding=partitioning.batch_sharding(mesh, len(shape), trainer.rules))
        state = trainer.abstract_sharded_state()
        compiled = trainer.compile_train_step(state, batch)
        memory = compiled.memory_analysis()
        state_bytes = sum(jnp.dtype(leaf.dtype).itemsize
                          * _prod(leaf.sharding.shard_shape(leaf.shape))
                          for leaf in jax.tree.leaves(state))
        params = sum(_prod(leaf.shape) for leaf in jax.tree.leaves(state.params))
        print(json.dumps({
            "config": sys.argv[2], "devices": len(devices), "fsdp": fsdp, "tensor": tensor,
            "parameters": params,
            "argument_bytes_per_device": int(memory.argument_size_in_bytes),
            "temp_bytes_per_device": int(memory.temp_size_in_bytes),
            "state_bytes_per_device": state_bytes}), flush=True)


def _prod(shape):
    out = 1
    for s in shape:
        out *= int(s)
    return out


if __name__ == "__main__":
    main()
