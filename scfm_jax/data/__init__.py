"""Gene vocabularies, the AnnData → cell store converter, the TensorStore reader and the step-pure pipeline."""
