"""Device selection shared by every entry point (`--device auto|cpu|cuda[:N]`)."""

from __future__ import annotations

import torch

from fmdefense.core.errors import InputError


def resolve_device(name: str = "auto") -> torch.device:
    """Map `auto` to CUDA when present, else CPU; validate explicit names."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device
