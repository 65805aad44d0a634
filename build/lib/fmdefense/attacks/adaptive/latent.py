"""`latent`: PGD-L∞ pulling the E_s/DGMM codes of x′ toward those of a guide image of another
class (the pool image with the nearest codes), plus a targeted margin on C(x′) toward its class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fmdefense.attacks.adaptive.base import PGDAttack, Pool, check_weight, device_of
from fmdefense.attacks.adaptive.losses import targeted_margin
from fmdefense.core.errors import InputError
from fmdefense.core.validation import check_images, check_labels
from fmdefense.defenses.base import Defense


class LatentPGD(PGDAttack):
    """Pull the E_s/DGMM codes of x′ toward a target-class guide's codes (+ targeted margin)."""

    name = "latent"
    defenses = ("fm",)
    w_latent: float
    w_cls: float

    def __init__(
        self,
        classifier: nn.Module,
        defense: Defense | None = None,
        *,
        w_latent: float = 1.0,
        w_cls: float = 1.0,
        **pgd: Any,
    ) -> None:
        check_weight("w_latent", w_latent)
        check_weight("w_cls", w_cls)
        super().__init__(classifier, defense, **pgd)
        self._keep(w_latent=w_latent, w_cls=w_cls)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        z_s, z_u = self.fm.vae.encode(x)
        return torch.cat([z_s.flatten(1), z_u.flatten(1)], 1).float()

    def _embed_all(self, x: torch.Tensor) -> torch.Tensor:
        device = device_of(self.classifier)
        return torch.cat(
            [self._embed(x[i : i + 256].to(device)).cpu() for i in range(0, len(x), 256)]
        )

    @torch.no_grad()
    def prepare(self, x: torch.Tensor, y: torch.Tensor, pool: Pool) -> None:
        """Guide of each input: the pool image of another class whose codes are nearest."""
        px, py = pool if pool is not None else (x, y)
        px = check_images(px, name="pool images").float().cpu()
        num_classes = int(self.classifier(x[:1].to(device_of(self.classifier))).shape[1])
        py = check_labels(py, len(px), num_classes, name="pool labels").cpu()
        e_p = self._embed_all(px)
        dist = torch.cdist(self._embed_all(x), e_p)  # (n, P)
        dist[y.view(-1, 1) == py.view(1, -1)] = float("inf")
        nearest = dist.argmin(1)
        if bool(torch.isinf(dist.gather(1, nearest.view(-1, 1))).any()):
            raise InputError("latent needs a pool image of another class for every input")
        self.guide_codes, self.guide_labels = e_p[nearest], py[nearest].long()

    def loss(
        self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        dev = x_adv.device
        pull = (self._embed(x_adv) - self.guide_codes[idx].to(dev)).pow(2).mean(1)
        logits = self.classifier(x_adv).float()
        push = targeted_margin(logits, self.guide_labels[idx].to(dev), self.kappa)
        return self.w_latent * pull + self.w_cls * push
