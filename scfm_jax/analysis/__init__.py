"""Load any checkpoint on local devices; embed, enhance, annotate and plot in the scanpy style."""
