"""Defense jobs behind the CLI: calibrate on VAL, defend a set of inputs or your own images.

Calibrations and decision sets are resumable where the defense caches work (FM-Defense's morph
chunks); the models come from the shipped weights unless given.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.core.artifacts import read_config, save_artifact
from fmdefense.core.errors import InputError
from fmdefense.core.paths import classifier_dir, vae_dir
from fmdefense.core.provenance import provenance
from fmdefense.data import load_raw, split_tensors
from fmdefense.data.user import UserImages
from fmdefense.defenses.base import ACTIONS, Decision, Defense
from fmdefense.defenses.decision_table import write_decisions_csv
from fmdefense.defenses.default import DefaultConfig, DefaultDefense
from fmdefense.defenses.ensemble import EnsembleConfig, EnsembleDefense
from fmdefense.defenses.fm.config import FMDefenseConfig
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.registry import defense_class, load_defense, needs_vae
from fmdefense.defenses.rule import accuracy, defended_accuracy
from fmdefense.models.classifiers import DATASET_CLASSIFIERS, Classifier

log = logging.getLogger(__name__)
DECISIONS_KIND = "decisions"


# ---------------------------------------------------------------------- models


def load_models(
    dataset: str, device: torch.device, classifier: Path | None = None, vae: Path | None = None
) -> tuple[Classifier, Any]:
    """The protected classifier and the combo-VAE of a dataset, in eval mode on `device`."""
    clf = Classifier.load(classifier_dir(dataset, classifier), device)
    return clf, load_vae(dataset, device, vae)


def load_vae(dataset: str, device: torch.device, vae: Path | None = None) -> Any:
    """The combo-VAE of a dataset (shipped weights unless `vae` names a folder), in eval mode."""
    from fmdefense.models.combo_vae import ComboVAE

    return ComboVAE.load(vae_dir(dataset, vae), device).eval()


def load_classifier(
    dataset: str, device: torch.device, spec: str | None = None, weights: Path | None = None
) -> nn.Module:
    """The dataset's shipped classifier, or the one `spec` names (`fmdefense.models.user`:
    a classifier folder, a TorchScript file, or `package.module:factory` + `weights`)."""
    from fmdefense.models.user import load_user_classifier

    if spec is None:
        if weights is not None:
            raise InputError("--classifier-weights needs --classifier package.module:factory")
        return Classifier.load(classifier_dir(dataset), device).eval()
    cfg = DATASET_CLASSIFIERS[dataset]
    return load_user_classifier(
        spec,
        weights,
        device,
        in_channels=cfg.in_channels,
        image_size=cfg.image_size,
        num_classes=cfg.num_classes,
    )


def open_defense(
    folder: Path,
    dataset: str,
    device: torch.device,
    classifier: nn.Module | None = None,
    vae: Path | None = None,
) -> Defense:
    """The calibrated defense of any kind saved in `folder`, around `classifier` (default: the
    dataset's shipped one) and, for the kinds built on it, the dataset's combo-VAE."""
    cls = defense_class(folder)
    clf = classifier if classifier is not None else load_classifier(dataset, device)
    model = load_vae(dataset, device, vae) if needs_vae(cls) else None
    return load_defense(folder, clf, model)


# ---------------------------------------------------------------------- calibrate


def val_images(
    dataset: str, val_limit: int | None = None, data_dir: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean VAL split (its first `val_limit` images when given)."""
    x_val, y_val = split_tensors(load_raw(dataset, data_dir=data_dir), "val")
    return x_val[:val_limit], y_val[:val_limit]


def run_calibrate(
    dataset: str,
    out_dir: Path,
    device: torch.device,
    config: FMDefenseConfig,
    *,
    val_limit: int | None = None,
    classifier: nn.Module | None = None,
    vae: Path | None = None,
    data_dir: Path | None = None,
) -> FMDefense:
    """Fit FM-Defense on the clean VAL split and save it; VAL morphs are cached in chunks."""
    clf = classifier if classifier is not None else load_classifier(dataset, device)
    model = load_vae(dataset, device, vae)
    x_val, y_val = val_images(dataset, val_limit, data_dir)
    t0 = time.perf_counter()
    defense = FMDefense(clf, model, config).fit(x_val, y_val, cache_dir=out_dir / "cache-val")
    defense.save(out_dir)
    log.info(
        "calibrated on %d VAL images in %.0f s -> %s", len(x_val), time.perf_counter() - t0, out_dir
    )
    return defense


def load_autoencoders(folder: Path, classifier: nn.Module) -> tuple[nn.Module, nn.Module]:
    """MagNet's two trained autoencoders from a MagNet artifact folder."""
    from fmdefense.defenses.magnet import MagNet

    if not Path(folder).is_dir():
        raise InputError(
            f"no MagNet artifact at {folder}: train one (fmdefense train magnet --dataset D "
            "--out DIR) and pass --magnet DIR, or calibrate with --no-magnet"
        )
    aes = MagNet.load(folder, classifier).autoencoders
    return aes.ae1.eval(), aes.ae2.eval()


def run_calibrate_default(
    dataset: str,
    out_dir: Path,
    device: torch.device,
    config: DefaultConfig,
    *,
    autoencoders: tuple[nn.Module, nn.Module] | None,
    val_limit: int | None = None,
    classifier: nn.Module | None = None,
    vae: Path | None = None,
    data_dir: Path | None = None,
) -> DefaultDefense:
    """Fit the default defense (fused one-decode scores at α) on clean VAL and save it."""
    clf = classifier if classifier is not None else load_classifier(dataset, device)
    x_val, _ = val_images(dataset, val_limit, data_dir)
    t0 = time.perf_counter()
    defense = DefaultDefense(clf, load_vae(dataset, device, vae), autoencoders, config).fit(x_val)
    defense.save(out_dir)
    log.info(
        "default defense calibrated on %d VAL images in %.0f s -> %s",
        len(x_val),
        time.perf_counter() - t0,
        out_dir,
    )
    return defense


def run_calibrate_ensemble(
    dataset: str,
    out_dir: Path,
    device: torch.device,
    config: EnsembleConfig,
    *,
    members: list[Path],
    autoencoders: tuple[nn.Module, nn.Module] | None,
    val_limit: int | None = None,
    classifier: nn.Module | None = None,
    data_dir: Path | None = None,
) -> EnsembleDefense:
    """Fit one default per combo-VAE folder in `members` on clean VAL; save the ensemble."""
    clf = classifier if classifier is not None else load_classifier(dataset, device)
    x_val, _ = val_images(dataset, val_limit, data_dir)
    vaes = [load_vae(dataset, device, Path(m)) for m in members]
    t0 = time.perf_counter()
    defense = EnsembleDefense(clf, vaes, autoencoders, config, [Path(m) for m in members])
    defense.fit(x_val).save(out_dir)
    log.info(
        "ensemble of %d calibrated on %d VAL images in %.0f s -> %s",
        len(vaes),
        len(x_val),
        time.perf_counter() - t0,
        out_dir,
    )
    return defense


# ---------------------------------------------------------------------- defend


def summarize(
    labels: torch.Tensor, action: torch.Tensor, truth: torch.Tensor | None
) -> dict[str, Any]:
    """Counts and shares per action; accuracies with and without the Table II convention when
    the truth is known."""
    n = len(labels)
    out: dict[str, Any] = {"inputs": n}
    for k, name in enumerate(ACTIONS):
        count = int((action == k).sum())
        out[name] = count
        out[f"{name}_share"] = count / n if n else float("nan")
    if truth is not None:
        out["accuracy"] = accuracy(labels, truth)
        out["defended_accuracy"] = defended_accuracy(labels, truth)
    return out


def _decide(defense: Defense, x: torch.Tensor, cache_dir: Path) -> Decision:
    if isinstance(defense, FMDefense):  # resumable morph chunks
        return defense.decide(x, cache_dir=cache_dir)
    return defense.decide(x)


def run_defend(
    defense: Defense,
    x: torch.Tensor,
    truth: torch.Tensor,
    out_dir: Path,
    source: dict[str, Any],
) -> dict[str, Any]:
    """Decide on every input and save the decisions artifact (FM-Defense resumes its chunks)."""
    t0 = time.perf_counter()
    dec = _decide(defense, x, out_dir / "cache")
    seconds = time.perf_counter() - t0
    metrics = {
        **summarize(dec.label, dec.action, truth),
        "undefended_accuracy": accuracy(dec.input_label, truth),
        "seconds_per_input": seconds / max(len(x), 1),
        "source": source,
        **provenance(),
    }
    tensors = {
        **dec.details,  # FM-Defense: resistance, distance
        **{f"score.{k}": v for k, v in dec.scores.items()},
        "action": dec.action,
        "label": dec.label,
        "input_label": dec.input_label,
        "truth": truth,
    }
    cfg = getattr(defense, "config", None)
    config = {
        "defense_kind": defense.kind,
        "defense": (
            dataclasses.asdict(cfg)
            if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)
            else None
        ),
        "source": source,
    }
    save_artifact(out_dir, kind=DECISIONS_KIND, config=config, tensors=tensors, metrics=metrics)
    return metrics


def true_labels(images: UserImages) -> torch.Tensor | None:
    """The images' labels in the classifier's numbering: class folders named by integers
    (`0`, `7`, ...) give those integers; other names give their sorted position."""
    if images.y is None or not images.classes:
        return images.y
    if all(c.isdigit() for c in images.classes):
        lookup = torch.tensor([int(c) for c in images.classes])
        return lookup[images.y]
    return images.y


def run_defend_images(
    defense: Defense, images: UserImages, out_csv: Path, *, limit: int | None = None
) -> dict[str, Any]:
    """Decide on a user's images and write one CSV row per image (`decision_table`); return
    the counts per action (and accuracies when the source has labels)."""
    x, names, truth = images.x[:limit], images.names[:limit], true_labels(images)
    truth = None if truth is None else truth[:limit]
    dec = defense.decide(x)
    write_decisions_csv(out_csv, dec, names, truth)
    return summarize(dec.label, dec.action, truth)


def check_decisions(folder: Path) -> dict[str, Any]:
    """Config of a decisions artifact (raises ArtifactError when it is not one)."""
    return read_config(folder, DECISIONS_KIND)
