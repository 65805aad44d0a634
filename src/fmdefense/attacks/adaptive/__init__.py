"""Defense-aware (adaptive) attacks on the default defense, FM-Defense, MagNet, Defense-GAN and
FBGAN (issues 7, 17, 19).

The paper's attackers know the classifier only. Here the attacker also knows the combo-VAE and
the calibrated detector (codes, normal ranges, θ_r, θ_d, the z_u reading), as Carlini & Wagner
(2017) and Tramèr et al. (2020) ask of every detection defense; the baselines are attacked the
same way. Every defense is judged by one rule on its hard decisions (`attacks.defended`).

- `base.py`: `AdaptiveAttack` and the one PGD-L∞ loop with hooks (`loss`, `project`,
  `success_at`), a template method;
- one file per attack, each with its own keyword-only parameters: `default_joint.py`,
  `joint.py`, `latent.py`, `cw_transfer.py`, `square.py`, `undefended.py`, `magnet_joint.py`,
  `defensegan_bpda.py`, `fbgan_joint.py` (the last three share `stealth.py`'s objective;
  `default_joint` its parameters);
- `registry.py`: ADAPTIVE_ATTACKS (name → class), DEFAULT_ATTACK per defense, make_attack;
- `sweep.py`: the one ε sweep (`run_sweep`, resumable per unit); `sanity.py`: its checks;
  `legacy.py`: result keys of the old shared config; `jobs.py`: loading defenses and inputs.
"""

from fmdefense.attacks.adaptive.base import AdaptiveAttack, AttackResult, PGDAttack, project_linf
from fmdefense.attacks.adaptive.registry import (
    ADAPTIVE_ATTACKS,
    DEFAULT_ATTACK,
    attack_class,
    attacks_for,
    make_attack,
    run_adaptive,
)
from fmdefense.attacks.adaptive.sanity import sanity_checks
from fmdefense.attacks.adaptive.sweep import evaluate, run_sweep

__all__ = [
    "ADAPTIVE_ATTACKS",
    "DEFAULT_ATTACK",
    "AdaptiveAttack",
    "AttackResult",
    "PGDAttack",
    "attack_class",
    "attacks_for",
    "evaluate",
    "make_attack",
    "project_linf",
    "run_adaptive",
    "run_sweep",
    "sanity_checks",
]
