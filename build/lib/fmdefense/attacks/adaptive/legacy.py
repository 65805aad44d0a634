"""The result keys written before each attack had its own parameters, so old sweeps still count.

Until the adaptive package was split, every attack ran from one shared 28-field config and a
result file's key held all of it ("config"). `legacy_config` rebuilds that dict for an attack:
the old defaults, the budget fields scaled as the old `with_budget` scaled all three, then the
attack's own parameters under their old names. A stored file whose key matches it is reused.
"""

from __future__ import annotations

from typing import Any

from fmdefense.attacks.adaptive.base import AdaptiveAttack

LEGACY_DEFAULTS: dict[str, Any] = {
    "eps": 0.3,
    "steps": 100,
    "restarts": 1,
    "step_size": None,
    "schedule": "halving",
    "random_start": True,
    "check_every": 10,
    "kappa": 5.0,
    "eot_codes": 4,
    "eot_values": 4,
    "morph_source": "fresh",
    "w_cls": 1.0,
    "w_morph": 1.0,
    "w_purify": 1.0,
    "w_latent": 1.0,
    "cw_confidence": 20.0,
    "cw_steps": 100,
    "cw_binary_steps": 5,
    "cw_stepsize": 0.1,
    "cw_initial_const": 0.01,
    "square_queries": 200,
    "square_p_init": 0.1,
    "w_detect": 10.0,
    "w_stealth": 10.0,
    "stealth_margin": 0.1,
    "bpda_starts": "defense",
    "batch_size": 64,
    "seed": 0,
}
LEGACY_BUDGET = ("steps", "cw_steps", "square_queries")  # what the old with_budget multiplied


def legacy_config(attack: AdaptiveAttack) -> dict[str, Any] | None:
    """The old shared config this attack would have run from (None: it has no old form)."""
    config = dict(LEGACY_DEFAULTS)
    for key in LEGACY_BUDGET:
        config[key] *= attack.budget
    for key, value in attack.params.items():
        old = attack.legacy_names.get(key, key)
        if old not in config:
            return None
        config[old] = value
    return config
