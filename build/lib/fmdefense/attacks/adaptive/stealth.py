"""PGD through a baseline's label-giving transform while keeping its detectors quiet.

The objective of MagNet's and Defense-GAN's adaptive attacks (Carlini & Wagner 2017):
w_cls · margin(C(x̂), y) on the label the defense gives an accepted input (x̂: the reformed or
projected image), + w_stealth · Σ_j max(score_j/τ_j − (1 − m), 0) over its detectors, so each
score is pushed below its threshold τ_j by the relative margin m = `stealth_margin`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fmdefense.attacks.adaptive.base import PGDAttack, check_weight
from fmdefense.attacks.adaptive.losses import margin, stealth_hinge
from fmdefense.core.config import check_range
from fmdefense.defenses.base import Defense


class StealthPGD(PGDAttack):
    """PGD on margin(C(x̂), y) + a hinge on score/threshold ratios (subclasses give both)."""

    w_cls: float
    w_stealth: float
    stealth_margin: float

    def __init__(
        self,
        classifier: nn.Module,
        defense: Defense | None = None,
        *,
        w_cls: float = 1.0,
        w_stealth: float = 10.0,  # weight of the hinge on score/threshold
        stealth_margin: float = 0.1,  # the hinge pulls until score ≤ (1 − margin) · threshold
        **pgd: Any,
    ) -> None:
        check_weight("w_cls", w_cls)
        check_weight("w_stealth", w_stealth)
        check_range("stealth_margin", stealth_margin, 0.0, 1.0, high_open=True)
        super().__init__(classifier, defense, **pgd)
        self._keep(w_cls=w_cls, w_stealth=w_stealth, stealth_margin=stealth_margin)

    def objective(
        self, labelled: torch.Tensor, y: torch.Tensor, ratio: torch.Tensor
    ) -> torch.Tensor:
        """(n,) from the image the defense labels (n, C, H, W) and score/threshold (n[, k])."""
        wrong = margin(self.classifier(labelled).float(), y, self.kappa)
        return (
            self.w_cls * wrong + self.w_stealth * stealth_hinge(ratio, self.stealth_margin).float()
        )
