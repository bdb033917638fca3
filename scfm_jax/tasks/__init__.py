"""Downstream tasks over the analysis API, one module per task (gene networks, integration, ...)."""
