"""Reconstruction-consistency check: the one-decode ablation of FM-Defense.

Score s(x) = 1 − p_C(x̂)[C(x)], where x̂ is the combo-VAE reconstruction of x: how much the
classifier, looking at the reconstruction, doubts the label it gave the input. Flag when s(x)
exceeds a threshold set on clean VAL data (false-positive rate ≤ 1 − ρ); a flagged input gets
the label of its reconstruction (the purification). One decode per input instead of m·N.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.errors import NotFittedError
from fmdefense.training.checkpoint import read_config, save_artifact
from fmdefense.validation import check_images

KIND = "recon_check"


@dataclass(frozen=True)
class ReconCheckConfig:
    """Settings: clean pass rate on VAL, z_u reading, batch size."""

    rho: float = 0.99
    z_u_mode: str = "class_mean"
    batch_size: int = 256


class ReconstructionCheck:
    """Detector protocol of FMDefense (fit, score, detect, predict, save/load), one decode each."""

    def __init__(self, classifier: nn.Module, vae: Any, config: ReconCheckConfig) -> None:
        self.classifier = classifier
        self.vae = vae
        self.config = config

    @torch.inference_mode()
    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(score, C(x), C(x̂)) for validated images x (n, C, H, W)."""
        check_images(x)
        device = next(self.classifier.parameters()).device
        scores, labels, recon_labels = [], [], []
        for i in range(0, len(x), self.config.batch_size):
            xb = x[i : i + self.config.batch_size].to(device)
            label = self.classifier(xb).argmax(1)
            recon = self.vae.reconstruct(xb, z_u_mode=self.config.z_u_mode)
            probs = self.classifier(recon).softmax(1)
            scores.append((1 - probs.gather(1, label.view(-1, 1)).squeeze(1)).cpu())
            labels.append(label.cpu())
            recon_labels.append(probs.argmax(1).cpu())
        return torch.cat(scores), torch.cat(labels), torch.cat(recon_labels)

    def fit(self, x_val: torch.Tensor) -> ReconstructionCheck:
        """Threshold τ: the smallest VAL score quantile keeping VAL false positives ≤ 1 − ρ."""
        scores, _, _ = self._outputs(x_val)
        allowed = int((1 - self.config.rho) * len(scores) + 1e-9)
        ordered = torch.sort(scores, descending=True).values
        self.tau_ = float(ordered[allowed]) if allowed < len(ordered) else 0.0  # flag s > τ
        self.val_fpr_ = float((scores > self.tau_).float().mean())
        return self

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Suspicion scores (n,) in [0, 1]; higher = more suspicious."""
        return self._outputs(x)[0]

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """Flagged inputs (n,) bool."""
        if not hasattr(self, "tau_"):
            raise NotFittedError("ReconstructionCheck is not fitted: call fit(x_val) or load()")
        return self.score(x) > self.tau_

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """C(x) where accepted, C(x̂) where flagged (purified)."""
        if not hasattr(self, "tau_"):
            raise NotFittedError("ReconstructionCheck is not fitted: call fit(x_val) or load()")
        scores, labels, recon_labels = self._outputs(x)
        return torch.where(scores > self.tau_, recon_labels, labels)

    def save(self, folder: Path) -> None:
        """config.json (with τ) + an empty-weights safetensors + metrics.json."""
        config = {**asdict(self.config), "tau": self.tau_}
        save_artifact(
            folder,
            kind=KIND,
            config=config,
            tensors={"tau": torch.tensor([self.tau_])},
            metrics={"val_fpr": self.val_fpr_},
        )

    @classmethod
    def load(cls, folder: Path, classifier: nn.Module, vae: Any) -> ReconstructionCheck:
        """Rebuild a fitted check."""
        raw = read_config(folder, KIND)
        tau = float(raw.pop("tau"))
        check = cls(classifier, vae, ReconCheckConfig(**raw))
        check.tau_, check.val_fpr_ = tau, float("nan")
        return check
