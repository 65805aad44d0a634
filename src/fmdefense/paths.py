"""Where fmdefense keeps downloads, caches, shipped weights and run outputs."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_home() -> Path:
    """Root for downloaded sources and decoded caches (`$FMDEFENSE_DATA`, default `<repo>/data`)."""
    return Path(os.environ.get("FMDEFENSE_DATA", REPO_ROOT / "data"))


def weights_home() -> Path:
    """Root of the shipped weights (`$FMDEFENSE_WEIGHTS`, default `<repo>/weights`)."""
    return Path(os.environ.get("FMDEFENSE_WEIGHTS", REPO_ROOT / "weights"))


def runs_home() -> Path:
    """Root for run outputs: attacks, reports (`$FMDEFENSE_RUNS`, default `<repo>/runs`)."""
    return Path(os.environ.get("FMDEFENSE_RUNS", REPO_ROOT / "runs"))
