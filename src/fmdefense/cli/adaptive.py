"""`fmdefense adaptive`: defense-aware attacks on the default, FM-Defense, MagNet, Defense-GAN or
FBGAN (issues 7, 19).

Attacks the first N CLE images of a dataset with one or more adaptive attacks over a sweep of
ε and judges the defense by the one rule on its hard decisions; resumable per unit (see
`fmdefense.attacks.adaptive.sweep`).

    fmdefense adaptive --dataset mnist --defense magnet --defense-dir runs/mnist/magnet \\
        --eps 0.05 0.1 0.2 0.3 --limit 500
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fmdefense.attacks.adaptive.registry import ADAPTIVE_ATTACKS, DEFAULT_ATTACK
from fmdefense.cli.common import add_common, add_executor, positive_int, probability

DATASETS = ("mnist", "fmnist", "orl")
DEFAULT_EPS = (0.05, 0.1, 0.2, 0.3)


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    """The attack parameters the command line sets (each attack takes those it has)."""
    given = {"steps": args.steps, "restarts": args.restarts, "batch_size": args.batch_size}
    if args.start_at_input:
        given["random_start"] = False
    return {k: v for k, v in given.items() if v is not None}


def run_command(args: argparse.Namespace) -> None:
    """Load the defense, its classifier and the CLE images; sweep; print one line."""
    from fmdefense.attacks.adaptive.jobs import (
        artifact_digest,
        default_defense_dir,
        default_out,
        load_inputs,
        load_target,
    )
    from fmdefense.attacks.adaptive.registry import attacks_for
    from fmdefense.attacks.adaptive.sweep import SUMMARY_FILE, run_sweep
    from fmdefense.core.device import resolve_device
    from fmdefense.core.errors import InputError

    kind = args.defense
    attacks = args.attack or [DEFAULT_ATTACK[kind]]
    allowed = attacks_for(kind)
    for name in attacks:
        if name not in allowed:
            raise InputError(
                f"attack {name!r} does not apply to {kind}; choose among {', '.join(allowed)}"
            )
    folder = args.defense_dir or default_defense_dir(args.dataset, kind)
    device = resolve_device(args.device)
    defense = load_target(kind, folder, args.dataset, device, args.classifier, args.vae)
    x, y = load_inputs(args.dataset, args.limit, args.data_dir)
    source = {
        "dataset": args.dataset,
        "split": "cle",
        "limit": args.limit,
        "defense": kind,
        "defense_dir": str(folder),
        "defense_digest": artifact_digest(folder),
    }
    out = args.out or default_out(args.dataset, kind)
    summary = run_sweep(
        defense,
        x,
        y,
        attacks,
        args.eps,
        out,
        changes=_changes(args),
        source=source,
        checks=not args.no_checks,
        unbounded_eps=args.unbounded_eps,
    )
    parts = []
    for name, res in summary["attacks"].items():
        robust = " ".join(
            f"{row['eps']:g}:{row['robust_accuracy_with_rejection']:.3f}" for row in res["per_eps"]
        )
        parts.append(f"{name} [{robust}]")
    print(
        f"{kind} on {summary['n']} {args.dataset} CLE images, robust accuracy with rejection "
        f"by ε: {'; '.join(parts)}; clean accept rate {summary['clean']['accept_rate']:.4f} "
        f"-> {out / SUMMARY_FILE}"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `adaptive` subcommand to the top-level subparsers of `fmdefense`."""
    p = sub.add_parser(
        "adaptive",
        help="defense-aware attacks on FM-Defense, MagNet, Defense-GAN, FBGAN or the default "
        "(resumable)",
    )
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--defense", choices=tuple(DEFAULT_ATTACK), required=True)
    p.add_argument(
        "--defense-dir",
        type=Path,
        default=None,
        help="fm: a calibrated FMDefense folder (fmdefense calibrate, or RUN/defense); "
        "magnet: a MagNet folder (RUN/magnet); defensegan: a DefenseGAN folder; fbgan: a "
        "calibrated FBGAN folder (weights/D/fbgan); ensemble: a calibrated ensemble folder "
        "(fmdefense calibrate --defense-kind ensemble) (default runs/D/defense, runs/D/magnet, "
        "runs/D/defense_gan, runs/D/fbgan)",
    )
    p.add_argument(
        "--attack",
        nargs="+",
        choices=tuple(ADAPTIVE_ATTACKS),
        default=None,
        help="fm: joint (default), latent, cw_transfer, square; magnet: magnet_joint (default), "
        "cw_transfer; defensegan: defensegan_bpda (default), cw_transfer; fbgan: fbgan_joint "
        "(default), cw_transfer; default: default_joint (default); ensemble: ensemble_joint "
        "(default); all: undefended",
    )
    p.add_argument("--eps", nargs="+", type=probability, default=list(DEFAULT_EPS))
    p.add_argument(
        "--limit", type=positive_int, default=None, help="attack only the first N CLE images"
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="iterations of every attack that has steps: PGD steps per restart (default 100; "
        "defensegan_bpda 40: a search per step), cw_transfer's Adam steps (100)",
    )
    p.add_argument(
        "--restarts",
        type=positive_int,
        default=None,
        help="PGD restarts (default 1; magnet_joint 4)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="inputs attacked together (64)"
    )
    p.add_argument(
        "--start-at-input",
        action="store_true",
        help="PGD attacks start at the input itself instead of a random point of the ε-ball "
        "(a detector-aware start: inside the clean region the detector accepts)",
    )
    p.add_argument(
        "--no-checks",
        action="store_true",
        help="skip the sanity checks (twice the budget and undefended PGD at the largest ε)",
    )
    p.add_argument(
        "--unbounded-eps",
        type=probability,
        default=None,
        help="also attack at this ε (e.g. 1.0): success should reach ~100 %%",
    )
    p.add_argument("--out", type=Path, default=None, help="results (runs/D/adaptive/DEFENSE)")
    p.add_argument("--classifier", type=Path, default=None, help="classifier artifact folder")
    p.add_argument("--vae", type=Path, default=None, help="combo-VAE artifact folder (fm)")
    add_common(p)
    add_executor(p)
    p.set_defaults(func=run_command)
