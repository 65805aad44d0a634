"""Detection metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fmdefense.defenses.rule import accuracy, defended_accuracy
from fmdefense.evaluation.metrics import (
    pct_with_interval,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
    wilson_interval,
)


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


def test_wilson_interval_matches_the_closed_form_and_stays_inside_zero_one() -> None:
    # Wilson's closed form at z = 1.96 for 75 of 80 (the ORL reconstruction figure)
    p, n, z = 75 / 80, 80, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = wilson_interval(p, n)
    assert low == pytest.approx(centre - half, abs=1e-9)
    assert high == pytest.approx(centre + half, abs=1e-9)
    low0, high0 = wilson_interval(0.0, 80)
    assert low0 == 0.0 and 0.0 < high0 < 0.06  # 0 of 80 is not "exactly 0"
    assert wilson_interval(1.0, 80)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_pct_with_interval_renders_share_and_bounds() -> None:
    assert pct_with_interval(None, 80) == "–"
    assert pct_with_interval(0.975, "–") == "97.5 %"
    text = pct_with_interval(0.9375, 80)
    assert text.startswith("93.8 % (") and text.endswith(")")
    low, high = (float(v) for v in text[8:-1].split("–"))
    assert low < 93.75 < high
