"""The combo-VAE (paper III.B, III.D, Table I): E_s for class-shared codes z_s, DGMM for
class-unique codes z_u, one decoder D(z_s ⊕ z_u), and the TC discriminator used in training.

Two variants share one interface:
- "vector" (MNIST, Fashion-MNIST, 28×28): z_s is a d_s-vector; the manipulable codes are
  [z_s, z_u], d_s + K numbers (paper: 20 codes on MNIST).
- "maps" (faces, 64×64): z_s is C feature maps of n×n; each channel is one manipulable code and
  z_u is kept as encoded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.core.artifacts import load_module, save_artifact
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.core.validation import check_images
from fmdefense.models.losses import lgm_logits

KIND = "combo_vae"


@dataclass(frozen=True)
class ComboVAEConfig:
    """Sizes of a combo-VAE; defaults are the MNIST ones (Table I)."""

    variant: str = "vector"  # vector | maps
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)
    num_classes: int = 10
    z_s_dim: int = 10  # d_s (vector) or channels C (maps)
    z_u_dim: int = 10  # K
    map_size: int = 8  # n (maps variant)
    width: int = 32
    tc_hidden: int = 256


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


def conv_trunk_28(c_in: int, w: int) -> nn.Sequential:
    """Table I encoder/DGMM convolutions for 28×28: 32-32-64-64 channels, k4 s2. -> (B, 256)"""
    return nn.Sequential(
        nn.Conv2d(c_in, w, 4, 2, 1),
        nn.ReLU(),  # 14×14
        nn.Conv2d(w, w, 4, 2, 1),
        nn.ReLU(),  # 7×7
        nn.Conv2d(w, 2 * w, 4, 2, 2),
        nn.ReLU(),  # 4×4
        nn.Conv2d(2 * w, 2 * w, 4, 2, 1),
        nn.ReLU(),  # 2×2
        nn.Flatten(),
        nn.Linear(2 * w * 4, 128),
        nn.ReLU(),
    )


class ResBlock(nn.Module):
    """Residual basic block (Table I, face columns), width-preserving."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1),
            nn.BatchNorm2d(c),
            _act(),
            nn.Conv2d(c, c, 3, 1, 1),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.leaky_relu(x + self.body(x), 0.2)


def conv_trunk_faces(c_in: int, w: int) -> nn.Sequential:
    """Face encoder: k7 stem, three stride-2 convs (64 → 8), two residual blocks. (B, 2w, 8, 8)"""
    return nn.Sequential(
        nn.Conv2d(c_in, w, 7, 1, 3),
        _act(),
        nn.Conv2d(w, 2 * w, 3, 2, 1),
        _act(),  # 32
        nn.Conv2d(2 * w, 2 * w, 3, 2, 1),
        _act(),  # 16
        nn.Conv2d(2 * w, 2 * w, 3, 2, 1),
        _act(),  # 8
        ResBlock(2 * w),
        ResBlock(2 * w),
    )


class Encoder(nn.Module):
    """E_s: q(z_s | x) as mean and log-variance (vector (B, d_s) or maps (B, C, n, n))."""

    def __init__(self, cfg: ComboVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.variant == "vector":
            self.net: nn.Module = nn.Sequential(
                conv_trunk_28(cfg.in_channels, cfg.width), nn.Linear(128, 2 * cfg.z_s_dim)
            )
        else:
            self.net = nn.Sequential(
                conv_trunk_faces(cfg.in_channels, cfg.width),
                nn.Conv2d(2 * cfg.width, 2 * cfg.z_s_dim, 1),
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=1)
        return mu, logvar.clamp(-12, 8)


class DGMM(nn.Module):
    """Deep Gaussian-mixture model: x -> z_u (B, K) with learned class means and variances."""

    def __init__(self, cfg: ComboVAEConfig) -> None:
        super().__init__()
        if cfg.variant == "vector":
            trunk: nn.Module = conv_trunk_28(cfg.in_channels, cfg.width)
            feat = 128
        else:
            trunk = nn.Sequential(
                conv_trunk_faces(cfg.in_channels, cfg.width), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            )
            feat = 2 * cfg.width
        self.features = nn.Sequential(trunk, nn.Linear(feat, cfg.z_u_dim))
        self.means = nn.Parameter(torch.randn(cfg.num_classes, cfg.z_u_dim))
        self.log_vars = nn.Parameter(torch.zeros(cfg.num_classes, cfg.z_u_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        return self.features(x)

    def logits(self, z_u: torch.Tensor) -> torch.Tensor:
        """Class log-posteriors up to a constant (B, num_classes), no margin."""
        return lgm_logits(z_u, self.means, self.log_vars)

    def class_means(self, z_u: torch.Tensor) -> torch.Tensor:
        """μ_ĉ of the most likely class of each z_u.  (B, K) -> (B, K)"""
        return self.means[self.logits(z_u).argmax(1)]


class Decoder(nn.Module):
    """D(z_s ⊕ z_u) -> image in (0, 1)."""

    def __init__(self, cfg: ComboVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        if cfg.variant == "vector":
            self.net: nn.Module = nn.Sequential(
                nn.Linear(cfg.z_s_dim + cfg.z_u_dim, 128),
                nn.ReLU(),
                nn.Linear(128, 2 * w * 7 * 7),
                nn.ReLU(),
                nn.Unflatten(1, (2 * w, 7, 7)),
                nn.ConvTranspose2d(2 * w, w, 4, 2, 1),
                _act(),  # 14×14
                nn.ConvTranspose2d(w, w // 2, 4, 2, 1),
                _act(),  # 28×28, half width: this layer dominates the cost of a morph
                nn.Conv2d(w // 2, cfg.in_channels, 3, 1, 1),
                nn.Sigmoid(),
            )
        else:
            self.net = nn.Sequential(
                nn.Conv2d(cfg.z_s_dim + cfg.z_u_dim, 2 * w, 1),
                _act(),
                ResBlock(2 * w),
                ResBlock(2 * w),
                nn.ConvTranspose2d(2 * w, 2 * w, 4, 2, 1),
                _act(),  # 16
                nn.ConvTranspose2d(2 * w, w, 4, 2, 1),
                _act(),  # 32
                nn.ConvTranspose2d(w, w, 4, 2, 1),
                _act(),  # 64
                nn.Conv2d(w, cfg.in_channels, 7, 1, 3),
                nn.Sigmoid(),
            )

    def forward(self, z_s: torch.Tensor, z_u: torch.Tensor) -> torch.Tensor:
        if self.cfg.variant == "vector":
            return self.net(torch.cat([z_s, z_u], 1))
        n = z_s.shape[-1]
        z_u_maps = z_u.view(*z_u.shape, 1, 1).expand(-1, -1, n, n)
        return self.net(torch.cat([z_s, z_u_maps], 1))


class TCDiscriminator(nn.Module):
    """D_tc on z_s only (guide §8: fed [z_s, z_u] it learns z_u's class structure instead)."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            _act(),
            nn.Linear(hidden, hidden),
            _act(),
            nn.Linear(hidden, hidden),
            _act(),
            nn.Linear(hidden, 2),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, d_s) -> (B, 2) logits
        return self.net(z)


class ComboVAE(nn.Module):
    """E_s + DGMM + decoder; the public interface the defense manipulates."""

    def __init__(self, cfg: ComboVAEConfig) -> None:
        super().__init__()
        if cfg.variant not in ("vector", "maps"):
            raise ArtifactError(f"unknown combo-VAE variant {cfg.variant!r}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.dgmm = DGMM(cfg)
        self.decoder = Decoder(cfg)

    @property
    def num_codes(self) -> int:
        """Manipulable codes: d_s + K for vectors, C channels for maps."""
        return (
            self.cfg.z_s_dim + self.cfg.z_u_dim
            if self.cfg.variant == "vector"
            else self.cfg.z_s_dim
        )

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        return check_images(x, channels=self.cfg.in_channels, size=self.cfg.image_size)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_s mean, z_u): (B, d_s) or (B, C, n, n), and (B, K)."""
        self._check(x)
        return self.encoder(x)[0], self.dgmm(x)

    def decode(self, z_s: torch.Tensor, z_u: torch.Tensor) -> torch.Tensor:
        """Images (B, C_img, H, W) in (0, 1) from z_s and z_u."""
        return self.decoder(z_s, z_u)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Manipulable codes: [z_s, z_u] (B, d_s + K) or z_s maps (B, C, n, n)."""
        z_s, z_u = self.encode(x)
        return torch.cat([z_s, z_u], 1) if self.cfg.variant == "vector" else z_s

    def decode_codes(self, codes: torch.Tensor, z_u: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse layout of `codes`; the maps variant needs the z_u kept fixed beside them."""
        if self.cfg.variant == "vector":
            return self.decoder(codes[:, : self.cfg.z_s_dim], codes[:, self.cfg.z_s_dim :])
        if z_u is None:
            raise InputError("decode_codes of a feature-map combo-VAE needs z_u (B, K)")
        return self.decoder(codes, z_u)

    def reconstruct(self, x: torch.Tensor, z_u_mode: str = "feature") -> torch.Tensor:
        """D(E_s(x) ⊕ z_u) with z_u = DGMM's feature vector ("feature") or its class mean μ_ĉ."""
        z_s, z_u = self.encode(x)
        if z_u_mode == "class_mean":
            z_u = self.dgmm.class_means(z_u)
        elif z_u_mode != "feature":
            raise InputError(f"z_u_mode must be 'feature' or 'class_mean', got {z_u_mode!r}")
        return self.decoder(z_s, z_u)

    def save(self, folder: Path, metrics: dict[str, Any] | None = None) -> None:
        """config.json + model.safetensors (+ metrics.json); the TC discriminator is not kept."""
        save_artifact(
            folder, kind=KIND, config=asdict(self.cfg), tensors=self.state_dict(), metrics=metrics
        )

    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu") -> ComboVAE:
        """Rebuild from an artifact folder (no pickle)."""
        return load_module(folder, KIND, lambda raw: cls(ComboVAEConfig(**raw)), device)


DATASET_VAES: dict[str, ComboVAEConfig] = {
    "mnist": ComboVAEConfig(),
    "fmnist": ComboVAEConfig(width=64),  # at 32 the decoder lost 8 points of C's accuracy
    "orl": ComboVAEConfig(
        variant="maps",
        image_size=(64, 64),
        num_classes=40,
        z_s_dim=32,
        z_u_dim=16,
        map_size=8,
        width=32,
    ),
}
