"""Evaluation: detection metrics, the paper's experiments and the report."""
