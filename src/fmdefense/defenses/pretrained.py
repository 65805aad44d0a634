"""The calibrated default defense of a dataset, from the artifacts shipped under weights/."""

from __future__ import annotations

import torch

from fmdefense.core.device import resolve_device
from fmdefense.core.errors import InputError
from fmdefense.core.paths import model_dir
from fmdefense.defenses.default import DefaultDefense
from fmdefense.defenses.jobs import load_models

PRETRAINED = ("mnist", "fmnist", "orl")


def pretrained(dataset: str = "mnist", *, device: str | torch.device = "auto") -> DefaultDefense:
    """The shipped classifier, combo-VAE and calibrated default defense of `dataset`: call
    `decide`/`detect`/`predict` on float tensors (n, C, H, W) in [0, 1]; `.classifier` is the
    protected classifier."""
    if dataset not in PRETRAINED:
        raise InputError(f"no pretrained default for {dataset!r}; choose one of {PRETRAINED}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    clf, vae = load_models(dataset, dev)
    defense = DefaultDefense.load(model_dir(dataset, "default"), clf, vae)
    if defense.autoencoders is not None:
        for ae in defense.autoencoders:
            ae.to(dev)
    return defense
