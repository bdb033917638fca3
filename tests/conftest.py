"""Shared test setup: exact matmuls, eight simulated CPU devices, the `shared` fixture.

Helpers live in modules (`shared_helpers`, `train_helpers`, `analysis_helpers`); tests import them
from there, never from this file.
"""
import os

# The tests run on CPU devices. Where libtpu is installed (`.ci/run` installs it for the deviceless
# TPU compiles of `scfm-jax plan`), JAX would otherwise try to open a TPU in every test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from shared_helpers import shared_path  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Eight simulated CPU devices for the mesh and resharding tests; single-device code uses the first.
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def shared():
    """The shared folder as a Path (skips when absent)."""
    return shared_path()
