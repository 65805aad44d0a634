"""Checks for images crossing the public boundary: shape, dtype, range and finiteness."""

from __future__ import annotations

import torch

from fmdefense.core.errors import InputError


def check_images(
    x: object,
    *,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    name: str = "x",
) -> torch.Tensor:
    """Return `x` as float32 if it is a float image batch (N, C, H, W) in [0, 1]; raise
    InputError if not. Other float precisions (float64, float16, bfloat16) are converted."""
    if not isinstance(x, torch.Tensor):
        raise InputError(
            f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}"
        )
    if x.dim() != 4:
        raise InputError(f"{name} must have shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(
            f"{name} must be a floating-point tensor scaled to [0, 1], got dtype {x.dtype} "
            "(divide uint8 images by 255)"
        )
    if x.shape[0] == 0:
        raise InputError(f"{name} is an empty batch")
    if channels is not None and x.shape[1] != channels:
        raise InputError(f"{name} must have {channels} channel(s), got shape {tuple(x.shape)}")
    if size is not None and tuple(x.shape[2:]) != tuple(size):
        raise InputError(
            f"{name} must have spatial size {size[0]}x{size[1]}, got shape {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"{name} must lie in [0, 1], got values in [{lo:.9g}, {hi:.9g}]")
    return x if x.dtype == torch.float32 else x.float()


def check_labels(y: object, n: int, num_classes: int, name: str = "y") -> torch.Tensor:
    """Return `y` as int64 if it is a label vector of length `n` within [0, num_classes)."""
    if not isinstance(y, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of labels, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != n:
        raise InputError(f"{name} must have shape ({n},), got {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise InputError(f"{name} must hold integer labels, got dtype {y.dtype}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(
            f"{name} must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]"
        )
    return y.long()
