"""Training loop for the target classifiers: seeded, resumable per epoch, with progress bars."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fmdefense.core.artifacts import RESUME_FILE, load_resume_state, save_resume_state
from fmdefense.core.config import (
    check_bool,
    check_choice,
    check_int,
    check_range,
    dataclass_kwargs,
)
from fmdefense.core.errors import InputError
from fmdefense.core.progress import progress
from fmdefense.core.validation import check_images
from fmdefense.models.classifiers import Classifier
from fmdefense.training.adversarial import Perturbation, perturb, pgd, pgd_check

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of a classifier run (all recorded in the artifact).

    With `adversarial` other than "none" every batch is replaced by its perturbation before the
    update (adversarial training, see `fmdefense.training.adversarial`): "fgsm_rs" is Wong et al.'s
    FGSM with a random start (one step, α = 1.25 ε unless `adv_step` is given), "pgd" is Madry et
    al.'s PGD-k with k = `adv_steps` (α = 2.5 ε / k unless given). ε = `adv_eps` on [0, 1] images.
    """

    epochs: int = 12
    batch_size: int = 128
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    shift: int = 2  # random translation in pixels (augmentation); 0 disables
    hflip: bool = False
    seed: int = 0
    adversarial: str = "none"  # none | fgsm_rs | pgd
    adv_eps: float = 0.3  # L∞ radius of the training perturbation
    adv_step: float | None = None  # None: 1.25 ε (fgsm_rs) or 2.5 ε / adv_steps (pgd)
    adv_steps: int = 1  # gradient steps per batch; fgsm_rs takes exactly one

    def __post_init__(self) -> None:
        """Every field checked: a bad value fails here, naming the field and what is allowed."""
        check_int("epochs", self.epochs, low=1, high=100_000)
        check_int("batch_size", self.batch_size, low=1, high=1_000_000)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_range("lr", self.lr, 0.0, 10.0, low_open=True)
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        check_int("shift", self.shift, low=0, high=64)
        check_bool("hflip", self.hflip)
        check_int("seed", self.seed, low=0, high=2**63 - 1)
        self._check_adversarial()

    def _check_adversarial(self) -> None:
        check_choice("adversarial", self.adversarial, ADVERSARIAL)
        check_range("adv_eps", self.adv_eps, 0.0, 1.0, low_open=True)
        if self.adv_step is not None:  # a step beyond 1 moves nothing further on [0, 1] images
            check_range("adv_step", self.adv_step, 0.0, 1.0, low_open=True)
        check_int("adv_steps", self.adv_steps, low=1, high=1_000)
        if self.adversarial == "fgsm_rs" and self.adv_steps != 1:
            raise InputError(
                f"adv_steps must be 1 with adversarial='fgsm_rs' (one FGSM step), got "
                f"{self.adv_steps}; use adversarial='pgd' for more steps"
            )

    @property
    def perturbation(self) -> Perturbation | None:
        """The resolved training perturbation (None without adversarial training)."""
        if self.adversarial == "none":
            return None
        if self.adv_step is not None:
            return Perturbation(self.adv_eps, self.adv_step, self.adv_steps)
        if self.adversarial == "fgsm_rs":
            return Perturbation(self.adv_eps, 1.25 * self.adv_eps, 1)
        return pgd(self.adv_eps, self.adv_steps)

    @classmethod
    def from_dict(cls, raw: object, what: str = "classifier training config") -> TrainConfig:
        """Rebuild a recorded config; keys added since it was written take their defaults (a
        config from before adversarial training reads as adversarial="none")."""
        return cls(**dataclass_kwargs(cls, raw, what))


OPTIMIZERS = ("adam", "sgd")
ADVERSARIAL = ("none", "fgsm_rs", "pgd")
CLEAN_CHECK = 10_000  # training images whose clean accuracy an adversarial run logs per epoch
PGD_CHECK = (1_000, 10)  # VAL images and PGD steps of the per-epoch robustness check


TRAIN_CONFIGS: dict[str, TrainConfig] = {
    "mnist": TrainConfig(epochs=12, optimizer="adam", lr=1e-3, shift=2),
    "fmnist": TrainConfig(
        epochs=15, optimizer="sgd", lr=0.1, weight_decay=5e-4, shift=2, hflip=True
    ),
    "orl": TrainConfig(
        epochs=80, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=5e-4, shift=4, hflip=True
    ),
    "celeba": TrainConfig(
        epochs=30, optimizer="adam", lr=1e-3, weight_decay=5e-4, shift=4, hflip=True
    ),
}


def augment(x: torch.Tensor, shift: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random integer translation (zero fill) and optional horizontal flip, per sample."""
    check_int("shift", shift, low=0, high=64)
    if shift > 0:
        n, _, h, w = x.shape
        padded = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen).tolist()
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if hflip:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.inference_mode()
def accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Share of `x` whose predicted label equals `y` (labels checked against the classifier)."""
    y = model.check_labels(y, len(x) if isinstance(x, torch.Tensor) else 0)
    return float((model.predict(x, batch_size) == y).float().mean())


def _checked(model: Classifier, data: object, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An (images, labels) pair checked for shape, dtype and range against the classifier."""
    if not isinstance(data, tuple | list) or len(data) != 2:
        raise InputError(f"{name} must be a pair (images, labels), got {type(data).__name__}")
    c = model.cfg
    x = check_images(data[0], channels=c.in_channels, size=c.image_size, name=f"{name} images")
    return x, model.check_labels(data[1], len(x), f"{name} labels")


def _resumable(saved: object, cfg: TrainConfig) -> bool:
    """A resume state's recorded config is `cfg` (one written before a field existed counts as
    that field's default)."""
    try:
        return TrainConfig.from_dict(saved) == cfg
    except InputError:
        return False


def _step(
    model: Classifier,
    xb: torch.Tensor,
    yb: torch.Tensor,
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One update on the batch (its perturbation when adversarial); its loss and logits."""
    p = cfg.perturbation
    if p is not None:
        xb = perturb(model, xb, yb, p, gen)  # train mode, as Wong et al.
    logits = model(xb)
    loss = F.cross_entropy(logits, yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, logits


def _epoch(
    model: Classifier,
    train: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator,
    desc: str,
) -> tuple[float, float]:
    """One pass over `train` in train mode; mean loss and accuracy of the batches trained on."""
    x_train, y_train = train
    device = next(model.parameters()).device
    model.train()
    total, correct, loss_sum = 0, 0, 0.0
    bar = progress(
        _batches(len(x_train), cfg.batch_size, gen),
        total=(len(x_train) + cfg.batch_size - 1) // cfg.batch_size,
        desc=desc,
        unit="batch",
        leave=False,
    )
    for idx in bar:
        xb = augment(x_train[idx], cfg.shift, cfg.hflip, gen).to(device)
        yb = y_train[idx].to(device)
        loss, logits = _step(model, xb, yb, cfg, opt, gen)
        sched.step()
        total += len(idx)
        correct += int((logits.argmax(1) == yb).sum())
        loss_sum += loss.item() * len(idx)
        bar.set_postfix(loss=f"{loss_sum / total:.4f}", acc=f"{correct / total:.4f}")
    return loss_sum / total, correct / total


def _epoch_row(
    model: Classifier,
    epoch: int,
    fit: tuple[float, float],
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
) -> dict[str, float]:
    """The history row. An adversarial run's loss and accuracy are those of the perturbed batches;
    it adds clean accuracy on the first `CLEAN_CHECK` (unaugmented) training images and accuracy on
    the first VAL images under a random-start PGD (`PGD_CHECK`), both in eval mode: a collapse of
    the latter while training accuracy holds is catastrophic overfitting (Wong et al. 2020)."""
    if cfg.perturbation is None:
        return {
            "epoch": epoch,
            "train_loss": fit[0],
            "train_acc": fit[1],
            "val_acc": accuracy(model, *val),
        }
    n, steps = PGD_CHECK
    robust = pgd_check(model, val[0][:n], val[1][:n], cfg.adv_eps, steps, seed=cfg.seed)
    return {
        "epoch": epoch,
        "train_adv_loss": fit[0],
        "train_adv_acc": fit[1],
        "train_clean_acc": accuracy(model, train[0][:CLEAN_CHECK], train[1][:CLEAN_CHECK]),
        "val_acc": accuracy(model, *val),
        "val_pgd_acc": robust["accuracy"],
    }


def _warn_overfitting(history: list[dict[str, float]]) -> None:
    """Log a warning when PGD accuracy on VAL fell by more than 0.2 below its best epoch."""
    robust = [r["val_pgd_acc"] for r in history if "val_pgd_acc" in r]
    if robust and robust[-1] < max(robust) - 0.2:
        log.warning(
            "PGD accuracy on VAL fell from %.3f to %.3f: catastrophic overfitting? (Wong et al. "
            "2020); try fewer epochs, a smaller --adv-step or --adversarial pgd",
            max(robust),
            robust[-1],
        )


def train_classifier(
    model: Classifier,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    out_dir: Path,
    device: torch.device,
) -> dict[str, Any]:
    """Train `model` in place; save resume state every epoch; return per-epoch history.

    A run that finds `resume.safetensors` in `out_dir` continues from its last finished epoch.
    """
    if not isinstance(cfg, TrainConfig):
        raise InputError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    train = _checked(model, train, "train")
    val = _checked(model, val, "val")
    torch.manual_seed(cfg.seed)
    model.to(device)
    opt = _make_optimizer(model, cfg)
    steps_per_epoch = (len(train[0]) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    start = 0
    state = load_resume_state(out_dir)
    if state is not None and _resumable(state.get("train_config"), cfg):
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, start = list(state["history"]), int(state["epoch"])
        log.info("resuming from epoch %d of %d (%s)", start, cfg.epochs, out_dir / RESUME_FILE)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        fit = _epoch(model, train, cfg, opt, sched, gen, f"epoch {epoch + 1}/{cfg.epochs}")
        row = _epoch_row(model, epoch + 1, fit, train, val, cfg)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        log.info(
            "epoch %d: %s",
            row["epoch"],
            ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"),
        )
        _warn_overfitting(history)
        save_resume_state(
            out_dir,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": history,
                "epoch": epoch + 1,
                "train_config": asdict(cfg),
            },
        )
    model.eval()
    result: dict[str, Any] = {"history": history, "train_config": asdict(cfg)}
    if cfg.perturbation is not None:
        result["perturbation"] = asdict(cfg.perturbation)
    return result
