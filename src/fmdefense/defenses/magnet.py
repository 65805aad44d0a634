"""MagNet (Meng & Chen 2017) on the one defense contract.

- Detector I: reconstruction error of autoencoder I (mean squared over pixels, p = 2).
- Detector II: reconstruction error of autoencoder II (mean absolute, p = 1).
- Thresholds τ_j: each detector's VAL false-positive ("drop") rate ≤ `drop_rate` (0.001).
- Reformer: an accepted input gets the label of AE_I(x); a flagged one is rejected.
The probability-divergence detectors (temperature T) are not included.

magnet = MagNet(classifier, MagNetAutoencoders(cfg), cfg)   # networks from models.magnet
magnet.fit(x_val)                # τ_j
magnet.score(x)                  # {"ae_i": e_1/τ_1, "ae_ii": e_2/τ_2}: flagged above 1
magnet.decide(x)                 # reject if either flags, else accept with C(AE_I(x))
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.core.artifacts import save_artifact
from fmdefense.core.paths import classifier_dir
from fmdefense.core.provenance import provenance
from fmdefense.defenses.base import Decision, Defense
from fmdefense.defenses.calibration import drop_rate_threshold, read_network_artifact
from fmdefense.defenses.rule import apply_rule
from fmdefense.models.magnet import MagNetAutoencoders, MagNetConfig

KIND = "magnet"
SCORES = ("ae_i", "ae_ii")  # detector I, detector II


class MagNet(Defense):
    """Both autoencoders, the two detectors' thresholds and the reformer around a classifier.

    Scores are each detector's error relative to its threshold, e_j/τ_j (flagged above 1), so
    they need `fit`; the raw errors (n, 2) are `errors(x)`, available before it.
    """

    name = "magnet"
    kind = KIND
    fitted_attribute = "thresholds_"

    def __init__(
        self, classifier: nn.Module, autoencoders: MagNetAutoencoders, config: MagNetConfig
    ) -> None:
        self.classifier = classifier
        self.autoencoders = autoencoders
        self.config = config

    @torch.no_grad()
    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(errors (n, 2), C(x), C(AE_I(x))) for validated images, batched, on the CPU."""
        errors, labels, reformed_labels = [], [], []
        self.autoencoders.eval()
        for i in range(0, len(x), self.config.batch_size):
            xb = x[i : i + self.config.batch_size].to(self.device)
            reformed, e = self.autoencoders(xb)
            errors.append(e.cpu())
            labels.append(self.classifier(xb).argmax(1).cpu())
            reformed_labels.append(self.classifier(reformed).argmax(1).cpu())
        return torch.cat(errors), torch.cat(labels), torch.cat(reformed_labels)

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        """Raw reconstruction errors (n, 2): mean squared (AE I), mean absolute (AE II)."""
        return self._outputs(self._check(x))[0]

    def fit(self, x_val: torch.Tensor, y_val: torch.Tensor | None = None) -> MagNet:
        """Each detector's threshold at the VAL drop rate (flag errors strictly above it)."""
        e = self.errors(x_val)
        self.thresholds_ = drop_rate_threshold(e, self.config.drop_rate)  # (2,)
        self.val_fpr_ = float(self._flags(e).any(1).float().mean())
        return self

    def _flags(self, errors: torch.Tensor) -> torch.Tensor:
        return errors / self.thresholds_ > 1.0  # (n, 2)

    def _scores(self, errors: torch.Tensor) -> dict[str, torch.Tensor]:
        rel = errors / self.thresholds_
        return {name: rel[:, j] for j, name in enumerate(SCORES)}

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"ae_i", "ae_ii"}: each detector's error over its threshold (n,), flagged above 1."""
        self._require_fit()
        return self._scores(self.errors(x))

    def decide(self, x: torch.Tensor) -> Decision:
        """Reject where either detector flags; accept the others with the reformer's label."""
        self._require_fit()
        errors, labels, reformed_labels = self._outputs(self._check(x))
        flags = self._flags(errors)
        action, label = apply_rule(flags.any(1), None, reformed_labels)
        details = {f"flagged_{name}": flags[:, j] for j, name in enumerate(SCORES)}
        return Decision(action, label, labels, self._scores(errors), details)

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The artifact's tensors: ae1.*, ae2.* and thresholds (2,) — the format of every
        MagNet artifact so far (NaN thresholds: not fitted)."""
        thresholds = getattr(self, "thresholds_", torch.full((2,), float("nan")))
        return {**self.autoencoders.state_dict(), "thresholds": thresholds}

    def save(self, folder: Path, metrics: dict[str, Any] | None = None) -> None:
        """config.json (the MagNetConfig), model.safetensors, metrics.json (+ `metrics`)."""
        self._require_fit()
        row = {"val_fpr": self.val_fpr_, "thresholds": self.thresholds_.tolist()}
        save_artifact(
            folder,
            kind=KIND,
            config=asdict(self.config),
            tensors=self.state_dict(),
            metrics={**row, **(metrics or {})},
        )

    @classmethod
    def load(cls, folder: Path, classifier: nn.Module, **models: Any) -> MagNet:
        """Rebuild a saved MagNet around `classifier`, on the classifier's device; its
        autoencoders are in the artifact. An artifact saved unfitted loads unfitted."""
        art = read_network_artifact(
            folder,
            KIND,
            MagNetConfig.from_dict,
            MagNetAutoencoders,
            threshold_key="thresholds",
            threshold_shape=(2,),
            models=models,
        )
        magnet = cls(classifier, art.network, art.config)
        art.network.to(magnet.device)
        if art.threshold is not None:
            magnet.thresholds_, magnet.val_fpr_ = art.threshold, art.val_fpr
        return magnet


def run_train_magnet(
    dataset: str,
    out_dir: Path,
    device: torch.device,
    *,
    epochs: int = 10,
    limit: int | None = None,
    classifier: Path | None = None,
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """Train on the dataset's combo-VAE split (20,000 clean images), fit on VAL, save.

    The defense protects the dataset's classifier (`classifier`: its artifact folder, default
    the shipped one); the metrics record its VAL accuracy (a rejection counts as wrong).
    `data_dir`: the dataset's own files (as `fmdefense.data.load_raw`).
    """
    from fmdefense.data import load_raw, split_tensors
    from fmdefense.models.classifiers import Classifier
    from fmdefense.training.magnet import train_magnet

    ds = load_raw(dataset, data_dir=data_dir)
    x, _ = split_tensors(ds, "vae_train")
    x_val, y_val = split_tensors(ds, "val")
    c, h, w = ds.image_shape
    cfg = MagNetConfig(in_channels=c, image_size=(h, w), epochs=epochs)
    autoencoders = MagNetAutoencoders(cfg)
    history = train_magnet(autoencoders, x[:limit], device)
    clf = Classifier.load(classifier_dir(dataset, classifier), device)
    magnet = MagNet(clf, autoencoders, cfg).fit(x_val)
    labels = magnet.predict(x_val)
    metrics = {
        "loss_history": history,
        "val_fpr": magnet.val_fpr_,
        "thresholds": magnet.thresholds_.tolist(),
        "val_accuracy": float((labels == y_val).float().mean()),
        **provenance(),
    }
    magnet.save(out_dir, metrics)
    return metrics
