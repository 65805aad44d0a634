"""`fmdefense baselines`: the shipped default defense and baselines on saved adversarial sets.

Each baseline is loaded from its shipped artifact (`weights/<dataset>/<folder>`, calibrated on
the clean VAL split when it was trained: FBGAN and MagNet at a VAL drop rate of 0.001, Defense-GAN
at its own) and judged on the CLE split and on each given adversarial set by
`contract_baseline` (accuracy with rejected ADV counted as defended, as Table II; detection
ROC-AUC by its suspicion score), on the first `limit` images of each set when the baseline has
one (Defense-GAN's search costs ≈ 0.1–0.3 s per image). Each set's decisions are cached under
`out/<defense>/` keyed by the inputs and the artifact's digest, so a killed run resumes per set.

    out/results.json    every number, with each set's source and fingerprint
    out/report.md       the same as a Markdown table
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fmdefense.attacks.adaptive.base import batched_logits
from fmdefense.attacks.runner import AdversarialSet, load_adversarial_set
from fmdefense.core.artifacts import atomic_write_bytes, write_json
from fmdefense.core.errors import InputError
from fmdefense.core.fingerprints import fingerprint_tensor
from fmdefense.core.paths import weights_home
from fmdefense.core.provenance import provenance
from fmdefense.data import load_raw, split_tensors
from fmdefense.defenses.base import Decision
from fmdefense.defenses.jobs import load_classifier, load_vae
from fmdefense.defenses.registry import load_defense
from fmdefense.defenses.rule import accuracy
from fmdefense.evaluation.baselines import contract_baseline
from fmdefense.evaluation.metrics import pct as _pct

log = logging.getLogger(__name__)
# Baseline registry name -> its shipped folder under weights/<dataset>/, and its display name
BASELINE_DIRS = {
    "default": "default",
    "fbgan": "fbgan",
    "magnet": "magnet",
    "defensegan": "defense_gan",
}
TITLES = {"default": "default", "fbgan": "FBGAN", "magnet": "MagNet", "defensegan": "Defense-GAN"}
DEFAULT_LIMITS = {"defensegan": 500}


def largest_score(dec: Decision) -> torch.Tensor:
    """The detection score (n,): the default's fused statistic; the one score of FBGAN and
    Defense-GAN; for MagNet the larger of its two detectors' error/threshold ratios (flagged
    above 1)."""
    if "fused" in dec.scores:
        return dec.scores["fused"]
    return torch.stack(list(dec.scores.values())).amax(0)


def _set_source(folder: Path, adv: AdversarialSet) -> dict[str, Any]:
    cfg = adv.config.get("config", adv.config)
    return {
        "folder": str(folder),
        "n": len(adv.y_true),
        "attack": cfg.get("attack"),
        "setting": cfg.get("setting"),
        "params": cfg.get("params"),
        "x_adv": fingerprint_tensor(adv.x_adv),
    }


def run_same_sets(
    dataset: str,
    set_dirs: Sequence[Path],
    out: Path,
    device: torch.device,
    *,
    defenses: Sequence[str] = tuple(BASELINE_DIRS),
    limits: dict[str, int] | None = None,
    limit: int | None = None,
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """Every baseline in `defenses` on CLE and on each adversarial set of `set_dirs`, on the
    first `limits[defense]` images (default `DEFAULT_LIMITS`), and at most `limit` for all;
    writes out/results.json and out/report.md and returns the results."""
    unknown = sorted(set(defenses) - set(BASELINE_DIRS))
    if unknown or not defenses:
        raise InputError(f"baselines must be among {', '.join(BASELINE_DIRS)}, got {unknown}")
    if not set_dirs:
        raise InputError("give at least one adversarial-set folder")
    limits = {**DEFAULT_LIMITS, **(limits or {})}
    clf = load_classifier(dataset, device)
    vae = load_vae(dataset, device) if "default" in defenses else None
    x_cle, y_cle = split_tensors(load_raw(dataset, data_dir=data_dir), "cle")
    adv_sets: dict[str, AdversarialSet] = {}
    sources: dict[str, dict[str, Any]] = {}
    for folder in map(Path, set_dirs):
        adv = load_adversarial_set(folder)
        if adv.config.get("config", adv.config).get("dataset", dataset) != dataset:
            raise InputError(f"{folder} holds a set of another dataset, expected {dataset}")
        if not torch.equal(adv.y_true, y_cle[adv.indices]):
            raise InputError(f"{folder}: its labels are not those of the {dataset} CLE split")
        adv_sets[folder.name] = adv
        sources[folder.name] = _set_source(folder, adv)
        sources[folder.name]["no_defense"] = accuracy(
            batched_logits(clf, adv.x_adv).argmax(1), adv.y_true
        )
    results: dict[str, Any] = {
        "dataset": dataset,
        "n_cle": len(y_cle),
        "no_defense_clean": accuracy(batched_logits(clf, x_cle).argmax(1), y_cle),
        "sets": sources,
        "defenses": {},
        "meta": provenance(),
    }
    for kind in defenses:
        folder = weights_home() / dataset / BASELINE_DIRS[kind]
        defense = load_defense(folder, clf, vae)
        first = min((n for n in (limits.get(kind), limit) if n is not None), default=None)
        log.info("%s (%s) on %d sets, first %s images each", kind, folder, len(adv_sets), first)
        row, _ = contract_baseline(
            out, kind, defense, folder, x_cle, y_cle, adv_sets, first, score=largest_score
        )
        drop_rate = getattr(getattr(defense, "config", None), "drop_rate", None)
        row |= {"folder": str(folder), "limit": first, "val_drop_rate": drop_rate}
        results["defenses"][kind] = row
    write_json(out / "results.json", results)
    atomic_write_bytes(out / "report.md", render_same_sets(results).encode())
    log.info("results: %s", out / "results.json")
    return results


def _cell(row: dict[str, Any], name: str) -> str:
    """Accuracy (share flagged) of one baseline on one set."""
    return f"{_pct(row['table2'].get(name))} ({_pct(row['flagged'].get(name))})"


def _n(total: int, limit: int | None) -> int:
    return total if limit is None else min(total, limit)


def render_same_sets(results: dict[str, Any]) -> str:
    """The results as Markdown: accuracy per set, then detection ROC-AUC."""
    kinds, sets = results["defenses"], results["sets"]
    head = " | ".join(
        f"{TITLES[k]}" + ("" if r["limit"] is None else f" (first {r['limit']})")
        for k, r in kinds.items()
    )
    lines = [
        f"# Baselines on the same {results['dataset']} sets",
        "",
        f"Made by `{results['meta'].get('command', '?')}`. Accuracy; an adversarial input counts "
        "as defended when rejected or labelled correctly (Table II's convention); in brackets "
        "the share flagged (rejected). Each baseline is the shipped artifact, calibrated on "
        "clean VAL only.",
        "",
        f"| set | n | no defense | {head} |",
        "|---|---|---|" + "---|" * len(kinds),
        f"| clean | {results['n_cle']} | {_pct(results['no_defense_clean'])} | "
        + " | ".join(_cell(r, "clean") for r in kinds.values())
        + " |",
    ]
    for name, src in sets.items():
        cells = " | ".join(_cell(r, name) for r in kinds.values())
        lines.append(f"| {name} | {src['n']} | {_pct(src['no_defense'])} | {cells} |")
    lines += [
        "",
        "Detection ROC-AUC (score: the default's fused statistic, FBGAN's and Defense-GAN's "
        "reconstruction error, the larger "
        "of MagNet's two error/threshold ratios; clean = the same first n CLE images):",
        "",
        "| set | " + " | ".join(TITLES[k] for k in kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for name in sets:
        cells = " | ".join(f"{r['detection'][name]['auc']:.3f}" for r in kinds.values())
        lines.append(f"| {name} | {cells} |")
    per_kind = []
    for kind, row in kinds.items():
        counts = ", ".join(f"{s} {_n(v['n'], row['limit'])}" for s, v in sets.items())
        per_kind.append(f"{TITLES[kind]}: {counts}")
    lines += ["", "Adversarial images per set: " + "; ".join(per_kind) + "."]
    return "\n".join(lines) + "\n"
