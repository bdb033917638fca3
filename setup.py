"""scfm-jax: single-cell foundation models (scFoundation, scMulan) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="scfm-jax",
    version="0.1.0",
    description="Single-cell transcriptomics foundation models (scFoundation, scMulan) in JAX/Flax, "
    "trainable on device meshes",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ sits at the top level for users (`--config configs/x.py`) and is installed as
    # `scfm_jax.configs`, so the demo and `analysis.load` work from an installed package too.
    packages=find_packages(include=["scfm_jax", "scfm_jax.*"]) + ["scfm_jax.configs"],
    package_dir={"scfm_jax.configs": "configs"},
    package_data={"scfm_jax": ["py.typed"]},
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorstore>=0.1.70",
        "numpy>=1.26",
        "anndata>=0.11",
        "zarr>=3",
        "h5py",
        "scipy",
        "ml-collections>=1.0",
        "absl-py",
        "tensorboardX>=2.6",
        "tqdm",
        "pandas",
        # the README demo trains on scanpy's bundled pbmc68k_reduced and plots with matplotlib
        "scanpy>=1.10",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "torch": ["torch>=2.1"],
        "analysis": ["umap-learn", "nbclient", "nbformat", "ipykernel"],
        "dev": [
            "torch>=2.1",
            "pytest>=8",
            "pytest-timeout",
            "nbclient",
            "nbformat",
            "ipykernel",
            "umap-learn",
        ],
    },
    entry_points={"console_scripts": ["scfm-jax=scfm_jax.main:main"]},
)
