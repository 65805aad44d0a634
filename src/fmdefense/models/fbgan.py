"""FBGAN (Bao, Liang & Wang 2018, arXiv 1805.07862): a bidirectional GAN with an MI regulariser.

Only the abstract of the paper is public here and no code exists, so this is BiGAN/ALI
(Donahue et al. 2017; Dumoulin et al. 2017) plus the paper's one stated addition, an
InfoGAN-style mutual-information term between *all* latent codes and the generated images:

- encoder E: x → z (deterministic, as BiGAN's), generator G: z → x, prior z ~ N(0, I_{z_dim});
- discriminator D(x, z) over pairs, real pairs (x, E(x)) against fake pairs (G(z), z);
- MI term (InfoGAN's variational lower bound with a unit-variance Gaussian Q(z | x) whose mean
  is E(x), so −log Q is ½‖E(G(z)) − z‖² up to a constant): E itself is the Q network;
- a pixel term ‖G(E(x)) − x‖² on real images (`recon_weight`, default 1): a departure from the
  paper, which learns the inverse adversarially only; 0 gives the paper's method (unstable
  within this machine's training budget, see `FBGANConfig.recon_weight`).

The discriminator is built here but not shipped: the artifact holds E, G and a calibration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.core.artifacts import WEIGHTS_FILE, load_tensors, read_config, save_artifact
from fmdefense.core.config import check_int, check_range, dataclass_kwargs
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.core.validation import check_images
from fmdefense.models.gan import upsampling_layers

KIND = "fbgan"


@dataclass(frozen=True)
class FBGANConfig:
    """Networks and training of an FBGAN (recorded in the artifact).

    Defaults: MNIST-sized DCGAN networks of width 32 (as Defense-GAN's generator here), a
    32-dimensional Gaussian latent, Adam 2e-4 with β = (0.5, 0.999) (DCGAN / BiGAN).
    """

    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)  # both sides divisible by 4
    z_dim: int = 32
    width: int = 32
    disc_hidden: int = 512  # joint (x, z) layer of the discriminator
    disc_dropout: float = 0.2  # ALI's discriminator dropout
    mi_weight: float = 1.0  # λ of the MI term ½‖E(G(z)) − z‖² (Gaussian NLL, unit variance)
    recon_weight: float = 1.0  # pixel term ‖G(E(x)) − x‖² on real x: NOT in the paper (0 = the
    # paper's method). Measured on MNIST (20,000 images, 1 thread): with 0, C's accuracy on
    # G(E(x)) of 1,000 CLE images rose to 76.8 % at epoch 9, then fell to 61.3 % at epoch 20
    # as E(x) drifted off the prior (code std 1.4 -> 2.5-3); BiGAN's own MNIST run took 400
    # epochs of 60,000 images. With 1, 93.9 % after 5 epochs of 10,000 images
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    epochs: int = 30
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("in_channels", self.in_channels, low=1)
        if len(self.image_size) != 2 or any(s < 4 or s % 4 for s in self.image_size):
            raise InputError(
                f"image_size must be two sides >= 4 divisible by 4, got {self.image_size}"
            )
        for name in ("z_dim", "width", "disc_hidden", "epochs", "batch_size"):
            check_int(name, getattr(self, name), low=1)
        check_int("seed", self.seed, low=0)
        check_range("disc_dropout", self.disc_dropout, 0.0, 1.0, high_open=True)
        check_range("mi_weight", self.mi_weight, 0.0, 1e6)
        check_range("recon_weight", self.recon_weight, 0.0, 1e6)
        check_range("lr", self.lr, 0.0, 1.0, low_open=True)
        if len(self.betas) != 2:
            raise InputError(f"betas must be two numbers, got {self.betas}")
        for i, b in enumerate(self.betas):
            check_range(f"betas[{i}]", b, 0.0, 1.0, high_open=True)

    @classmethod
    def from_dict(cls, raw: object) -> FBGANConfig:
        """Rebuild from JSON (lists back to tuples); unknown or malformed keys raise InputError."""
        kwargs = dataclass_kwargs(cls, raw, "FBGAN config")
        for key in ("image_size", "betas"):
            if isinstance(kwargs[key], list):
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build networks from `seed` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _conv_trunk(cfg: FBGANConfig) -> nn.Sequential:
    """(N, C, H, W) -> (N, 2w·H/4·W/4): two stride-2 convolutions with leaky ReLU, no norm."""
    d = cfg.width
    return nn.Sequential(
        nn.Conv2d(cfg.in_channels, d, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(d, 2 * d, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
    )


def _trunk_width(cfg: FBGANConfig) -> int:
    return 2 * cfg.width * (cfg.image_size[0] // 4) * (cfg.image_size[1] // 4)


class Encoder(nn.Module):
    """E: image → latent code; no batch norm, so E(x) of one image never depends on others."""

    def __init__(self, cfg: FBGANConfig) -> None:
        super().__init__()
        self.trunk = _conv_trunk(cfg)
        self.head = nn.Linear(_trunk_width(cfg), cfg.z_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, z_dim)
        return self.head(self.trunk(x))


class Generator(nn.Module):
    """G, DCGAN-style: z → (2w, H/4, W/4) → (w, H/2, W/2) → (C, H, W), sigmoid output."""

    def __init__(self, cfg: FBGANConfig) -> None:
        super().__init__()
        self.base, self.fc, self.up = upsampling_layers(
            cfg.z_dim, cfg.width, cfg.in_channels, cfg.image_size
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (N, z_dim) -> (N, C, H, W)
        return self.up(self.fc(z).view(-1, *self.base))


class Discriminator(nn.Module):
    """D(x, z) → logit that the pair is real (x, E(x)) rather than fake (G(z), z).

    Dropout after every hidden layer, as ALI's discriminator (it keeps D from winning early by
    reading the code's statistics alone).
    """

    def __init__(self, cfg: FBGANConfig) -> None:
        super().__init__()
        p = cfg.disc_dropout
        self.x_path = nn.Sequential(_conv_trunk(cfg), nn.Dropout(p))
        self.z_path = nn.Sequential(nn.Linear(cfg.z_dim, 256), nn.LeakyReLU(0.2), nn.Dropout(p))
        self.joint = nn.Sequential(
            nn.Linear(_trunk_width(cfg) + 256, cfg.disc_hidden),
            nn.LeakyReLU(0.2),
            nn.Dropout(p),
            nn.Linear(cfg.disc_hidden, 1),
        )

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # -> (N,)
        feats = torch.cat([self.x_path(x), self.z_path(z)], 1)  # (N, trunk + 256)
        return self.joint(feats).squeeze(1)


def build_discriminator(cfg: FBGANConfig) -> Discriminator:
    """The training-only discriminator, seeded from cfg.seed + 1."""
    with seeded(cfg.seed + 1):
        return Discriminator(cfg)


class FBGAN(nn.Module):
    """E and G with seeded initialisation; every method is differentiable in x."""

    def __init__(self, cfg: FBGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        with seeded(cfg.seed):
            self.encoder = Encoder(cfg)
            self.generator = Generator(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, z_dim)
        return self.encoder(x)

    def generate(self, z: torch.Tensor) -> torch.Tensor:  # (N, z_dim) -> (N, C, H, W)
        return self.generator(z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """G(E(x)) (N, C, H, W): the purified image."""
        return self.generator(self.encoder(x))

    forward = reconstruct

    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """‖x − G(E(x))‖² per image (N,), summed over pixels."""
        return (self.reconstruct(x) - x).pow(2).flatten(1).sum(1)

    def check(self, x: object, name: str = "x") -> torch.Tensor:
        """Validated float32 images of this model's shape."""
        return check_images(x, channels=self.cfg.in_channels, size=self.cfg.image_size, name=name)


def threshold_at_drop_rate(errors: torch.Tensor, drop_rate: float) -> float:
    """Smallest threshold τ among the errors (n,) with share(errors > τ) ≤ drop_rate."""
    check_range("drop_rate", drop_rate, 0.0, 1.0, high_open=True)
    if errors.ndim != 1 or not len(errors):
        raise InputError(f"errors must be a non-empty vector, got shape {tuple(errors.shape)}")
    allowed = int(drop_rate * len(errors) + 1e-9)
    ordered = torch.sort(errors.detach().cpu(), descending=True).values
    return float(ordered[min(allowed, len(errors) - 1)])


def save_fbgan(
    folder: Path,
    model: FBGAN,
    calibration: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """One artifact: config.json {model, calibration}, E+G safetensors, metrics.json."""
    save_artifact(
        folder,
        kind=KIND,
        config={"model": asdict(model.cfg), "calibration": dict(calibration or {}) or None},
        tensors=model.state_dict(),
        metrics=metrics,
    )


def load_fbgan(
    folder: Path, device: str | torch.device = "cpu"
) -> tuple[FBGAN, dict[str, Any] | None]:
    """(FBGAN in eval mode, its calibration or None) from an artifact folder; no unpickling."""
    raw = read_config(folder, KIND)
    try:
        cfg = FBGANConfig.from_dict(raw.get("model"))
    except (InputError, TypeError) as exc:
        raise ArtifactError(f"{folder}/config.json: {exc}") from exc
    calibration = raw.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise ArtifactError(f"{folder}/config.json: calibration must be an object or null")
    model = FBGAN(cfg)
    try:
        model.load_state_dict(load_tensors(Path(folder) / WEIGHTS_FILE, device))
    except RuntimeError as exc:
        raise ArtifactError(f"weights in {folder} do not match its config: {exc}") from exc
    return model.to(device).eval(), calibration
