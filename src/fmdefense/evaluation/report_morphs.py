"""The report's sections on what FM-Defense's morphs add: whether the codes carry separate
evidence, and the morphs against one decode (the reconstruction check) and MagNet."""

from __future__ import annotations

from typing import Any

from fmdefense.evaluation.metrics import pct as _pct


def recon_section(results: dict[str, Any]) -> list[str]:
    """FM-Defense's morphs against the one-decode reconstruction check, same sets and scores."""
    recon = results.get("recon_check")
    if not recon:
        return []
    lines = [
        "## What the morphs add: FM-Defense vs the one-decode reconstruction check",
        "",
        "Reconstruction check: score 1 − p_C(x̂)[C(x)] with x̂ the combo-VAE reconstruction "
        "(one decode per input, against m·N for FM-Defense).",
        "",
        "| attack | FM-Defense AUC | recon check AUC (feature / class mean) | FM TPR @ 1 % / 5 % "
        "| recon TPR @ 1 % / 5 % (feature) |",
        "|---|---|---|---|---|",
    ]
    for name, fm in results["roc"].items():
        f, c = recon["feature"]["detection"][name], recon["class_mean"]["detection"][name]
        lines.append(
            f"| {name} | {fm['auc']:.3f} | {f['auc']:.3f} / {c['auc']:.3f} | "
            f"{_pct(fm['tpr_at_fpr_0.01'])} / {_pct(fm['tpr_at_fpr_0.05'])} | "
            f"{_pct(f['tpr_at_fpr_0.01'])} / {_pct(f['tpr_at_fpr_0.05'])} |"
        )
    magnet = results.get("magnet")
    if magnet:
        lines += [
            "",
            "MagNet (detectors I and II at VAL drop rate 0.001 each, reformer AE I), same sets: "
            f"{_pct(magnet['clean_flagged'])} of CLE flagged.",
            "",
            "| set | MagNet accuracy (rejected ADV counts as defended) | MagNet AUC | "
            "MagNet TPR @ 1 % / 5 % |",
            "|---|---|---|---|",
            f"| clean | {_pct(magnet['table2']['clean'])} | | |",
        ]
        for name, d in magnet["detection"].items():
            lines.append(
                f"| {name} | {_pct(magnet['table2'][name])} | {d['auc']:.3f} | "
                f"{_pct(d['tpr_at_fpr_0.01'])} / {_pct(d['tpr_at_fpr_0.05'])} |"
            )
    return [*lines, ""]


def code_agreement_markdown(agreement: dict[str, Any]) -> str:
    """Per set: how binary the resistances are, how often all codes agree, single-code AUCs."""
    lines = [
        "| set | r_i exactly 0 or 1 | inputs whose r_i span ≤ 0.05 | inputs with every "
        "r_i = 0 | AUC of one code (min / median / max) | AUC of all codes |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in agreement.items():
        one = row.get("auc_one_code")
        cells = " / ".join(f"{v:.3f}" for v in one) if one else "–"
        every = f"{row['auc_all_codes']:.3f}" if "auc_all_codes" in row else "–"
        lines.append(
            f"| {name} | {_pct(row['binary'])} | {_pct(row['codes_agree'])} | "
            f"{_pct(row.get('all_zero'))} | {cells} | {every} |"
        )
    return "\n".join(lines)


def code_agreement_section(results: dict[str, Any]) -> list[str]:
    agreement = results.get("code_agreement")
    if not agreement:
        return []
    return [
        "### Do the codes carry separate evidence?",
        "",
        "When every code's morphs keep or lose the label together, the m codes say one thing "
        "(whether C recognises the decoded input) and one code detects as well as all of them.",
        "",
        code_agreement_markdown(agreement),
        "",
    ]
