"""Per-example objectives of the adaptive attacks (lower is better for the attacker)."""

from __future__ import annotations

import torch


def margin(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """Untargeted CW margin max(Z_y − max_{j≠y} Z_j, −κ): below 0 means misclassified. (n,)"""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return (true - other).clamp(min=-kappa)


def targeted_margin(logits: torch.Tensor, t: torch.Tensor, kappa: float) -> torch.Tensor:
    """Targeted CW margin max(max_{j≠t} Z_j − Z_t, −κ): below 0 means labelled t. (n,)"""
    return margin(logits, t, float("inf")).neg().clamp(min=-kappa)


def best_wrong_class(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The most likely class other than y. (n,)"""
    return logits.detach().scatter(1, y.view(-1, 1), float("-inf")).argmax(1)


def stealth_hinge(ratio: torch.Tensor, stealth_margin: float) -> torch.Tensor:
    """Σ_j max(ratio_j − (1 − m), 0) over the last dimension: pulls each detector's
    score/threshold ratio under 1 − m, then stops. (n[, k]) -> (n,)"""
    hinge = (ratio - (1 - stealth_margin)).clamp(min=0)
    return hinge.sum(-1) if hinge.dim() > 1 else hinge
