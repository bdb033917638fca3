"""PyTorch references of scFoundation and scMulan, the benchmarks' peers.

Written from `../shared/SPEC.md` (not copied from the original repositories) with the original
module names, so the released checkpoints and `scfm_jax.interop`'s exports load with
`load_state_dict(strict=True)`, and run the way the official tools do: one cell per pass for
scFoundation's `get_embedding.py`, a full forward per generated token for scMulan's annotation.
`tests/test_torch_reference.py` checks both against the fixtures of the original code.
"""
