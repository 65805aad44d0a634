"""Defense-GAN's networks (Samangouei, Kabkab & Chellappa 2018) and their config.

A WGAN-GP generator G: z ~ N(0, I_z_dim) → image in [0, 1] (DCGAN-style, batch norm) and its
critic (no batch norm, as WGAN-GP asks). The config also holds the WGAN-GP training settings
(`fmdefense.training.defense_gan`) and the test-time search of the defense built on G
(`fmdefense.defenses.defense_gan.DefenseGAN`): one artifact records all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fmdefense.core.errors import InputError
from fmdefense.models.seeding import seeded


@dataclass(frozen=True)
class DefenseGANConfig:
    """Generator, WGAN-GP training and test-time search settings (recorded in the artifact).

    Defense-GAN: z_dim 128, L = 200, R = 10. WGAN-GP: λ_gp 10, n_critic 5, Adam 1e-4 (0.5, 0.9).
    Defaults here: L = 100, R = 4 (a 5× cheaper search: ≈ 0.5 s per MNIST image on 2 busy cores).
    """

    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)  # both sides divisible by 4
    z_dim: int = 128
    width: int = 32  # 64 made the search 3–4× slower on this CPU
    # WGAN-GP training
    gp_weight: float = 10.0
    n_critic: int = 5  # critic updates per generator update
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    epochs: int = 20  # one epoch = one pass of real batches through the critic
    batch_size: int = 64
    # test-time search
    search_steps: int = 100  # L (paper: 200)
    restarts: int = 4  # R (paper: 10)
    search_lr: float = 0.1  # Adam on z. Measured on a smoke generator (2 epochs, 2,000 MNIST
    # images), R = 2, L = 100: lr 0.01 / 0.05 / 0.1 / 0.2 left a mean error of 16.7 / 0.047 /
    # 0.003 / 0.001 on 32 images the generator can make (44.98 at the starts), and 174 / 150 /
    # 143 / 138 on 32 VAL digits. 0.1 is a middle choice, untested on a fully trained generator
    search_batch_size: int = 128  # images per search batch (R·B rows of z; 64–256 equally fast)
    drop_rate: float = 0.001  # VAL false-positive rate of the detection threshold
    seed: int = 0  # generator init (critic: seed + 1), training draws, the search's starts

    def __post_init__(self) -> None:
        h, w = self.image_size
        if h % 4 or w % 4:
            raise InputError(f"image_size must be divisible by 4, got {self.image_size}")
        if self.search_steps < 0 or self.restarts < 1:
            raise InputError(
                f"need search_steps >= 0 and restarts >= 1, got {self.search_steps}, "
                f"{self.restarts}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DefenseGANConfig:
        """Rebuild from JSON (lists back to tuples)."""
        raw = dict(raw)
        for key in ("image_size", "betas"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw)


def upsampling_layers(
    z_dim: int, width: int, channels: int, image_size: tuple[int, int]
) -> tuple[tuple[int, int, int], nn.Sequential, nn.Sequential]:
    """The DCGAN-style generator's layers (shared by Defense-GAN's and FBGAN's generators):
    the base shape (2w, H/4, W/4), the dense layer from z, and the two up-convolutions."""
    h, w, d = image_size[0] // 4, image_size[1] // 4, width
    fc = nn.Sequential(nn.Linear(z_dim, 2 * d * h * w), nn.BatchNorm1d(2 * d * h * w), nn.ReLU())
    up = nn.Sequential(
        nn.ConvTranspose2d(2 * d, d, 4, 2, 1),
        nn.BatchNorm2d(d),
        nn.ReLU(),
        nn.ConvTranspose2d(d, channels, 4, 2, 1),
        nn.Sigmoid(),
    )
    return (2 * d, h, w), fc, up


class Generator(nn.Module):
    """DCGAN-style: z → (2w, H/4, W/4) → (w, H/2, W/2) → (C, H, W), sigmoid output.

    Its initial weights come from `cfg.seed`, so the same config builds the same generator.
    """

    def __init__(self, cfg: DefenseGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        with seeded(cfg.seed):
            self.base, self.fc, self.up = upsampling_layers(
                cfg.z_dim, cfg.width, cfg.in_channels, cfg.image_size
            )

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (N, z_dim) -> (N, C, H, W)
        return self.up(self.fc(z).view(-1, *self.base))


class Critic(nn.Module):
    """WGAN-GP critic: three stride-2 convolutions with leaky ReLU, no batch norm, linear out.

    Initialised from `cfg.seed + 1` (another stream than the generator's).
    """

    def __init__(self, cfg: DefenseGANConfig) -> None:
        super().__init__()
        d = cfg.width
        with seeded(cfg.seed + 1):
            self.features = nn.Sequential(
                nn.Conv2d(cfg.in_channels, d, 4, 2, 1),
                nn.LeakyReLU(0.2),
                nn.Conv2d(d, 2 * d, 4, 2, 1),
                nn.LeakyReLU(0.2),
                nn.Conv2d(2 * d, 4 * d, 4, 2, 1),
                nn.LeakyReLU(0.2),
                nn.Flatten(),
            )
            with torch.no_grad():
                n_out = self.features(torch.zeros(1, cfg.in_channels, *cfg.image_size)).shape[1]
            self.head = nn.Linear(n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N,)
        return self.head(self.features(x)).squeeze(1)
