"""Fuse named suspicion scores into one statistic calibrated at a clean false-positive rate α.

Each score becomes an empirical p-value against a clean reference set; the p-values are combined
(Fisher's −2 Σ log p, or the union/min-p rule MagNet uses); the combined statistic's threshold
is taken on *other* clean images than the reference (a split of VAL), because a threshold set on
the reference images themselves overfits (their p-values are not uniform). Plain tensor functions.
"""

from __future__ import annotations

import math

import torch

COMBINERS = ("fisher", "min_p")


def pvalues(reference: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Empirical p-values (1 + #{ref ≥ s}) / (n_ref + 1) per column.

    reference: (n_ref, k) clean scores; s: (n, k) -> (n, k) in (0, 1]."""
    n_ref = reference.shape[0]
    ref = reference.sort(0).values.T.contiguous()  # (k, n_ref) ascending
    below = torch.searchsorted(ref, s.T.contiguous(), right=False)  # (k, n): #{ref < s}
    return ((1 + n_ref - below).T.double() / (n_ref + 1)).float()


def combine(p: torch.Tensor, rule: str) -> torch.Tensor:
    """Combined statistic (n,), larger = more suspicious, from p-values (n, k)."""
    if rule == "fisher":
        return -2 * p.double().log().sum(1)
    if rule == "min_p":
        return -p.double().min(1).values.log()
    raise ValueError(f"unknown combination rule {rule!r}; choose one of {COMBINERS}")


def threshold_at(stat: torch.Tensor, alpha: float) -> float:
    """Smallest observed t with share(stat > t) ≤ α (flag strictly above)."""
    allowed = int(alpha * len(stat) + 1e-9)
    ordered = stat.double().sort(descending=True).values
    return float(ordered[allowed]) if allowed < len(ordered) else -math.inf


def split_indices(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded half/half split of n calibration images: (reference, threshold) indices."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = n // 2
    return perm[:half].sort().values, perm[half:].sort().values
