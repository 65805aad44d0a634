"""`cw_transfer`: high-confidence Carlini–Wagner L2 (κ = 20 by default) on the classifier alone,
through Foolbox (`attacks.library.run_attack`), clipped to the L∞ ε and transferred to the
defended pipeline, which judges it. Applies to every defense.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from fmdefense.attacks.adaptive.base import AdaptiveAttack, Pool, check_weight, project_linf
from fmdefense.attacks.library import CWConfig, degenerate, run_attack
from fmdefense.core.config import check_int, check_range
from fmdefense.defenses.base import Defense


class CWTransfer(AdaptiveAttack):
    """High-confidence CW-L2 on the classifier alone (Foolbox), clipped to ε, then transferred."""

    name = "cw_transfer"
    budget_params = ("steps",)
    legacy_names: ClassVar[dict[str, str]] = {
        "confidence": "cw_confidence",
        "steps": "cw_steps",
        "binary_steps": "cw_binary_steps",
        "stepsize": "cw_stepsize",
        "initial_const": "cw_initial_const",
    }
    confidence: float
    steps: int
    binary_steps: int
    stepsize: float
    initial_const: float
    batch_size: int

    def __init__(
        self,
        classifier: nn.Module,
        defense: Defense | None = None,
        *,
        confidence: float = 20.0,  # κ
        steps: int = 100,  # Adam steps per binary-search step
        binary_steps: int = 5,
        stepsize: float = 0.1,  # guide §8: 0.01 leaves pixels at 0/1 unmoved in 100 steps
        initial_const: float = 1e-2,
        batch_size: int = 64,
        **common: Any,
    ) -> None:
        check_weight("confidence", confidence)
        for key, count in (("steps", steps), ("binary_steps", binary_steps)):
            check_int(key, count, low=1)
        check_int("batch_size", batch_size, low=1)
        check_range("stepsize", stepsize, 0.0, math.inf, low_open=True)
        check_range("initial_const", initial_const, 0.0, math.inf, low_open=True)
        super().__init__(classifier, defense, **common)
        self._keep(
            confidence=confidence,
            steps=steps,
            binary_steps=binary_steps,
            stepsize=stepsize,
            initial_const=initial_const,
            batch_size=batch_size,
        )

    def _run(
        self, x: torch.Tensor, y: torch.Tensor, pool: Pool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cw = CWConfig(
            binary_search_steps=self.binary_steps,
            steps=self.steps,
            stepsize=self.stepsize,
            confidence=self.confidence,
            initial_const=self.initial_const,
        )
        out = []
        for i in range(0, len(x), self.batch_size):
            xb, yb = x[i : i + self.batch_size], y[i : i + self.batch_size]
            x_cw = run_attack("cw_l2", self.classifier, xb, yb, config=cw)
            failed = degenerate(x_cw) & ~degenerate(xb)  # Foolbox's placeholder: nothing found
            x_cw = torch.where(failed.view(-1, 1, 1, 1), xb, x_cw)
            out.append(project_linf(x_cw, xb, self.eps))
        x_adv = torch.cat(out)
        return x_adv, self.success(x_adv, y)
