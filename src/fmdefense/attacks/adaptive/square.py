"""`square`: a gradient-free Square-style L∞ random search (after Andriushchenko et al. 2020),
*hand-written in a few lines, not the reference implementation*, on a score computed from the
hard decisions of FM-Defense or the default defense; it catches gradient masking the gradient
attacks would miss. `DEFICITS` says, per defense, how far a decision is from acceptance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from torch import nn

from fmdefense.attacks.adaptive.base import (
    AdaptiveAttack,
    Pool,
    batched_logits,
    check_weight,
    project_linf,
)
from fmdefense.attacks.adaptive.losses import margin
from fmdefense.core.config import check_int, check_range
from fmdefense.defenses import fusion
from fmdefense.defenses.base import Decision, Defense
from fmdefense.defenses.default import DefaultDefense
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.rule import fooled

# (defense, its decision) -> (how far each input is from acceptance (n,) ≥ 0, the largest value)
Deficit = Callable[[Defense, Decision], tuple[torch.Tensor, float]]


def fm_deficit(defense: Defense, dec: Decision) -> tuple[torch.Tensor, float]:
    """Σ_i max(θ_i + 1/N − r_i, 0) from FM-Defense's own resistance (r_i must exceed θ_i)."""
    d = cast(FMDefense, defense)
    need = d.theta_.view(1, -1) + 1.0 / d.config.n_morphs  # (1, codes)
    deficit = (need - dec.details["resistance"]).clamp(min=0).sum(1)  # (n,)
    return deficit, float(need.clamp(min=0).sum())


def default_deficit(defense: Defense, dec: Decision) -> tuple[torch.Tensor, float]:
    """How far the fused statistic is above the default's threshold, mapped into [0, 1):
    excess / (excess + scale), with scale the way from the threshold to the statistic of every
    p-value at its empirical floor 1/(n_ref + 1) (tails can go beyond it, so it is no maximum)."""
    d = cast(DefaultDefense, defense)
    n_ref, k = d.reference_.shape
    floor = torch.full((1, k), -math.log(n_ref + 1))
    worst = float(fusion.combine(floor, d.config.combine)[0])
    if not math.isfinite(d.threshold_) or worst <= d.threshold_:  # everything (nothing) flagged
        return dec.flagged.float(), 1.0
    excess = (dec.scores["fused"].double() - d.threshold_).clamp(min=0)
    return (excess / (excess + worst - d.threshold_)).float(), 1.0


DEFICITS: dict[str, Deficit] = {"fm": fm_deficit, "default": default_deficit}


class SquareSearch(AdaptiveAttack):
    """Square-style L∞ random search on the hard-decision pipeline (hand-written, minimal).

    Start from vertical stripes of ±ε, then per query set one random square (side from the p
    schedule) of each input's perturbation to a fresh ±ε per channel, keeping it when the score
    falls. Score (lower is better for the attacker), with m = max(margin of C(x′) at y, −κ) and
    deficit = w_detect · the defense's `DEFICITS` entry (FM-Defense: Σ_i max(θ_i + 1/N − r_i, 0)
    from its own resistance; the default: the fused statistic's excess over its threshold): −∞
    on success; deficit + m when C(x′) is wrong; else the largest possible deficit + m, so that
    crossing the class boundary is always an improvement.
    """

    name = "square"
    defenses = tuple(DEFICITS)
    budget_params = ("queries",)
    legacy_names: ClassVar[dict[str, str]] = {
        "queries": "square_queries",
        "p_init": "square_p_init",
    }
    queries: int
    p_init: float
    w_detect: float
    kappa: float
    seed: int

    def __init__(
        self,
        classifier: nn.Module,
        defense: Defense | None = None,
        *,
        queries: int = 200,
        p_init: float = 0.1,  # initial share of pixels in the square
        w_detect: float = 10.0,  # weight of the defense's deficit in the score
        kappa: float = 5.0,
        seed: int = 0,
        **common: Any,
    ) -> None:
        check_int("queries", queries, low=1)
        check_range("p_init", p_init, 0.0, 1.0, low_open=True)
        check_weight("w_detect", w_detect)
        check_weight("kappa", kappa)
        check_int("seed", seed, low=0)
        super().__init__(classifier, defense, **common)
        self._keep(queries=queries, p_init=p_init, w_detect=w_detect, kappa=kappa, seed=seed)

    def _score(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert self.defense is not None
        dec = self.defense.decide(x_adv)
        deficit, most = DEFICITS[self.defense.name](self.defense, dec)  # (n,), float
        deficit, ceiling = self.w_detect * deficit, self.w_detect * most
        m = margin(batched_logits(self.classifier, x_adv), y, self.kappa)
        score = torch.where(m < 0, deficit + m, ceiling + m)  # any wrong x′ beats any right one
        return torch.where(fooled(dec.label, y), torch.full_like(score, float("-inf")), score)

    def _p(self, it: int) -> float:
        """The paper's piecewise-halving share of pixels, rescaled to the query budget."""
        marks = [10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000]
        halvings = sum(it >= int(m * self.queries / 10000) for m in marks)
        return self.p_init / 2**halvings

    def _run(
        self, x: torch.Tensor, y: torch.Tensor, pool: Pool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        n, c, h, w = x.shape
        eps = self.eps
        stripes = (torch.randint(0, 2, (n, c, 1, w), generator=gen) * 2 - 1).float() * eps
        x_best = project_linf(x + stripes, x, eps)
        score = self._score(x_best, y)
        for it in range(self.queries):
            rows = torch.isfinite(score).nonzero().flatten()
            if len(rows) == 0:
                break
            s = max(1, min(h, w, round(math.sqrt(self._p(it) * h * w))))
            r0 = torch.randint(0, h - s + 1, (len(rows),), generator=gen)
            c0 = torch.randint(0, w - s + 1, (len(rows),), generator=gen)
            signs = (torch.randint(0, 2, (len(rows), c), generator=gen) * 2 - 1).float() * eps
            delta = x_best[rows] - x[rows]
            for j in range(len(rows)):
                delta[j, :, r0[j] : r0[j] + s, c0[j] : c0[j] + s] = signs[j].view(c, 1, 1)
            cand = project_linf(x[rows] + delta, x[rows], eps)
            new = self._score(cand, y[rows])
            better = new < score[rows]
            x_best[rows[better]] = cand[better]
            score[rows[better]] = new[better]
        return x_best, torch.isinf(score) & (score < 0)
