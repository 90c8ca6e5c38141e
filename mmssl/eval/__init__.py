"""Evaluation of frozen encoders: features, linear probes, kNN, and online monitors during pretraining."""
