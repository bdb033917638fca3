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
    return config
