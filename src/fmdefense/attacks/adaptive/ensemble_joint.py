"""`ensemble_joint`: `default_joint` with expectation over transformation (EOT) over the members.

The ensemble (`defenses/ensemble.py`) judges an input by one member drawn at random, or by all of
them. The attacker knows every member, so each step minimises the mean over the K members of
`default_joint`'s loss against that member (Athalye et al. 2018's EOT: the expectation over the
defense's randomness is here an exact average over its K outcomes; for mode "all" the same sum
asks every member to accept). The classifier's margin, the rounding lock of the 1-bit squeezer
and MagNet's scores are shared by the members; each member adds its own combo-VAE's scores and
its own fused threshold. Success is checked on the ensemble's own decisions, as for every attack.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from fmdefense.attacks.adaptive.base import Pool
from fmdefense.attacks.adaptive.default_joint import DefaultJointPGD
from fmdefense.defenses.base import Defense
from fmdefense.defenses.default import DefaultDefense
from fmdefense.defenses.ensemble import EnsembleDefense


class EnsembleJointPGD(DefaultJointPGD):
    """`default_joint` averaged over every member of a combo-VAE ensemble (EOT)."""

    name = "ensemble_joint"
    defenses = ("ensemble",)

    def __init__(self, classifier: nn.Module, defense: Defense | None = None, **params: Any):
        super().__init__(classifier, defense, **params)
        self.members = [
            DefaultJointPGD(classifier, m, **self.params) for m in self.ensemble.members_
        ]

    @property
    def ensemble(self) -> EnsembleDefense:
        return cast(EnsembleDefense, self.defense)

    @property
    def default(self) -> DefaultDefense:
        """Member 0: what the members share (score names, the 1-bit squeezer, the lock)."""
        return self.ensemble.members_[0]

    def prepare(self, x: torch.Tensor, y: torch.Tensor, pool: Pool) -> None:
        super().prepare(x, y, pool)
        for member in self.members:
            member.prepare(x, y, pool)

    def begin_step(self, t: int, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        """The shared rounding lock (this attack's), each member's phase (its step)."""
        super().begin_step(t, x_adv, y, idx)
        for member in self.members:
            member.step_ = t

    def loss(
        self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        """Mean over members of each member's `default_joint` loss. (n,)"""
        losses = [member.loss(x_adv, y, idx, gen) for member in self.members]
        return torch.stack(losses).mean(0)
