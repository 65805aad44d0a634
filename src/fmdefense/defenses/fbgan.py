"""FBGAN as a defense (Bao, Liang & Wang 2018), on the one Defense contract.

FBGAN's own use is purification: every input is mapped to the semantic space and back,
x → G(E(x)), and the classifier labels the reconstruction. As for MagNet and Defense-GAN here,
a detector is added on the reconstruction error ‖x − G(E(x))‖², flagged above a threshold set
on clean VAL images at a false-positive ("drop") rate of 0.001; flagged inputs are rejected,
the others get C(G(E(x))). E and G are plain differentiable networks (no search), so white-box
attacks differentiate through `logits` / `reconstruct`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.core.config import check_int, check_range, dataclass_kwargs
from fmdefense.core.device import module_device
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.defenses.base import Decision, Defense
from fmdefense.defenses.rule import apply_rule
from fmdefense.models.fbgan import (
    FBGAN,
    KIND,
    load_fbgan,
    save_fbgan,
    threshold_at_drop_rate,
)

SCORE = "reconstruction_error"


@dataclass(frozen=True)
class FBGANDefenseConfig:
    """VAL false-positive rate of the threshold, and the batch size of scoring."""

    drop_rate: float = 0.001
    batch_size: int = 256

    def __post_init__(self) -> None:
        check_range("drop_rate", self.drop_rate, 0.0, 1.0, high_open=True)
        check_int("batch_size", self.batch_size, low=1)


class FBGANDefense(Defense):
    """Reject when ‖x − G(E(x))‖² exceeds its VAL threshold; otherwise label C(G(E(x)))."""

    name = "fbgan"
    kind = KIND
    fitted_attribute = "threshold_"

    def __init__(
        self, classifier: nn.Module, model: FBGAN, config: FBGANDefenseConfig | None = None
    ) -> None:
        self.classifier = classifier
        self.model = model
        self.config = config or FBGANDefenseConfig()

    # ------------------------------------------------------------ differentiable

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """G(E(x)) (n, C, H, W), differentiable (E and G in whatever mode they are in)."""
        return self.model.reconstruct(x)

    purify = reconstruct

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """C(G(E(x))) logits (n, classes), differentiable: the defended classifier."""
        return self.classifier(self.model.reconstruct(x))

    # ------------------------------------------------------------ contract

    @torch.inference_mode()
    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(error, C(x), C(G(E(x)))) for images x (n, C, H, W), in eval mode."""
        x = self.model.check(self._check(x))
        was_training = self.model.training
        self.model.eval()
        errors, labels, recon_labels = [], [], []
        try:
            for i in range(0, len(x), self.config.batch_size):
                xb = x[i : i + self.config.batch_size].to(self.device)
                recon = self.model.reconstruct(xb)  # (B, C, H, W)
                errors.append((recon - xb).pow(2).flatten(1).sum(1).cpu())
                labels.append(self.classifier(xb).argmax(1).cpu())
                recon_labels.append(self.classifier(recon).argmax(1).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(errors), torch.cat(labels), torch.cat(recon_labels)

    def fit(self, x_val: torch.Tensor, y_val: torch.Tensor | None = None) -> FBGANDefense:
        """Threshold τ: the smallest VAL error keeping VAL false positives ≤ drop_rate."""
        errors = self._outputs(x_val)[0]
        self.threshold_ = threshold_at_drop_rate(errors, self.config.drop_rate)
        self.val_fpr_ = float((errors > self.threshold_).float().mean())
        return self

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"reconstruction_error": ‖x − G(E(x))‖²} (n,), summed over pixels."""
        self._require_fit()
        return {SCORE: self._outputs(x)[0]}

    def decide(self, x: torch.Tensor) -> Decision:
        """Reject errors above τ; accept the rest with the label of their reconstruction."""
        self._require_fit()
        errors, labels, recon_labels = self._outputs(x)
        action, label = apply_rule(errors > self.threshold_, None, recon_labels)
        return Decision(action, label, labels, {SCORE: errors})

    def save(self, folder: Path, metrics: dict[str, Any] | None = None) -> None:
        """E, G and the calibration as one artifact (metrics default to the VAL FPR)."""
        self._require_fit()
        calibration = {**asdict(self.config), "threshold": self.threshold_}
        if metrics is None:
            metrics = {"val_fpr": getattr(self, "val_fpr_", float("nan"))}
        save_fbgan(folder, self.model, calibration, metrics)

    @classmethod
    def load(  # type: ignore[override]
        cls, folder: Path, classifier: nn.Module, device: str | torch.device | None = None
    ) -> FBGANDefense:
        """Rebuild around `classifier` (on its device unless given); fitted when the artifact
        holds a threshold, otherwise call `fit(x_val)`."""
        if device is None:
            device = module_device(classifier)
        model, calibration = load_fbgan(folder, device)
        raw = dict(calibration or {})
        threshold = raw.pop("threshold", None)
        try:
            config = FBGANDefenseConfig(**dataclass_kwargs(FBGANDefenseConfig, raw, "calibration"))
        except InputError as exc:
            raise ArtifactError(f"{folder}/config.json: {exc}") from exc
        defense = cls(classifier, model, config)
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, int | float):
                raise ArtifactError(f"{folder}/config.json: threshold must be a number")
            if not math.isfinite(threshold):
                raise ArtifactError(f"{folder}/config.json: threshold must be finite")
            defense.threshold_ = float(threshold)
        return defense
