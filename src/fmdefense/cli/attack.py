"""`fmdefense attack`: make a dataset's adversarial set from its CLE split (resumable chunks).

The job is `fmdefense.attacks.jobs.run_attack_job`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fmdefense.attacks.library import ATTACKS, SETTING_NAMES
from fmdefense.cli.common import MODEL_DATASETS, add_common, add_executor, positive_int


def run_command(args: argparse.Namespace) -> None:
    """Attack the CLE images with the dataset's classifier; print the headline metrics."""
    from fmdefense.attacks.jobs import run_attack_job
    from fmdefense.core.device import resolve_device

    adv, out = run_attack_job(
        args.dataset,
        args.attack,
        args.setting,
        resolve_device(args.device),
        limit=args.limit,
        batch_size=args.batch_size,
        out=args.out,
        classifier=args.classifier,
        data_dir=args.data_dir,
    )
    m = adv.metrics
    print(
        f"{args.attack} ({adv.config['setting']}) on {m['images']} {args.dataset} CLE images: "
        f"success {m['success_rate']:.4f} (on correct {m['success_rate_on_correct']:.4f}), "
        f"accuracy on ADV {m['accuracy_on_adv']:.4f}, mean L2 {m['mean_l2']:.3f}, mean Linf "
        f"{m['mean_linf']:.3f}, degenerate {m['degenerate_outputs']}, "
        f"{m['seconds_per_image']:.3f} s/image -> {out}"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `attack` subcommand to the top-level subparsers of `fmdefense`."""
    p = sub.add_parser("attack", help="attack the CLE split (resumable chunks)")
    p.add_argument("--dataset", choices=MODEL_DATASETS, required=True)
    p.add_argument("--attack", choices=tuple(ATTACKS), required=True)
    p.add_argument(
        "--setting",
        choices=SETTING_NAMES,
        default=None,
        help="cw_l2: fast (5×100, the default) or reference (9×1000); others: default",
    )
    p.add_argument(
        "--limit", type=positive_int, default=None, help="attack only the first N CLE images"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=256, help="images per chunk (64–512 best)"
    )
    p.add_argument("--out", type=Path, default=None, help="artifact (runs/D/attacks/NAME)")
    p.add_argument("--classifier", type=Path, default=None, help="classifier artifact folder")
    add_common(p)
    add_executor(p)
    p.set_defaults(func=run_command)
