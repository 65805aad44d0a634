"""Precision "auto": bf16 only where the device runs it natively, fp32 otherwise.

On a CPU without native bf16 (AVX2 only: mkldnn reports no bf16 support) autocast to bf16 ran
decode + classify 12× slower than fp32 (guide §6), and ≈ 100× on another such machine
(2026-12-08), so "auto" never picks it there, and an explicit bf16 there is warned about.
"""

from __future__ import annotations

import logging

import torch

from fmdefense.core.errors import InputError

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls/convolutions are native on `device`."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "fp32" or "bf16" for a requested precision on a device; "auto" is logged once."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "bf16" and not native_bf16(device):
        log.warning(
            "precision bf16 on %s, where bf16 is not native: autocast runs it 12-100x slower "
            "than fp32 here (use precision auto)",
            device,
        )
    if precision != "auto":
        return precision
    chosen = "bf16" if native_bf16(device) else "fp32"
    log.info("precision auto on %s: %s (native bf16: %s)", device, chosen, chosen == "bf16")
    return chosen
