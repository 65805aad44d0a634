"""The one accept/purify/reject rule and the one way to judge its outcome.

Every defense flags inputs and says which flagged inputs it may purify; `apply_rule` turns that
into actions and final labels. `outcome_rates` judges final labels against the truth: an input
counts as defended when rejected or labelled right (the paper's Table II convention).
"""

from __future__ import annotations

from typing import Any

import torch

from fmdefense.defenses.base import ACCEPT, PURIFY, REJECT, REJECT_LABEL


def apply_rule(
    flagged: torch.Tensor,
    purifiable: torch.Tensor | None,
    accept_label: torch.Tensor,
    purified_label: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Actions (n,) and labels (n,): accept unflagged inputs with `accept_label`; purify flagged
    inputs where `purifiable` (label `purified_label`); reject the other flagged ones."""
    flagged = flagged.bool().cpu()
    can = torch.zeros_like(flagged) if purifiable is None else purifiable.bool().cpu()
    action = torch.full(flagged.shape, ACCEPT, dtype=torch.long)
    action[flagged & can] = PURIFY
    action[flagged & ~can] = REJECT
    label = accept_label.long().cpu().clone()
    to_purify = action == PURIFY
    if bool(to_purify.any()):
        if purified_label is None:
            raise ValueError("purifiable inputs need purified_label")
        label[to_purify] = purified_label.long().cpu()[to_purify]
    label[action == REJECT] = REJECT_LABEL
    return action, label


def accuracy(labels: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of labels equal to the truth (a rejection counts as wrong)."""
    return float((labels.cpu() == truth.cpu()).float().mean()) if len(truth) else float("nan")


def defended_accuracy(labels: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of inputs rejected or labelled right (Table II's convention for ADV)."""
    if not len(truth):
        return float("nan")
    ok = (labels.cpu() == REJECT_LABEL) | (labels.cpu() == truth.cpu())
    return float(ok.float().mean())


def fooled(labels: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(n,) bool: labelled (not rejected) and wrong — an attack's success on that input."""
    labels, truth = labels.cpu().long(), truth.cpu().long()
    return (labels != truth) & (labels != REJECT_LABEL)


def outcome_rates(labels: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
    """Robust accuracy with rejection, attack success and accept rate from final labels (n,)."""
    labels, truth = labels.cpu().long(), truth.cpu().long()
    n = len(truth)
    rejected = labels == REJECT_LABEL
    wrong = fooled(labels, truth)

    def share(m: torch.Tensor) -> float:
        return float(m.float().mean()) if n else 0.0

    return {
        "robust_accuracy_with_rejection": share(~wrong),
        "attack_success": share(wrong),
        "accept_rate": share(~rejected),
        "rejected": int(rejected.sum()),
        "labelled_right": int((~rejected & (labels == truth)).sum()),
        "labelled_wrong": int(wrong.sum()),
        "n": n,
    }
