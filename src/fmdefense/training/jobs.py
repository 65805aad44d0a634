"""End-to-end jobs behind the CLI: train a dataset's classifier, measure shipped weights."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fmdefense.core.artifacts import RESUME_FILE
from fmdefense.core.config import replace_fields
from fmdefense.core.errors import InputError
from fmdefense.core.paths import classifier_dir
from fmdefense.core.provenance import provenance
from fmdefense.data import load_raw, split_tensors
from fmdefense.models.classifiers import Classifier, build_classifier
from fmdefense.training.adversarial import pgd_check
from fmdefense.training.loops import TRAIN_CONFIGS, accuracy, train_classifier

log = logging.getLogger(__name__)


TEST_PGD_CHECK = (1_000, 20)  # test images and PGD steps of an adversarial run's quick check


def run_train_classifier(
    dataset: str,
    out_dir: Path,
    device: torch.device,
    *,
    overrides: Mapping[str, Any] | None = None,
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """Train the dataset's classifier on its training split and save the artifact.

    `overrides` replace fields of the dataset's `TrainConfig` (None values are ignored). An
    adversarially trained classifier's metrics also hold `test_pgd`: accuracy on the first test
    images under one random-start PGD at its ε (a quick upper bound, not the adaptive evaluation).
    """
    if dataset not in TRAIN_CONFIGS:
        known = ", ".join(TRAIN_CONFIGS)
        raise InputError(f"no classifier training settings for {dataset!r}; known: {known}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = replace_fields(TRAIN_CONFIGS[dataset], given, "classifier training config")
    model = build_classifier(dataset)  # before the data: a bad request fails at once
    ds = load_raw(dataset, data_dir=data_dir)
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
    if cfg.perturbation is not None:
        n, steps = TEST_PGD_CHECK
        metrics["test_pgd"] = pgd_check(
            model, x_test[:n], y_test[:n], cfg.adv_eps, steps, seed=cfg.seed
        )
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
