"""PGD-L∞ on the classifier alone: success is C(x′) ≠ y, whatever the defense says.

The sanity check of every sweep (≈ 100 % at ε = 0.3 on MNIST); with κ = 0 it is also the
oblivious baseline, stopping at the first misclassification.
"""

from __future__ import annotations

import torch

from fmdefense.attacks.adaptive.base import PGDAttack, batched_logits
from fmdefense.attacks.adaptive.losses import margin


class UndefendedPGD(PGDAttack):
    """PGD on the classifier alone; needs no defense (one passed in is ignored)."""

    name = "undefended"
    needs_defense = False

    def success(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return batched_logits(self.classifier, x_adv).argmax(1) != y

    def loss(
        self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        return margin(self.classifier(x_adv).float(), y, self.kappa)
