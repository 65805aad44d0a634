"""The one defense contract (scikit-learn's conventions, ART's detector shape).

defense = SomeDefense(classifier, ..., config)   # __init__ only stores
defense.fit(x_val, y_val=None)                    # clean data only; returns self; attrs end in _
defense.score(x)                                  # named suspicion scores, larger = more suspicious
defense.decide(x) -> Decision                     # action accept/purify/reject, label, scores
defense.detect(x); defense.predict(x)             # derived from decide
defense.save(folder); SomeDefense.load(folder, classifier, **models)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from fmdefense.core.device import module_device
from fmdefense.core.errors import NotFittedError
from fmdefense.core.validation import check_images

ACCEPT, PURIFY, REJECT = 0, 1, 2
ACTIONS = ("accept", "purify", "reject")
REJECT_LABEL = -1

D = TypeVar("D", bound="Defense")


@dataclass(frozen=True)
class InputDecision:
    """One input's verdict: action name, final label and its named scores."""

    action: str
    label: int
    scores: dict[str, float]


@dataclass(frozen=True)
class Decision:
    """Verdicts for a batch: tensors over the n inputs, indexable per input."""

    action: torch.Tensor  # (n,) ACCEPT | PURIFY | REJECT
    label: torch.Tensor  # (n,) final label, REJECT_LABEL exactly where rejected
    input_label: torch.Tensor  # (n,) the protected classifier's own label C(x)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (n,)
    details: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # e.g. resistance

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> InputDecision:
        scores = {k: float(v[i]) for k, v in self.scores.items()}
        return InputDecision(ACTIONS[int(self.action[i])], int(self.label[i]), scores)

    @property
    def flagged(self) -> torch.Tensor:
        """(n,) bool: purified or rejected (the detector's verdict)."""
        return self.action != ACCEPT

    def counts(self) -> dict[str, int]:
        """How many inputs were accepted, purified and rejected."""
        return {name: int((self.action == k).sum()) for k, name in enumerate(ACTIONS)}


class Defense(ABC):
    """What every defense of fmdefense is: fitted on clean data, then deciding per input."""

    name: ClassVar[str]  # registry name
    kind: ClassVar[str]  # artifact kind written in config.json
    classifier: nn.Module
    fitted_attribute: ClassVar[str]  # set by fit/load; its absence means "not fitted"

    @abstractmethod
    def fit(self: D, x_val: torch.Tensor, y_val: torch.Tensor | None = None) -> D:
        """Calibrate on clean images only; return self."""

    @abstractmethod
    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named suspicion scores (n,) each, larger = more suspicious."""

    @abstractmethod
    def decide(self, x: torch.Tensor) -> Decision:
        """Accept, purify or reject every input (one `Decision`)."""

    @abstractmethod
    def save(self, folder: Path) -> None:
        """Write the calibrated state as one artifact folder (safetensors + JSON)."""

    @classmethod
    @abstractmethod
    def load(cls: type[D], folder: Path, classifier: nn.Module, **models: Any) -> D:
        """Rebuild a calibrated defense around `classifier` (and the models it needs)."""

    # ------------------------------------------------------------------ derived

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """(n,) bool: inputs the defense does not accept as they are."""
        return self.decide(x).flagged

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Final labels (n,): REJECT_LABEL (−1) where rejected."""
        return self.decide(x).label

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, self.fitted_attribute)

    def _require_fit(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"this {type(self).__name__} is not calibrated: call fit(x_val) or load()"
            )

    @property
    def device(self) -> torch.device:
        return module_device(self.classifier)

    def _check(self, x: object, name: str = "x") -> torch.Tensor:
        """Validated float32 images shaped like the classifier's input (when it says)."""
        cfg = getattr(self.classifier, "cfg", None)
        return check_images(
            x,
            channels=getattr(cfg, "in_channels", None),
            size=getattr(cfg, "image_size", None),
            name=name,
        )
