"""Adapters over Foolbox 3.3.4, the library the paper used: one registry entry per attack name.

Every adapter takes the model at call time and inputs in [0, 1], and returns what Foolbox returned
(clipped to the attack's norm bound where it has one). Success is decided here, by classifying
what came back, never by Foolbox's flag (guide §8: CW returns an all-black placeholder wherever it
found nothing, and Foolbox counts a misclassified black image as a success); an all-constant or
non-finite output is degenerate and never a success.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from fmdefense.core.device import module_device
from fmdefense.core.errors import InputError
from fmdefense.core.validation import check_images, check_labels

if TYPE_CHECKING:  # foolbox is imported when an attack is built: the CLI starts without it
    import foolbox as fb

Built = tuple["fb.attacks.Attack", float | None]  # the Foolbox attack and its ε (None: no cap)


@dataclass(frozen=True)
class FGSMConfig:
    """FGSM (Goodfellow et al.): one signed-gradient step of size ε under L∞, no random start."""

    epsilon: float = 0.3


@dataclass(frozen=True)
class DeepFoolConfig:
    """DeepFool L∞ (Foolbox LinfDeepFoolAttack): minimal perturbation, run without an ε cap.

    Each step linearises the logit differences to the `candidates` most likely classes, moves
    to the nearest linearised boundary, and the total step is scaled by 1 + `overshoot`; it stops
    per image once the label flips, after at most `steps` steps. Values are Foolbox's defaults.
    """

    steps: int = 50
    candidates: int = 10  # classes considered per step (the top-10 logits; all on MNIST)
    overshoot: float = 0.02
    loss: Literal["logits", "crossentropy"] = "logits"


@dataclass(frozen=True)
class CWConfig:
    """Carlini–Wagner L2 with a binary search over the constant c (L2CarliniWagnerAttack)."""

    binary_search_steps: int = 9
    steps: int = 1000  # Adam iterations per binary-search step
    stepsize: float = 0.01  # Adam learning rate in tanh space
    confidence: float = 0.0  # κ: required logit margin
    initial_const: float = 1e-3  # c₀
    abort_early: bool = True  # stop a search step once the loss stalls


CW_SETTINGS: dict[str, CWConfig] = {
    # As in Carlini & Wagner (2017): 9 binary-search steps × 1,000 iterations, lr 0.01.
    "reference": CWConfig(),
    # 5 × 100 with a 10× larger step: at stepsize 0.01, 100 steps barely move pixels at 0 or 1 and
    # 26 of 50 MNIST outputs stayed Foolbox's black placeholder; at 0.1 none did, all 50 succeeded.
    "fast": CWConfig(binary_search_steps=5, steps=100, stepsize=0.1),
    # High confidence (issue 15): the fast search asking for a logit margin κ = 20, so the
    # example lands far past the decision boundary instead of on it.
    "kappa20": CWConfig(binary_search_steps=5, steps=100, stepsize=0.1, confidence=20.0),
}


@dataclass(frozen=True)
class PGDConfig:
    """PGD L∞ (Madry et al.): `steps` signed-gradient steps of `rel_stepsize`·ε from a uniform
    random start, cross-entropy loss; `seed` fixes the random start (bit-exact regeneration)."""

    epsilon: float = 0.3
    steps: int = 40
    rel_stepsize: float = 0.01 / 0.3  # Madry's MNIST step 0.01 at ε = 0.3 (Foolbox's default)
    seed: int = 0


PGD_SETTINGS: dict[str, PGDConfig] = {"eps0.3": PGDConfig(), "eps0.1": PGDConfig(epsilon=0.1)}


def _fgsm(cfg: FGSMConfig) -> Built:
    import foolbox as fb

    return fb.attacks.LinfFastGradientAttack(random_start=False), cfg.epsilon


def _deepfool(cfg: DeepFoolConfig) -> Built:
    import foolbox as fb

    attack = fb.attacks.LinfDeepFoolAttack(
        steps=cfg.steps, candidates=cfg.candidates, overshoot=cfg.overshoot, loss=cfg.loss
    )
    return attack, None


def _cw(cfg: CWConfig) -> Built:
    import foolbox as fb

    return fb.attacks.L2CarliniWagnerAttack(**asdict(cfg)), None


def _pgd(cfg: PGDConfig) -> Built:
    import foolbox as fb

    attack = fb.attacks.LinfPGD(rel_stepsize=cfg.rel_stepsize, steps=cfg.steps, random_start=True)
    return attack, cfg.epsilon


@dataclass(frozen=True)
class AttackSpec:
    """A registry entry: the factory of the Foolbox attack, its norm and its named settings."""

    build: Callable[[Any], Built]
    norm: Literal["linf", "l2"]
    settings: dict[str, Any] = field(default_factory=dict)
    default_setting: str = "default"


ATTACKS: dict[str, AttackSpec] = {
    "fgsm": AttackSpec(_fgsm, "linf", {"default": FGSMConfig()}),
    "deepfool_linf": AttackSpec(_deepfool, "linf", {"default": DeepFoolConfig()}),
    "cw_l2": AttackSpec(_cw, "l2", dict(CW_SETTINGS), default_setting="fast"),
    "pgd_linf": AttackSpec(_pgd, "linf", dict(PGD_SETTINGS), default_setting="eps0.3"),
}
SETTING_NAMES = tuple(dict.fromkeys(s for spec in ATTACKS.values() for s in spec.settings))


def attack_spec(name: str) -> AttackSpec:
    """The registry entry of an attack, or InputError naming the known attacks."""
    if name not in ATTACKS:
        raise InputError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name]


def resolve_setting(name: str, setting: str | None = None) -> str:
    """The setting's name, with None or "default" meaning the attack's default setting."""
    spec = attack_spec(name)
    chosen = spec.default_setting if setting in (None, "default") else str(setting)
    if chosen not in spec.settings:
        raise InputError(f"{name} has settings {', '.join(spec.settings)}, not {setting!r}")
    return chosen


def attack_config(name: str, setting: str | None = None) -> Any:
    """The config dataclass of an attack at a named setting (None: its default)."""
    return attack_spec(name).settings[resolve_setting(name, setting)]


def _device(model: nn.Module) -> torch.device:
    return module_device(model)


def check_attack_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Validate images (N, C, H, W) in [0, 1] and labels (N,) within the model's classes."""
    check_images(x)
    with torch.no_grad():
        num_classes = model.eval()(x[:1].to(_device(model))).shape[1]
    return check_labels(y, len(x), num_classes)


def run_attack(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, config: Any = None
) -> torch.Tensor:
    """What Foolbox returns for inputs x and true labels y: (N, C, H, W) on the CPU, in [0, 1].

    `config` is the attack's config dataclass (None: its default setting). Judge the output with
    `judge`, not with Foolbox's success flag.
    """
    import foolbox as fb

    y = check_attack_inputs(model, x, y)
    spec = attack_spec(name)
    config = config if config is not None else attack_config(name)
    attack, epsilon = spec.build(config)
    device = _device(model)
    fmodel = fb.PyTorchModel(model.eval(), bounds=(0, 1), device=device)
    seed = getattr(config, "seed", None)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:  # Foolbox draws random starts from torch's global generator
            torch.manual_seed(seed)
        _, clipped, _ = attack(fmodel, x.to(device), y.to(device), epsilons=epsilon)
    return clipped.detach().cpu().clamp(0, 1)  # clamp keeps NaN, so degenerate() still sees it


def degenerate(x_adv: torch.Tensor) -> torch.Tensor:
    """Outputs that are not images of anything: non-finite, or constant (e.g. all black). (N,)"""
    flat = x_adv.flatten(1)
    finite = torch.isfinite(flat).all(1)
    spread = flat.nan_to_num(0).amax(1) - flat.nan_to_num(0).amin(1)
    return ~finite | (spread < 1e-3)


@torch.no_grad()  # not inference_mode: the labels may feed an attack's autograd graph
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The model's labels (N,) for x, batched, in eval mode."""
    device = _device(model)
    model.eval()
    return torch.cat(
        [
            model(x[i : i + batch_size].to(device)).argmax(1).cpu()
            for i in range(0, len(x), batch_size)
        ]
    )


def judge(
    model: nn.Module, x: torch.Tensor, x_attack: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept images, their labels, success and degenerate flags, decided by re-classification.

    A degenerate output (no adversarial found, e.g. CW's black placeholder) is replaced by the
    clean image, so the kept set holds only images of the inputs; it never counts as a success.
    """
    bad = degenerate(x_attack)  # (N,)
    kept = torch.where(bad.view(-1, *[1] * (x.dim() - 1)), x, x_attack)  # (N, C, H, W)
    y_adv = predict(model, kept)
    return kept, y_adv, (y_adv != y) & ~bad, bad
