"""Decisions as a CSV table: one row per input, written atomically with the csv module.

Columns: `image` (file path or `index i`), `action` (accept | purify | reject), `label` (the
final label, −1 where rejected), `input_label` (the protected classifier's own label C(x)),
`true_label` (only when the source gave labels), then one column per named score of the
defense (larger = more suspicious), in the defense's order.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from fmdefense.core.artifacts import atomic_write_bytes
from fmdefense.core.errors import InputError
from fmdefense.defenses.base import ACTIONS, Decision

FIXED_COLUMNS = ("image", "action", "label", "input_label")


def decision_header(dec: Decision, with_truth: bool) -> list[str]:
    """The column names of a decisions table."""
    fixed = [*FIXED_COLUMNS, *(["true_label"] if with_truth else [])]
    clash = sorted(set(fixed) & set(dec.scores))
    if clash:
        raise InputError(f"score names {clash} collide with the table's own columns")
    return [*fixed, *dec.scores]


def decision_rows(
    dec: Decision, names: list[str], truth: torch.Tensor | None = None
) -> list[list[str]]:
    """One row of strings per input, in `decision_header` order."""
    if len(names) != len(dec) or (truth is not None and len(truth) != len(dec)):
        raise InputError(f"{len(dec)} decisions but {len(names)} names / labels")
    action, label, input_label = dec.action.tolist(), dec.label.tolist(), dec.input_label.tolist()
    scores = [v.float().tolist() for v in dec.scores.values()]
    rows = []
    for i, name in enumerate(names):
        row = [name, ACTIONS[action[i]], str(label[i]), str(input_label[i])]
        if truth is not None:
            row.append(str(int(truth[i])))
        row += [f"{s[i]:.6g}" for s in scores]
        rows.append(row)
    return rows


def write_decisions_csv(
    path: Path, dec: Decision, names: list[str], truth: torch.Tensor | None = None
) -> None:
    """Write the decisions table to `path` (a temporary file, then an atomic rename)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(decision_header(dec, truth is not None))
    writer.writerows(decision_rows(dec, names, truth))
    atomic_write_bytes(Path(path), buf.getvalue().encode())
