"""Sequential early stopping: the hypergeometric bounds, and both rules simulated on counts."""

from __future__ import annotations

import math

import pytest
import torch

from fmdefense.defenses.base import ACCEPT, PURIFY, REJECT
from fmdefense.defenses.fm.sequential import (
    SequentialConfig,
    count_bounds,
    full_actions,
    pooled_dis_floor,
    simulate,
)
from fmdefense.defenses.fm.thresholds import distance, flags

N = 20


def test_count_bounds_are_hypergeometric_tail_tests_exact_at_n() -> None:
    lo, hi = count_bounds(N, 0.04, 0.04)
    s = torch.arange(N + 1)
    assert torch.equal(lo[N], s) and torch.equal(hi[N], s)  # every morph seen: exact
    assert int(lo[0, 0]) == 0 and int(hi[0, 0]) == N  # nothing seen: anything
    for k in range(1, N):
        for agree in range(k + 1):
            a_lo, a_hi = int(lo[k, agree]), int(hi[k, agree])
            assert agree <= a_lo <= a_hi <= agree + N - k  # inside the certain interval
            # a_lo is the smallest count with P(S_k ≥ agree | a) > α, by direct summation
            assert _tail_at_least(a_lo, k, agree) > 0.04
            assert a_lo == agree or _tail_at_least(a_lo - 1, k, agree) <= 0.04
    # 5 of 5 agreeing rule out a ≤ 11 of 20 at 4 %: C(11,5)/C(20,5) = .030, C(12,5)/C(20,5) = .051
    assert int(lo[5, 5]) == 12


def _tail_at_least(a: int, k: int, s: int) -> float:
    total = math.comb(N, k)
    return sum(math.comb(a, j) * math.comb(N - a, k - j) for j in range(s, k + 1)) / total


def _inputs() -> tuple[torch.Tensor, torch.Tensor, float]:
    """Resistances (n, 3) in multiples of 1/N: many far above θ, some at, around and below it."""
    gen = torch.Generator().manual_seed(0)
    r = torch.randint(0, N + 1, (400, 3), generator=gen).float() / N
    r[:200] = 1.0
    theta = torch.tensor([0.5, 0.7, -1.0])  # the last code flags nothing (NEVER)
    return r, theta, 0.3


def test_exact_rule_simulated_gives_the_full_count_decisions() -> None:
    r, theta, theta_d = _inputs()
    full = full_actions(r, N, theta, theta_d)
    dist = distance(r, theta)
    expected = torch.where(flags(r, theta), torch.where(dist <= theta_d, PURIFY, REJECT), ACCEPT)
    assert torch.equal(full, expected)
    assert set(full.tolist()) == {ACCEPT, PURIFY, REJECT}
    action, used = simulate(r, N, theta, theta_d, SequentialConfig(mode="exact", round_size=2))
    assert torch.equal(action, full)
    assert int(used.max()) <= 3 * N and float(used.float().mean()) < 3 * N
    assert bool((used[:200] <= 2 * N).all())  # a NEVER code is never sampled


@pytest.mark.parametrize("alpha", [0.01, 0.1])
def test_confidence_rule_saves_morphs_and_errs_near_its_error_rates(alpha: float) -> None:
    r, theta, theta_d = _inputs()
    full = full_actions(r, N, theta, theta_d)
    cfg = SequentialConfig(mode="confidence", round_size=2, alpha_high=alpha, alpha_low=alpha)
    exact = SequentialConfig(mode="exact", round_size=2)
    action, used = simulate(r, N, theta, theta_d, cfg, seed=1)
    _, used_exact = simulate(r, N, theta, theta_d, exact, seed=1)
    assert float(used.float().mean()) < float(used_exact.float().mean())
    wrong = float((action != full).float().mean())
    assert wrong <= 4 * alpha  # per code and look; a few looks and codes per input
    assert torch.equal(action[:200], full[:200])  # r = 1 everywhere is never flagged
    # with a tiny error rate the rule agrees everywhere here
    strict = SequentialConfig(mode="confidence", round_size=2, alpha_high=1e-9, alpha_low=1e-9)
    assert torch.equal(simulate(r, N, theta, theta_d, strict)[0], full)


def test_simulation_is_seeded() -> None:
    r, theta, theta_d = _inputs()
    cfg = SequentialConfig(mode="confidence", alpha_high=0.2)
    a, b = simulate(r, N, theta, theta_d, cfg, seed=3), simulate(r, N, theta, theta_d, cfg, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_pooled_dis_floor_is_a_lower_bound_at_its_error_rate() -> None:
    theta = torch.tensor([0.5, 0.6, 0.7, -1.0])
    r = torch.tensor([0.05, 0.1, 0.0, 0.3])  # Dis = 0.45 + 0.5 + 0.7 = 1.65
    true_dis = float(distance(r.view(1, -1), theta)[0])
    counts = (r * N).round().long()
    gen = torch.Generator().manual_seed(0)
    trials, k = 4000, 8
    order = torch.rand(trials, 4, N, generator=gen).argsort(-1)
    agree = (order[..., :k] < counts.view(1, -1, 1)).sum(-1).float()  # (trials, 4)
    seen = torch.full_like(agree, float(k))
    no_help = torch.ones_like(agree)  # per-code upper bounds that say nothing
    floor = pooled_dis_floor(agree, seen, no_help, theta, alpha=0.05)
    assert float((floor > true_dis + 1e-9).float().mean()) <= 0.05
    assert float(floor.max()) > 1.0  # and it is informative
    # every morph seen: never above the true Dis
    full = pooled_dis_floor(
        r.view(1, -1) * N, torch.full((1, 4), float(N)), r.view(1, -1), theta, 0.05
    )
    assert float(full[0]) <= true_dis + 1e-9
    # nothing seen: no bound
    assert (
        float(pooled_dis_floor(torch.zeros(1, 4), torch.zeros(1, 4), no_help, theta, 0.05)[0])
        == -math.inf
    )
