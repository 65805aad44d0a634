"""Shared fixtures: tiny synthetic IDX datasets, so most tests need no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fmdefense.data.idx import write_idx
from fmdefense.data.sources import IDX_NAMES


def make_idx_folder(folder: Path, n_train: int = 120, n_test: int = 60, gz: bool = True) -> Path:
    """Write four MNIST-style IDX files with random images and balanced labels."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for key, stem in IDX_NAMES.items():
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[key])
    return folder


@pytest.fixture
def idx_folder(tmp_path: Path) -> Path:
    return make_idx_folder(tmp_path / "idx")


@pytest.fixture
def data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data home, so tests never touch the real caches."""
    home = tmp_path / "home"
    monkeypatch.setenv("FMDEFENSE_DATA", str(home))
    return home
