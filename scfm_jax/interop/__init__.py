"""Import and export of the official PyTorch checkpoints (scFoundation models.ckpt, scMulan .pt)."""
