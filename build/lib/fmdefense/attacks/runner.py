"""Run an attack over a set of images in resumable chunks and store the adversarial set.

An artifact folder holds config.json (kind "adversarial_set": attack, setting, full parameters,
source, library versions), adversarial.safetensors (float32 images and per-image records; float32
so that no rounding can undo a perturbation) and metrics.json. Every attacked image is kept,
successful or not; `chunks/` holds one safetensors file per finished chunk and a manifest, so a
killed run continues where it stopped and a re-run says which chunks it reused.
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

from fmdefense.attacks.library import (
    attack_config,
    attack_spec,
    check_attack_inputs,
    degenerate,
    judge,
    predict,
    resolve_setting,
    run_attack,
)
from fmdefense.core.artifacts import (
    CONFIG_FILE,
    FORMAT_VERSION,
    METRICS_FILE,
    WEIGHTS_FILE,
    load_tensors,
    read_config,
    read_metrics,
    save_tensors,
    write_json,
)
from fmdefense.core.chunks import chunked
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.core.provenance import provenance

log = logging.getLogger(__name__)
KIND = "adversarial_set"
TENSORS_FILE = "adversarial.safetensors"
RECORDS = ("x_adv", "indices", "y_true", "y_clean", "y_adv", "success", "l2", "linf")


@dataclass(frozen=True)
class AdversarialSet:
    """Adversarial images and their per-image records (all tensors over the same N inputs)."""

    x_adv: torch.Tensor  # (N, C, H, W) float32 in [0, 1]; the clean image where degenerate
    indices: torch.Tensor  # (N,) positions in the attacked split (CLE)
    y_true: torch.Tensor  # (N,)
    y_clean: torch.Tensor  # (N,) classifier's label of the clean image
    y_adv: torch.Tensor  # (N,) classifier's label of the stored adversarial image
    success: torch.Tensor  # (N,) bool: y_adv ≠ y_true and the attack's output not degenerate
    l2: torch.Tensor  # (N,) ‖x_adv − x‖₂
    linf: torch.Tensor  # (N,) ‖x_adv − x‖∞
    degenerate: torch.Tensor  # (N,) bool: the attack returned a constant or non-finite image
    config: dict[str, Any]
    metrics: dict[str, Any]


def _mean_median(v: torch.Tensor) -> tuple[float, float]:
    return (float(v.mean()), float(v.median())) if len(v) else (float("nan"), float("nan"))


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
    mean_l2, median_l2 = _mean_median(l2)
    mean_linf, median_linf = _mean_median(linf)
    return {
        "images": n,
        "success_rate": float(s.mean()),
        "success_rate_on_correct": float(s[ok].mean()) if bool(ok.any()) else float("nan"),
        "clean_accuracy": float(ok.float().mean()),
        "accuracy_on_adv": float((y_adv == y_true).float().mean()),
        "mean_l2": mean_l2,
        "median_l2": median_l2,
        "mean_linf": mean_linf,
        "median_linf": median_linf,
        "mean_l2_successful": _mean_median(l2[success])[0],
        "mean_linf_successful": _mean_median(linf[success])[0],
        "seconds_per_image": seconds / max(n, 1),
    }


def attack_set(
    name: str,
    setting: str | None,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    out_dir: Path,
    *,
    batch_size: int = 256,
    source: dict[str, Any] | None = None,
) -> AdversarialSet:
    """Attack every image of x in chunks of `batch_size` and save the set to `out_dir`.

    Finished chunks survive a kill and are reused by a re-run with the same attack, setting,
    source and batch size. `source` (dataset, split, classifier, ...) is recorded in the config.
    """
    setting = resolve_setting(name, setting)
    y = check_attack_inputs(model, x, y)
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size}")
    cfg = attack_config(name, setting)
    config = {  # also the chunks' resume key: keep these fields stable
        "attack": name,
        "setting": setting,
        "norm": attack_spec(name).norm,
        "params": dataclasses.asdict(cfg),
        **(source or {}),
    }

    def compute(start: int, stop: int) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        adv = run_attack(name, model, x[start:stop], y[start:stop], config=cfg)
        return {"x_adv": adv, "seconds": torch.tensor([time.perf_counter() - t0])}

    out = chunked(
        len(x), batch_size, out_dir / "chunks", compute, config=config, desc=f"{name} ({setting})"
    )
    tensors, metrics = _assemble(model, x, y, out["x_adv"], float(out["seconds"].sum()))
    _save(Path(out_dir), {**config, "provenance": provenance()}, tensors, metrics)
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


def _assemble(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_attack: torch.Tensor, seconds: float
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-image records of the attack's outputs, judged by re-classification, and metrics."""
    x_adv, y_adv, success, bad = judge(model, x, x_attack, y)
    y_clean = predict(model, x)
    delta = (x_adv - x).flatten(1)  # (N, C·H·W)
    l2, linf = delta.norm(dim=1), delta.abs().amax(1)
    tensors = {
        "x_adv": x_adv.float(),
        "indices": torch.arange(len(x)),
        "y_true": y,
        "y_clean": y_clean,
        "y_adv": y_adv,
        "success": success,
        "l2": l2,
        "linf": linf,
        "degenerate": bad,
    }
    metrics = summarize(y, y_clean, y_adv, success, l2, linf, seconds)
    metrics["degenerate_outputs"] = int(bad.sum())
    return tensors, metrics


def _save(
    folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], metrics: dict[str, Any]
) -> None:
    """Tensors, then metrics, then config.json last, each atomically: a config implies the rest."""
    save_tensors(folder / TENSORS_FILE, tensors)
    write_json(folder / METRICS_FILE, {**metrics, **provenance()})
    write_json(
        folder / CONFIG_FILE, {"kind": KIND, "format_version": FORMAT_VERSION, "config": config}
    )


def load_adversarial_set(folder: Path) -> AdversarialSet:
    """Read an adversarial-set artifact (safetensors and JSON, no pickle)."""
    folder = Path(folder)
    config = read_config(folder, KIND)
    path = folder / TENSORS_FILE
    legacy = folder / WEIGHTS_FILE  # sets written before the file was renamed
    t = load_tensors(path if path.is_file() or not legacy.is_file() else legacy)
    missing = set(RECORDS) - set(t)
    if missing:
        raise ArtifactError(f"{folder} lacks {sorted(missing)}; re-run the attack")
    bad = t["degenerate"].bool() if "degenerate" in t else degenerate(t["x_adv"])
    return AdversarialSet(
        x_adv=t["x_adv"],
        indices=t["indices"].long(),
        y_true=t["y_true"].long(),
        y_clean=t["y_clean"].long(),
        y_adv=t["y_adv"].long(),
        success=t["success"].bool(),
        l2=t["l2"],
        linf=t["linf"],
        degenerate=bad,
        config=config,
        metrics=read_metrics(folder),
    )
