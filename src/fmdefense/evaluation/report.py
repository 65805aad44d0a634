"""report.md from results.json: every number in the report is read from the results dict."""

from __future__ import annotations

from typing import Any

from fmdefense.evaluation.metrics import pct as _pct
from fmdefense.evaluation.metrics import pct_with_interval as _ci
from fmdefense.evaluation.report_default import default_section
from fmdefense.evaluation.report_morphs import code_agreement_section, recon_section

# Figures the paper printed (Table II, MNIST/CelebA columns), for comparison only.
PAPER_TABLE2_MNIST = {
    "clean": {"no_defense": 0.994, "fm_defense": 0.983},
    "fgsm": {
        "no_defense": 0.212,
        "fm_defense": 0.998,
        "defense_gan": 0.8321,
        "magnet": 0.746,
        "fbgan": 0.8043,
    },
    "cw_l2": {
        "no_defense": 0.0,
        "fm_defense": 0.9878,
        "defense_gan": 0.8011,
        "magnet": 0.196,
        "fbgan": 0.908,
    },
    "deepfool_linf": {
        "no_defense": 0.091,
        "fm_defense": 0.997,
        "defense_gan": 0.8114,
        "magnet": 0.494,
    },
}
# CelebA: no clean row in Table II (its classifier: 94.7 %, IV.A)
PAPER_TABLE2_CELEBA = {
    "fgsm": {
        "no_defense": 0.076,
        "fm_defense": 0.999,
        "defense_gan": 0.3217,
        "magnet": 0.592,
        "fbgan": 0.337,
    },
    "cw_l2": {
        "no_defense": 0.0,
        "fm_defense": 0.989,
        "defense_gan": 0.2822,
        "magnet": 0.405,
        "fbgan": 0.355,
    },
    "deepfool_linf": {
        "no_defense": 0.021,
        "fm_defense": 0.998,
        "defense_gan": 0.3017,
        "magnet": 0.534,
    },
}
# ORL is not in the paper: its faces are compared with the paper's face column (CelebA)
PAPER_TABLE2 = {
    "mnist": PAPER_TABLE2_MNIST,
    "celeba": PAPER_TABLE2_CELEBA,
    "orl": PAPER_TABLE2_CELEBA,
}
PAPER_COLUMN = {"mnist": "MNIST", "celeba": "CelebA", "orl": "CelebA"}


def _paper_column(dataset: str) -> str:
    """Which of the paper's Table II columns the quoted cells come from."""
    if dataset not in PAPER_COLUMN:
        return f"its Table II (it has no {dataset} column: those cells stay empty)"
    faces = " (faces: ORL is not in the paper)" if dataset == "orl" else ""
    return f"its Table II, {PAPER_COLUMN[dataset]} column{faces}"


PAPER_FIGURES = {
    "figure1": "paper Figure 1: CLE resistance near 1 on most codes, ADV markedly lower",
    "resistance_histograms": "not in the paper (per-input min_i r_i and mean_i r_i, "
    "top and bottom rows; Figure 1 shows only the means per code)",
    "figure4": "paper Figure 4: adversarial detection > 99.9 % at high thresholds, "
    "overall best ≈ 80 % at unified θ = 30 %",
    "figure5": "paper Figure 5: recall > 95 %, final accuracy ≈ 99 % at η = 100 %",
    "roc": "not in the paper",
    "roc_defenses": "not in the paper (its baselines' figures were quoted, not measured)",
    "figure6": "paper Figure 6: purified digits keep their class; FactorVAE loses it",
    "fbgan_samples": "not in the paper (FBGAN's samples G(z) and reconstructions G(E(x)) of "
    "the first CLE and adversarial images)",
}
# Figures drawn only when the run measured what they show
FIGURE_NEEDS = {"roc_defenses": "roc_defenses", "fbgan_samples": "fbgan"}


def _quoted(quoted: dict[str, Any], name: str) -> dict[str, Any]:
    """The paper's figures for one of its own attacks (none for the high-confidence ones)."""
    paper_attacks = ("clean", "fgsm", "deepfool_linf", "cw_l2-fast", "cw_l2-reference")
    return quoted.get(name.split("-")[0], {}) if name in paper_attacks else {}


def table2_markdown(table: dict[str, Any], dataset: str) -> str:
    """Table II rows: ours measured; the paper's figures (MNIST, CelebA) beside them, labelled as
    quoted."""
    quoted = PAPER_TABLE2.get(dataset, {})
    lines = [
        "| set | n | no defense | FM-Defense (ours) | FM-Defense, rejections wrong | "
        "paper: no defense | paper: FM-Defense |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        q, n = _quoted(quoted, name), row["n"]
        lines.append(
            f"| {name} | {n} | {_ci(row['no_defense'], n)} | {_ci(row['fm_defense'], n)} | "
            f"{_ci(row.get('fm_defense_plain', row['fm_defense']), n)} | "
            f"{_pct(q.get('no_defense'))} | {_pct(q.get('fm_defense'))} |"
        )
    return "\n".join(lines)


def side_by_side_markdown(results: dict[str, Any], dataset: str) -> str:
    """Table II with every defense measured on the same sets, the paper's figures quoted."""
    quoted = PAPER_TABLE2.get(dataset, {})
    t2, joint = results["table2"], results["table2_joint_fpr_5pct"]
    recon = results.get("recon_check", {}).get("feature", {}).get("table2_rho_0.99", {})
    magnet = results.get("magnet", {}).get("table2", {})
    gan = results.get("defense_gan", {})
    n_gan = gan.get("n_per_set", "–")
    fbgan = results.get("fbgan", {}).get("table2", {})
    lines = [
        "| set | no defense | FM-Defense | FM-Defense (joint, VAL FPR ≤ 5 %) | recon check "
        f"(ρ = 0.99) | MagNet | Defense-GAN (first {n_gan}) | FBGAN | paper: FM-Defense | "
        "paper: MagNet | paper: Defense-GAN | paper: FBGAN |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    whole_sets = results.get("default", {}).get("table", {})
    for name, row in t2.items():
        q, n = _quoted(quoted, name), row["n"]  # n: the images FM-Defense ran on
        # the baselines see whole sets (the default's rows record their size)
        whole = whole_sets.get("CLE" if name == "clean" else name, {}).get("n", n)
        n_g = min(whole, n_gan) if isinstance(n_gan, int) else None
        lines.append(
            f"| {name} | {_ci(row['no_defense'], n)} | {_ci(row['fm_defense'], n)} | "
            f"{_ci(joint[name]['fm_defense'], joint[name].get('n', n))} | "
            f"{_ci(recon.get(name), whole)} | {_ci(magnet.get(name), whole)} | "
            f"{_ci(gan.get('table2', {}).get(name), n_g)} | "
            f"{_ci(fbgan.get(name), whole)} | {_pct(q.get('fm_defense'))} | "
            f"{_pct(q.get('magnet'))} | "
            f"{_pct(q.get('defense_gan'))} | {_pct(q.get('fbgan'))} |"
        )
    return "\n".join(lines)


def _side_by_side_section(results: dict[str, Any]) -> list[str]:
    meta = results["meta"]
    gan = results.get("defense_gan", {})
    lines = [
        "## All defenses on the same sets",
        "",
        "Accuracy; an adversarial input counts as defended when rejected or labelled correctly; "
        "in brackets, the 95 % Wilson interval of each measured share. "
        f"Paper columns are quoted from {_paper_column(meta['dataset'])} (other classifiers and "
        "attack settings), not measured here.",
        "",
        side_by_side_markdown(results, meta["dataset"]),
        "",
    ]
    if "skipped" in gan:
        lines += [f"Defense-GAN: {gan['skipped']}.", ""]
    elif gan:
        lines += [
            f"Defense-GAN: R = {gan['search']['restarts']} restarts × L = "
            f"{gan['search']['steps']} steps (paper: 10 × 200), {_pct(gan['clean_flagged'])} of "
            "its CLE images flagged.",
            "",
        ]
    auc = results.get("roc_defenses", {})
    if auc:
        attacks = sorted({a for d in auc.values() for a in d})
        lines += [
            "| defense | " + " | ".join(f"AUC {a}" for a in attacks) + " |",
            "|---|" + "---|" * len(attacks),
        ]
        for defense, row in auc.items():
            cells = [f"{row[a]['auc']:.3f}" if a in row else "–" for a in attacks]
            lines.append(f"| {defense} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _by_defense(adaptive: dict[str, Any]) -> list[tuple[str, Any]]:
    """Defenses in a fixed order (the default first, then FM-Defense), whatever order
    results.json stored."""
    order = {"default": 0, "fm": 1, "magnet": 2, "defensegan": 3, "fbgan": 4}
    return sorted(adaptive.items(), key=lambda kv: (order.get(kv[0], 9), kv[0]))


def _attack_results(adaptive: dict[str, Any]) -> list[tuple[str, Any, str, Any]]:
    """(defense kind, its summary, attack name, that attack's results), defenses in order."""
    return [
        (kind, summary, attack, res)
        for kind, summary in _by_defense(adaptive)
        for attack, res in summary["attacks"].items()
    ]


def adaptive_markdown(adaptive: dict[str, Any]) -> str:
    """Robust accuracy with rejection per defense and ε under its own adaptive attack."""
    lines = [
        "| defense | attack | n | clean accept rate | ε | robust accuracy with rejection | "
        "attack success | s / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, summary, attack, res in _attack_results(adaptive):
        for row in res["per_eps"]:
            lines.append(
                f"| {kind} | {attack} | {summary['n']} | "
                f"{_pct(summary['clean']['accept_rate'])} | {row['eps']} | "
                f"{_pct(row['robust_accuracy_with_rejection'])} | "
                f"{_pct(row['attack_success'])} | {row['seconds_per_image']:.2f} |"
            )
    return "\n".join(lines)


def _flag(value: Any) -> str:
    return "–" if value is None else ("yes" if value else "**no**")


def sanity_markdown(adaptive: dict[str, Any]) -> str:
    """The sanity checks of each defense's adaptive attack, one row each (– when not run)."""
    lines = [
        "| defense | attack | success by ε | 2× steps | 2× restarts | bare classifier | "
        "unbounded ε | rises with ε | passed | converged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, _, attack, res in _attack_results(adaptive):
        s = res["sanity"]
        unbounded = (
            f"{_pct(s['success_unbounded'])} at {s['unbounded_eps']:g}"
            if "unbounded_eps" in s
            else "–"
        )
        lines.append(
            f"| {kind} | {attack} | {' / '.join(_pct(v) for v in s['success_by_eps'])} | "
            f"{_pct(s.get('success_double_budget'))} | {_pct(s.get('success_double_restarts'))} | "
            f"{_pct(s.get('undefended_success'))} | {unbounded} | "
            f"{_flag(s.get('success_non_decreasing_in_eps'))} | {_flag(s.get('passed'))} | "
            f"{_flag(s.get('converged'))} |"
        )
    return "\n".join(lines)


def _adaptive_section(results: dict[str, Any]) -> list[str]:
    adaptive = results.get("adaptive")
    if not adaptive:
        return []
    lines = [
        "## Security against an attacker who knows the defense",
        "",
        "White-box L∞ attacks on each defended pipeline (its own adaptive attack), judged on the "
        "defense's hard decisions: an adversarial input is safe when rejected or labelled "
        "correctly; attack success = accepted (or purified) and wrong.",
        "",
        adaptive_markdown(adaptive),
        "",
        "Operating points: "
        + "; ".join(
            f"{kind}: {summary.get('operating_point', 'as fitted')}"
            for kind, summary in _by_defense(adaptive)
        )
        + ".",
        "",
        "Sanity checks (attack success at the largest ε with twice the PGD steps and with twice "
        "the restarts, PGD on the bare classifier, success at an unbounded ε). *Passed*: "
        "success rises with ε, twice the restarts is not lower (their first restart repeats the "
        "run), twice the steps is not lower by more than two binomial standard errors (another "
        "trajectory: the step-size schedule stretches), the bare classifier and the unbounded ε "
        "reach ≥ 99 %. *Converged*: neither doubling gains more than two standard errors; when "
        "not, the robust accuracy at the largest ε is an upper bound.",
        "",
        sanity_markdown(adaptive),
    ]
    return [*lines, ""]


def render(results: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    meta = results["meta"]
    joint_split = results["table2_joint_fpr_5pct"].get("breakdown", {})
    out = [
        f"# FM-Defense on {meta['dataset']} — profile `{meta['profile']}`",
        "",
        f"Made by `{meta['command']}`. Seeds: {meta['seeds']}. Versions: {meta['versions']}.",
        "",
        "**Threat model.** The attacker knows the classifier, not the defense (the paper's "
        "oblivious setting); attacks are made against the classifier alone. "
        f"FGSM ε = {meta['fgsm_epsilon']} (L∞), DeepFool L∞ and CW-L2 minimal-perturbation; "
        "high confidence: CW-L2 κ = 20, PGD-L∞ (40 steps, random start) at ε = 0.3 and 0.1.",
        "",
        f"Test points: {meta['counts']}. Defense: {meta['defense']}.",
        "",
        *default_section(results),
        "## Table II (FM-Defense, the paper's rule: the reproduction)",
        "",
        "ADV counts as defended when rejected or labelled correctly (the paper's convention); the "
        "column 'rejections wrong' counts only correct labels. Paper figures are quoted from "
        f"{_paper_column(meta['dataset'])} (its own classifier and attack settings), not "
        "measured here. In brackets: the "
        "95 % Wilson interval of each measured share (the binomial error on n images).",
        "",
        table2_markdown(results["table2"], meta["dataset"]),
        "",
        f"Joint VAL false-positive rate at these thresholds: {_pct(results['joint_val_fpr'])} "
        f"(per-code target {_pct(1 - meta['defense']['rho'])}).",
        "",
        "### A second operating point: joint thresholds, VAL false positives ≤ 5 %",
        "",
        table2_markdown(
            {
                k: v
                for k, v in results["table2_joint_fpr_5pct"].items()
                if k not in ("thresholds", "breakdown")
            },
            meta["dataset"],
        ),
        "",
        "## Accept / purify / reject",
        "",
        "Share of each set; 'flagged' (purify + reject) on CLE is the clean false-positive rate, "
        "on ADV the detection rate.",
        "",
        "| set | accept | purify | reject | accept (joint) | purify (joint) | reject (joint) |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {k} | {_pct(v['accept'])} | {_pct(v['purify'])} | {_pct(v['reject'])} | "
            + " | ".join(
                _pct(joint_split.get(k, {}).get(a)) for a in ("accept", "purify", "reject")
            )
            + " |"
            for k, v in results["breakdown"].items()
        ],
        "",
        "## Detection beyond the paper (score 1 − min_i r_i)",
        "",
        "| attack | ROC-AUC | TPR @ FPR 0.1 % | TPR @ 1 % | TPR @ 5 % |",
        "|---|---|---|---|---|",
        *[
            f"| {k} | {v['auc']:.3f} | {_pct(v['tpr_at_fpr_0.001'])} "
            f"| {_pct(v['tpr_at_fpr_0.01'])} | {_pct(v['tpr_at_fpr_0.05'])} |"
            for k, v in results["roc"].items()
        ],
        "",
        *code_agreement_section(results),
        *recon_section(results),
        *_side_by_side_section(results),
        *_adaptive_section(results),
        "## Figures",
        "",
    ]
    for key, caption in PAPER_FIGURES.items():
        if key in FIGURE_NEEDS and FIGURE_NEEDS[key] not in results:
            continue
        out += [f"![{key}]({key}.png)", "", f"*Ours: `{key}.png`. Compare: {caption}.*", ""]
    return "\n".join(out)
