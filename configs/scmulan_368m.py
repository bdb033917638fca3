"""scMulan at the released size: 368,800,320 parameters (SPEC.md II.6).

24 layers, width 1120, 16 heads (head dim 70), no biases, the official 2,222-token vocabulary; the
rest (data, train, mesh, objective) as scmulan_tiny. Point `objective.token_set` at the official
vocabulary folder to continue from the released weights' token set; with a token set built from a
store instead, pass `--config.model.vocab_size=-1`.
"""
from scfm_jax.configs import scmulan_tiny


def get_config():
    config = scmulan_tiny.get_config()
    config.model.update(vocab_size=2222, n_layer=24, n_head=16, n_embd=1120, bias=False,
                        expression_level=10, remat_policy="dots")
    config.objective.num_genes = 2000
    config.data.max_nonzero = 2000
    config.data.buckets = (512, 1024, 2000)
    # Sized for a v5e-8 by `scfm-jax plan`: replicated on 8 chips (data=8) the state took 4.47 GB
    # of each chip and 4 cells per chip at the 2,000-gene bucket did not fit (16.4 GB of
    # temporaries). FSDP over the slice and 4 micro-batches (one cell per chip per micro-step):
    # 4.74 GB (72% headroom). `--sweep` at 2,000 genes, largest batch that fits: none 32 (41%),
    # dots 128 (18%; 64 at 54%), full 512 (16%; 256 at 54%). The batch stays at 32; a larger one
    # should take `full`, whose roofline MFU rises to 22% at 256 against 6% here.
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.train.grad_accum_steps = 4
    return config
