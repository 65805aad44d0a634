"""Defense jobs behind the CLI: calibrate on VAL, defend a set of inputs, both resumable."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from fmdefense.core.artifacts import read_config, save_artifact
from fmdefense.core.paths import classifier_dir, vae_dir
from fmdefense.core.provenance import provenance
from fmdefense.data import load_raw, split_tensors
from fmdefense.defenses.base import ACTIONS
from fmdefense.defenses.fm.config import FMDefenseConfig
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.rule import accuracy, defended_accuracy
from fmdefense.models.classifiers import Classifier

log = logging.getLogger(__name__)
DECISIONS_KIND = "decisions"


def load_models(
    dataset: str, device: torch.device, classifier: Path | None = None, vae: Path | None = None
) -> tuple[Classifier, Any]:
    """The protected classifier and the combo-VAE of a dataset, in eval mode on `device`."""
    from fmdefense.models.combo_vae import ComboVAE

    clf = Classifier.load(classifier_dir(dataset, classifier), device)
    model = ComboVAE.load(vae_dir(dataset, vae), device)
    return clf, model.eval()


def run_calibrate(
    dataset: str,
    out_dir: Path,
    device: torch.device,
    config: FMDefenseConfig,
    *,
    val_limit: int | None = None,
    classifier: Path | None = None,
    vae: Path | None = None,
    data_dir: Path | None = None,
) -> FMDefense:
    """Fit FM-Defense on the clean VAL split and save it; VAL morphs are cached in chunks."""
    clf, model = load_models(dataset, device, classifier, vae)
    x_val, y_val = split_tensors(load_raw(dataset, data_dir=data_dir), "val")
    if val_limit is not None:
        x_val, y_val = x_val[:val_limit], y_val[:val_limit]
    t0 = time.perf_counter()
    defense = FMDefense(clf, model, config).fit(x_val, y_val, cache_dir=out_dir / "cache-val")
    defense.save(out_dir)
    log.info(
        "calibrated on %d VAL images in %.0f s -> %s", len(x_val), time.perf_counter() - t0, out_dir
    )
    return defense


def load_defense(
    folder: Path,
    dataset: str,
    device: torch.device,
    classifier: Path | None = None,
    vae: Path | None = None,
) -> FMDefense:
    """A saved calibration with its dataset's models."""
    clf, model = load_models(dataset, device, classifier, vae)
    return FMDefense.load(folder, clf, model)


def summarize(labels: torch.Tensor, action: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
    """Counts per action and accuracies with and without the Table II convention."""
    n = len(truth)
    return {
        "inputs": n,
        **{f"{name}_share": float((action == k).sum()) / n for k, name in enumerate(ACTIONS)},
        "accuracy": accuracy(labels, truth),
        "defended_accuracy": defended_accuracy(labels, truth),
    }


def run_defend(
    defense: FMDefense,
    x: torch.Tensor,
    truth: torch.Tensor,
    out_dir: Path,
    source: dict[str, Any],
) -> dict[str, Any]:
    """Decide on every input (resumable via chunks in out_dir) and save the decisions."""
    t0 = time.perf_counter()
    dec = defense.decide(x, cache_dir=out_dir / "cache")
    seconds = time.perf_counter() - t0
    metrics = {
        **summarize(dec.label, dec.action, truth),
        "undefended_accuracy": accuracy(dec.input_label, truth),
        "seconds_per_input": seconds / max(len(x), 1),
        "source": source,
        **provenance(),
    }
    tensors = {
        "resistance": dec.details["resistance"],
        "distance": dec.details["distance"],
        "action": dec.action,
        "label": dec.label,
        "input_label": dec.input_label,
        "truth": truth,
    }
    config = {"defense": dataclasses.asdict(defense.config), "source": source}
    save_artifact(out_dir, kind=DECISIONS_KIND, config=config, tensors=tensors, metrics=metrics)
    return metrics


def check_decisions(folder: Path) -> dict[str, Any]:
    """Config of a decisions artifact (raises ArtifactError when it is not one)."""
    return read_config(folder, DECISIONS_KIND)
