"""The default defense in `fmdefense reproduce`: calibrate on clean VAL, choose its combination
rule and purification policy on a *tuning set* (attacks on VAL images, never the reported sets),
then measure it on the reported sets and ablate what each score adds.

Candidates: combine ∈ {fisher, min_p, harmonic} × tails ∈ {empirical, exponential} × purify ∈
{reject, paper, consistent}; every available score is fused. The first session fixed fisher and
min_p with empirical p-values before any attack was run; harmonic and the exponential tails were
added after the reported sets' ablation showed empirical p-values capping a strong score's
evidence (see `fusion`), and are chosen, like the rest, on the tuning set only. The choice
maximises the worst defended accuracy over the tuning attacks, then the mean, then VAL clean
accuracy (ties: earlier candidate).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import torch

from fmdefense.core.artifacts import load_tensors, save_tensors
from fmdefense.core.chunks import config_hash
from fmdefense.core.fingerprints import fingerprint, fingerprint_tensor
from fmdefense.defenses import fusion
from fmdefense.defenses.default import PURIFY_POLICIES, DefaultDefense, ScorePass
from fmdefense.defenses.rule import accuracy, defended_accuracy

log = logging.getLogger(__name__)
Sets = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (x (n, C, H, W), truth (n,))
CANDIDATES = tuple(itertools.product(fusion.COMBINERS, fusion.TAILS, PURIFY_POLICIES))
FIELDS = ("s", "label", "recon_label", "dgmm_label", "recon_s")


def cached_pass(folder: Path, name: str, defense: DefaultDefense, x: torch.Tensor) -> ScorePass:
    """The defense's score pass over a set (and its reconstructions' scores), cached by inputs,
    models and what is scored."""
    key = {
        "input": fingerprint_tensor(x),
        "models": defense.fingerprints_,
        "names": defense.names_,
        "squeezers": list(defense.config.squeezers),
        "autoencoders": [fingerprint(ae) for ae in defense.autoencoders or ()],
    }
    path = folder / f"{name}-{config_hash(key)}.safetensors"
    if path.is_file():
        t = load_tensors(path)
        return ScorePass(t["s"], t["label"], t["recon_label"], t["dgmm_label"], None, t["recon_s"])
    p = defense.score_pass(x, with_recon_scores=True)
    save_tensors(path, {k: getattr(p, k) for k in FIELDS})
    return ScorePass(p.s, p.label, p.recon_label, p.dgmm_label, None, p.recon_s)


def policy_rows(
    defense: DefaultDefense, passes: dict[str, ScorePass], truth: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Per set: share flagged, accepted/purified/rejected, accuracy (CLE) or defended (ADV)."""
    rows = {}
    for name, p in passes.items():
        dec = defense.decide_from_pass(p)
        y = truth[name]
        counts = dec.counts()
        row = {k: v / len(y) for k, v in counts.items()}
        row["flagged"] = float(dec.flagged.float().mean())
        row["n"] = len(y)
        row["no_defense"] = accuracy(dec.input_label, y)
        row["accuracy"] = accuracy(dec.label, y)
        row["defended"] = defended_accuracy(dec.label, y)
        rows[name] = row
    return rows


def _criterion(rows: dict[str, dict[str, float]], clean: str) -> tuple[float, float, float]:
    adv = [r["defended"] for k, r in rows.items() if k != clean]
    return (min(adv), sum(adv) / len(adv), rows[clean]["accuracy"])


def candidate(key: tuple[str, str, str]) -> dict[str, str]:
    """A candidate's DefaultConfig fields from its (combine, tails, purify) key."""
    return dict(zip(("combine", "tails", "purify"), key, strict=True))


def choose_candidate(
    defense: DefaultDefense, passes: dict[str, ScorePass], truth: dict[str, torch.Tensor]
) -> tuple[tuple[str, str, str], dict[str, Any]]:
    """The (combine, tails, purify) candidate that defends the tuning attacks best; every row
    kept."""
    table: dict[str, Any] = {}
    best, best_key = None, None
    for key in CANDIDATES:
        rows = policy_rows(defense.with_config(**candidate(key)), passes, truth)
        table["/".join(key)] = rows
        crit = _criterion(rows, "VAL")
        if best is None or crit > best:
            best, best_key = crit, key
    assert best_key is not None
    return best_key, table


def _pmatrix(defense: DefaultDefense, s: torch.Tensor) -> torch.Tensor:
    return fusion.log_pvalues(defense.reference_, s, defense.config.tails)


def resistance_scores(r: torch.Tensor) -> torch.Tensor:
    """The morphs' two summaries as score columns (n, 2): 1 − mean_i r_i, 1 − min_i r_i."""
    return torch.stack([1 - r.mean(1), 1 - r.min(1).values], 1)


def _flag_share(
    p_cal: torch.Tensor, p_set: dict[str, torch.Tensor], cols: list[int], rule: str, alpha: float
) -> dict[str, float]:
    """Share flagged per set when the columns `cols` of the p-value matrices are fused."""
    thr = fusion.threshold_at(fusion.combine(p_cal[:, cols], rule), alpha)
    return {
        k: float((fusion.combine(p[:, cols], rule) > thr).float().mean()) for k, p in p_set.items()
    }


def ablation(
    defense: DefaultDefense,
    passes: dict[str, ScorePass],
    resistance: dict[str, torch.Tensor] | None = None,
    val_resistance: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Share flagged per set at α (the detector alone) for score subsets: each alone,
    leave-one-out, all (the default); and, where the morphs' resistance exists, the morphs alone
    and the default + morphs, on the images FM-Defense was run on (`morph_images`)."""
    names, rule, alpha = list(defense.names_), defense.config.combine, defense.config.alpha
    p_cal = _pmatrix(defense, defense.calibration_)
    p_set = {k: _pmatrix(defense, p.s) for k, p in passes.items()}
    base = list(range(len(names)))
    subsets: dict[str, list[int]] = {"default (all one-decode scores)": base}
    subsets |= {f"only {names[i]}": [i] for i in base}
    subsets |= {f"without {names[i]}": [j for j in base if j != i] for i in base}
    out: dict[str, Any] = {
        label: _flag_share(p_cal, p_set, cols, rule, alpha) for label, cols in subsets.items()
    }
    if resistance is None or val_resistance is None:
        return out
    ref_ix, cal_ix = fusion.split_indices(len(val_resistance), defense.config.seed)
    val_r = resistance_scores(val_resistance)
    tails = defense.config.tails
    p_cal_r = torch.cat([p_cal, fusion.log_pvalues(val_r[ref_ix], val_r[cal_ix], tails)], 1)
    p_set_r = {}
    for k, p in p_set.items():
        n = len(resistance[k])
        extra = fusion.log_pvalues(val_r[ref_ix], resistance_scores(resistance[k]), tails)
        p_set_r[k] = torch.cat([p[:n], extra], 1)
    morphs = [len(base), len(base) + 1]
    out["one-decode default on the same images"] = _flag_share(p_cal_r, p_set_r, base, rule, alpha)
    out["morphs only (resistance)"] = _flag_share(p_cal_r, p_set_r, morphs, rule, alpha)
    out["default + morphs"] = _flag_share(p_cal_r, p_set_r, base + morphs, rule, alpha)
    out["morph_images"] = {k: len(v) for k, v in resistance.items()}
    return out


def stage_default(
    run: Path,
    defense: DefaultDefense,
    val: tuple[torch.Tensor, torch.Tensor],
    sets: Sets,
    tuning: Sets,
    resistance: dict[str, torch.Tensor] | None = None,
    val_resistance: torch.Tensor | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Fit on VAL, choose on the tuning attacks, measure on `sets` (CLE first), ablate; saves
    the chosen defense under run/default/defense. Returns results and the fused statistic per
    reported set (for the ROC figure)."""
    folder = run / "default"
    base = defense.fit(val[0])
    tune = {"VAL": val, **tuning}
    tune_passes = {k: cached_pass(folder / "tuning", k, base, x) for k, (x, _) in tune.items()}
    key, tuning_table = choose_candidate(base, tune_passes, {k: y for k, (_, y) in tune.items()})
    chosen = base.with_config(**candidate(key))
    chosen.save(folder / "defense")
    passes = {k: cached_pass(folder / "sets", k, chosen, x) for k, (x, _) in sets.items()}
    truth = {k: y for k, (_, y) in sets.items()}
    policies = {
        "/".join(k): policy_rows(chosen.with_config(**candidate(k)), passes, truth)
        for k in CANDIDATES
    }
    stat = {k: chosen.statistic(p.s) for k, p in passes.items()}
    log.info("default defense: chose %s on the tuning set", "/".join(key))
    results = {
        "chosen": candidate(key),
        "names": chosen.names_,
        "alpha": chosen.config.alpha,
        "val_fpr_held_out": chosen.val_fpr_,
        "tuning_sets": {k: len(y) for k, (_, y) in tune.items()},
        "tuning": tuning_table,
        "table": policies["/".join(key)],
        "policies": policies,
        "ablation": ablation(chosen, passes, resistance, val_resistance),
    }
    return results, stat
