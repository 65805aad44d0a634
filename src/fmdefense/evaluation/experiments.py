"""The paper's experiments as functions of resistances and labels, each returning JSON-ready data
and writing a PNG: Figure 1, Figure 4, Figure 5, Table II, and ROC/TPR beyond the paper.

Inputs are the per-set outputs of the defense: resistance r (n, m), the input label C(x), the
purified label, and the true label. Nothing here runs a network, so sweeps are cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from fmdefense.defenses.base import REJECT_LABEL
from fmdefense.defenses.fm.thresholds import distance, distance_threshold, flags, thresholds
from fmdefense.defenses.rule import accuracy, apply_rule, defended_accuracy
from fmdefense.evaluation.metrics import roc_auc, roc_curve, tpr_at_fpr

FPR_TARGETS = (0.001, 0.01, 0.05)
SELECTION_RHO = 0.95  # code-selection bars: at 0.999 no selection flags anything (see README)


@dataclass(frozen=True)
class SetOutputs:
    """What the defense measured on one input set (CLE or one attack's ADV)."""

    resistance: torch.Tensor  # (n, m)
    input_label: torch.Tensor  # (n,) C(x)
    purified_label: torch.Tensor  # (n,) C(reconstruction)
    truth: torch.Tensor  # (n,)


def suspicion(r: torch.Tensor) -> torch.Tensor:
    """Scalar score for ROC curves: 1 − min_i r_i, ties broken by 1 − mean r (tiny weight)."""
    return 1 - r.min(1).values + 1e-3 * (1 - r.mean(1))


def final_labels(
    out: SetOutputs, theta: torch.Tensor, theta_d: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and suspicious flags under thresholds θ_r, θ_d (the one accept/purify/reject rule)."""
    sus = flags(out.resistance, theta)
    purifiable = distance(out.resistance, theta) <= theta_d + 1e-12
    _, labels = apply_rule(sus, purifiable, out.input_label, out.purified_label)
    return labels, sus


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure1(cle: SetOutputs, adv: dict[str, SetOutputs], codes: list[int], path: Path) -> dict:
    """Average resistance per code, CLE vs ADV per attack (paper Figure 1)."""
    data = {"codes": codes, "CLE": cle.resistance.mean(0).tolist()}
    data |= {name: o.resistance.mean(0).tolist() for name, o in adv.items()}
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(codes) + 2), 3.5))
    width = 0.8 / (1 + len(adv))
    for k, name in enumerate(["CLE", *adv]):
        ax.bar(np.arange(len(codes)) + k * width, data[name], width, label=name)
    ax.set_xticks(np.arange(len(codes)) + 0.4 - width / 2, [f"f{c}" for c in codes])
    ax.set(ylabel="mean resistance", ylim=(0, 1.05), title="Resistance per code (Figure 1)")
    ax.legend(fontsize=8)
    _save(fig, path)
    return data


def resistance_histograms(
    cle: SetOutputs, adv: dict[str, SetOutputs], path: Path, bins: int = 20
) -> dict[str, Any]:
    """Histograms of min_i r_i (the detection score) and mean_i r_i per input, CLE vs each
    attack: one panel per attack and statistic. Counts are shares of each set."""
    edges = torch.linspace(0, 1, bins + 1)
    stats = {"min": lambda r: r.min(1).values, "mean": lambda r: r.mean(1)}

    def share(r: torch.Tensor) -> list[float]:
        return (torch.histc(r.float(), bins, 0, 1) / len(r)).tolist()

    data: dict[str, Any] = {"edges": edges.tolist()}
    for stat, f in stats.items():
        data[stat] = {"CLE": share(f(cle.resistance))}
        data[stat] |= {name: share(f(o.resistance)) for name, o in adv.items()}
    fig, axes = plt.subplots(2, len(adv), figsize=(3.2 * len(adv), 5), squeeze=False)
    centers, width = (edges[:-1] + 0.5 / bins).numpy(), 1 / bins
    for row, stat in enumerate(stats):
        for col, name in enumerate(adv):
            ax = axes[row][col]
            ax.bar(centers, data[stat]["CLE"], width, alpha=0.6, label="CLE")
            ax.bar(centers, data[stat][name], width, alpha=0.6, label=name)
            ax.set(xlabel=f"{stat}_i r_i", ylabel="share of inputs", xlim=(0, 1))
            ax.legend(fontsize=7)
    _save(fig, path)
    return data


def _subset(o: SetOutputs, ix: torch.Tensor) -> SetOutputs:
    return SetOutputs(o.resistance[:, ix], o.input_label, o.purified_label, o.truth)


def _detection(cle: SetOutputs, adv: SetOutputs, theta: torch.Tensor) -> dict[str, float]:
    clean_ok = float((~flags(cle.resistance, theta)).float().mean())
    adv_ok = float(flags(adv.resistance, theta).float().mean())
    n_c, n_a = len(cle.truth), len(adv.truth)
    return {
        "clean": clean_ok,
        "adv": adv_ok,
        "overall": (clean_ok * n_c + adv_ok * n_a) / (n_c + n_a),
    }


def figure4(
    cle: SetOutputs,
    adv: dict[str, SetOutputs],
    val_r: torch.Tensor,
    selections: dict[str, list[int]],
    path: Path,
) -> dict:
    """Detection accuracy (Adv, Clean, Overall) vs the unified threshold, vs ρ with per-code
    thresholds, and for different code selections (paper Figure 4)."""
    m = cle.resistance.shape[1]
    grid = [round(t, 2) for t in np.linspace(0, 1, 21)]
    rhos = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999]
    data: dict[str, Any] = {"unified": {}, "rho": {}, "selection": {}, "grid": grid, "rhos": rhos}
    fig, axes = plt.subplots(3, len(adv), figsize=(4 * len(adv), 9), squeeze=False)
    for col, (name, a) in enumerate(adv.items()):
        uni = [_detection(cle, a, torch.full((m,), t)) for t in grid]
        per = [_detection(cle, a, thresholds(val_r, rho, "per_code")) for rho in rhos]
        data["unified"][name], data["rho"][name] = uni, per
        for key in ("adv", "clean", "overall"):
            axes[0, col].plot(grid, [d[key] for d in uni], label=key)
            axes[1, col].plot(range(len(rhos)), [d[key] for d in per], marker="o", label=key)
        axes[0, col].set(title=f"{name}: unified θ", xlabel="θ", ylabel="detection accuracy")
        axes[1, col].set(title=f"{name}: per-code θ at ρ", xlabel="ρ")
        axes[1, col].set_xticks(range(len(rhos)), [str(r) for r in rhos], fontsize=7)
        sel = {}
        for label, idx in selections.items():
            ix = torch.tensor(idx, dtype=torch.long)
            theta = thresholds(val_r[:, ix], SELECTION_RHO, "per_code")
            sel[label] = _detection(_subset(cle, ix), _subset(a, ix), theta)
        data["selection"][name] = sel
        x = np.arange(len(sel))
        for k, key in enumerate(("adv", "clean", "overall")):
            axes[2, col].bar(x + k * 0.27, [sel[s][key] for s in sel], 0.27, label=key)
        axes[2, col].set_xticks(x + 0.27, list(sel), fontsize=7, rotation=15)
        axes[2, col].set(title=f"{name}: code selections (ρ = {SELECTION_RHO})")
    axes[0, 0].legend(fontsize=8)
    _save(fig, path)
    return data


def figure5(
    cle: SetOutputs,
    adv: SetOutputs,
    val_r: torch.Tensor,
    path: Path,
    unified: tuple[float, ...] = (0.6, 0.8, 1.0),
) -> dict:
    """Purification recall (clean, adversarial, overall) and final accuracy vs η at several
    unified θ_r (paper Figure 5). Recall = share of the salvageable set regaining its label."""
    m = cle.resistance.shape[1]
    etas = [round(e, 2) for e in np.linspace(0.1, 1.0, 10)]
    data: dict[str, Any] = {"etas": etas}
    fig, axes = plt.subplots(1, len(unified), figsize=(4 * len(unified), 3.5), squeeze=False)
    for col, t in enumerate(unified):
        theta = torch.full((m,), t)
        rows = []
        for eta in etas:
            theta_d = distance_threshold(val_r, theta, eta)
            row: dict[str, Any] = {"theta_d": theta_d}
            recov = {}
            for key, o in (("clean", cle), ("adv", adv)):
                labels, sus = final_labels(o, theta, theta_d)
                salvage = sus & (labels != REJECT_LABEL)
                recov[key] = (int((labels[salvage] == o.truth[salvage]).sum()), int(salvage.sum()))
                row[f"{key}_recall"] = recov[key][0] / recov[key][1] if recov[key][1] else None
            got = recov["clean"][0] + recov["adv"][0]
            tot = recov["clean"][1] + recov["adv"][1]
            row["overall_recall"] = got / tot if tot else None
            lab_c, _ = final_labels(cle, theta, theta_d)
            lab_a, _ = final_labels(adv, theta, theta_d)
            n_c, n_a = len(cle.truth), len(adv.truth)
            row["final_accuracy"] = (
                accuracy(lab_c, cle.truth) * n_c + defended_accuracy(lab_a, adv.truth) * n_a
            ) / (n_c + n_a)
            rows.append(row)
        data[f"theta_{t}"] = rows
        ax = axes[0, col]
        for key in ("clean_recall", "adv_recall", "overall_recall", "final_accuracy"):
            ys = [np.nan if r[key] is None else r[key] for r in rows]
            ax.plot(etas, ys, marker=".", label=key)
        ax.set(title=f"unified θ_r = {t}", xlabel="η", ylim=(0, 1.05))
    axes[0, 0].legend(fontsize=7)
    _save(fig, path)
    return data


def table2(
    cle: SetOutputs, adv: dict[str, SetOutputs], theta: torch.Tensor, theta_d: float
) -> dict:
    """Accuracy with no defense and with FM-Defense per attack, plus clean accuracy (Table II).

    ADV "with defense" follows the paper (rejected or true label counts as defended); the plain
    accuracy of the final labels (a rejection counts as wrong) is given beside it."""
    lab_c, _ = final_labels(cle, theta, theta_d)
    rows: dict[str, Any] = {
        "clean": {
            "no_defense": accuracy(cle.input_label, cle.truth),
            "fm_defense": accuracy(lab_c, cle.truth),
            "n": len(cle.truth),
        }
    }
    for name, o in adv.items():
        lab, _ = final_labels(o, theta, theta_d)
        rows[name] = {
            "no_defense": accuracy(o.input_label, o.truth),
            "fm_defense": defended_accuracy(lab, o.truth),
            "fm_defense_plain": accuracy(lab, o.truth),
            "n": len(o.truth),
        }
    return rows


def roc(cle: SetOutputs, adv: dict[str, SetOutputs], path: Path) -> dict:
    """ROC curves and AUC per attack of the score 1 − min_i r_i; TPR at FPR 0.1 %, 1 %, 5 %."""
    sc = suspicion(cle.resistance)
    data = {}
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, o in adv.items():
        sa = suspicion(o.resistance)
        fpr, tpr = roc_curve(sc, sa)
        auc = roc_auc(sc, sa)
        data[name] = {"auc": auc, **{f"tpr_at_fpr_{f}": tpr_at_fpr(sc, sa, f) for f in FPR_TARGETS}}
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false-positive rate (CLE)", ylabel="detection rate (ADV)", title="ROC")
    ax.legend(fontsize=8)
    _save(fig, path)
    return data


def code_agreement(
    val_r: torch.Tensor, cle: SetOutputs, adv: dict[str, SetOutputs], spread: float = 0.05
) -> dict:
    """Do the codes carry separate evidence? Per set (VAL's resistances (n, m) first): the share
    of r_i exactly 0 or 1, of inputs whose r_i span at most `spread` and of inputs with every
    r_i = 0; per attack, the ROC-AUC of each single code's 1 − r_i (min / median / max over
    codes) beside the all-code score (1 − min_i r_i)."""
    out: dict[str, Any] = {}
    for name, r in {
        "VAL": val_r,
        "CLE": cle.resistance,
        **{k: o.resistance for k, o in adv.items()},
    }.items():
        row: dict[str, Any] = {
            "binary": float(((r == 0) | (r == 1)).float().mean()),
            # float32 rounding: 0.95 − 0.90 is a hair above 0.05
            "codes_agree": float(
                (r.max(1).values - r.min(1).values <= spread + 1e-6).float().mean()
            ),
            "all_zero": float((r.max(1).values == 0).float().mean()),
        }
        if name not in ("VAL", "CLE"):
            per = sorted(roc_auc(1 - cle.resistance[:, i], 1 - r[:, i]) for i in range(r.shape[1]))
            row |= {"auc_one_code": (per[0], float(np.median(per)), per[-1])}
            row["auc_all_codes"] = roc_auc(suspicion(cle.resistance), suspicion(r))
        out[name] = row
    return out


def roc_by_defense(scores: dict[str, dict[str, torch.Tensor]], path: Path) -> dict[str, Any]:
    """One ROC panel per attack with a curve per defense; each defense's scores are
    {"CLE": (n,), attack: (n,)} (higher = more suspicious), compared on the images it scored."""
    attacks = sorted({k for s in scores.values() for k in s if k != "CLE"})
    fig, axes = plt.subplots(1, max(len(attacks), 1), figsize=(4 * max(len(attacks), 1), 3.8))
    axes = np.atleast_1d(axes)
    data: dict[str, Any] = {}
    for ax, attack in zip(axes, attacks, strict=False):
        for defense, s in scores.items():
            if attack not in s or not len(s["CLE"]):
                continue
            fpr, tpr = roc_curve(s["CLE"], s[attack])
            auc = roc_auc(s["CLE"], s[attack])
            data.setdefault(defense, {})[attack] = {"auc": auc, "n": len(s[attack])}
            ax.plot(fpr, tpr, label=f"{defense} ({auc:.3f}, n={len(s[attack])})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false-positive rate (CLE)", ylabel="detection rate", title=attack)
        ax.legend(fontsize=7)
    _save(fig, path)
    return data


def score_detection(clean: torch.Tensor, adv: dict[str, torch.Tensor]) -> dict[str, Any]:
    """AUC and TPR at fixed FPR for any scalar suspicion score (higher = more suspicious)."""
    return {
        name: {
            "auc": roc_auc(clean, a),
            **{f"tpr_at_fpr_{f}": tpr_at_fpr(clean, a, f) for f in FPR_TARGETS},
        }
        for name, a in adv.items()
    }


def breakdown(outs: dict[str, SetOutputs], theta: torch.Tensor, theta_d: float) -> dict:
    """Share of inputs accepted, purified and rejected per set."""
    data = {}
    for name, o in outs.items():
        sus = flags(o.resistance, theta)
        dist = distance(o.resistance, theta)
        purify = sus & (dist <= theta_d + 1e-12)
        data[name] = {
            "accept": float((~sus).float().mean()),
            "purify": float(purify.float().mean()),
            "reject": float((sus & ~purify).float().mean()),
        }
    return data


def figure6(rows: dict[str, torch.Tensor], path: Path, n: int = 8) -> None:
    """Image grid: one row per kind (clean, adversarial, purified, FactorVAE-style)."""
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0), squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            img = imgs[c].detach().cpu().float()
            ax.imshow(
                (img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy(),
                cmap="gray",
                vmin=0,
                vmax=1,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right")
    _save(fig, path)
