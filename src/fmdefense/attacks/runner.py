"""Run an attack over a dataset's CLE split in resumable chunks and store the adversarial set.

An artifact folder holds config.json (kind "adversarial_set": attack, setting, full parameters,
dataset, library versions), model.safetensors (adversarial images in float32 and per-image
records) and metrics.json. Every attacked image is kept, successful or not.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.attacks.library import NORMS, attack_config, degenerate, predict, run_attack
from fmdefense.chunks import chunked
from fmdefense.errors import ArtifactError
from fmdefense.training.checkpoint import load_tensors, read_config, read_metrics, save_artifact
from fmdefense.training.jobs import provenance

log = logging.getLogger(__name__)
KIND = "adversarial_set"


@dataclass(frozen=True)
class AdversarialSet:
    """Adversarial images and their per-image records (all tensors over the same n inputs)."""

    x_adv: torch.Tensor  # (n, C, H, W) float32 in [0, 1]
    indices: torch.Tensor  # (n,) positions in the CLE split
    y_true: torch.Tensor  # (n,)
    y_clean: torch.Tensor  # (n,) classifier's label of the clean image
    y_adv: torch.Tensor  # (n,) classifier's label of the adversarial image
    success: torch.Tensor  # (n,) bool: y_adv ≠ y_true and output not degenerate
    l2: torch.Tensor  # (n,)
    linf: torch.Tensor  # (n,)
    config: dict[str, Any]
    metrics: dict[str, Any]


def summarize(
    y_true: torch.Tensor,
    y_clean: torch.Tensor,
    y_adv: torch.Tensor,
    success: torch.Tensor,
    l2: torch.Tensor,
    linf: torch.Tensor,
    seconds: float,
) -> dict[str, Any]:
    """Success rates (all / on correctly classified clean images), accuracy on ADV, norms."""
    n = len(y_true)
    ok = y_clean == y_true
    s = success.float()
    return {
        "images": n,
        "success_rate": float(s.mean()),
        "success_rate_on_correct": float(s[ok].mean()) if bool(ok.any()) else float("nan"),
        "clean_accuracy": float(ok.float().mean()),
        "accuracy_on_adv": float((y_adv == y_true).float().mean()),
        "mean_l2": float(l2.mean()),
        "median_l2": float(l2.median()),
        "mean_linf": float(linf.mean()),
        "median_linf": float(linf.median()),
        "seconds_per_image": seconds / max(n, 1),
    }


def attack_set(
    name: str,
    setting: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    out_dir: Path,
    *,
    batch_size: int = 256,
    source: dict[str, Any] | None = None,
) -> AdversarialSet:
    """Attack every image of x in chunks of `batch_size` (finished chunks survive a kill)."""
    cfg = attack_config(name, setting)
    config = {
        "attack": name,
        "setting": setting,
        "norm": NORMS[name],
        "params": dataclasses.asdict(cfg),
        **(source or {}),
    }

    def compute(start: int, stop: int) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        adv = run_attack(name, model, x[start:stop], y[start:stop], cfg)
        return {"x_adv": adv, "seconds": torch.tensor([time.perf_counter() - t0])}

    out = chunked(
        len(x), batch_size, out_dir / "chunks", compute, config=config, desc=f"{name} ({setting})"
    )
    x_adv = out["x_adv"]
    y_clean, y_adv = predict(model, x), predict(model, x_adv)
    delta = (x_adv - x).flatten(1)
    l2, linf = delta.norm(dim=1), delta.abs().amax(1)
    success = (y_adv != y) & ~degenerate(x_adv)
    seconds = float(out["seconds"].sum())
    tensors = {
        "x_adv": x_adv,
        "indices": torch.arange(len(x)),
        "y_true": y,
        "y_clean": y_clean,
        "y_adv": y_adv,
        "success": success,
        "l2": l2,
        "linf": linf,
    }
    metrics = summarize(y, y_clean, y_adv, success, l2, linf, seconds)
    metrics["degenerate_outputs"] = int(degenerate(x_adv).sum())
    save_artifact(
        out_dir, kind=KIND, config=config, tensors=tensors, metrics={**metrics, **provenance()}
    )
    log.info(
        "%s %s: success %.4f, accuracy on ADV %.4f, %.3f s/image -> %s",
        name,
        setting,
        metrics["success_rate"],
        metrics["accuracy_on_adv"],
        metrics["seconds_per_image"],
        out_dir,
    )
    return load_adversarial_set(out_dir)


def load_adversarial_set(folder: Path) -> AdversarialSet:
    """Read an adversarial-set artifact (no pickle)."""
    config = read_config(folder, KIND)
    t = load_tensors(Path(folder) / "model.safetensors")
    missing = {"x_adv", "indices", "y_true", "y_clean", "y_adv", "success", "l2", "linf"} - set(t)
    if missing:
        raise ArtifactError(f"{folder} lacks {sorted(missing)}; re-run the attack")
    return AdversarialSet(
        t["x_adv"],
        t["indices"].long(),
        t["y_true"].long(),
        t["y_clean"].long(),
        t["y_adv"].long(),
        t["success"].bool(),
        t["l2"],
        t["linf"],
        config,
        read_metrics(folder),
    )
