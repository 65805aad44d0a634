"""`fmdefense reproduce`: the paper's evaluation end to end (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fmdefense.cli.common import (
    DATASETS,
    add_data_dir,
    add_device,
    add_executor,
    default_out,
    non_negative_int,
    positive_int,
)
from fmdefense.core.device import resolve_device
from fmdefense.core.errors import InputError

BASELINES = ("recon", "magnet", "defensegan", "fbgan")  # as evaluation.profiles (imported lazily)
PROFILE_NAMES = ("quick", "paper", "smoke")  # evaluation.profiles.PROFILES' keys (tested)


def _attacks(names: list[str] | None) -> tuple[tuple[str, str], ...]:
    """The profile's (attack, setting) pairs named by attack or by `attack-setting`."""
    from fmdefense.evaluation.profiles import ATTACKS

    if names is None:
        return ATTACKS
    known = {a[0] for a in ATTACKS} | {"-".join(a) for a in ATTACKS}
    unknown = sorted(set(names) - known)
    if unknown:
        raise InputError(f"unknown --attacks {unknown}; choose among {', '.join(sorted(known))}")
    return tuple(a for a in ATTACKS if a[0] in names or "-".join(a) in names)


def _defenses(parts: list[str]) -> tuple[str, ...]:
    """The baselines named beside fm (comma- or space-separated)."""
    defenses = tuple(d for part in parts for d in part.split(",") if d)
    if "fm" not in defenses:
        raise InputError("--defenses must include fm: FM-Defense is what reproduce evaluates")
    unknown = sorted(set(defenses) - {"fm", *BASELINES})
    if unknown:
        raise InputError(f"unknown --defenses {unknown}; choose among fm, {', '.join(BASELINES)}")
    return tuple(d for d in defenses if d != "fm")


def _profile_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Profile fields changed on the command line (stated in the run's profile.json)."""
    given = {"adaptive_limit": args.adaptive_limit, "n_cle": args.n_cle, "fm_limit": args.fm_limit}
    out: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if args.compile:
        out["compile"] = True
    if args.vae is not None:
        if not (args.vae / "config.json").is_file():
            raise InputError(f"--vae {args.vae}: no combo-VAE artifact there (config.json)")
        out["vae"] = str(args.vae)
    if args.codes is not None:
        out["codes"] = tuple(args.codes)
    return out


def run_command(args: argparse.Namespace) -> None:
    """Run (or resume) the pipeline; print Table II and where the report is."""
    attacks, baselines = _attacks(args.attacks), _defenses(args.defenses)
    from fmdefense.evaluation.pipeline import run_reproduce

    run = default_out(args.out, args.dataset, f"reproduce-{args.profile}")
    results = run_reproduce(
        args.dataset,
        args.profile,
        run,
        resolve_device(args.device),
        attacks=attacks,
        baselines=baselines,
        overrides=_profile_overrides(args),
        data_dir=args.data_dir,
    )
    print(summary_table(results))
    print(f"report: {run / 'report.md'} ({results['meta']['seconds']:.0f} s)")


def summary_table(results: dict[str, Any]) -> str:
    """Accuracy per set (CLE) and defended share (ADV): no defense, the default, the baselines
    and FM-Defense under the paper's rule, from results.json's content."""
    from fmdefense.evaluation.metrics import pct as _pct

    default = results["default"]["table"]
    cols = {
        "MagNet": results.get("magnet", {}).get("table2", {}),
        "Defense-GAN": results.get("defense_gan", {}).get("table2", {}),
        "FBGAN": results.get("fbgan", {}).get("table2", {}),
    }
    cols = {k: v for k, v in cols.items() if v}
    head = f"{'set':>16} {'no defense':>11} {'default':>9} " + " ".join(f"{k:>12}" for k in cols)
    lines = [head + f" {'FM (paper rule)':>16}"]
    for name, row in default.items():
        key = "clean" if name == "CLE" else name
        t2 = results["table2"].get(key, {})
        ours = row["accuracy"] if name == "CLE" else row["defended"]
        cells = " ".join(f"{_pct(c.get(key)):>12}" for c in cols.values())
        lines.append(
            f"{name:>16} {_pct(row.get('no_defense', t2.get('no_defense'))):>11} "
            f"{_pct(ours):>9} {cells} "
            f"{_pct(t2.get('fm_defense')):>16}"
        )
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `reproduce`."""
    p = sub.add_parser("reproduce", help="the paper's evaluation end to end (resumable)")
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="mnist",
        help="celeba needs --data-dir and its classifier and combo-VAE trained first (README)",
    )
    p.add_argument(
        "--profile",
        choices=PROFILE_NAMES,
        default="quick",
        help="paper: IV.A's sizes; quick: smaller; smoke: smallest (checks the pipeline runs)",
    )
    p.add_argument(
        "--attacks",
        nargs="+",
        default=None,
        help="subset by attack (fgsm deepfool_linf cw_l2 pgd_linf) or attack-setting",
    )
    p.add_argument("--out", type=Path, default=None, help="run folder (runs/D/reproduce-P)")
    p.add_argument(
        "--defenses",
        nargs="+",
        default=["fm,recon,magnet,defensegan,fbgan"],
        help="comma- or space-separated: fm (always), recon, magnet, defensegan, fbgan",
    )
    p.add_argument(
        "--adaptive-limit",
        type=non_negative_int,
        default=None,
        help="defense-aware attacks on the first N CLE images (quick: 0 = off; paper: 500)",
    )
    p.add_argument(
        "--n-cle",
        type=positive_int,
        default=None,
        help="evaluate on the first N CLE images (default: the profile's; paper: all 5,000); "
        "use a fresh --out, and N ≥ --adaptive-limit",
    )
    p.add_argument(
        "--fm-limit",
        type=positive_int,
        default=None,
        help="FM-Defense's morphs on only the first N images of every set, CLE included "
        "(its 2,000 morphs per input dominate the run); every other defense sees whole sets",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile FM-Defense's morph decode + classify (1.6x in the bf16 benchmark "
        "at batch 512); morphs round slightly differently: use a fresh --out",
    )
    p.add_argument(
        "--vae",
        type=Path,
        default=None,
        help="combo-VAE folder to manipulate (default: the dataset's shipped one); fresh --out",
    )
    p.add_argument(
        "--codes",
        nargs="+",
        type=non_negative_int,
        default=None,
        help="FM-Defense manipulates only these code indices (default: all; the paper's faces: "
        "one feature map); use a fresh --out",
    )
    add_data_dir(p)
    add_device(p)
    add_executor(p)
    p.set_defaults(func=run_command)
