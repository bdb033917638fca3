"""Plots: a UMAP of an embedding coloured by labels (scanpy), and a workdir's training curves."""
from __future__ import annotations

from pathlib import Path

import anndata

from scfm_jax.errors import MissingInput, UnknownName


def umap(adata: anndata.AnnData, embedding_key: str = "X_scfoundation", color=None, *,
         n_neighbors: int = 15, seed: int = 0, save: str | Path | None = None, **plot_kwargs):
    """Neighbours and UMAP of `obsm[embedding_key]`, drawn coloured by `color` (obs keys).

    The coordinates go to `obsm["X_umap_<embedding_key without X_>"]`, so an existing `X_umap`
    is kept. Returns the matplotlib figure (also written to `save` when given).
    """
    import matplotlib.pyplot as plt
    import scanpy as sc

    if embedding_key not in adata.obsm:
        raise UnknownName(f"adata.obsm has no {embedding_key!r} (keys: {list(adata.obsm)})")
    name = embedding_key.removeprefix("X_")
    neighbors_key = f"neighbors_{name}"
    sc.pp.neighbors(adata, n_neighbors=min(n_neighbors, adata.n_obs - 1), use_rep=embedding_key,
                    key_added=neighbors_key, random_state=seed)
    basis = f"X_umap_{name}"
    sc.tl.umap(adata, neighbors_key=neighbors_key, key_added=basis, random_state=seed)
    figure = sc.pl.embedding(adata, basis=basis, color=color, show=False, return_fig=True,
                             **plot_kwargs)
    if save is not None:
        figure.savefig(save, bbox_inches="tight")
    plt.close(figure)
    return figure


def training_curves(workdir: str | Path, output: str | Path | None = None,
                    baseline: float | None = None) -> Path:
    """PNG of the train and held-out loss of a training workdir (its metrics.jsonl).

    `workdir` may be a `scfm-jax demo --workdir` folder (the run is in its train/). Returns the PNG
    path (default `<workdir>/loss_curves.png`).
    """
    from scfm_jax.train.metrics import plot_loss_curves

    workdir = Path(workdir)
    if not (workdir / "metrics.jsonl").is_file() and (workdir / "train" / "metrics.jsonl").is_file():
        workdir = workdir / "train"
    if not (workdir / "metrics.jsonl").is_file():
        raise MissingInput(f"{workdir} has no metrics.jsonl; give the --workdir of a "
                           "scfm-jax train or demo run")
    return plot_loss_curves(workdir, output or workdir / "loss_curves.png", baseline=baseline)
