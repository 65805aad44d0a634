"""SHA-256 identities of tensors and modules: they key resumable caches and tie calibrations
to the models they were fitted on."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def fingerprint_tensor(x: torch.Tensor) -> str:
    """SHA-256 of a tensor's values and shape (identifies an input set for resumable caches)."""
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint(module: Any) -> str:
    """SHA-256 of a module's weights, to tie a calibration to the models it was fitted on."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
