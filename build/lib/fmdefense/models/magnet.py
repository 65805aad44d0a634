"""MagNet's networks (Meng & Chen 2017): two autoencoders for MNIST-sized images, and their config.

- Autoencoder I (detector I and the reformer): conv-pool-conv / conv-upsample-conv, 3 channels.
- Autoencoder II (detector II): three 3×3 convolutions.
All activations are sigmoids, as in the paper. The defense built on them is
`fmdefense.defenses.magnet.MagNet`; their training loop is `fmdefense.training.magnet`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fmdefense.core.config import check_int, check_range, dataclass_kwargs
from fmdefense.core.errors import InputError
from fmdefense.models.seeding import seeded


@dataclass(frozen=True)
class MagNetConfig:
    """MagNet's MNIST settings (noise 0.1, drop rate 0.001), fewer epochs than its 100."""

    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)  # both sides even (autoencoder I pools by 2)
    noise: float = 0.1
    drop_rate: float = 0.001  # each detector's VAL false-positive rate
    epochs: int = 10
    batch_size: int = 256  # training batches, and the defense's inference batches
    lr: float = 1e-2  # all-sigmoid autoencoders crawl at 1e-3 (13.5 % reformer accuracy after
    # 3 epochs on MNIST); at 1e-2 the reformer keeps 97.4 % of 1,000 CLE images after 3 epochs
    seed: int = 0  # initial weights, batch order and noise

    def __post_init__(self) -> None:
        check_int("in_channels", self.in_channels, low=1)
        if len(self.image_size) != 2 or any(s % 2 or s < 2 for s in self.image_size):
            raise InputError(f"image_size must be two even sides, got {self.image_size}")
        check_range("noise", self.noise, 0.0, 1.0)
        check_range("drop_rate", self.drop_rate, 0.0, 1.0, high_open=True)
        check_int("epochs", self.epochs, low=0)
        check_int("batch_size", self.batch_size, low=1)
        check_range("lr", self.lr, 0.0, 1.0, low_open=True)
        check_int("seed", self.seed, low=0)

    @classmethod
    def from_dict(cls, raw: object) -> MagNetConfig:
        """Rebuild from JSON (image_size back to a tuple); unknown keys give one clear line."""
        d = dataclass_kwargs(cls, raw, "MagNetConfig")
        d["image_size"] = tuple(d["image_size"])
        return cls(**d)


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, 1, 1), nn.Sigmoid()]


def autoencoder_i(c: int) -> nn.Sequential:
    """MagNet's MNIST detector/reformer I: conv-pool-conv / conv-upsample-conv, 3 channels."""
    return nn.Sequential(
        *_conv(c, 3),
        nn.AvgPool2d(2),
        *_conv(3, 3),
        *_conv(3, 3),
        nn.Upsample(scale_factor=2),
        *_conv(3, 3),
        *_conv(3, c),
    )


def autoencoder_ii(c: int) -> nn.Sequential:
    """MagNet's MNIST detector II: three 3×3 convolutions."""
    return nn.Sequential(*_conv(c, 3), *_conv(3, 3), *_conv(3, c))


class MagNetAutoencoders(nn.Module):
    """Both autoencoders (state_dict keys ae1.*, ae2.*), initialised from the config's seed."""

    def __init__(self, cfg: MagNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        with seeded(cfg.seed):
            self.ae1 = autoencoder_i(cfg.in_channels)
            self.ae2 = autoencoder_ii(cfg.in_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(AE_I(x), errors (n, 2)): the reformed images and both detectors' errors.

        Error I is the mean squared, error II the mean absolute reconstruction error (MagNet's
        p = 2 and p = 1). Differentiable, so adaptive attacks use it as it is.
        """
        reformed = self.ae1(x)  # (n, C, H, W)
        e1 = (reformed - x).pow(2).flatten(1).mean(1)
        e2 = (self.ae2(x) - x).abs().flatten(1).mean(1)
        return reformed, torch.stack([e1, e2], 1)

    def extra_repr(self) -> str:
        return f"in_channels={self.cfg.in_channels}, image_size={self.cfg.image_size}"
