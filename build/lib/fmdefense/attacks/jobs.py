"""The `attack` job: a dataset's adversarial set from its CLE split (resumable chunks)."""

from __future__ import annotations

from pathlib import Path

import torch

from fmdefense.attacks.library import resolve_setting
from fmdefense.attacks.runner import AdversarialSet, attack_set
from fmdefense.core.errors import InputError
from fmdefense.core.paths import classifier_dir


def default_out(dataset: str, attack: str, setting: str) -> Path:
    """runs/<dataset>/attacks/<attack>[-<setting>] (no suffix for a "default" setting)."""
    name = attack if setting == "default" else f"{attack}-{setting}"
    return Path("runs") / dataset / "attacks" / name


def run_attack_job(
    dataset: str,
    attack: str,
    setting: str | None,
    device: torch.device,
    *,
    limit: int | None = None,
    batch_size: int = 256,
    out: Path | None = None,
    classifier: Path | None = None,
    data_dir: Path | None = None,
) -> tuple[AdversarialSet, Path]:
    """Attack the first `limit` CLE images (all when None) of a dataset's classifier; the
    saved set and its folder (default `default_out`)."""
    from fmdefense.data import load_raw, split_tensors
    from fmdefense.models.classifiers import Classifier

    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive number of images, got {limit}")
    resolved = resolve_setting(attack, setting)
    out = out or default_out(dataset, attack, resolved)
    folder = classifier_dir(dataset, classifier)
    model = Classifier.load(folder, device)
    x, y = split_tensors(load_raw(dataset, data_dir=data_dir), "cle")
    x, y = x[:limit], y[:limit]  # a None limit keeps all
    source = {"dataset": dataset, "split": "cle", "limit": limit, "classifier": str(folder)}
    adv = attack_set(attack, resolved, model, x, y, out, batch_size=batch_size, source=source)
    return adv, out
