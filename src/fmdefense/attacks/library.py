"""Adapters over Foolbox 3.3.4, the library the paper used: one factory per attack name.

Every adapter takes the model at call time, inputs in [0, 1], and returns the attacked images
(clipped to the attack's norm bound where it has one). Success is decided by us, by classifying
what came back, never by Foolbox's flag (guide §8: CW can return all-black images it counts as
successes); an all-constant or non-finite output is degenerate and never a success.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import foolbox as fb
import torch
from torch import nn

from fmdefense.errors import InputError
from fmdefense.validation import check_images, check_labels


@dataclass(frozen=True)
class FGSMConfig:
    """FGSM (Goodfellow et al.): one signed-gradient step of size ε under L∞."""

    epsilon: float = 0.3


@dataclass(frozen=True)
class DeepFoolConfig:
    """DeepFool L∞ (minimal perturbation, no ε cap): Foolbox's LinfDeepFoolAttack."""

    steps: int = 50
    candidates: int = 10  # classes considered per step (the top-10 logits)
    overshoot: float = 0.02
    loss: Literal["logits", "crossentropy"] = "logits"


@dataclass(frozen=True)
class CWConfig:
    """Carlini–Wagner L2 with binary search over the constant (Foolbox L2CarliniWagnerAttack)."""

    binary_search_steps: int = 9
    steps: int = 1000
    stepsize: float = 0.01
    confidence: float = 0.0  # κ
    initial_const: float = 1e-3
    abort_early: bool = True


CW_SETTINGS: dict[str, CWConfig] = {
    # As in Carlini & Wagner (2017): 9 binary-search steps × 1,000 iterations, lr 0.01.
    "reference": CWConfig(),
    # 5 × 100 with a 10× larger step: at stepsize 0.01 100 steps barely move pixels at 0 or 1.
    "fast": CWConfig(binary_search_steps=5, steps=100, stepsize=0.1),
}
SETTINGS: dict[str, dict[str, Any]] = {
    "fgsm": {"default": FGSMConfig()},
    "deepfool_linf": {"default": DeepFoolConfig()},
    "cw_l2": {"default": CW_SETTINGS["fast"], **CW_SETTINGS},
}


def _fgsm(cfg: FGSMConfig) -> tuple[fb.attacks.Attack, float | None]:
    return fb.attacks.LinfFastGradientAttack(random_start=False), cfg.epsilon


def _deepfool(cfg: DeepFoolConfig) -> tuple[fb.attacks.Attack, float | None]:
    attack = fb.attacks.LinfDeepFoolAttack(
        steps=cfg.steps, candidates=cfg.candidates, overshoot=cfg.overshoot, loss=cfg.loss
    )
    return attack, None


def _cw(cfg: CWConfig) -> tuple[fb.attacks.Attack, float | None]:
    return fb.attacks.L2CarliniWagnerAttack(**asdict(cfg)), None


ATTACKS: dict[str, Callable[[Any], tuple[fb.attacks.Attack, float | None]]] = {
    "fgsm": _fgsm,
    "deepfool_linf": _deepfool,
    "cw_l2": _cw,
}
NORMS = {"fgsm": "linf", "deepfool_linf": "linf", "cw_l2": "l2"}


def attack_config(name: str, setting: str = "default") -> Any:
    """The config of an attack at a named setting."""
    if name not in ATTACKS:
        raise InputError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    if setting not in SETTINGS[name]:
        raise InputError(f"{name} has settings {', '.join(SETTINGS[name])}, not {setting!r}")
    return SETTINGS[name][setting]


def run_attack(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: Any
) -> torch.Tensor:
    """Attacked images (n, C, H, W) in [0, 1] for inputs x and true labels y."""
    check_images(x)
    n_classes = int(y.max()) + 1 if len(y) else 1
    check_labels(y, len(x), max(n_classes, 2))
    model.eval()
    device = next(model.parameters()).device
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=device)
    attack, epsilon = ATTACKS[name](config)
    _, clipped, _ = attack(fmodel, x.to(device), y.to(device), epsilons=epsilon)
    return clipped.detach().cpu().clamp(0, 1)


def degenerate(x_adv: torch.Tensor) -> torch.Tensor:
    """Outputs that are not images of anything: non-finite or constant (e.g. all black). (n,)"""
    flat = x_adv.flatten(1)
    finite = torch.isfinite(flat).all(1)
    spread = flat.nan_to_num(0).amax(1) - flat.nan_to_num(0).amin(1)
    return ~finite | (spread < 1e-3)


@torch.no_grad()  # not inference_mode: the labels may feed an attack's autograd graph
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The model's labels (n,) for x, batched."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat(
        [
            model(x[i : i + batch_size].to(device)).argmax(1).cpu()
            for i in range(0, len(x), batch_size)
        ]
    )
