"""Resistance thresholds θ_r and the distance threshold θ_d, from clean VAL data only.

An input is normal iff r_i > θ_i for every selected code (strict). Resistances take the discrete
values k/N, so each θ_i is chosen among the observed VAL values: the largest t with
share(r_i ≤ t) ≤ 1 − ρ. VAL instances tied at θ_i are flagged and counted, so the VAL
false-positive rate never exceeds its target. NEVER (−1) marks a code that flags nothing.
"""

from __future__ import annotations

import torch

NEVER = -1.0
THRESHOLD_MODES = ("per_code", "unified", "joint")


def _largest_passing(values: torch.Tensor, max_fpr: float) -> float:
    """Largest observed t with share(values ≤ t) ≤ max_fpr; NEVER when none qualifies."""
    best = NEVER
    allowed = int(max_fpr * len(values) + 1e-9)  # flagged instances allowed, counted exactly
    for t in torch.unique(values).tolist():
        if int((values <= t).sum()) <= allowed:
            best = t
        else:
            break
    return best


def _within(suspicious: torch.Tensor, max_fpr: float) -> bool:
    return int(suspicious.sum()) <= int(max_fpr * len(suspicious) + 1e-9)


def flags(r: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Suspicious instances: some r_i ≤ θ_i.  r: (n, m), theta: (m,) -> (n,) bool."""
    return (r <= theta.view(1, -1)).any(1)


def per_code_thresholds(r_val: torch.Tensor, rho: float) -> torch.Tensor:
    """The paper's rule: each code's own VAL false-positive rate ≤ 1 − ρ.  (n, m) -> (m,)."""
    return torch.tensor([_largest_passing(r_val[:, i], 1 - rho) for i in range(r_val.shape[1])])


def unified_threshold(r_val: torch.Tensor, rho: float) -> torch.Tensor:
    """One θ for all codes, the largest whose joint VAL false-positive rate ≤ 1 − ρ."""
    return torch.full((r_val.shape[1],), _largest_passing(r_val.min(1).values, 1 - rho))


def joint_thresholds(r_val: torch.Tensor, rho: float, steps: int = 30) -> torch.Tensor:
    """Per-code thresholds at a common per-code level α, the largest α (bisection) whose
    joint VAL false-positive rate is ≤ 1 − ρ (the per-code rule lets joint FPR grow with m)."""
    lo, hi = 0.0, 1.0 - rho
    best = per_code_thresholds(r_val, 1.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        theta = per_code_thresholds(r_val, 1.0 - mid)
        if _within(flags(r_val, theta), 1 - rho):
            lo, best = mid, theta
        else:
            hi = mid
    candidate = per_code_thresholds(r_val, rho)  # α = 1 − ρ may already be jointly fine
    if _within(flags(r_val, candidate), 1 - rho):
        return candidate
    return best


def thresholds(r_val: torch.Tensor, rho: float, mode: str = "per_code") -> torch.Tensor:
    """θ_r (m,) from VAL resistances (n, m) for a threshold mode in THRESHOLD_MODES."""
    rules = {
        "per_code": per_code_thresholds,
        "unified": unified_threshold,
        "joint": joint_thresholds,
    }
    if mode not in rules:
        raise ValueError(f"unknown threshold mode {mode!r}; choose one of {THRESHOLD_MODES}")
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must lie in (0, 1], got {rho}")
    return rules[mode](r_val, rho)


def distance(r: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Eq. 5: Dis(r, θ) = Σ_{r_i < θ_i} |r_i − θ_i|.  (n, m), (m,) -> (n,)."""
    gap = theta.view(1, -1) - r
    return torch.where(gap > 0, gap, torch.zeros_like(gap)).sum(1)


def distance_threshold(r_val: torch.Tensor, theta: torch.Tensor, eta: float) -> float:
    """θ_d: the η-fractile of Dis over the suspicious VAL instances; 0 when none is suspicious
    (then only suspicious inputs at distance 0, i.e. tied at θ, are purified)."""
    suspicious = flags(r_val, theta)
    if not bool(suspicious.any()):
        return 0.0
    return float(torch.quantile(distance(r_val[suspicious], theta).double(), eta))
