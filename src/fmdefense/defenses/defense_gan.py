"""Defense-GAN (Samangouei, Kabkab & Chellappa 2018), from its paper.

- A WGAN-GP generator G: z ~ N(0, I_128) → image in [0, 1], trained on clean data only
  (critic without batch norm, gradient penalty λ = 10, n_critic = 5, Adam 1e-4, β = (0.5, 0.9):
  the WGAN-GP settings of Gulrajani et al. 2017).
- Test time: from R random starts z₀ ~ N(0, I), L steps of gradient descent on
  ‖G(z) − x‖² (Adam on z, lr `search_lr`); z* is the restart with the smallest final error.
  All R restarts of a batch of B images are optimised together as one (R·B, z_dim) tensor.
- Detection: the reconstruction error ‖G(z*) − x‖² (sum over pixels), flagged above a threshold
  set on clean VAL at a false-positive ("drop") rate of 0.001.
- Classification: C(G(z*)) for accepted inputs, REJECT_LABEL (−1) for flagged ones.

The paper used L = 200 and R = 10. Here the defaults are L = 100 and R = 4, Adam with
lr 0.1 (see `search_lr`), so a search costs 400 generator forward and
backward passes per image instead of 2,000. Adam is invariant to the scale of the loss, so
summing rather than averaging over pixels does not change the step. The search is seeded: the
starts of image i depend only on `seed` and i, so scores agree across batchings (up to float
rounding) and are identical across save/load.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fmdefense.core.artifacts import (
    RESUME_FILE,
    GeneratorState,
    load_module,
    load_resume_state,
    save_artifact,
    save_resume_state,
)
from fmdefense.core.errors import InputError, NotFittedError
from fmdefense.core.validation import check_images
from fmdefense.defenses.base import REJECT_LABEL

log = logging.getLogger(__name__)
KIND = "defense_gan"

# Fields that change test-time behaviour only: a resume state stays valid when they change.
_SEARCH_FIELDS = ("epochs", "search_steps", "restarts", "search_lr", "search_batch_size")


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
    seed: int = 0

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


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Build networks from `seed` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Generator(nn.Module):
    """DCGAN-style: z → (2w, H/4, W/4) → (w, H/2, W/2) → (C, H, W), sigmoid output."""

    def __init__(self, cfg: DefenseGANConfig) -> None:
        super().__init__()
        h, w = cfg.image_size[0] // 4, cfg.image_size[1] // 4
        d = cfg.width
        self.base = (2 * d, h, w)
        self.fc = nn.Sequential(
            nn.Linear(cfg.z_dim, 2 * d * h * w), nn.BatchNorm1d(2 * d * h * w), nn.ReLU()
        )
        self.up = nn.Sequential(
            nn.ConvTranspose2d(2 * d, d, 4, 2, 1),
            nn.BatchNorm2d(d),
            nn.ReLU(),
            nn.ConvTranspose2d(d, cfg.in_channels, 4, 2, 1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (N, z_dim) -> (N, C, H, W)
        return self.up(self.fc(z).view(-1, *self.base))


class Critic(nn.Module):
    """WGAN-GP critic: three stride-2 convolutions with leaky ReLU, no batch norm, linear out."""

    def __init__(self, cfg: DefenseGANConfig) -> None:
        super().__init__()
        d = cfg.width
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


@dataclass(frozen=True)
class Projection:
    """Result of the z search for n images."""

    z: torch.Tensor  # (n, z_dim) best restart's code
    recon: torch.Tensor  # (n, C, H, W) G(z*)
    error: torch.Tensor  # (n,) ‖G(z*) − x‖², summed over pixels


class DefenseGAN(nn.Module):
    """The generator, the detection threshold and the z search (the critic is not shipped)."""

    threshold: torch.Tensor  # (1,) buffer, NaN until fitted

    def __init__(self, cfg: DefenseGANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        with _seeded(cfg.seed):
            self.generator = Generator(cfg)
        self.register_buffer("threshold", torch.full((1,), float("nan")))

    @property
    def device(self) -> torch.device:
        return self.threshold.device

    def _starts(self, n: int) -> torch.Tensor:
        """Seeded random starts (n, R, z_dim): row i depends only on the seed and i."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        return torch.randn((n, self.cfg.restarts, self.cfg.z_dim), generator=gen)

    def _search(self, x: torch.Tensor, z0: torch.Tensor) -> Projection:
        """L Adam steps on all R·B codes at once; keep each image's best restart."""
        B, R = z0.shape[:2]
        G = self.generator
        with torch.inference_mode(False), torch.enable_grad():
            target = x.clone().repeat(R, 1, 1, 1)  # (R·B, C, H, W), row r·B + b
            z = z0.transpose(0, 1).reshape(R * B, -1).clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=self.cfg.search_lr)
            for _ in range(self.cfg.search_steps):
                err = (G(z) - target).pow(2).flatten(1).sum(1)  # (R·B,)
                (z.grad,) = torch.autograd.grad(err.sum(), z)
                opt.step()
            with torch.no_grad():
                z = z.detach()
                recon = G(z)
                err = (recon - target).pow(2).flatten(1).sum(1)
        best = err.view(R, B).argmin(0)  # (B,)
        pick = best * B + torch.arange(B, device=best.device)
        return Projection(z[pick], recon[pick], err[pick])

    def starts(self, n: int) -> torch.Tensor:
        """The starts (n, R, z_dim) `project` uses for n images (row i: the i-th image's)."""
        return self._starts(n)

    def project(self, x: torch.Tensor, starts: torch.Tensor | None = None) -> Projection:
        """z* = argmin over R restarts × L steps of ‖G(z) − x‖², in batches of images.

        `starts` (n, R', z_dim) replaces the seeded starts (attacks resample them for EOT).
        """
        check_images(x, channels=self.cfg.in_channels, size=self.cfg.image_size)
        z0 = self._starts(len(x)) if starts is None else starts
        if z0.ndim != 3 or z0.shape[0] != len(x) or z0.shape[2] != self.cfg.z_dim:
            raise InputError(
                f"starts must have shape ({len(x)}, R, {self.cfg.z_dim}), got {tuple(z0.shape)}"
            )
        bs = self.cfg.search_batch_size
        was_training = self.generator.training
        self.generator.eval()  # batch norm in eval mode: each image's search is independent
        try:
            parts = [
                self._search(x[i : i + bs].to(self.device), z0[i : i + bs].to(self.device))
                for i in tqdm(range(0, len(x), bs), desc="Defense-GAN", leave=False, disable=None)
            ]
        finally:
            self.generator.train(was_training)
        return Projection(
            torch.cat([p.z for p in parts]),
            torch.cat([p.recon for p in parts]),
            torch.cat([p.error for p in parts]),
        )

    def fit_thresholds(self, x_val: torch.Tensor) -> DefenseGAN:
        """Threshold at the VAL drop rate (flag errors strictly above it); sets `val_fpr_`."""
        e = self.project(x_val).error
        allowed = int(self.cfg.drop_rate * len(e) + 1e-9)
        ordered = torch.sort(e, descending=True).values
        self.threshold.fill_(float(ordered[min(allowed, len(e) - 1)]))
        self.val_fpr_ = int((e > self.threshold).sum()) / len(e)
        return self

    fit = fit_thresholds

    def _require_fit(self) -> None:
        if bool(torch.isnan(self.threshold).any()):
            raise NotFittedError("Defense-GAN threshold is not fitted: call fit_thresholds(x_val)")

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction error ‖G(z*) − x‖² per image (n,); higher = more suspicious."""
        return self.project(x).error

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """Flagged inputs (n,) bool: error above the VAL threshold."""
        self._require_fit()
        return self.score(x) > self.threshold

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """G(z*) (n, C, H, W): the purified images."""
        return self.project(x).recon

    purify = reconstruct

    def predict(self, classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """C(G(z*)) for accepted inputs, REJECT_LABEL (−1) for flagged ones (one search)."""
        return self.score_and_predict(classifier, x)[1]

    def score_and_predict(
        self, classifier: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(score, predict) from one search, for callers that need both (the search dominates)."""
        self._require_fit()
        p = self.project(x)
        with torch.no_grad():
            labels = torch.cat(
                [classifier(p.recon[i : i + 256]).argmax(1) for i in range(0, len(p.recon), 256)]
            )
        flagged = (p.error > self.threshold).to(labels.device)
        return p.error, torch.where(flagged, torch.full_like(labels, REJECT_LABEL), labels)

    def save(self, folder: Path, metrics: dict[str, Any] | None = None) -> None:
        save_artifact(
            folder, kind=KIND, config=asdict(self.cfg), tensors=self.state_dict(), metrics=metrics
        )

    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu") -> DefenseGAN:
        return load_module(folder, KIND, lambda raw: cls(DefenseGANConfig.from_dict(raw)), device)


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """E[(‖∇D(x̂)‖₂ − 1)²] at x̂ = ε·real + (1 − ε)·fake, ε (B, 1, 1, 1); differentiable."""
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def _train_key(cfg: DefenseGANConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in _SEARCH_FIELDS}


def train_defense_gan(
    model: DefenseGAN,
    x: torch.Tensor,
    device: torch.device,
    folder: Path | None = None,
) -> list[dict[str, float]]:
    """WGAN-GP on clean images x (n, C, H, W); per-epoch history; resumable from `folder`.

    Every real batch makes one critic step; every n_critic-th batch also one generator step.
    With `folder`, `resume.safetensors` is written after each epoch and a later call continues
    from it (when the training settings match; `epochs` may grow).
    """
    cfg = model.cfg
    check_images(x, channels=cfg.in_channels, size=cfg.image_size)
    with _seeded(cfg.seed + 1):
        critic = Critic(cfg)
    G = model.generator
    G.to(device).train()
    critic.to(device).train()
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_c = torch.optim.Adam(critic.parameters(), lr=cfg.lr, betas=cfg.betas)
    gen = torch.Generator().manual_seed(cfg.seed)
    parts: dict[str, Any] = {
        "generator": G,
        "critic": critic,
        "opt_g": opt_g,
        "opt_c": opt_c,
        "gen": GeneratorState(gen),
    }
    history: list[dict[str, float]] = []
    start = 0
    state = load_resume_state(folder) if folder is not None else None
    if (
        state is not None
        and state.get("kind") == KIND
        and state.get("train_key") == _train_key(cfg)
    ):
        for name, part in parts.items():
            part.load_state_dict(state[name])
        start, history = int(state["epoch"]), list(state["history"])
        log.info(
            "Defense-GAN: resuming from epoch %d (%s)", start, Path(folder or ".") / RESUME_FILE
        )
    n, bs = len(x), cfg.batch_size
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        sums = {"critic_loss": 0.0, "wasserstein": 0.0, "gp": 0.0, "generator_loss": 0.0}
        c_steps = g_steps = 0
        bar = tqdm(
            range(0, n, bs), desc=f"Defense-GAN {epoch + 1}/{cfg.epochs}", leave=False, disable=None
        )
        for i in bar:
            real = x[perm[i : i + bs]].to(device)
            b = len(real)
            z = torch.randn((b, cfg.z_dim), generator=gen).to(device)
            eps = torch.rand((b, 1, 1, 1), generator=gen).to(device)
            with torch.no_grad():
                fake = G(z)
            w_dist = critic(real).mean() - critic(fake).mean()
            gp = gradient_penalty(critic, real, fake, eps)
            loss_c = -w_dist + cfg.gp_weight * gp
            opt_c.zero_grad(set_to_none=True)
            loss_c.backward()
            opt_c.step()
            c_steps += 1
            sums["critic_loss"] += loss_c.item()
            sums["wasserstein"] += w_dist.item()
            sums["gp"] += gp.item()
            if c_steps % cfg.n_critic == 0:
                z = torch.randn((bs, cfg.z_dim), generator=gen).to(device)
                loss_g = -critic(G(z)).mean()
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                g_steps += 1
                sums["generator_loss"] += loss_g.item()
            bar.set_postfix(w=f"{sums['wasserstein'] / c_steps:.3f}")
        row = {
            "epoch": epoch + 1,
            "critic_loss": sums["critic_loss"] / c_steps,
            "wasserstein": sums["wasserstein"] / c_steps,
            "gp": sums["gp"] / c_steps,
            "generator_loss": sums["generator_loss"] / max(g_steps, 1),
            "critic_steps": c_steps,
            "generator_steps": g_steps,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        log.info(
            "Defense-GAN epoch %d: W %.4f gp %.4f G %.4f (%d G steps, %.0f s)",
            epoch + 1,
            row["wasserstein"],
            row["gp"],
            row["generator_loss"],
            g_steps,
            row["seconds"],
        )
        if folder is not None:
            save_resume_state(
                folder,
                {
                    **{name: part.state_dict() for name, part in parts.items()},
                    "kind": KIND,
                    "train_key": _train_key(cfg),
                    "epoch": epoch + 1,
                    "history": history,
                },
            )
    G.eval()
    return history


def run_train_defense_gan(
    dataset: str,
    out_dir: Path,
    device: torch.device,
    *,
    epochs: int = 20,
    limit: int | None = None,
    val_limit: int | None = None,
) -> dict[str, Any]:
    """Train on the dataset's combo-VAE split (20,000 clean images), threshold on VAL, save.

    `limit` / `val_limit` keep only the first N training / VAL images (smoke runs).
    """
    from fmdefense.core.provenance import provenance
    from fmdefense.data import load_raw, split_tensors

    ds = load_raw(dataset)
    x, _ = split_tensors(ds, "vae_train")
    x = x[:limit]
    x_val, _ = split_tensors(ds, "val")
    x_val = x_val[:val_limit]
    c, h, w = ds.image_shape
    model = DefenseGAN(DefenseGANConfig(in_channels=c, image_size=(h, w), epochs=epochs))
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    history = train_defense_gan(model, x, device, out_dir)
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.to(device).eval().fit_thresholds(x_val)
    fit_seconds = time.perf_counter() - t0
    val_fpr = model.val_fpr_
    metrics = {
        "loss_history": history,
        "val_fpr": val_fpr,
        "threshold": float(model.threshold),
        "train_images": len(x),
        "val_images": len(x_val),
        "train_seconds": train_seconds,
        "fit_seconds": fit_seconds,
        "search_ms_per_image": 1000 * fit_seconds / len(x_val),
        **provenance(),
    }
    model.cpu().save(out_dir, metrics)
    (out_dir / RESUME_FILE).unlink(missing_ok=True)
    log.info(
        "Defense-GAN: VAL FPR %.4f, threshold %.4f -> %s", val_fpr, metrics["threshold"], out_dir
    )
    return metrics
