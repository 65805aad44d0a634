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
    if x.numel() == 0:
        raise InputError(f"{name} has an empty channel or spatial size: shape {tuple(x.shape)}")
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
        raise InputError(f"{name} must lie in [0, 1], got values in [{_bound(lo)}, {_bound(hi)}]")
    return x if x.dtype == torch.float32 else x.float()


def _bound(value: float) -> str:
    """`value` in 9 significant digits, or in full where rounding would land it on a bound of
    [0, 1] that it does not equal (1 + 1e-12 must not read "1")."""
    short = f"{value:.9g}"
    return repr(value) if float(short) in (0.0, 1.0) and float(short) != value else short


def check_labels(y: object, n: int, num_classes: int, name: str = "y") -> torch.Tensor:
    """Return `y` as int64 if it is a label vector (n,) of integers within [0, num_classes);
    raise InputError naming what is wrong (2-D or one-hot labels, floats, bools, range)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"the number of labels expected must be an integer >= 0, got {n!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if not isinstance(y, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of labels, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != n:
        hint = " (class indices, not one-hot or 2-D labels)" if y.dim() > 1 else ""
        raise InputError(f"{name} must have shape ({n},){hint}, got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(
            f"{name} must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]"
        )
    return y.long()
