"""Detection metrics: ROC/AUC and TPR at fixed FPR (accuracies: fmdefense.defenses.rule).

Scores follow one convention: higher = more suspicious. AUC comes from SciPy's Mann–Whitney U
(ties count one half); the ROC curve itself is a few lines of NumPy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest, mannwhitneyu


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return (
        x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, float)
    )


def roc_auc(clean: torch.Tensor | np.ndarray, adv: torch.Tensor | np.ndarray) -> float:
    """P(score_adv > score_clean) + ½ P(equal): the area under the ROC curve."""
    c, a = _np(clean), _np(adv)
    if len(c) == 0 or len(a) == 0:
        return float("nan")
    u = mannwhitneyu(a, c, alternative="two-sided").statistic
    return float(u / (len(a) * len(c)))


def roc_curve(
    clean: torch.Tensor | np.ndarray, adv: torch.Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) over every threshold `flag score >= t`, from (0, 0) to (1, 1)."""
    c, a = _np(clean), _np(adv)
    ts = np.unique(np.concatenate([c, a]))[::-1]
    fpr = np.array([0.0, *[(c >= t).mean() for t in ts]])
    tpr = np.array([0.0, *[(a >= t).mean() for t in ts]])
    return fpr, tpr


def tpr_at_fpr(
    clean: torch.Tensor | np.ndarray, adv: torch.Tensor | np.ndarray, max_fpr: float
) -> float:
    """Largest detection rate on `adv` with the clean false-positive rate ≤ max_fpr."""
    fpr, tpr = roc_curve(clean, adv)
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max())


def wilson_interval(share: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a share measured on n items (SciPy's binomtest): the
    binomial error stated beside a figure, honest at 0 % and 100 % on small sets."""
    if n < 1:
        raise ValueError(f"a share needs at least one item, got n={n}")
    ci = binomtest(round(share * n), n).proportion_ci(level, method="wilson")
    return float(ci.low), float(ci.high)


def pct(share: Any) -> str:
    """A share as "97.5 %" ("–" when not measured)."""
    return "–" if share is None else f"{100 * float(share):.1f} %"


def pct_with_interval(share: Any, n: Any) -> str:
    """ "97.5 % (91.3–99.3)": a share and its 95 % Wilson interval ("–" when not measured)."""
    if share is None or not isinstance(n, int) or n < 1:
        return pct(share)
    low, high = wilson_interval(float(share), n)
    return f"{pct(share)} ({100 * low:.1f}–{100 * high:.1f})"
