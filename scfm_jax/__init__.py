"""scfm-jax: scFoundation and scMulan in JAX/Flax.

The flow is one direction: data (convert → store → pipeline) → models → train → analysis.
"""
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _configs_of_this_checkout() -> None:
    """Make `scfm_jax.configs` the `configs/` folder beside this package in a source checkout.

    setup.py installs `configs/` as `scfm_jax.configs`; a plain checkout on `sys.path` has no such
    package, and an editable install of another checkout would answer with that checkout's files.
    So the configs always come from the tree the package itself was imported from.
    """
    package = Path(__file__).resolve().parent
    checkout_configs = package.parent / "configs"
    if ("scfm_jax.configs" in sys.modules or (package / "configs").is_dir()
            or not (package.parent / "setup.py").is_file()
            or not (checkout_configs / "__init__.py").is_file()):
        return
    spec = importlib.util.spec_from_file_location(
        "scfm_jax.configs", checkout_configs / "__init__.py",
        submodule_search_locations=[str(checkout_configs)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["configs"] = module


_configs_of_this_checkout()
