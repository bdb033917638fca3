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
    # `scfm_jax.configs`, so the demo and `analysis.load` work from an installed package too; in
    # a checkout, scfm_jax/__init__.py maps `scfm_jax.configs` onto the folder beside it.
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
        # official checkpoints are read and written without torch; it is needed only for
        # `scmulan_torch.export_official_state_dict` (torch tensors) and the comparison tests
        "torch": ["torch>=2.1"],
        # libtpu, the TPU compiler, at the version the installed jax pins: `scfm-jax plan`
        # compiles for TPU slices on any machine (no TPU needed) and runs on TPU VMs.
        "tpu": ["jax[tpu]"],
        # `scfm-jax convert --soma / --census`: TileDB-SOMA experiments and the CELLxGENE Census
        "census": ["tiledbsoma>=1.15", "cellxgene-census>=1.15"],
        # checkpoints on a gs:// bucket (train.checkpoint_dir): Orbax reaches it through etils.epath
        "gcs": ["gcsfs"],
        # the documentation site: `python -m sphinx -W -b html docs docs/_build/html`
        "docs": ["sphinx>=8", "myst-parser>=4", "myst-nb>=1.1", "furo"],
        # harmonypy: the integration baseline of `scfm-jax evaluate`; leidenalg / igraph: scanpy's
        # Leiden (scib-metrics' clustering, `scfm-jax genes` modules)
        "analysis": ["umap-learn", "scib-metrics>=0.5.10", "nbclient", "nbformat", "ipykernel",
                     "harmonypy", "leidenalg", "igraph"],
        # Arc's cell-eval: tests/test_perturbation.py checks our perturbation metrics against its
        # (pulls polars, pdex, numba-mwu; leaves jax, numpy and anndata as they are)
        "cell-eval": ["cell-eval>=0.8"],
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            # `-n 2`: the README's test command runs two workers, one test file each at a time
            "pytest-xdist>=3",
            "nbclient",
            "nbformat",
            "ipykernel",
            "umap-learn",
            "tiledbsoma>=1.15",   # tests/test_data_soma.py
            "moto[server]>=5",    # tests/test_object_store.py: a local S3 server
            "boto3",
            "gcsfs",                  # tests/test_object_store.py: checkpoints on gs://
            "gcp-storage-emulator",   # ... against a local GCS server
            "scib-metrics>=0.5.10",
            "harmonypy",
            "leidenalg",
            "igraph",
            "cell-eval>=0.8",     # tests/test_perturbation.py: metrics against cell-eval's
        ],
    },
    entry_points={"console_scripts": ["scfm-jax=scfm_jax.main:main"]},
)
