"""Fuse named suspicion scores into one statistic calibrated at a clean false-positive rate α.

Each score becomes a p-value against a clean reference set; the p-values are combined; the
combined statistic's threshold is taken on *other* clean images than the reference (a split of
VAL), because a threshold set on the reference images themselves overfits (their p-values are
not uniform). Plain tensor functions; p-values are carried as log p (float64), so a score far
outside the clean range keeps all its evidence.

p-values ("tails"):
- "empirical": (1 + #{ref ≥ s}) / (n_ref + 1). Its floor 1/(n_ref + 1) caps what one score can
  say: a score a hundred times beyond every clean value counts as much as one just beyond.
- "exponential": the same inside the reference range; beyond the largest reference value the
  tail is extrapolated, p = exp(−(s − max)/β) / (n_ref + 1), with β the mean excess of the
  reference's top 10 % over its 90 % quantile (peaks over threshold with an exponential tail,
  the generalised Pareto's shape-0 case: light enough not to over-promise, and a fit that
  cannot fail on 100 points).

Combinations ("combine"), each larger = more suspicious:
- "fisher": −2 Σ log p (sums moderate evidence; one extreme score is diluted by the rest);
- "min_p": −log min p (the union rule MagNet uses; blind to several moderate signals);
- "harmonic": log Σ 1/p, the harmonic-mean p-value (Wilson, PNAS 2019): dominated by the
  smallest p, yet several moderate ones add up; valid under dependence between the scores.
"""

from __future__ import annotations

import math

import torch

COMBINERS = ("fisher", "min_p", "harmonic")
TAILS = ("empirical", "exponential")
TAIL_SHARE = 0.1  # the reference's top share that fits the exponential tail's scale


def log_pvalues(reference: torch.Tensor, s: torch.Tensor, tail: str = "empirical") -> torch.Tensor:
    """log p-values per column, float64.

    reference: (n_ref, k) clean scores; s: (n, k) -> (n, k) ≤ 0."""
    if tail not in TAILS:
        raise ValueError(f"unknown tail {tail!r}; choose one of {TAILS}")
    n_ref = reference.shape[0]
    ref = reference.double().sort(0).values  # (n_ref, k) ascending
    s = s.double()
    below = torch.searchsorted(ref.T.contiguous(), s.T.contiguous(), right=False).T  # (n, k)
    log_p = ((1 + n_ref - below).double() / (n_ref + 1)).log()  # (n, k)
    if tail == "empirical":
        return log_p
    top, beta = tail_scale(ref)
    beyond = -(s - top) / beta - math.log(n_ref + 1)  # (n, k)
    return torch.where(s > top, beyond, log_p)


def tail_scale(ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exponential tail's start (the largest reference value) and scale β per column, from
    the reference sorted ascending (n_ref, k) -> (k,), (k,)."""
    top = ref[-1]  # (k,)
    u = torch.quantile(ref, 1 - TAIL_SHARE, dim=0)  # (k,)
    excess = (ref - u).clamp(min=0)  # (n_ref, k)
    beta = excess.sum(0) / (ref > u).sum(0).clamp(min=1)  # (k,) mean excess over u
    return top, beta.clamp(min=1e-12 * top.abs().clamp(min=1.0))  # constant column: sharp tail


def combine(log_p: torch.Tensor, rule: str) -> torch.Tensor:
    """Combined statistic (n,) float64, larger = more suspicious, from log p-values (n, k)."""
    log_p = log_p.double()
    if rule == "fisher":
        return -2 * log_p.sum(1)
    if rule == "min_p":
        return -log_p.min(1).values
    if rule == "harmonic":
        return torch.logsumexp(-log_p, 1)
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
