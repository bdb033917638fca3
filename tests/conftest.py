"""Shared test setup: exact matmuls, eight simulated CPU devices, the `shared` fixture.

Helpers live in modules (`shared_helpers.shared_path`, `train_helpers`, `analysis_helpers`);
`shared_path` is re-exported here for the test files that still import it from conftest.
"""
import jax
import pytest

from shared_helpers import REPO_ROOT, shared_dir, shared_path  # noqa: F401

jax.config.update("jax_default_matmul_precision", "highest")
# Eight simulated CPU devices for the mesh and resharding tests; single-device code uses the first.
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def shared():
    """The shared folder as a Path (skips when absent)."""
    return shared_path()
