"""fmdefense: FM-Defense, adversarial-example detection and purification by feature manipulation.

import fmdefense
defense = fmdefense.pretrained("mnist")   # the calibrated default defense
decision = defense.decide(x)              # x: float (n, 1, 28, 28) in [0, 1]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fmdefense.defenses.default import DefaultDefense


def pretrained(dataset: str = "mnist", *, device: Any = "auto") -> DefaultDefense:
    """The calibrated default defense of a dataset from the shipped artifacts (lazy import:
    `import fmdefense` stays light)."""
    from fmdefense.defenses.pretrained import pretrained as load

    return load(dataset, device=device)
