"""One rule for every defense: judge its hard decisions (issue 7).

A defended pipeline is anything with `labels(x) -> (n,) long`, REJECT_LABEL (−1) where it
rejects the input. Adapters wrap the three defenses of this project:

- `FMDefended`: FM-Defense's `decide` (accept with C(x), purify to C(D(E_s(x) ⊕ z_u)), reject);
- `MagNetDefended`: MagNet's `predict(classifier, x)` (reject when either detector flags,
  else C(AE_I(x)));
- `DefenseGANDefended`: Defense-GAN's `predict(classifier, x)` (reject when ‖G(z*) − x‖² is
  above the threshold, else C(G(z*))).

`outcome_rates` applies the one rule to an input set: robust accuracy with rejection = share of
inputs rejected or labelled y; attack success = labelled, not rejected, and wrong; accept rate =
share labelled (not rejected), which on clean inputs is the clean accept rate at the defense's
thresholds. Adapters may add defense-specific counts (FM-Defense's actions, MagNet's detectors).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fmdefense.core.errors import InputError
from fmdefense.defenses.base import ACCEPT, PURIFY, REJECT_LABEL
from fmdefense.defenses.defense_gan import DefenseGAN
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.magnet import MagNet

DEFENSE_KINDS = ("fm", "magnet", "defensegan")


@runtime_checkable
class Defended(Protocol):
    """A defended classifier judged by its hard decisions."""

    name: str

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """Final labels (n,) long on the CPU; REJECT_LABEL (−1) where the input is rejected."""
        ...


def rates_from_labels(labels: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The one rule, from final labels (n,) and true labels (n,)."""
    labels, y = labels.cpu().long(), y.cpu().long()
    n = len(y)
    rejected = labels == REJECT_LABEL
    wrong = ~rejected & (labels != y)
    share = (lambda m: float(m.float().mean())) if n else (lambda m: 0.0)
    return {
        "robust_accuracy_with_rejection": share(~wrong),
        "attack_success": share(wrong),
        "accept_rate": share(~rejected),
        "rejected": int(rejected.sum()),
        "labelled_right": int((~rejected & (labels == y)).sum()),
        "labelled_wrong": int(wrong.sum()),
        "n": n,
    }


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


@torch.no_grad()
def _batched(fn: Any, x: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    parts = [fn(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


class FMDefended:
    """FM-Defense's hard decisions (`decide`): accepted, purified or rejected."""

    name = "fm"

    def __init__(self, defense: FMDefense) -> None:
        defense._require_fit()
        self.defense = defense
        self.classifier = defense.classifier

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        return self.defense.decide(x).label.long()

    def outcomes(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """The one rule plus FM-Defense's actions, from one `decide`."""
        dec = self.defense.decide(x)
        row = rates_from_labels(dec.label, y)
        rejected = dec.label == REJECT_LABEL
        wrong = (dec.label != y) & ~rejected
        accepted, purified = dec.action == ACCEPT, dec.action == PURIFY
        share = float(accepted.float().mean()) if len(y) else 0.0
        row.update(
            accept_action_rate=share,  # accepted as is, without purification
            accepted_wrong=int((accepted & wrong).sum()),
            purified_wrong=int((purified & wrong).sum()),
            purified_right=int((purified & (dec.label == y)).sum()),
            classifier_wrong=int((dec.input_label != y).sum()),
            actions=dec.counts(),
        )
        return row


class MagNetDefended:
    """MagNet with its classifier: reject when a detector flags, else C(AE_I(x))."""

    name = "magnet"

    def __init__(self, magnet: MagNet, classifier: nn.Module, batch_size: int = 256) -> None:
        magnet._require_fit()
        self.magnet, self.classifier, self.batch_size = magnet, classifier, batch_size

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        device = self.magnet.thresholds.device
        return _batched(
            lambda xb: self.magnet.predict(self.classifier, xb), x, device, self.batch_size
        ).long()

    def outcomes(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """The one rule plus how many inputs each detector flags."""
        row = rates_from_labels(self.labels(x), y)
        device = self.magnet.thresholds.device
        errors = _batched(self.magnet.errors, x, device, self.batch_size)  # (n, 2)
        flagged = errors > self.magnet.thresholds.cpu()
        row.update(
            flagged_detector_i=int(flagged[:, 0].sum()),
            flagged_detector_ii=int(flagged[:, 1].sum()),
        )
        return row


class DefenseGANDefended:
    """Defense-GAN with its classifier: reject when ‖G(z*) − x‖² > τ, else C(G(z*)).

    The search's starts depend on each input's position in `x` (see `DefenseGAN.starts`), so
    judge an input set in the same order the attack saw it.
    """

    name = "defensegan"

    def __init__(self, gan: DefenseGAN, classifier: nn.Module) -> None:
        gan._require_fit()
        self.gan, self.classifier = gan, classifier

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        return self.gan.predict(self.classifier, x).cpu().long()

    def outcomes(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """The one rule plus the mean reconstruction error, from one search."""
        score, labels = self.gan.score_and_predict(self.classifier, x)
        row = rates_from_labels(labels.cpu(), y)
        row.update(mean_score=float(score.mean()) if len(y) else 0.0)
        return row


def as_defended(defense: object, classifier: nn.Module | None = None) -> Defended:
    """The adapter of a fitted defense (a `Defended` passes as is); baselines need `classifier`."""
    if isinstance(defense, FMDefense):
        return FMDefended(defense)
    if isinstance(defense, MagNet | DefenseGAN):
        if classifier is None:
            raise InputError(f"{type(defense).__name__} needs the classifier it protects")
        if isinstance(defense, MagNet):
            return MagNetDefended(defense, classifier)
        return DefenseGANDefended(defense, classifier)
    if isinstance(defense, Defended):
        return defense
    raise InputError(
        "defense must be an FMDefense, a MagNet, a DefenseGAN or have labels(x), got "
        f"{type(defense).__name__}"
    )


def outcome_rates(
    defense: object, x: torch.Tensor, y: torch.Tensor, *, classifier: nn.Module | None = None
) -> dict[str, Any]:
    """The one rule on an input set (plus the adapter's own counts, when it has `outcomes`)."""
    target = as_defended(defense, classifier)
    outcomes = getattr(target, "outcomes", None)
    if outcomes is not None:
        return dict(outcomes(x, y))
    return rates_from_labels(target.labels(x), y)


def defended_success(target: Defended, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per input (n,) bool: labelled, not rejected, and wrong."""
    label = target.labels(x_adv)
    return (label != y.cpu()) & (label != REJECT_LABEL)
