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
from tqdm.auto import tqdm

from fmdefense.core.artifacts import RESUME_FILE, load_resume_state, save_resume_state
from fmdefense.models.classifiers import Classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of a classifier run (all recorded in the artifact)."""

    epochs: int = 12
    batch_size: int = 128
    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    shift: int = 2  # random translation in pixels (augmentation); 0 disables
    hflip: bool = False
    seed: int = 0


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
    """Share of `x` whose predicted label equals `y`."""
    return float((model.predict(x, batch_size) == y).float().mean())


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
    torch.manual_seed(cfg.seed)
    model.to(device)
    x_train, y_train = train
    opt = _make_optimizer(model, cfg)
    steps_per_epoch = (len(x_train) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    start = 0
    state = load_resume_state(out_dir)
    if state is not None and state.get("train_config") == asdict(cfg):
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, start = list(state["history"]), int(state["epoch"])
        log.info("resuming from epoch %d of %d (%s)", start, cfg.epochs, out_dir / RESUME_FILE)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(
            _batches(len(x_train), cfg.batch_size, gen),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=None,
        )
        for idx in bar:
            xb = augment(x_train[idx], cfg.shift, cfg.hflip, gen).to(device)
            yb = y_train[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss_sum / total:.4f}", acc=f"{correct / total:.4f}")
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / total,
            "train_acc": correct / total,
            "val_acc": accuracy(model, *val),
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        log.info(
            "epoch %d: loss %.4f train %.4f val %.4f (%.0f s)",
            row["epoch"],
            row["train_loss"],
            row["train_acc"],
            row["val_acc"],
            row["seconds"],
        )
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
    return {"history": history, "train_config": asdict(cfg)}
