"""Hyperparameter-sweep service for debiasing image classifiers against spurious correlations."""
