"""Any fmdefense defense as an Adversarial Robustness Toolbox (ART 1.20) evasion detector.

    from fmdefense.integrations.art import ARTDetector
    detector = ARTDetector(fmdefense.pretrained("mnist"))   # or ARTDetector(defense).fit(...)
    report, is_adversarial = detector.detect(x)             # x: numpy (n, C, H, W) in [0, 1]

`fit(x, y)` calibrates the wrapped defense on clean images (its `fit`: nothing is trained, so
ART's `batch_size` and `nb_epochs` have no effect); `detect(x, batch_size)` decides in batches
and returns ART's pair: a report `{"action", "label", "input_label", "scores"}` of numpy arrays
(n,) and a bool array (n,) that is True where the defense purifies or rejects. Needs the
optional extra: `pip install 'fmdefense[art]'`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from fmdefense.core.errors import InputError
from fmdefense.defenses.base import ACTIONS, Decision, Defense

try:
    from art.defences.detector.evasion import EvasionDetector
except ImportError as exc:  # pragma: no cover - the extra is installed by `make setup`
    raise ImportError(
        "fmdefense.integrations.art needs ART: pip install 'fmdefense[art]' "
        "(adversarial-robustness-toolbox==1.20.1)"
    ) from exc


class ARTDetector(EvasionDetector):
    """ART's `EvasionDetector` over an fmdefense `Defense` (numpy NCHW float images in [0, 1])."""

    defence_params: ClassVar[list[str]] = ["defense"]

    def __init__(self, defense: Defense) -> None:
        super().__init__()
        self.defense = defense
        self._check_params()

    def _check_params(self) -> None:
        if not isinstance(self.defense, Defense):
            raise InputError(
                f"ARTDetector wraps an fmdefense Defense, got {type(self.defense).__name__}"
            )

    # ------------------------------------------------------------------ numpy boundary

    def _images(self, x: Any, name: str = "x") -> torch.Tensor:
        """A float tensor (n, C, H, W) from numpy; the defense checks range and size."""
        if not isinstance(x, np.ndarray):
            raise InputError(f"{name} must be a numpy array (n, C, H, W), got {type(x).__name__}")
        if x.ndim != 4:
            raise InputError(f"{name} must have shape (n, C, H, W), got {x.shape}")
        channels = getattr(getattr(self.defense.classifier, "cfg", None), "in_channels", None)
        if channels is not None and x.shape[1] != channels:
            hint = " (NHWC? use x.transpose(0, 3, 1, 2))" if x.shape[-1] == channels else ""
            raise InputError(
                f"{name} must be NCHW with {channels} channel(s), got shape {x.shape}{hint}"
            )
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"{name} must hold floats in [0, 1], got dtype {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    @staticmethod
    def _labels(y: Any, n: int) -> torch.Tensor | None:
        """Integer labels (n,) from ART's integer or one-hot labels; None passes through."""
        if y is None:
            return None
        y = np.asarray(y)
        if y.ndim == 2:  # one-hot (ART's usual form)
            y = y.argmax(1)
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"y must be {n} integer labels or one-hot rows, got {y.shape}")
        return torch.from_numpy(y.astype(np.int64))

    # ------------------------------------------------------------------ ART's contract

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray | None = None,
        batch_size: int = 128,
        nb_epochs: int = 20,
        **kwargs: Any,
    ) -> None:
        """Calibrate the defense on clean images `x` (labels `y` passed on); ART's training
        arguments are accepted and unused, `kwargs` go to the defense's `fit`."""
        xt = self._images(x)
        self.defense.fit(xt, self._labels(y, len(xt)), **kwargs)

    def decide(self, x: np.ndarray, batch_size: int = 128) -> Decision:
        """The defense's `Decision` over `x`, `batch_size` inputs at a time."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        xt = self._images(x)
        parts = [self.defense.decide(xt[i : i + batch_size]) for i in range(0, len(xt), batch_size)]
        return Decision(
            torch.cat([d.action for d in parts]),
            torch.cat([d.label for d in parts]),
            torch.cat([d.input_label for d in parts]),
            {k: torch.cat([d.scores[k] for d in parts]) for k in parts[0].scores},
        )

    def detect(
        self, x: np.ndarray, batch_size: int = 128, **kwargs: Any
    ) -> tuple[dict[str, Any], np.ndarray]:
        """(report, is_adversarial): the report's arrays are `action` (str: accept, purify,
        reject), `label` (final, −1 where rejected), `input_label` (C(x)) and `scores`
        (name → float array, larger = more suspicious); is_adversarial is bool (n,)."""
        if kwargs:
            raise InputError(f"ARTDetector.detect takes no {sorted(kwargs)}")
        dec = self.decide(x, batch_size)
        report = {
            "action": np.asarray(ACTIONS)[dec.action.cpu().numpy()],
            "label": dec.label.cpu().numpy().astype(np.int64),
            "input_label": dec.input_label.cpu().numpy().astype(np.int64),
            "scores": {k: v.detach().float().cpu().numpy() for k, v in dec.scores.items()},
        }
        return report, dec.flagged.cpu().numpy().astype(bool)
