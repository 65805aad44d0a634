"""`fmdefense baselines`: the shipped baselines on saved adversarial sets (issue 19).

    fmdefense baselines --dataset fmnist --sets runs/fmnist/attacks-5000/fgsm \\
        runs/fmnist/attacks-5000/deepfool_linf runs/fmnist/attacks-1000/cw_l2-fast \\
        --out results/fmnist/baselines-same-sets
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fmdefense.cli.common import MODEL_DATASETS, add_common, positive_int

BASELINES = ("default", "fbgan", "magnet", "defensegan")  # as evaluation.same_sets (lazily)


def run_command(args: argparse.Namespace) -> None:
    """Measure each baseline on CLE and every set; print one line per baseline."""
    from fmdefense.core.device import resolve_device
    from fmdefense.evaluation.same_sets import TITLES, run_same_sets

    limits = {} if args.defensegan_limit is None else {"defensegan": args.defensegan_limit}
    results = run_same_sets(
        args.dataset,
        args.sets,
        args.out,
        resolve_device(args.device),
        defenses=args.defenses,
        limits=limits,
        limit=args.limit,
        data_dir=args.data_dir,
    )
    for kind, row in results["defenses"].items():
        cells = ", ".join(f"{k} {100 * v:.1f} %" for k, v in row["table2"].items())
        print(f"{TITLES[kind]}: {cells}")
    print(f"-> {args.out / 'results.json'}, {args.out / 'report.md'}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `baselines` subcommand."""
    p = sub.add_parser(
        "baselines", help="the shipped FBGAN, MagNet and Defense-GAN on saved adversarial sets"
    )
    p.add_argument("--dataset", choices=MODEL_DATASETS, required=True)
    p.add_argument(
        "--sets",
        type=Path,
        nargs="+",
        required=True,
        help="adversarial-set folders (fmdefense attack --out ...) of the dataset's CLE split",
    )
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--defenses", nargs="+", choices=BASELINES, default=list(BASELINES))
    p.add_argument(
        "--defensegan-limit",
        type=positive_int,
        default=None,
        help="Defense-GAN on the first N images of each set (default 500: its search's cost)",
    )
    p.add_argument(
        "--limit", type=positive_int, default=None, help="every baseline on the first N only"
    )
    add_common(p)
    p.set_defaults(func=run_command)
