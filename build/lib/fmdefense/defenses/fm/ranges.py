"""Normal value range of each manipulable code, measured on clean validation codes."""

from __future__ import annotations

import torch


def code_values(codes: torch.Tensor) -> torch.Tensor:
    """Scalar value of each code: itself for vectors, the channel mean for feature maps.

    codes: (n, M) or (n, M, h, w) -> (n, M)
    """
    return codes if codes.dim() == 2 else codes.flatten(2).mean(-1)


def normal_ranges(
    val_codes: torch.Tensor, quantiles: tuple[float, float] = (0.01, 0.99), min_width: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Central quantile interval [lo, hi] of each code's value over VAL, at least `min_width` wide.

    val_codes: (n, M[, h, w]) -> lo, hi: (M,)
    """
    q_lo, q_hi = quantiles
    if not 0.0 <= q_lo < q_hi <= 1.0:
        raise ValueError(f"range quantiles must satisfy 0 <= lo < hi <= 1, got {quantiles}")
    values = code_values(val_codes).double()
    lo = torch.quantile(values, q_lo, dim=0)
    hi = torch.quantile(values, q_hi, dim=0)
    centre, half = (lo + hi) / 2, torch.clamp((hi - lo) / 2, min=min_width / 2)
    return (centre - half).float(), (centre + half).float()
