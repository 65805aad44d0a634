"""Reconstruction-consistency check: the one-decode ablation of FM-Defense.

Score s(x) = 1 − p_C(x̂)[C(x)], where x̂ is the combo-VAE reconstruction of x: how much the
classifier, looking at the reconstruction, doubts the label it gave the input. Flag when s(x)
exceeds a threshold set on clean VAL data (false-positive rate ≤ 1 − ρ); a flagged input gets
the label of its reconstruction (the purification). One decode per input instead of m·N.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.core.artifacts import read_config, save_artifact
from fmdefense.core.config import check_choice, check_int, check_range, dataclass_kwargs
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.defenses.base import Decision, Defense
from fmdefense.defenses.fm.purifier import Z_U_MODES
from fmdefense.defenses.rule import apply_rule

KIND = "recon_check"


@dataclass(frozen=True)
class ReconCheckConfig:
    """Settings: clean pass rate on VAL, z_u reading, batch size."""

    rho: float = 0.99
    z_u_mode: str = "class_mean"
    batch_size: int = 256

    def __post_init__(self) -> None:
        check_range("rho", self.rho, 0.0, 1.0, low_open=True)
        check_choice("z_u_mode", self.z_u_mode, Z_U_MODES)
        check_int("batch_size", self.batch_size, low=1)


class ReconstructionCheck(Defense):
    """One decode per input: flag when C doubts its label on the reconstruction; purify."""

    name = "recon"
    kind = KIND
    fitted_attribute = "tau_"

    def __init__(self, classifier: nn.Module, vae: Any, config: ReconCheckConfig) -> None:
        self.classifier = classifier
        self.vae = vae
        self.config = config

    @torch.inference_mode()
    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(score, C(x), C(x̂)) for images x (n, C, H, W)."""
        x = self._check(x)
        scores, labels, recon_labels = [], [], []
        for i in range(0, len(x), self.config.batch_size):
            xb = x[i : i + self.config.batch_size].to(self.device)
            label = self.classifier(xb).argmax(1)
            recon = self.vae.reconstruct(xb, z_u_mode=self.config.z_u_mode)
            probs = self.classifier(recon).softmax(1)
            scores.append((1 - probs.gather(1, label.view(-1, 1)).squeeze(1)).cpu())
            labels.append(label.cpu())
            recon_labels.append(probs.argmax(1).cpu())
        return torch.cat(scores), torch.cat(labels), torch.cat(recon_labels)

    def fit(self, x_val: torch.Tensor, y_val: torch.Tensor | None = None) -> ReconstructionCheck:
        """Threshold τ: the smallest VAL score quantile keeping VAL false positives ≤ 1 − ρ."""
        scores, _, _ = self._outputs(x_val)
        allowed = int((1 - self.config.rho) * len(scores) + 1e-9)
        ordered = torch.sort(scores, descending=True).values
        self.tau_ = float(ordered[allowed]) if allowed < len(ordered) else 0.0  # flag s > τ
        self.val_fpr_ = float((scores > self.tau_).float().mean())
        return self

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"recon_check": 1 − p_C(x̂)[C(x)]} (n,) in [0, 1]."""
        self._require_fit()
        return {"recon_check": self._outputs(x)[0]}

    def decide(self, x: torch.Tensor) -> Decision:
        """Accept C(x) below τ; purify to C(x̂) above it (this check never rejects)."""
        self._require_fit()
        scores, labels, recon_labels = self._outputs(x)
        flagged = scores > self.tau_
        action, label = apply_rule(flagged, torch.ones_like(flagged), labels, recon_labels)
        return Decision(action, label, labels, {"recon_check": scores})

    def save(self, folder: Path) -> None:
        """config.json (with τ) + a safetensors holding τ + metrics.json."""
        self._require_fit()
        config = {**asdict(self.config), "tau": self.tau_}
        save_artifact(
            folder,
            kind=KIND,
            config=config,
            tensors={"tau": torch.tensor([self.tau_])},
            metrics={"val_fpr": self.val_fpr_},
        )

    @classmethod
    def load(  # type: ignore[override]
        cls, folder: Path, classifier: nn.Module, vae: Any = None
    ) -> ReconstructionCheck:
        """Rebuild a fitted check around the classifier and combo-VAE it was fitted with."""
        if vae is None:
            raise InputError("ReconstructionCheck.load needs its combo-VAE (vae=)")
        raw = dict(read_config(folder, KIND))
        tau = raw.pop("tau", None)
        if not isinstance(tau, int | float) or not math.isfinite(tau):
            raise ArtifactError(f"{folder}/config.json: tau must be a finite number, got {tau!r}")
        try:
            config = ReconCheckConfig(**dataclass_kwargs(ReconCheckConfig, raw, "config"))
        except InputError as exc:
            raise ArtifactError(f"{folder}/config.json: {exc}") from exc
        check = cls(classifier, vae, config)
        check.tau_, check.val_fpr_ = float(tau), float("nan")
        return check
