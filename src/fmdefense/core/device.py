"""Device selection shared by every entry point (`--device auto|cpu|cuda[:N]`).

Only devices this machine can run are accepted: torch parses many names (`xpu`, `meta`, `cpu:3`,
`mps`) that fail much later with unrelated messages, so each is refused here in one line.
"""

from __future__ import annotations

import torch

from fmdefense.core.errors import InputError

_USE = "use --device auto, cpu or cuda[:N]"


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module's parameters are on (the CPU for a module without parameters)."""
    return next(module.parameters(), torch.empty(0)).device


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Map `auto` to CUDA when present, else CPU; refuse names this machine cannot use."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise InputError(f"device must be a string such as 'cpu', got {type(name).__name__}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise InputError(f"unknown device {name!r}; {_USE}") from exc
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise InputError(f"device {name!r}: there is one CPU device (no index); {_USE}")
        return torch.device("cpu")
    if device.type == "cuda":
        return _cuda(name, device)
    if device.type == "mps" and _mps_available():
        return device
    raise InputError(f"device {name!r} ({device.type}) is not available here; {_USE}")


def _cuda(name: str, device: torch.device) -> torch.device:
    if not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise InputError(f"device {name!r}: only {count} CUDA device(s) here (cuda:0 ...)")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
