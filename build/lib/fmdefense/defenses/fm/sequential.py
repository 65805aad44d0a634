"""Sequential early stopping of the morphs: decode a round of morphs per (input, code), stop
each input once its decision is settled, and batch what is still open across inputs.

- "exact": an input stops when no outcome of its remaining morphs can change its action
  (accept / purify / reject under θ_r and θ_d): identical decisions by construction.
- "sprt": each code runs Wald's sequential probability ratio test of r_i ≥ θ_i + δ against
  r_i ≤ θ_i − δ with error rates α; an input is flagged as soon as one code tests low and
  accepted once every code tests high; Dis is then estimated from the morphs seen.

Morphs are taken in the engine's shuffled order, so every prefix is a random sample of N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fmdefense.core.config import check_choice, check_int, check_range
from fmdefense.defenses.base import ACCEPT, PURIFY, REJECT
from fmdefense.defenses.fm.resistance import Decoder, Labeller

SEQUENTIAL_MODES = ("exact", "sprt")
EPS = 1e-12


@dataclass(frozen=True)
class SequentialConfig:
    """Round size and, for the SPRT, its indifference half-width δ and error rate α."""

    mode: str = "exact"
    round_size: int = 10  # morphs per (input, code) per round
    alpha: float = 0.01
    delta: float = 0.1

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, SEQUENTIAL_MODES)
        check_int("round_size", self.round_size, low=1)
        check_range("alpha", self.alpha, 0.0, 0.5, low_open=True, high_open=True)
        check_range("delta", self.delta, 0.0, 0.5, low_open=True, high_open=True)


def _actions(flag: torch.Tensor, dis: torch.Tensor, theta_d: float) -> torch.Tensor:
    action = torch.full(flag.shape, ACCEPT, dtype=torch.long)
    action[flag & (dis <= theta_d + EPS)] = PURIFY
    action[flag & (dis > theta_d + EPS)] = REJECT
    return action


def exact_state(
    agree: torch.Tensor, seen: torch.Tensor, N: int, theta: torch.Tensor, theta_d: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(settled (n,), action (n,), codes still needed (n, m)) from counts agree/seen (n, m)."""
    lo = agree / N  # every remaining morph disagrees
    hi = (agree + (N - seen)) / N  # every remaining morph agrees
    t = theta.view(1, -1)
    above = lo > t  # this code can no longer flag
    surely_flag = (hi <= t).any(1)
    surely_accept = above.all(1)
    dis_max = (t - lo).clamp(min=0).sum(1)
    dis_min = (t - hi).clamp(min=0).sum(1)
    purify_sure = dis_max <= theta_d + EPS
    reject_sure = dis_min > theta_d + EPS
    settled = surely_accept | (surely_flag & (purify_sure | reject_sure))
    action = torch.full(settled.shape, REJECT, dtype=torch.long)
    action[purify_sure] = PURIFY
    action[surely_accept] = ACCEPT
    need = ~settled.view(-1, 1) & ~above & (seen < N)
    return settled, action, need


def sprt_state(
    agree: torch.Tensor,
    seen: torch.Tensor,
    N: int,
    theta: torch.Tensor,
    theta_d: float,
    cfg: SequentialConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SPRT's (settled, action, codes still needed); a code at N morphs is decided exactly."""
    t = theta.view(1, -1).expand_as(agree)
    p_hi = (t + cfg.delta).clamp(EPS, 1 - EPS)  # H0: the code keeps its label often
    p_lo = (t - cfg.delta).clamp(EPS, 1 - EPS)  # H1: it does not
    llr = agree * (p_lo / p_hi).log() + (seen - agree) * ((1 - p_lo) / (1 - p_hi)).log()
    bound = math.log((1 - cfg.alpha) / cfg.alpha)
    full = seen >= N
    r_hat = agree / seen.clamp(min=1)
    never = t < 0  # a code whose θ is NEVER cannot flag: nothing to test
    low = torch.where(full, r_hat <= t, llr >= bound) & ~never
    high = torch.where(full, r_hat > t, llr <= -bound) | never
    flag, accept = low.any(1), high.all(1)
    dis = (t - r_hat).clamp(min=0).where(low, torch.zeros_like(r_hat)).sum(1)
    settled = flag | accept
    action = _actions(flag, dis, theta_d)
    need = ~settled.view(-1, 1) & ~high & ~low
    return settled, action, need


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
    agree = torch.zeros(n, m)
    seen = torch.zeros(n, m)
    k = 0
    while True:
        if cfg.mode == "exact":
            _, action, need = exact_state(agree, seen, N, theta, theta_d)
        else:
            _, action, need = sprt_state(agree, seen, N, theta, theta_d, cfg)
        if not bool(need.any()) or k >= N:
            break
        k1 = min(k + cfg.round_size, N)
        pairs = need.nonzero()  # (P, 2)
        morphs, owner = _pair_morphs(codes, code_idx, deltas, pairs, k, k1)
        agree_round = torch.empty(len(morphs), dtype=torch.bool)
        for b in range(0, len(morphs), batch_size):
            sl = slice(b, b + batch_size)
            pred = classify(decode(morphs[sl], z_u[owner[sl]]))
            agree_round[sl] = pred.cpu() == labels[owner[sl]]
        hits = agree_round.view(len(pairs), k1 - k).sum(1).float()
        agree[pairs[:, 0], pairs[:, 1]] += hits
        seen[pairs[:, 0], pairs[:, 1]] += k1 - k
        k = k1
    r_hat = agree / seen.clamp(min=1)
    return action, r_hat, seen.sum(1).long()
