"""Downstream tasks over the analysis API, one module per task (perturbation, genes, integration), each beside the field's baselines on the same data."""
