"""Flax NNX models: scFoundation (xTrimoGene with a performer decoder) and scMulan.

Parameters carry logical axis names only; they are placed on a mesh explicitly by the train code
(abstract init, then a jitted init with output shardings), so Flax's eager sharding of each new
variable is switched off for the whole package.
"""
from flax import nnx

nnx.use_eager_sharding(False)
