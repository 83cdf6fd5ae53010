"""Benchmarks: the training loop against a naive one, fused trials, and search against no search (hpo)."""
