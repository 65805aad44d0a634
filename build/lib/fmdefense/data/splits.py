"""The paper's splits (IV.A), seeded and disjoint.

From the train part: VAL (threshold calibration) is held out first, the combo-VAE's training set
is drawn from the rest, and the classifier trains on everything but VAL. CLE is drawn from the
test part. Datasets with few images per identity (ORL, CelebA) hold out one image per identity
for VAL instead and use the whole test part as CLE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fmdefense.core.errors import DataError
from fmdefense.data.sources import RawDataset

SPLIT_NAMES = ("classifier_train", "vae_train", "val", "cle", "test")


@dataclass(frozen=True)
class SplitConfig:
    """Sizes and seed of the splits; paper values by default."""

    seed: int = 0
    vae_train: int = 20_000
    val: int = 2_000
    cle: int = 5_000
    per_identity: bool = False  # one VAL image per identity, CLE = whole test part


DEFAULT_SPLITS: dict[str, SplitConfig] = {
    "mnist": SplitConfig(),
    "fmnist": SplitConfig(),
    "orl": SplitConfig(per_identity=True),
    "celeba": SplitConfig(per_identity=True),
}


def _per_identity_val(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.sort([rng.choice(np.flatnonzero(labels == c)) for c in np.unique(labels)])


def make_splits(ds: RawDataset, cfg: SplitConfig) -> dict[str, np.ndarray]:
    """Index arrays per split: train-part indices except `cle`/`test`, which index the test part."""
    rng = np.random.default_rng(cfg.seed)
    n_train, n_test = len(ds.y_train), len(ds.y_test)
    if cfg.per_identity:
        val = _per_identity_val(ds.y_train, rng)
        rest = np.setdiff1d(np.arange(n_train), val)
        vae, cle = rest, np.arange(n_test)
    else:
        if cfg.val + cfg.vae_train > n_train or cfg.cle > n_test:
            raise DataError(
                f"{ds.name}: splits ask for {cfg.val}+{cfg.vae_train} train and {cfg.cle} test "
                f"images, the dataset has {n_train} and {n_test}"
            )
        perm = rng.permutation(n_train)
        val, vae = np.sort(perm[: cfg.val]), np.sort(perm[cfg.val : cfg.val + cfg.vae_train])
        rest = np.sort(perm[cfg.val :])
        cle = np.sort(rng.permutation(n_test)[: cfg.cle])
    return {
        "classifier_train": rest,
        "vae_train": vae,
        "val": val,
        "cle": cle,
        "test": np.arange(n_test),
    }


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, C, H, W) → float32 tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)


def split_tensors(
    ds: RawDataset, name: str, cfg: SplitConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (float in [0, 1], (N, C, H, W)) and labels (int64) of one split."""
    if name not in SPLIT_NAMES:
        raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLIT_NAMES)}")
    cfg = cfg or DEFAULT_SPLITS.get(ds.name, SplitConfig())
    idx = make_splits(ds, cfg)[name]
    test_part = name in ("cle", "test")
    x = ds.x_test if test_part else ds.x_train
    y = ds.y_test if test_part else ds.y_train
    return to_float(x[idx]), torch.from_numpy(y[idx]).long()
