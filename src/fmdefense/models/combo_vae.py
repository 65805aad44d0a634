"""The combo-VAE (paper III.B, III.D, Table I): E_s for class-shared codes z_s, DGMM for
class-unique codes z_u, one decoder D(z_s ⊕ z_u), and the TC discriminator used in training.

Two variants share one interface:
- "vector" (MNIST, Fashion-MNIST, 28×28): z_s is a d_s-vector; the manipulable codes are
  [z_s, z_u], d_s + K numbers (paper: 20 codes on MNIST).
- "maps" (faces, 64×64): z_s is C feature maps of n×n; each channel is one manipulable code and
  z_u is kept as encoded. n = side / 2^k for k = 3 (the shipped 8×8) down to 0 (the paper's face
  reading, IV.A: maps as large as the image); the k stride-2 layers of the face encoder keep
  their stride and the other 3 − k run at stride 1, so each k has the same layer list. n = 1 on
  a larger image is a vector z_s for faces: a linear bottleneck between 1×1 codes and the
  side/8 trunk, so one code's value can move the whole image (a map's mean barely varies).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.core.artifacts import load_module, save_artifact
from fmdefense.core.config import check_choice, check_int, check_pair, dataclass_kwargs
from fmdefense.core.errors import InputError
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
    map_size: int = 8  # n (maps variant): side / 8, / 4, / 2 or side itself
    width: int = 32
    tc_hidden: int = 256

    def __post_init__(self) -> None:
        """Every field checked, including the image size each variant's networks produce."""
        check_choice("variant", self.variant, ("vector", "maps"))
        check_int("in_channels", self.in_channels, low=1, high=64)
        check_int("num_classes", self.num_classes, low=2, high=100_000)
        check_int("z_s_dim", self.z_s_dim, low=1, high=4096)
        check_int("z_u_dim", self.z_u_dim, low=1, high=4096)
        check_int("map_size", self.map_size, low=1, high=128)
        check_int("width", self.width, low=2, high=1024)  # the vector decoder halves it
        check_int("tc_hidden", self.tc_hidden, low=1, high=65_536)
        check_pair("image_size", self.image_size, low=1, high=1024)
        # the vector networks are built for 28×28; the maps ones map n×n codes to 2^k·n images
        if self.variant == "vector" and self.image_size != (28, 28):
            raise InputError(
                f"image_size must be (28, 28) for the 'vector' variant, got {self.image_size}"
            )
        if self.variant == "maps":
            h, w = self.image_size
            sizes = {self.map_size * 2**k for k in range(4)}
            if h != w or (h not in sizes and not (self.map_size == 1 and h % 8 == 0)):
                raise InputError(
                    f"image_size must be square and map_size × 1, 2, 4 or 8 (or a multiple of "
                    f"8 with map_size 1) for the 'maps' variant with map_size {self.map_size}, "
                    f"got {self.image_size}"
                )

    @property
    def downsamplings(self) -> int:
        """k: stride-2 layers between a face image and its code maps (maps variant; 0 to 3)."""
        return min(3, (self.image_size[0] // self.map_size).bit_length() - 1)

    @property
    def bottleneck(self) -> int:
        """Side of the trunk a linear layer joins to 1×1 codes (maps variant; 0: none)."""
        side = self.image_size[0]
        return side // 8 if self.variant == "maps" and self.map_size == 1 and side > 8 else 0

    @classmethod
    def from_dict(
        cls, raw: object, what: str = "combo-VAE config", *, complete: bool = False
    ) -> ComboVAEConfig:
        """Rebuild from JSON: unknown or missing keys and wrong types give one clear line; with
        `complete` (a saved artifact), every field must be present."""
        return cls(**dataclass_kwargs(cls, raw, what, tuples=True, complete=complete))


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


def conv_trunk_faces(c_in: int, w: int, down: int = 3) -> nn.Sequential:
    """Face encoder: k7 stem, three 3×3 convs of which the first `down` have stride 2, two
    residual blocks. (B, c_in, S, S) -> (B, 2w, S / 2^down, S / 2^down)"""
    s = [2 if i < down else 1 for i in range(3)]
    return nn.Sequential(
        nn.Conv2d(c_in, w, 7, 1, 3),
        _act(),
        nn.Conv2d(w, 2 * w, 3, s[0], 1),
        _act(),  # 32 (64 × 64 input, down 3)
        nn.Conv2d(2 * w, 2 * w, 3, s[1], 1),
        _act(),  # 16
        nn.Conv2d(2 * w, 2 * w, 3, s[2], 1),
        _act(),  # 8
        ResBlock(2 * w),
        ResBlock(2 * w),
    )


def _up(c_in: int, c_out: int, upsample: bool) -> nn.Module:
    """A decoder stage: ×2 transposed conv, or a 3×3 conv at the same size."""
    return nn.ConvTranspose2d(c_in, c_out, 4, 2, 1) if upsample else nn.Conv2d(c_in, c_out, 3, 1, 1)


class Encoder(nn.Module):
    """E_s: q(z_s | x) as mean and log-variance (vector (B, d_s) or maps (B, C, n, n))."""

    def __init__(self, cfg: ComboVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.variant == "vector":
            self.net: nn.Module = nn.Sequential(
                conv_trunk_28(cfg.in_channels, cfg.width), nn.Linear(128, 2 * cfg.z_s_dim)
            )
        elif cfg.bottleneck:  # (B, 2w, s, s) -> (B, 2C, 1, 1)
            self.net = nn.Sequential(
                conv_trunk_faces(cfg.in_channels, cfg.width),
                nn.Flatten(),
                nn.Linear(2 * cfg.width * cfg.bottleneck**2, 2 * cfg.z_s_dim),
                nn.Unflatten(1, (2 * cfg.z_s_dim, 1, 1)),
            )
        else:
            self.net = nn.Sequential(
                conv_trunk_faces(cfg.in_channels, cfg.width, cfg.downsamplings),
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
            up = [i >= 3 - cfg.downsamplings for i in range(3)]  # the last k stages upsample
            self.net = nn.Sequential(
                _code_input(cfg),
                _act(),
                ResBlock(2 * w),
                ResBlock(2 * w),
                _up(2 * w, 2 * w, up[0]),
                _act(),  # 16 (8 × 8 maps)
                _up(2 * w, w, up[1]),
                _act(),  # 32
                _up(w, w, up[2]),
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


def _code_input(cfg: ComboVAEConfig) -> nn.Module:
    """The face decoder's first layer: a 1×1 conv on the code maps, or with a bottleneck a
    linear layer from 1×1 codes to the trunk.  (B, C + K, n, n) -> (B, 2w, n', n')"""
    c_in, c_out, s = cfg.z_s_dim + cfg.z_u_dim, 2 * cfg.width, cfg.bottleneck
    if not s:
        return nn.Conv2d(c_in, c_out, 1)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(c_in, c_out * s * s), nn.Unflatten(1, (c_out, s, s))
    )


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
        if not isinstance(cfg, ComboVAEConfig):
            raise InputError(f"ComboVAE needs a ComboVAEConfig, got {type(cfg).__name__}")
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
        x = self._check(x)
        return self.encoder(x)[0], self.dgmm(x)

    def decode(self, z_s: torch.Tensor, z_u: torch.Tensor) -> torch.Tensor:
        """Images (B, C_img, H, W) in (0, 1) from z_s and z_u."""
        c, n = self.cfg, self.cfg.map_size
        z_s_shape = (c.z_s_dim,) if c.variant == "vector" else (c.z_s_dim, n, n)
        _check_code("z_s", z_s, z_s_shape)
        _check_code("z_u", z_u, (c.z_u_dim,), len(z_s))
        return self.decoder(z_s, z_u)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Manipulable codes: [z_s, z_u] (B, d_s + K) or z_s maps (B, C, n, n)."""
        z_s, z_u = self.encode(x)
        return torch.cat([z_s, z_u], 1) if self.cfg.variant == "vector" else z_s

    def decode_codes(self, codes: torch.Tensor, z_u: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse layout of `codes`; the maps variant needs the z_u kept fixed beside them."""
        if self.cfg.variant == "vector":
            _check_code("codes", codes, (self.num_codes,))
            return self.decoder(codes[:, : self.cfg.z_s_dim], codes[:, self.cfg.z_s_dim :])
        if z_u is None:
            raise InputError("decode_codes of a feature-map combo-VAE needs z_u (B, K)")
        return self.decode(codes, z_u)

    def reconstruct(self, x: torch.Tensor, z_u_mode: str = "feature") -> torch.Tensor:
        """D(E_s(x) ⊕ z_u) with z_u = DGMM's feature vector ("feature") or its class mean μ_ĉ."""
        if z_u_mode not in ("feature", "class_mean"):
            raise InputError(f"z_u_mode must be 'feature' or 'class_mean', got {z_u_mode!r}")
        z_s, z_u = self.encode(x)
        if z_u_mode == "class_mean":
            z_u = self.dgmm.class_means(z_u)
        return self.decoder(z_s, z_u)

    def save(self, folder: Path, metrics: dict[str, Any] | None = None) -> None:
        """config.json + model.safetensors (+ metrics.json); the TC discriminator is not kept."""
        save_artifact(
            folder, kind=KIND, config=asdict(self.cfg), tensors=self.state_dict(), metrics=metrics
        )

    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu") -> ComboVAE:
        """Rebuild from an artifact folder (no pickle)."""
        return load_module(
            folder, KIND, lambda raw: cls(ComboVAEConfig.from_dict(raw, complete=True)), device
        )


def _check_code(name: str, z: object, shape: tuple[int, ...], batch: int | None = None) -> None:
    """Refuse a code tensor whose shape is not (B, *shape) (shape checks only: a hot path)."""
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor (B, {shape}), got {z!r:.60}")
    if tuple(z.shape[1:]) != shape or (batch is not None and len(z) != batch):
        want = f"({batch if batch is not None else 'B'}, {', '.join(map(str, shape))})"
        raise InputError(f"{name} must have shape {want}, got {tuple(z.shape)}")


_FACES = ComboVAEConfig(  # ORL's
    variant="maps", image_size=(64, 64), num_classes=40, z_s_dim=32, z_u_dim=16, map_size=8
)
DATASET_VAES: dict[str, ComboVAEConfig] = {
    "mnist": ComboVAEConfig(),
    "fmnist": ComboVAEConfig(width=64),  # at 32 the decoder lost 8 points of C's accuracy
    "orl": _FACES,
    # ORL's networks on RGB: the face trunk and decoder take any channel count at 64×64
    "celeba": replace(_FACES, in_channels=3, num_classes=100),
}
