"""Metrics, baselines and reports on a built dataset's test split."""
