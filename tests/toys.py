"""Toy classifier and combo-VAE whose behaviour is known in closed form, for defense tests.

The toy classifier labels a 4×4 image 1 when its mean brightness exceeds 0.5. The toy VAE's
codes are [mean brightness, top-left pixel, constant 0.5]; decoding paints every pixel with the
first code, so only code 0 can change the label and codes 1 and 2 change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ToyCfg:
    in_channels: int = 1
    image_size: tuple[int, int] = (4, 4)


class ToyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cfg = ToyCfg()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 4, 4) -> (B, 2)
        m = x.flatten(1).mean(1) - 0.5
        return torch.stack([-m, m], 1) * self.scale


class ToyVAE(nn.Module):
    num_codes = 3

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_s = torch.stack([x.flatten(1).mean(1), x[:, 0, 0, 0]], 1)  # (B, 2)
        z_u = torch.full((len(x), 1), 0.5)  # (B, 1)
        return z_s, z_u

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.encode(x), 1)  # (B, 3)

    def decode_codes(self, codes: torch.Tensor, z_u: torch.Tensor | None = None) -> torch.Tensor:
        return (codes[:, :1] + self.bias).clamp(0, 1).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)

    def reconstruct(self, x: torch.Tensor, z_u_mode: str = "feature") -> torch.Tensor:
        c = self.codes(x)
        if z_u_mode == "class_mean":  # a purifier that pushes towards the nearer class centre
            c = c.clone()
            c[:, 0] = torch.where(c[:, 0] > 0.5, 0.8, 0.2)
        return self.decode_codes(c)


def images(means: list[float]) -> torch.Tensor:
    """Flat 4×4 images with the given brightness. (n, 1, 4, 4)"""
    return torch.tensor(means).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).clone()


class ToyDGMM(nn.Module):
    """Two class means on the toy's one-dimensional z_u (constant 0.5: DGMM always doubts)."""

    def __init__(self) -> None:
        super().__init__()
        self.means = nn.Parameter(torch.tensor([[0.2], [0.8]]))  # (classes, K)

    def logits(self, z_u: torch.Tensor) -> torch.Tensor:  # (B, 1) -> (B, 2)
        return -50 * (z_u - self.means.T).pow(2)

    def class_means(self, z_u: torch.Tensor) -> torch.Tensor:
        return self.means[self.logits(z_u).argmax(1)]


class ToyComboVAE(ToyVAE):
    """The toy VAE with what the default defense reads too: `decode` and a DGMM."""

    def __init__(self) -> None:
        super().__init__()
        self.dgmm = ToyDGMM()

    def decode(self, z_s: torch.Tensor, z_u: torch.Tensor) -> torch.Tensor:
        return self.decode_codes(torch.cat([z_s, z_u], 1))
