"""Detection metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmdefense.defenses.rule import accuracy, defended_accuracy
from fmdefense.evaluation.metrics import roc_auc, roc_curve, tpr_at_fpr


def test_auc_of_separated_reversed_and_tied_scores() -> None:
    assert roc_auc([0.0, 0.1], [0.5, 0.9]) == 1.0
    assert roc_auc([0.5, 0.9], [0.0, 0.1]) == 0.0
    assert roc_auc([0.3, 0.3], [0.3, 0.3]) == 0.5
    assert roc_auc([0.0, 0.2, 0.4], [0.1, 0.3, 0.5]) == pytest.approx(6 / 9)


def test_auc_is_the_area_under_the_curve() -> None:
    rng = np.random.default_rng(0)
    c, a = rng.normal(0, 1, 300), rng.normal(1, 1, 200)
    fpr, tpr = roc_curve(c, a)
    assert fpr[0] == 0 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(c, a), abs=1e-9)


def test_tpr_at_fixed_fpr() -> None:
    clean = [0.0] * 98 + [0.5, 1.0]  # 1 % of clean inputs score 1.0, 1 % score 0.5
    adv = [1.0, 0.5, 0.5, 0.2]
    assert tpr_at_fpr(clean, adv, 0.01) == 0.25
    assert tpr_at_fpr(clean, adv, 0.02) == 1.0  # flag >= 0.2: still 2 % of clean
    assert tpr_at_fpr(clean, adv, 0.0) == 0.0


def test_table_ii_conventions() -> None:
    truth = torch.tensor([1, 2, 3, 4])
    labels = torch.tensor([1, -1, 0, 4])
    assert accuracy(labels, truth) == 0.5
    assert defended_accuracy(labels, truth) == 0.75
