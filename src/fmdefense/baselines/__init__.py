"""Baselines measured in the same harness as FM-Defense."""
