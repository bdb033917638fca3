"""Downstream tasks over the analysis API, each beside the field's baselines on the same split."""
