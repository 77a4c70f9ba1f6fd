"""Evaluation: datasets, synthetic pairs, baselines, metrics and reports."""
