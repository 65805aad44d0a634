"""The default defense's fusion: p-values (empirical, exponential tails), combinations, the
threshold at α on held-out clean scores, and the tuning-set choice among candidates."""

from __future__ import annotations

import math

import pytest
import torch

from fmdefense.core.errors import InputError
from fmdefense.defenses import fusion
from fmdefense.defenses.default import DefaultConfig, ScorePass
from fmdefense.evaluation.default_stage import CANDIDATES, candidate, choose_candidate


def _clean(n: int, k: int, seed: int) -> torch.Tensor:
    """Clean-like scores (n, k): positive, right-skewed, correlated through a shared factor."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 1, generator=g)
    return (0.7 * shared + 0.7 * torch.randn(n, k, generator=g)).exp()


def test_empirical_pvalues_count_the_reference_at_or_above() -> None:
    ref = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    s = torch.tensor([[0.5], [2.0], [3.5], [9.0]])
    p = fusion.log_pvalues(ref, s, "empirical").exp().flatten()
    assert torch.allclose(p, torch.tensor([5 / 5, 4 / 5, 2 / 5, 1 / 5], dtype=torch.float64))


def test_exponential_tails_match_inside_the_range_and_keep_falling_beyond_it() -> None:
    ref = _clean(1000, 3, seed=1)
    inside = ref[:50]
    emp = fusion.log_pvalues(ref, inside, "empirical")
    assert torch.equal(fusion.log_pvalues(ref, inside, "exponential"), emp)
    top = ref.max(0).values
    beyond = top + torch.tensor([[0.1], [1.0], [10.0]]) * top  # (3, 3) ever further out
    lp = fusion.log_pvalues(ref, beyond, "exponential")
    floor = -math.log(1001)
    assert bool((lp < floor).all())  # beyond every clean value: below the empirical floor
    assert bool((lp[1:] < lp[:-1]).all())  # and falling with the distance
    assert torch.equal(fusion.log_pvalues(ref, beyond, "empirical"), torch.full_like(lp, floor))


def test_a_constant_reference_column_gives_finite_p_values() -> None:
    ref = torch.ones(100, 2)
    lp = fusion.log_pvalues(ref, torch.tensor([[1.0, 2.0]]), "exponential")
    assert bool(torch.isfinite(lp[:, 0]).all())
    assert float(lp[0, 1]) < -1e6  # any value above a constant clean score is far out


def test_combinations_on_hand_computed_p_values() -> None:
    p = torch.tensor([[0.5, 0.1, 0.01]], dtype=torch.float64)
    lp = p.log()
    assert fusion.combine(lp, "fisher").item() == pytest.approx(-2 * float(lp.sum()))
    assert fusion.combine(lp, "min_p").item() == pytest.approx(-math.log(0.01))
    assert fusion.combine(lp, "harmonic").item() == pytest.approx(math.log(2 + 10 + 100))
    with pytest.raises(ValueError, match="unknown combination"):
        fusion.combine(lp, "mean")
    with pytest.raises(ValueError, match="unknown tail"):
        fusion.log_pvalues(p, p, "gaussian")


@pytest.mark.parametrize("key", CANDIDATES[::3])  # every (combine, tails) once
def test_the_threshold_holds_the_clean_false_positive_rate_on_fresh_clean_data(
    key: tuple[str, str, str],
) -> None:
    """Calibrated on one half, thresholded on the other: fresh clean scores are flagged at
    about α (binomial tolerance for 20,000 draws: ±0.5 points at α = 2 %)."""
    rule, tail = key[0], key[1]
    ref, cal, fresh = _clean(1000, 6, 2), _clean(1000, 6, 3), _clean(20000, 6, 4)
    alpha = 0.02
    thr = fusion.threshold_at(fusion.combine(fusion.log_pvalues(ref, cal, tail), rule), alpha)
    fpr = float((fusion.combine(fusion.log_pvalues(ref, fresh, tail), rule) > thr).double().mean())
    assert abs(fpr - alpha) < 0.006, fpr


def test_harmonic_tails_flag_one_score_far_out_where_fisher_dilutes_it() -> None:
    """The failure the empirical floor caused: one score far beyond every clean value, the
    other nine ordinary. Fisher over empirical p-values misses it; harmonic over tails flags it."""
    ref, cal = _clean(1000, 10, 5), _clean(1000, 10, 6)
    x = _clean(200, 10, 7)
    x[:, 0] = ref[:, 0].max() * 3  # one far-out score per input
    flagged = {}
    for rule, tail in (("fisher", "empirical"), ("harmonic", "exponential")):
        stat_cal = fusion.combine(fusion.log_pvalues(ref, cal, tail), rule)
        thr = fusion.threshold_at(stat_cal, 0.01)
        stat = fusion.combine(fusion.log_pvalues(ref, x, tail), rule)
        flagged[rule] = float((stat > thr).double().mean())
    assert flagged["harmonic"] == 1.0
    assert flagged["fisher"] < 0.5


def test_old_default_artifacts_keep_their_empirical_p_values() -> None:
    old = {
        "alpha": 0.01,
        "combine": "fisher",
        "purify": "reject",
        "eta": 0.9,
        "squeezers": ["bits1"],
        "scores": None,
        "batch_size": 8,
        "seed": 0,
    }
    assert DefaultConfig.from_dict(old).tails == "empirical"
    assert DefaultConfig().tails == "exponential"
    with pytest.raises(InputError, match="tails"):
        DefaultConfig(tails="pareto")


class _Table:
    """A stand-in defense for `choose_candidate`: flags by a fixed share per candidate."""

    def __init__(self, flags: dict[tuple[str, str, str], dict[str, torch.Tensor]]) -> None:
        self.flags, self.key = flags, CANDIDATES[0]

    def with_config(self, **changes: str) -> _Table:
        clone = _Table(self.flags)
        clone.key = (changes["combine"], changes["tails"], changes["purify"])
        return clone

    def decide_from_pass(self, p: ScorePass) -> object:
        from fmdefense.defenses.base import Decision
        from fmdefense.defenses.rule import apply_rule

        flagged = self.flags.get(self.key, {}).get(str(len(p.label)), torch.zeros_like(p.label))
        action, label = apply_rule(flagged.bool(), None, p.label, p.recon_label)
        return Decision(action, label, p.label, {})


def test_choose_candidate_maximises_the_worst_defended_tuning_attack() -> None:
    n_val, n_adv = 10, 4  # sets told apart by size in the stand-in
    y_val, y_adv = torch.arange(n_val) % 3, torch.zeros(n_adv, dtype=torch.long)
    val = ScorePass(torch.zeros(n_val, 1), y_val, y_val, y_val)
    adv = ScorePass(torch.zeros(n_adv, 1), torch.ones(n_adv, dtype=torch.long), y_adv, y_adv)
    good = ("harmonic", "exponential", "reject")
    flags = {good: {str(n_adv): torch.ones(n_adv)}, CANDIDATES[0]: {str(n_adv): torch.ones(n_adv)}}
    flags[CANDIDATES[0]][str(n_val)] = torch.ones(n_val)  # defends, at the clean images' cost
    key, table = choose_candidate(_Table(flags), {"VAL": val, "a": adv}, {"VAL": y_val, "a": y_adv})  # type: ignore[arg-type]
    assert key == good
    assert set(table) == {"/".join(k) for k in CANDIDATES}
    assert candidate(key) == {"combine": "harmonic", "tails": "exponential", "purify": "reject"}
