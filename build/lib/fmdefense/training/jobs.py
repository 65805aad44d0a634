"""End-to-end jobs behind the CLI: train a dataset's classifier, measure shipped weights."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from fmdefense.core.artifacts import RESUME_FILE
from fmdefense.core.paths import classifier_dir
from fmdefense.core.provenance import provenance
from fmdefense.data import load_raw, split_tensors
from fmdefense.models.classifiers import Classifier, build_classifier
from fmdefense.training.loops import TRAIN_CONFIGS, accuracy, train_classifier

log = logging.getLogger(__name__)


def run_train_classifier(
    dataset: str,
    out_dir: Path,
    device: torch.device,
    *,
    epochs: int | None = None,
    seed: int | None = None,
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """Train the dataset's classifier on its training split and save the artifact."""
    ds = load_raw(dataset, data_dir=data_dir)
    cfg = TRAIN_CONFIGS[dataset]
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    model = build_classifier(dataset)
    train = split_tensors(ds, "classifier_train")
    t0 = time.perf_counter()
    result = train_classifier(model, train, split_tensors(ds, "val"), cfg, out_dir, device)
    x_test, y_test = split_tensors(ds, "test")
    metrics = {
        "dataset": dataset,
        "test_accuracy": accuracy(model, x_test, y_test),
        "test_images": len(y_test),
        "train_images": len(train[1]),
        "train_seconds": time.perf_counter() - t0,
        **result,
        **provenance(),
    }
    model.cpu().save(out_dir, metrics)
    (Path(out_dir) / RESUME_FILE).unlink(missing_ok=True)
    log.info("%s classifier: test accuracy %.4f -> %s", dataset, metrics["test_accuracy"], out_dir)
    return metrics


def measure_classifier(
    dataset: str, weights: Path | None, device: torch.device, data_dir: Path | None = None
) -> dict[str, Any]:
    """Test accuracy of a classifier artifact on the dataset's full test part."""
    folder = classifier_dir(dataset, weights)
    model = Classifier.load(folder, device)
    x, y = split_tensors(load_raw(dataset, data_dir=data_dir), "test")
    return {
        "dataset": dataset,
        "weights": str(folder),
        "test_images": len(y),
        "test_accuracy": accuracy(model, x, y),
    }
