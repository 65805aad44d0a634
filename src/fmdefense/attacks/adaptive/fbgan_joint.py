"""`fbgan_joint`: FBGAN's adaptive attack, white-box through E and G, under its detector.

FBGAN labels an accepted input by C(G(E(x′))) and rejects it when ‖x′ − G(E(x′))‖² exceeds its
VAL threshold τ. E, G and C are plain differentiable networks (no search, no rounding, no
randomness), so the gradient is exact and no BPDA is needed: `StealthPGD`'s objective, the
margin loss on C(G(E(x′))) plus the hinge keeping ‖x′ − G(E(x′))‖²/τ under 1 − m, with the
gradient through both E and G (and, in the error, through x′ itself).

One restart by default; the sweep's sanity check doubles them (and the steps) at the largest ε.
"""

from __future__ import annotations

from typing import cast

import torch

from fmdefense.attacks.adaptive.stealth import StealthPGD
from fmdefense.defenses.fbgan import FBGANDefense


class FBGANJointPGD(StealthPGD):
    """Through G(E(·)), under the reconstruction-error threshold."""

    name = "fbgan_joint"
    defenses = ("fbgan",)

    def loss(
        self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        fbgan = cast(FBGANDefense, self.defense)
        recon = fbgan.reconstruct(x_adv)  # (n, C, H, W): G(E(x′)), what C labels
        error = (recon - x_adv).pow(2).flatten(1).sum(1)  # (n,): the detector's score
        return self.objective(recon, y, error / fbgan.threshold_)
