"""scfm-jax: scFoundation and scMulan in JAX/Flax.

The flow is one direction: data (convert → store → pipeline) → models → train → analysis.
"""

__version__ = "0.1.0"
