"""Where fmdefense keeps downloads, caches, shipped weights and run outputs."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def data_home() -> Path:
    """Root for downloaded sources and decoded caches (`$FMDEFENSE_DATA`, default `<repo>/data`)."""
    return Path(os.environ.get("FMDEFENSE_DATA", REPO_ROOT / "data"))


def weights_home() -> Path:
    """Root of the shipped weights (`$FMDEFENSE_WEIGHTS`, default `<repo>/weights`)."""
    return Path(os.environ.get("FMDEFENSE_WEIGHTS", REPO_ROOT / "weights"))


def runs_home() -> Path:
    """Root for run outputs: attacks, reports (`$FMDEFENSE_RUNS`, default `<repo>/runs`)."""
    return Path(os.environ.get("FMDEFENSE_RUNS", REPO_ROOT / "runs"))


def classifier_dir(dataset: str, weights: Path | None = None) -> Path:
    """Folder of a dataset's classifier artifact (shipped weights by default)."""
    return Path(weights) if weights is not None else weights_home() / dataset / "classifier"


def vae_dir(dataset: str, weights: Path | None = None) -> Path:
    """Folder of a dataset's combo-VAE artifact (shipped weights by default)."""
    return Path(weights) if weights is not None else weights_home() / dataset / "combo_vae"


def model_dir(dataset: str, kind: str) -> Path:
    """Folder of any shipped artifact of a dataset (weights/<dataset>/<kind>)."""
    return weights_home() / dataset / kind
