"""A differentiable stand-in for the default defense's fused statistic, for its adaptive attack.

The defense's p-values count clean reference scores at or above s (a step function: no
gradient inside the clean range). Here each step becomes a sigmoid of width h_k = β_k / 2, with
β_k the scale of the defense's own exponential tail for score k (`fusion.tail_scale`), and the
tail beyond the largest reference value is the defense's own; the p-values are combined by the
defense's rule (`fusion.combine`). So the attack can aim at the decision itself — statistic
under the threshold — and trade one score against another, as the harmonic mean allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fmdefense.defenses import fusion
from fmdefense.defenses.default import DefaultDefense

Inverse = Callable[[torch.Tensor], torch.Tensor]
INVERSE_LINKS: dict[str, Inverse] = {  # score-name prefix -> g⁻¹ of `default_joint.LINKS`
    "recon_check_": lambda g: -torch.expm1(-g),  # −log p -> 1 − p
    "dgmm_doubt": lambda g: -torch.expm1(-g),
    "squeeze_": lambda g: -2 * torch.expm1(-g),  # −log(1 − d/2) -> d
}


def raw_from_linked(linked: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Scores (n, k) on the defense's own scale from their links g(s) (n, k)."""
    cols = []
    for i, name in enumerate(names):
        inv = next((f for p, f in INVERSE_LINKS.items() if name.startswith(p)), None)
        cols.append(linked[:, i] if inv is None else inv(linked[:, i]))
    return torch.stack(cols, 1)


def smooth_log_pvalues(reference: torch.Tensor, s: torch.Tensor, tails: str) -> torch.Tensor:
    """Sigmoid-smoothed `fusion.log_pvalues`: reference (n_ref, k), s (n, k) -> (n, k), float64."""
    ref = reference.double().sort(0).values  # (n_ref, k)
    s = s.double()
    n_ref = ref.shape[0]
    top, beta = fusion.tail_scale(ref)  # (k,) each
    h = (beta / 2).clamp(min=1e-12)  # (k,)
    above = torch.sigmoid((ref.unsqueeze(0) - s.unsqueeze(1)) / h).sum(1)  # (n, k)
    log_p = torch.log1p(above) - math.log(n_ref + 1)
    if tails == "empirical":
        return torch.maximum(log_p, torch.full_like(log_p, -math.log(n_ref + 1)))
    beyond = -(s - top) / beta - math.log(n_ref + 1)
    return torch.where(s > top, beyond, log_p)


def smooth_statistic(defense: DefaultDefense, raw: torch.Tensor) -> torch.Tensor:
    """The fused statistic (n,) of raw scores (n, k) in `names_` order, differentiable."""
    log_p = smooth_log_pvalues(defense.reference_, raw, defense.config.tails)
    return fusion.combine(log_p, defense.config.combine)
