"""Sequential early stopping of the morphs: decode a round of morphs per (input, code), stop
each input once its decision is settled, and batch what is still open across inputs.

Both modes keep, for every (input, code), an interval [lo, hi] that holds its resistance r_i,
and settle an input when its action (accept / purify / reject under θ_r and θ_d) is the same
for every r inside the intervals: accepted once every code is surely above θ_i, flagged as
soon as one code is surely at or below it, purified or rejected once Dis's bounds fall on one
side of θ_d.

- "exact": the interval is certain (every unseen morph keeps / loses the label): identical
  decisions by construction.
- "confidence": the interval is the set of counts a (r = a/N) that the morphs seen so far do not
  reject by an exact hypergeometric tail test (the morphs are drawn without replacement from the
  input's N): a code is called above θ_i when P(≥ s agreements in k | a = ⌊θ_i N⌋) ≤ α_high and
  at or below it when P(≤ s | a = ⌊θ_i N⌋ + 1) ≤ α_low; Dis's bounds use α / m per code (they
  sum m codes), and Dis's lower bound also a pooled Chernoff bound at α_low
  (`pooled_dis_floor`). The α are per code and look, not corrected for repeated looks; they were
  chosen on clean VAL resistances (`benchmarks/sequential.py` simulates the rule on committed
  ones, and says the choice).

Morphs are taken in the engine's shuffled order, so every prefix is a random sample of N, and
a rule can be simulated exactly from counts alone (`simulate`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fmdefense.core.config import check_choice, check_int, check_range
from fmdefense.defenses.base import ACCEPT, PURIFY, REJECT
from fmdefense.defenses.fm.resistance import Decoder, Labeller

SEQUENTIAL_MODES = ("exact", "confidence")
EPS = 1e-12
State = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Observe = Callable[[torch.Tensor, int, int], torch.Tensor]


@dataclass(frozen=True)
class SequentialConfig:
    """Round size and, for "confidence", each code's per-look error rates."""

    mode: str = "exact"
    round_size: int = 5  # morphs per (input, code) per round
    alpha_high: float = 0.03  # calling a code above θ_i when r_i ≤ θ_i
    alpha_low: float = 0.001  # calling a code at or below θ_i when r_i > θ_i

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, SEQUENTIAL_MODES)
        check_int("round_size", self.round_size, low=1)
        check_range("alpha_high", self.alpha_high, 0.0, 0.5, low_open=True, high_open=True)
        check_range("alpha_low", self.alpha_low, 0.0, 0.5, low_open=True, high_open=True)


def _log_choose(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


@functools.lru_cache(maxsize=8)
def count_bounds(N: int, alpha_high: float, alpha_low: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) tables (N+1, N+1) indexed [k seen, s agreeing]: the smallest count a with
    P(S_k ≥ s | a) > alpha_high and the largest with P(S_k ≤ s | a) > alpha_low, S_k the
    agreements among k morphs drawn without replacement from N holding a (hypergeometric).
    Exact at k = N (lo = hi = s); [0, N] at k = 0."""
    a = torch.arange(N + 1, dtype=torch.float64).view(-1, 1, 1)
    k = torch.arange(N + 1, dtype=torch.float64).view(1, -1, 1)
    s = torch.arange(N + 1, dtype=torch.float64).view(1, 1, -1)
    possible = (s <= k) & (s <= a) & (k - s <= N - a)
    log_p = (
        _log_choose(a, torch.minimum(s, a))
        + _log_choose(N - a, torch.minimum((k - s).clamp(min=0), N - a))
        - _log_choose(torch.tensor(float(N), dtype=torch.float64), k)
    )
    p = torch.where(possible, log_p.exp(), torch.zeros((), dtype=torch.float64))  # (a, k, s)
    at_most = p.cumsum(-1)  # P(S_k ≤ s | a)
    at_least = p.flip(-1).cumsum(-1).flip(-1)  # P(S_k ≥ s | a)
    counts = torch.arange(N + 1).view(-1, 1, 1)
    lo = torch.where(at_least > alpha_high, counts, N + 1).min(0).values
    hi = torch.where(at_most > alpha_low, counts, -1).max(0).values
    return lo, hi


def interval_state(
    lo: torch.Tensor,
    hi: torch.Tensor,
    dis_lo: torch.Tensor,
    dis_hi: torch.Tensor,
    theta: torch.Tensor,
    theta_d: float,
    dis_floor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(settled (n,), action (n,), codes that can still matter (n, m)) from resistance intervals
    [lo, hi] (n, m) for the flag and [dis_lo, dis_hi] for Dis (and another lower bound on Dis
    (n,), if given)."""
    t = theta.view(1, -1)
    above = lo > t  # this code can no longer flag
    surely_flag = (hi <= t).any(1)
    surely_accept = above.all(1)
    dis_max = (t - dis_lo).clamp(min=0).sum(1)
    dis_min = (t - dis_hi).clamp(min=0).sum(1)
    if dis_floor is not None:
        dis_min = torch.maximum(dis_min, dis_floor.to(dis_min.dtype))
    purify_sure = dis_max <= theta_d + EPS
    reject_sure = dis_min > theta_d + EPS
    settled = surely_accept | (surely_flag & (purify_sure | reject_sure))
    action = torch.full(settled.shape, REJECT, dtype=torch.long)
    action[purify_sure] = PURIFY
    action[surely_accept] = ACCEPT
    return settled, action, ~settled.view(-1, 1) & ~above


def exact_state(
    agree: torch.Tensor, seen: torch.Tensor, N: int, theta: torch.Tensor, theta_d: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(settled (n,), action (n,), codes still needed (n, m)) from counts agree/seen (n, m)."""
    lo = agree / N  # every remaining morph disagrees
    hi = (agree + (N - seen)) / N  # every remaining morph agrees
    settled, action, need = interval_state(lo, hi, lo, hi, theta, theta_d)
    return settled, action, need & (seen < N)


def confidence_state(
    agree: torch.Tensor,
    seen: torch.Tensor,
    N: int,
    theta: torch.Tensor,
    theta_d: float,
    cfg: SequentialConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hypergeometric confidence rule's (settled, action, codes still needed)."""
    m = theta.numel()
    k, s = seen.long(), agree.long()
    lo, hi = count_bounds(N, cfg.alpha_high, cfg.alpha_low)
    d_lo, d_hi = count_bounds(N, cfg.alpha_high / m, cfg.alpha_low / m)
    dis_hi = d_hi[k, s] / N
    floor = pooled_dis_floor(agree, seen, dis_hi, theta, cfg.alpha_low)
    settled, action, need = interval_state(
        lo[k, s] / N, hi[k, s] / N, d_lo[k, s] / N, dis_hi, theta, theta_d, floor
    )
    return settled, action, need & (seen < N)


def _kl(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Bernoulli KL(q ‖ p), elementwise."""
    return (
        torch.xlogy(q, q)
        - torch.xlogy(q, p)
        + torch.xlogy(1 - q, 1 - q)
        - torch.xlogy(1 - q, 1 - p)
    )


def pooled_dis_floor(
    agree: torch.Tensor,
    seen: torch.Tensor,
    dis_hi: torch.Tensor,
    theta: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """A lower bound on Dis (n,) from the pooled agreements of the codes that have seen the
    most morphs (the pool P, all at k): Dis ≥ Σ_P (θ_i − r_i) + Σ_rest (θ_i − hi_i)+, and
    Σ_P r_i ≤ |P| p⁺, the Chernoff (KL) upper bound at `alpha` on their mean resistance. Valid
    because draws without replacement are more concentrated than binomial ones (Hoeffding 1963)
    and, at a given mean, unequal codes more than equal ones. Per-code bounds alone need nearly
    every morph to prove Dis > θ_d when θ_d lies close to Σ θ_i."""
    t = theta.view(1, -1).double()
    k_max = seen.max(1, keepdim=True).values
    pool = (seen == k_max) & (k_max > 0) & (t >= 0)  # (n, m); NEVER codes add nothing to Dis
    K = (seen * pool).sum(1).double()  # (n,) morphs pooled
    q = (agree * pool).sum(1).double() / K.clamp(min=1)
    low, high = q.clone(), torch.ones_like(q)
    budget = math.log(1 / alpha)
    for _ in range(40):  # bisection for the largest p with K · KL(q ‖ p) ≤ log(1/α)
        mid = (low + high) / 2
        inside = K * _kl(q, mid) <= budget
        low, high = torch.where(inside, mid, low), torch.where(inside, high, mid)
    rest = ((t - dis_hi.double()).clamp(min=0) * ~pool).sum(1)
    floor = (t * pool).sum(1) - pool.sum(1) * high + rest
    return torch.where(K > 0, floor, torch.full_like(floor, -math.inf))


def _state(N: int, theta: torch.Tensor, theta_d: float, cfg: SequentialConfig) -> State:
    def state(agree: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cfg.mode == "exact":
            _, action, need = exact_state(agree, seen, N, theta, theta_d)
        else:
            _, action, need = confidence_state(agree, seen, N, theta, theta_d, cfg)
        return action, need

    return state


def run_rounds(
    n: int, m: int, N: int, state: State, observe: Observe, round_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The round loop: actions (n,), agreements and morphs seen (n, m). `observe(pairs, k0,
    k1)` returns how many of morphs k0..k1 keep the label for each (input, code) pair (P, 2)."""
    agree, seen = torch.zeros(n, m), torch.zeros(n, m)
    k = 0
    while True:
        action, need = state(agree, seen)
        if not bool(need.any()) or k >= N:
            return action, agree, seen
        k1 = min(k + round_size, N)
        pairs = need.nonzero()  # (P, 2)
        agree[pairs[:, 0], pairs[:, 1]] += observe(pairs, k, k1)
        seen[pairs[:, 0], pairs[:, 1]] += k1 - k
        k = k1


def _pair_morphs(
    codes: torch.Tensor,
    code_idx: torch.Tensor,
    deltas: torch.Tensor,
    pairs: torch.Tensor,
    k0: int,
    k1: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Morph codes (P·s, M[, h, w]) of morphs k0..k1 for each (input, code) pair (P, 2),
    and the input index of each morph."""
    i, j = pairs[:, 0], pairs[:, 1]
    s = k1 - k0
    base = codes[i].repeat_interleave(s, 0).clone()  # (P·s, M[, h, w])
    d = deltas[i, j, k0:k1].reshape(-1)  # (P·s,)
    rows = torch.arange(len(base))
    col = code_idx[j].repeat_interleave(s)
    shape = (-1, *([1] * (base.dim() - 2)))
    base[rows, col] += d.view(shape) if base.dim() > 2 else d
    return base, i.repeat_interleave(s)


@torch.inference_mode()
def sequential_actions(
    codes: torch.Tensor,
    z_u: torch.Tensor,
    labels: torch.Tensor,
    code_idx: torch.Tensor,
    deltas: torch.Tensor,
    decode: Decoder,
    classify: Labeller,
    theta: torch.Tensor,
    theta_d: float,
    cfg: SequentialConfig,
    batch_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Actions (n,), resistance estimates (n, m) and morphs decoded per input (n,)."""
    n, m, N = deltas.shape

    def observe(pairs: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
        morphs, owner = _pair_morphs(codes, code_idx, deltas, pairs, k0, k1)
        agree_round = torch.empty(len(morphs), dtype=torch.bool)
        for b in range(0, len(morphs), batch_size):
            sl = slice(b, b + batch_size)
            pred = classify(decode(morphs[sl], z_u[owner[sl]]))
            agree_round[sl] = pred.cpu() == labels[owner[sl]]
        return agree_round.view(len(pairs), k1 - k0).sum(1).float()

    state = _state(N, theta, theta_d, cfg)
    action, agree, seen = run_rounds(n, m, N, state, observe, cfg.round_size)
    return action, agree / seen.clamp(min=1), seen.sum(1).long()


def simulate(
    r: torch.Tensor,
    N: int,
    theta: torch.Tensor,
    theta_d: float,
    cfg: SequentialConfig,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule run on full resistances r (n, m) (multiples of 1/N): each (input, code) sees its
    r·N agreeing morphs in a seeded uniformly random order, as the engine's shuffled morphs
    are. Returns actions (n,) and morphs used per input (n,)."""
    n, m = r.shape
    counts = (r * N).round().long()  # (n, m)
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand(n, m, N, generator=gen).argsort(-1)  # a uniform permutation per pair
    cum = torch.cat([torch.zeros(n, m, 1), (order < counts[..., None]).float().cumsum(-1)], -1)

    def observe(pairs: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
        i, j = pairs[:, 0], pairs[:, 1]
        return cum[i, j, k1] - cum[i, j, k0]

    state = _state(N, theta, theta_d, cfg)
    action, _, seen = run_rounds(n, m, N, state, observe, cfg.round_size)
    return action, seen.sum(1).long()


def full_actions(r: torch.Tensor, N: int, theta: torch.Tensor, theta_d: float) -> torch.Tensor:
    """The actions the full count gives (n,), from resistances r (n, m)."""
    return exact_state(r * N, torch.full_like(r, float(N)), N, theta, theta_d)[1]
