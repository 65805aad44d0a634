"""Detection thresholds at a clean "drop" rate, as MagNet and Defense-GAN set theirs."""

from __future__ import annotations

import torch


def drop_rate_threshold(scores: torch.Tensor, drop_rate: float) -> torch.Tensor:
    """Threshold of each score column so that flagging scores strictly above it flags at most
    `drop_rate` of the clean scores (the ⌊rate·n⌋-th largest value). (n[, k]) -> ([k])"""
    allowed = int(drop_rate * len(scores) + 1e-9)
    ordered = torch.sort(scores, dim=0, descending=True).values
    return ordered[min(allowed, len(scores) - 1)]
