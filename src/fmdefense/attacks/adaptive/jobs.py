"""Loading what an adaptive sweep attacks: a saved defense with its models, the CLE inputs,
and the digest that ties every result file to the defense artifact it was computed on."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from fmdefense.core.artifacts import CONFIG_FILE, WEIGHTS_FILE
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.core.paths import classifier_dir, vae_dir
from fmdefense.defenses.base import Defense
from fmdefense.defenses.registry import DEFENSES

# Default artifact folder of each defense under runs/<dataset>/
DEFAULT_DIRS = {
    "default": "default/defense",
    "ensemble": "ensemble",
    "fm": "defense",
    "magnet": "magnet",
    "defensegan": "defense_gan",
    "fbgan": "fbgan",
}
# Models a defense needs beside the classifier (the others hold theirs in their artifact)
NEEDS_VAE = ("fm", "recon", "default")


def default_out(dataset: str, defense: str) -> Path:
    """runs/<dataset>/adaptive/<defense>."""
    return Path("runs") / dataset / "adaptive" / defense


def default_defense_dir(dataset: str, defense: str) -> Path:
    """runs/<dataset>/<the defense's folder> (`DEFAULT_DIRS`)."""
    return Path("runs") / dataset / DEFAULT_DIRS.get(defense, defense)


def artifact_digest(folder: Path) -> str:
    """SHA-256 of an artifact's config.json and model.safetensors (identifies a defense)."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = Path(folder) / name
        if not path.is_file():
            raise ArtifactError(f"{folder} is not an artifact folder: missing {name}")
        h.update(name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def load_target(
    defense: str,
    folder: Path,
    dataset: str,
    device: torch.device,
    classifier: Path | None = None,
    vae: Path | None = None,
) -> Defense:
    """The fitted defense (registry name `defense`) saved in `folder`, around the dataset's
    classifier (and combo-VAE, for the defenses built on it), on `device`."""
    from fmdefense.models.classifiers import Classifier
    from fmdefense.models.combo_vae import ComboVAE

    if defense not in DEFENSES:
        raise InputError(f"unknown defense {defense!r}; choose one of {', '.join(DEFENSES)}")
    clf = Classifier.load(classifier_dir(dataset, classifier), device).eval()
    models: dict[str, Any] = {}
    if defense in NEEDS_VAE:
        models["vae"] = ComboVAE.load(vae_dir(dataset, vae), device).eval()
    return DEFENSES[defense].load(folder, clf, **models)


def load_inputs(
    dataset: str, limit: int | None, data_dir: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` CLE images and labels (all when None)."""
    from fmdefense.data import load_raw, split_tensors

    x, y = split_tensors(load_raw(dataset, data_dir=data_dir), "cle")
    return x[:limit], y[:limit]
