"""ADAPTIVE_ATTACKS: registry name → attack class (its factory), and DEFAULT_ATTACK per defense.

- `joint`, `latent`: FM-Defense; `default_joint`: the default defense; `ensemble_joint`: the
  combo-VAE ensemble; `square`: FM-Defense and the default; `magnet_joint`: MagNet;
  `defensegan_bpda`: Defense-GAN; `fbgan_joint`: FBGAN;
  `cw_transfer`: every defense; `undefended`: no defense (the bare classifier).
Each factory is called as `factory(classifier, defense, **params)` with its own keyword-only
hyperparameters; `make_attack` fills the classifier in from the defense.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fmdefense.attacks.adaptive.base import AdaptiveAttack, AttackResult, Pool
from fmdefense.attacks.adaptive.cw_transfer import CWTransfer
from fmdefense.attacks.adaptive.default_joint import DefaultJointPGD
from fmdefense.attacks.adaptive.defensegan_bpda import DefenseGANBPDA
from fmdefense.attacks.adaptive.ensemble_joint import EnsembleJointPGD
from fmdefense.attacks.adaptive.fbgan_joint import FBGANJointPGD
from fmdefense.attacks.adaptive.joint import JointPGD
from fmdefense.attacks.adaptive.latent import LatentPGD
from fmdefense.attacks.adaptive.magnet_joint import MagNetJointPGD
from fmdefense.attacks.adaptive.square import SquareSearch
from fmdefense.attacks.adaptive.undefended import UndefendedPGD
from fmdefense.core.errors import InputError
from fmdefense.defenses.base import Defense
from fmdefense.defenses.registry import DEFENSES

ADAPTIVE_ATTACKS: dict[str, type[AdaptiveAttack]] = {
    cls.name: cls
    for cls in (
        JointPGD,
        LatentPGD,
        CWTransfer,
        SquareSearch,
        UndefendedPGD,
        MagNetJointPGD,
        DefenseGANBPDA,
        FBGANJointPGD,
        DefaultJointPGD,
        EnsembleJointPGD,
    )
}
# The adaptive attack each defense is judged by first (the CLI's and the pipeline's default).
DEFAULT_ATTACK = {
    "default": "default_joint",
    "ensemble": "ensemble_joint",
    "fm": "joint",
    "magnet": "magnet_joint",
    "defensegan": "defensegan_bpda",
    "fbgan": "fbgan_joint",
}


def attack_class(name: str) -> type[AdaptiveAttack]:
    """The registered attack `name` (InputError naming the choices otherwise)."""
    if name not in ADAPTIVE_ATTACKS:
        raise InputError(
            f"unknown adaptive attack {name!r}; choose one of {', '.join(ADAPTIVE_ATTACKS)}"
        )
    return ADAPTIVE_ATTACKS[name]


def attacks_for(defense: str) -> list[str]:
    """Registered attacks that apply to a defense's registry name ("fm", "magnet", ...)."""
    if defense not in DEFENSES:
        raise InputError(f"unknown defense {defense!r}; choose one of {', '.join(DEFENSES)}")
    return [
        name
        for name, cls in ADAPTIVE_ATTACKS.items()
        if not cls.needs_defense or cls.defenses is None or defense in cls.defenses
    ]


def make_attack(
    name: str,
    defense: Defense | None = None,
    *,
    classifier: nn.Module | None = None,
    **params: Any,
) -> AdaptiveAttack:
    """Build a registered attack around `defense` (its classifier unless one is given)."""
    cls = attack_class(name)
    if classifier is None:
        if defense is None:
            raise InputError("pass a classifier (or a defense that holds one)")
        classifier = defense.classifier
    return cls(classifier, defense, **params)


def run_adaptive(
    name: str,
    defense: Defense | None,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    pool: Pool = None,
    classifier: nn.Module | None = None,
    **params: Any,
) -> AttackResult:
    """`make_attack(name, defense, classifier=classifier, **params).run(x, y, pool=pool)`."""
    return make_attack(name, defense, classifier=classifier, **params).run(x, y, pool=pool)
