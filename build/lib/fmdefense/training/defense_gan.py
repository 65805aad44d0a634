"""Defense-GAN's generator training: WGAN-GP (Gulrajani et al. 2017) on clean images only.

Critic without batch norm, gradient penalty λ = 10, n_critic = 5, Adam 1e-4, β = (0.5, 0.9).
Every real batch makes one critic step; every n_critic-th batch also one generator step.
Resumable: with a folder, `resume.safetensors` (safetensors + JSON header, no pickle) is written
after each epoch and a later call continues from it when the training settings match.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fmdefense.core.artifacts import GeneratorState, load_resume_state, save_resume_state
from fmdefense.core.validation import check_images
from fmdefense.models.gan import Critic, DefenseGANConfig, Generator

log = logging.getLogger(__name__)
RESUME_KIND = "defense_gan"  # the resume state's kind (the artifact's kind, as before the split)

# Fields that change test-time behaviour only: a resume state stays valid when they change.
_SEARCH_FIELDS = ("epochs", "search_steps", "restarts", "search_lr", "search_batch_size")


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """E[(‖∇D(x̂)‖₂ − 1)²] at x̂ = ε·real + (1 − ε)·fake, ε (B, 1, 1, 1); differentiable."""
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def _train_key(cfg: DefenseGANConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in _SEARCH_FIELDS}


class _WGANGP:
    """The two networks, their optimisers and the data RNG of one training run."""

    def __init__(self, generator: Generator, device: torch.device) -> None:
        cfg = self.cfg = generator.cfg
        self.G, self.critic = generator.to(device).train(), Critic(cfg).to(device).train()
        self.device = device
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.opt_c = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def parts(self) -> dict[str, Any]:
        return {
            "generator": self.G,
            "critic": self.critic,
            "opt_g": self.opt_g,
            "opt_c": self.opt_c,
            "gen": GeneratorState(self.gen),
        }

    def critic_step(self, real: torch.Tensor) -> tuple[float, float, float]:
        """One critic update on a real batch: (critic loss, Wasserstein estimate, penalty)."""
        b, cfg, dev = len(real), self.cfg, self.device
        z = torch.randn((b, cfg.z_dim), generator=self.gen).to(dev)
        eps = torch.rand((b, 1, 1, 1), generator=self.gen).to(dev)
        with torch.no_grad():
            fake = self.G(z)
        w_dist = self.critic(real).mean() - self.critic(fake).mean()
        gp = gradient_penalty(self.critic, real, fake, eps)
        loss_c = -w_dist + cfg.gp_weight * gp
        self.opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        self.opt_c.step()
        return loss_c.item(), w_dist.item(), gp.item()

    def generator_step(self) -> float:
        """One generator update on a fresh batch of codes: its loss −E[D(G(z))]."""
        z = torch.randn((self.cfg.batch_size, self.cfg.z_dim), generator=self.gen).to(self.device)
        loss_g = -self.critic(self.G(z)).mean()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        return loss_g.item()

    def epoch(self, x: torch.Tensor, epoch: int) -> dict[str, float]:
        """One pass of real batches; the epoch's mean losses and step counts."""
        cfg, t0 = self.cfg, time.perf_counter()
        perm, bs = torch.randperm(len(x), generator=self.gen), cfg.batch_size
        sums = {"critic_loss": 0.0, "wasserstein": 0.0, "gp": 0.0, "generator_loss": 0.0}
        c_steps = g_steps = 0
        desc = f"Defense-GAN {epoch + 1}/{cfg.epochs}"
        bar = tqdm(range(0, len(x), bs), desc=desc, leave=False, disable=None)
        for i in bar:
            loss_c, w_dist, gp = self.critic_step(x[perm[i : i + bs]].to(self.device))
            c_steps += 1
            sums["critic_loss"] += loss_c
            sums["wasserstein"] += w_dist
            sums["gp"] += gp
            if c_steps % cfg.n_critic == 0:
                sums["generator_loss"] += self.generator_step()
                g_steps += 1
            bar.set_postfix(w=f"{sums['wasserstein'] / c_steps:.3f}")
        return {
            "epoch": epoch + 1,
            "critic_loss": sums["critic_loss"] / c_steps,
            "wasserstein": sums["wasserstein"] / c_steps,
            "gp": sums["gp"] / c_steps,
            "generator_loss": sums["generator_loss"] / max(g_steps, 1),
            "critic_steps": c_steps,
            "generator_steps": g_steps,
            "seconds": time.perf_counter() - t0,
        }


def _resume(run: _WGANGP, folder: Path | None) -> tuple[int, list[dict[str, float]]]:
    """(first epoch, history) from a matching resume state in `folder`, else (0, [])."""
    state = load_resume_state(folder) if folder is not None else None
    if state is None or state.get("kind") != RESUME_KIND:
        return 0, []
    if state.get("train_key") != _train_key(run.cfg):
        return 0, []
    for name, part in run.parts().items():
        part.load_state_dict(state[name])
    log.info("Defense-GAN: resuming from epoch %d (%s)", state["epoch"], Path(folder or "."))
    return int(state["epoch"]), list(state["history"])


def train_defense_gan(
    generator: Generator,
    x: torch.Tensor,
    device: torch.device,
    folder: Path | None = None,
) -> list[dict[str, float]]:
    """WGAN-GP on clean images x (n, C, H, W); per-epoch history; resumable from `folder`.

    The generator is trained in place (settings from `generator.cfg`, `epochs` may grow across
    resumed calls) and left in eval mode for the search.
    """
    cfg = generator.cfg
    check_images(x, channels=cfg.in_channels, size=cfg.image_size)
    run = _WGANGP(generator, device)
    start, history = _resume(run, folder)
    for epoch in range(start, cfg.epochs):
        row = run.epoch(x, epoch)
        history.append(row)
        log.info(
            "Defense-GAN epoch %d: W %.4f gp %.4f G %.4f (%d G steps, %.0f s)",
            epoch + 1,
            row["wasserstein"],
            row["gp"],
            row["generator_loss"],
            row["generator_steps"],
            row["seconds"],
        )
        if folder is not None:
            parts = {name: part.state_dict() for name, part in run.parts().items()}
            state = {"kind": RESUME_KIND, "train_key": _train_key(cfg), "epoch": epoch + 1}
            save_resume_state(folder, {**parts, **state, "history": history})
    generator.eval()
    return history
