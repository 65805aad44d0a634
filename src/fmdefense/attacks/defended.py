"""One judgement of every defense's hard decisions (issue 7), over `Defense.decide`.

An attack succeeds on an input when the defense labels it (accepted, purified or reformed), does
not reject it, and the label is wrong; a rejected input, or one labelled correctly, is a failure.
`outcomes` applies `defenses.rule.outcome_rates` to one `decide` of an input set and adds what
the `Decision` itself says: the actions taken, how many of each were wrong, the mean of each
named score and how many inputs each boolean detail (e.g. one of MagNet's detectors) flagged.
"""

from __future__ import annotations

from typing import Any

import torch

from fmdefense.core.errors import NotFittedError
from fmdefense.defenses.base import ACCEPT, PURIFY, Decision, Defense
from fmdefense.defenses.rule import fooled, outcome_rates


def require_fitted(defense: Defense) -> None:
    """Raise NotFittedError unless `defense` is calibrated."""
    if not defense.is_fitted:
        raise NotFittedError(
            f"the {type(defense).__name__} is not calibrated: call defense.fit(x_val) or load it"
        )


def defended_success(defense: Defense, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per input (n,) bool: the defense's final label is wrong and not a rejection."""
    return fooled(defense.decide(x_adv).label, y)


def decision_counts(dec: Decision, y: torch.Tensor) -> dict[str, Any]:
    """What a Decision adds to the one rule: actions, wrong labels per action, mean scores."""
    y = y.cpu()
    wrong = fooled(dec.label, y)
    accepted, purified = dec.action == ACCEPT, dec.action == PURIFY
    n = len(y)
    flagged: dict[str, Any] = {
        k: int(v.sum()) for k, v in dec.details.items() if v.dtype == torch.bool and v.dim() == 1
    }
    members = dec.details.get("member_flags")  # (n, K) an ensemble's per-member verdicts
    if members is not None:  # what each member alone would accept wrong (C(x) is the label)
        wrong_input = dec.input_label.cpu() != y
        accepted_wrong = ~members.cpu() & wrong_input.view(-1, 1)  # (n, K)
        flagged["member_accepted_wrong"] = [int(c) for c in accepted_wrong.sum(0)]
        flagged["any_member_accepted_wrong"] = int(accepted_wrong.any(1).sum())
    return {
        "actions": dec.counts(),
        "accept_action_rate": float(accepted.float().mean()) if n else 0.0,  # as is, unpurified
        "accepted_wrong": int((accepted & wrong).sum()),
        "purified_wrong": int((purified & wrong).sum()),
        "purified_right": int((purified & (dec.label == y)).sum()),
        "classifier_wrong": int((dec.input_label.cpu() != y).sum()),
        "mean_scores": {k: float(v.float().mean()) if n else 0.0 for k, v in dec.scores.items()},
        **flagged,
    }


def outcomes(defense: Defense, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The one rule on an input set, plus the Decision's own counts, from one `decide`."""
    dec = defense.decide(x)
    return {**outcome_rates(dec.label, y), **decision_counts(dec, y)}
