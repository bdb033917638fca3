"""Flax NNX networks only: scFoundation (xTrimoGene with a performer decoder) and scMulan.

Parameters carry logical axis names (`layers.with_axes`) and are placed on a mesh by the train
code. Nothing here reads a store or builds a training batch (see `scfm_jax.objectives`).
"""
