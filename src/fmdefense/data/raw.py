"""The decoded form every dataset source produces, checked on construction so a corrupt cache or
an odd source file fails with a line naming what is wrong."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmdefense.core.errors import DataError


@dataclass(frozen=True)
class RawDataset:
    """Decoded dataset: uint8 images (N, C, H, W) and int64 labels, train and test parts."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __post_init__(self) -> None:
        """Refuse arrays that are not uint8 images (N, C, H, W) with integer labels (N,) >= 0,
        or whose train and test parts disagree on the image shape."""
        if not isinstance(self.name, str) or not self.name:
            raise DataError(f"dataset name must be a non-empty string, got {self.name!r}")
        for part in ("train", "test"):
            _check_part(self.name, part, getattr(self, f"x_{part}"), getattr(self, f"y_{part}"))
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train images {self.x_train.shape[1:]} and test images "
                f"{self.x_test.shape[1:]} differ in shape"
            )

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


def _check_part(name: str, part: str, x: object, y: object) -> None:
    where = f"{name} {part} part"
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise DataError(f"{where}: images and labels must be numpy arrays")
    if x.ndim != 4 or x.dtype != np.uint8 or min(x.shape[1:], default=0) < 1:
        raise DataError(
            f"{where}: images must be uint8 (N, C, H, W), got {x.dtype} of shape {x.shape}"
        )
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers (N,), got {y.dtype} of shape {y.shape}")
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"{where}: {len(x)} images but {len(y)} labels (need as many, and > 0)")
    if int(y.min()) < 0:
        raise DataError(f"{where}: labels must be >= 0, got {int(y.min())}")
