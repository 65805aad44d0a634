"""Adversarial training's inner maximisation, L∞ on images in [0, 1]: FGSM with a random start
(Wong, Rice & Kolter 2020, "Fast is better than free") and PGD-k (Madry et al. 2018).

One code path for both: δ₀ ~ U(−ε, ε) with x + δ₀ clipped to [0, 1], then k signed-gradient
steps of size α on the cross-entropy of model(x + δ), each followed by projection to the ε-ball
around x and to [0, 1]. FGSM-RS is k = 1 (α = 1.25 ε by default), PGD-k uses α = 2.5 ε / k by
default (Madry's rule; ε / 4 at k = 10).

The caller chooses the model's mode. The training loop perturbs in train mode, as Wong et al. and
Madry et al. do (dropout is active and batch-norm statistics also see the perturbation passes);
the robustness checks run in eval mode. Only the input gets a gradient: parameter `.grad`s are
left untouched. Random starts come from a CPU generator, so a resumed run draws the same ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fmdefense.core.config import check_int, check_range
from fmdefense.core.errors import InputError


@dataclass(frozen=True)
class Perturbation:
    """A resolved L∞ perturbation: radius `eps`, step size `step`, `steps` steps."""

    eps: float
    step: float
    steps: int = 1

    def __post_init__(self) -> None:
        """Every field checked (a step beyond 2.5 moves nothing further on [0, 1] images)."""
        check_range("eps", self.eps, 0.0, 1.0, low_open=True)
        check_range("step", self.step, 0.0, 2.5, low_open=True)
        check_int("steps", self.steps, low=1, high=10_000)


def pgd(eps: float, steps: int) -> Perturbation:
    """PGD-k with Madry's step size 2.5 ε / k."""
    return Perturbation(eps, 2.5 * eps / steps, steps)


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def perturb(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    p: Perturbation,
    gen: torch.Generator,
) -> torch.Tensor:
    """x + δ (same shape, detached) with ‖δ‖∞ ≤ ε and x + δ in [0, 1], raising the loss on `y`.

    `gen` (a CPU generator) draws the random start; the model's mode is the caller's.
    """
    x = x.detach()
    noise = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)  # (B, C, H, W)
    x_adv = (x + (2.0 * noise - 1.0) * p.eps).clamp(0.0, 1.0)
    with torch.enable_grad():
        for _ in range(p.steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = _project(x_adv.detach() + p.step * grad.sign(), x, p.eps)
    return x_adv.detach()


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    p: Perturbation,
    *,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Share of (x, y) still classified as y after `perturb`, in eval mode (mode restored)."""
    if len(x) == 0 or len(x) != len(y):
        raise InputError(f"robust_accuracy needs as many labels as images (> 0), got {len(x)}")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        x_adv = perturb(model, xb, yb, p, gen)
        with torch.no_grad():
            correct += int((model(x_adv).argmax(1) == yb).sum())
    model.train(was_training)
    return correct / len(x)


def pgd_check(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, *, seed: int = 0
) -> dict[str, Any]:
    """A quick robustness estimate: accuracy under one random-start PGD-k run at ε (cross-entropy,
    eval mode). An upper bound on robust accuracy, not an evaluation: `fmdefense adaptive` is."""
    p = pgd(eps, steps)
    acc = robust_accuracy(model, x, y, p, seed=seed)
    return {"accuracy": acc, "images": len(x), "restarts": 1, "seed": seed, **asdict(p)}
