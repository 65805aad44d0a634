"""`joint`: PGD-L∞ on FM-Defense's whole decision, one differentiable objective.

w_cls · margin(C(x′), y) (misclassify) + w_morph · mean targeted margin of the morphs
C(D(codes(x′) with code i shifted by Δ)) toward C(x′)'s best wrong class (expectation over
transformation: fresh codes i among the flagging ones and fresh shifts Δ each step, drawn by the
defense's own widening search inside [lo_, hi_]) + w_purify · margin(C(purified x′), y).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fmdefense.attacks.adaptive.base import PGDAttack, Pool, check_weight
from fmdefense.attacks.adaptive.losses import best_wrong_class, margin, targeted_margin
from fmdefense.core.config import check_choice, check_int
from fmdefense.defenses.base import Defense
from fmdefense.defenses.fm.morphs import MorphConfig, draw_table, morph_codes, natural_deltas
from fmdefense.defenses.fm.ranges import code_values
from fmdefense.defenses.fm.thresholds import NEVER

MORPH_SOURCES = ("fresh", "defense")  # fresh draws | the defense's own common draws


class JointPGD(PGDAttack):
    """Misclassify C(x′) + morphs agree with C(x′)'s wrong class (EOT) + purified label wrong."""

    name = "joint"
    defenses = ("fm",)
    eot_codes: int
    eot_values: int
    morph_source: str
    w_cls: float
    w_morph: float
    w_purify: float

    def __init__(
        self,
        classifier: nn.Module,
        defense: Defense | None = None,
        *,
        eot_codes: int = 4,
        eot_values: int = 4,
        morph_source: str = "fresh",
        w_cls: float = 1.0,
        w_morph: float = 1.0,
        w_purify: float = 1.0,
        **pgd: Any,
    ) -> None:
        check_int("eot_codes", eot_codes, low=1)  # codes sampled per step
        check_int("eot_values", eot_values, low=1)  # shifts sampled per code and input
        check_choice("morph_source", morph_source, MORPH_SOURCES)
        for key, w in (("w_cls", w_cls), ("w_morph", w_morph), ("w_purify", w_purify)):
            check_weight(key, w)
        super().__init__(classifier, defense, **pgd)
        self._keep(
            eot_codes=eot_codes,
            eot_values=eot_values,
            morph_source=morph_source,
            w_cls=w_cls,
            w_morph=w_morph,
            w_purify=w_purify,
        )

    def prepare(self, x: torch.Tensor, y: torch.Tensor, pool: Pool) -> None:
        d = self.fm
        self.active_codes = d.code_idx_[d.theta_ > NEVER].long()  # codes that flag nothing
        self.morph_cfg: MorphConfig = d.config.morph  # need no care
        self.defense_table = draw_table(self.morph_cfg, int(d.lo_.numel()))  # (T, M, B)

    def _eot_deltas(
        self, values: torch.Tensor, codes: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        """Shifts (n, k, V) of the sampled codes, drawn by the defense's widening search."""
        lo, hi = self.fm.lo_[codes], self.fm.hi_[codes]
        mc = self.morph_cfg
        if self.morph_source == "defense":
            table = self.defense_table[:, codes]
        else:
            table = torch.rand(mc.max_iters, len(codes), mc.draws_per_iter, generator=gen) * 2 - 1
        deltas = natural_deltas(values, lo, hi, table, mc)  # (n, k, N)
        pick = torch.randint(0, mc.n_morphs, (*values.shape, self.eot_values), generator=gen)
        return deltas.gather(2, pick)  # (n, k, V)

    def _morph_loss(
        self, x_adv: torch.Tensor, target: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        """Mean targeted margin (n,) of V shifts of k sampled codes, differentiable in x′."""
        vae = self.fm.vae
        pick = torch.randperm(len(self.active_codes), generator=gen)[: self.eot_codes]
        codes_i = self.active_codes[pick]  # (k,)
        codes = vae.codes(x_adv)  # (n, M[, h, w])
        z_u = vae.encode(x_adv)[1]  # (n, K)
        values = code_values(codes.detach().float().cpu())[:, codes_i]  # (n, k)
        deltas = self._eot_deltas(values, codes_i, gen)  # (n, k, V)
        n, k, V = deltas.shape
        shifted = morph_codes(codes, codes_i, deltas.to(codes.device, codes.dtype))
        m_logits = self.classifier(
            vae.decode_codes(shifted.flatten(0, 2), z_u.repeat_interleave(k * V, 0))
        )
        m_loss = targeted_margin(m_logits.float(), target.repeat_interleave(k * V), self.kappa)
        return m_loss.view(n, k * V).mean(1)

    def loss(
        self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        logits = self.classifier(x_adv).float()
        target = best_wrong_class(logits, y)  # (n,)
        total = self.w_cls * margin(logits, y, self.kappa)
        if self.w_morph > 0 and len(self.active_codes) > 0:
            total = total + self.w_morph * self._morph_loss(x_adv, target, gen)
        if self.w_purify > 0:
            recon = self.fm.vae.reconstruct(x_adv, z_u_mode=self.fm.z_u_mode_)
            total = total + self.w_purify * margin(self.classifier(recon).float(), y, self.kappa)
        return total
