"""`fmdefense attack`: make a dataset's adversarial set from its CLE split (resumable chunks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fmdefense.attacks.library import ATTACKS, SETTING_NAMES, resolve_setting
from fmdefense.core.errors import InputError

DATASETS = ("mnist", "fmnist", "orl")


def default_out(dataset: str, attack: str, setting: str) -> Path:
    """runs/<dataset>/attacks/<attack>[-<setting>] (no suffix for a "default" setting)."""
    name = attack if setting == "default" else f"{attack}-{setting}"
    return Path("runs") / dataset / "attacks" / name


def run_command(args: argparse.Namespace) -> None:
    """Load the classifier and the CLE split, attack them, print the headline metrics."""
    from fmdefense.attacks.runner import attack_set
    from fmdefense.core.device import resolve_device
    from fmdefense.core.paths import classifier_dir
    from fmdefense.data import load_raw, split_tensors
    from fmdefense.models.classifiers import Classifier

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be a positive number of images, got {args.limit}")
    setting = resolve_setting(args.attack, args.setting)
    out = args.out or default_out(args.dataset, args.attack, setting)
    folder = classifier_dir(args.dataset, args.classifier)
    model = Classifier.load(folder, resolve_device(args.device))
    x, y = split_tensors(load_raw(args.dataset, data_dir=args.data_dir), "cle")
    x, y = x[: args.limit], y[: args.limit]  # a None limit keeps all
    source = {
        "dataset": args.dataset,
        "split": "cle",
        "limit": args.limit,
        "classifier": str(folder),
    }
    adv = attack_set(
        args.attack, setting, model, x, y, out, batch_size=args.batch_size, source=source
    )
    m = adv.metrics
    print(
        f"{args.attack} ({setting}) on {m['images']} {args.dataset} CLE images: success "
        f"{m['success_rate']:.4f} (on correct {m['success_rate_on_correct']:.4f}), accuracy on "
        f"ADV {m['accuracy_on_adv']:.4f}, mean L2 {m['mean_l2']:.3f}, mean Linf "
        f"{m['mean_linf']:.3f}, degenerate {m['degenerate_outputs']}, "
        f"{m['seconds_per_image']:.3f} s/image -> {out}"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `attack` subcommand to the top-level subparsers of `fmdefense`."""
    p = sub.add_parser("attack", help="attack the CLE split (resumable chunks)")
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--attack", choices=tuple(ATTACKS), required=True)
    p.add_argument(
        "--setting",
        choices=SETTING_NAMES,
        default=None,
        help="cw_l2: fast (5×100, the default) or reference (9×1000); others: default",
    )
    p.add_argument("--limit", type=int, default=None, help="attack only the first N CLE images")
    p.add_argument("--batch-size", type=int, default=256, help="images per chunk (64–512 best)")
    p.add_argument("--out", type=Path, default=None, help="artifact (runs/D/attacks/NAME)")
    p.add_argument("--classifier", type=Path, default=None, help="classifier artifact folder")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with the dataset's files")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    p.set_defaults(func=run_command)
