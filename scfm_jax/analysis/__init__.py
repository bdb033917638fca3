"""Load any checkpoint on local devices; embed, enhance, annotate and plot in the scanpy style."""
import importlib

# name -> submodule; imported on first use, so `scfm-jax embed`/`annotate` (modules of this
# package) do not pay for scikit-learn and scanpy at start-up.
_EXPORTS = {
    "load": "loading", "LoadedModel": "loading",
    "embed": "model_embedding",
    "embed_cells": "embedding", "embed_genes": "embedding", "enhance": "embedding",
    "fit_classifier": "scfoundation_classifier", "fine_tune": "scfoundation_classifier",
    "predict": "scfoundation_classifier",
    "Classifier": "scfoundation_classifier",
    "knn_transfer": "evaluation", "label_transfer": "evaluation",
    "pca_baseline": "evaluation", "harmony_baseline": "evaluation",
    "compare_embeddings": "evaluation",
    "thin_counts": "evaluation", "enhancement_check": "evaluation",
    "umap": "plots", "training_curves": "plots",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
