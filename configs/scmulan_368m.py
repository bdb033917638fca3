"""scMulan at the released size: 368,800,320 parameters (SPEC.md II.6).

24 layers, width 1120, 16 heads (head dim 70), no biases, the official 2,222-token vocabulary; the
rest (data, train, mesh, objective) as scmulan_tiny. Point `objective.token_set` at the official
vocabulary folder to continue from the released weights' token set; with a token set built from a
store instead, pass `--config.model.vocab_size=-1`.
"""
from scfm_jax.train.config_checks import base_config


def get_config():
    config = base_config(__file__, "scmulan_tiny")
    config.model.update(vocab_size=2222, n_layer=24, n_head=16, n_embd=1120, bias=False,
                        expression_level=10, dtype="bfloat16", remat_policy="full")
    config.objective.num_genes = 2000
    config.data.max_nonzero = 2000
    config.data.buckets = (512, 1024, 2000)
    # Sized for a v5e-8 (the plan rows, before and after, are in docs/speed.md): the state split
    # over the slice (FSDP), 512 cells per optimiser step (the original's batch is not released)
    # in 4 micro-batches of 16 cells per chip, enough to share each layer's weight traffic.
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.data.global_batch_size = 512
    config.train.grad_accum_steps = 4
    return config
