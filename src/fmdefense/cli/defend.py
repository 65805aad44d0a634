"""`fmdefense calibrate` (fit a defense on clean VAL) and `fmdefense defend` (decide on inputs).

fmdefense calibrate --dataset mnist --defense-kind default --out runs/mnist/default
fmdefense calibrate --dataset mnist --defense-kind ensemble --members A B C --out runs/mnist/ens
fmdefense defend --images my_digits/ --out decisions.csv          # the pretrained default
fmdefense defend --dataset mnist --input runs/mnist/attacks/fgsm --defense runs/mnist/defense
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from fmdefense.cli.common import (
    MODEL_DATASETS,
    add_classifier_spec,
    add_common,
    add_executor,
    codes,
    default_out,
    open_probability,
    positive_int,
    probability,
    unit_interval,
)
from fmdefense.core.device import resolve_device
from fmdefense.core.errors import InputError
from fmdefense.core.precision import PRECISIONS
from fmdefense.defenses.default import PURIFY_POLICIES, DefaultConfig
from fmdefense.defenses.ensemble import MODES
from fmdefense.defenses.fm.config import FMDefenseConfig
from fmdefense.defenses.fm.thresholds import THRESHOLD_MODES
from fmdefense.defenses.fusion import COMBINERS, TAILS

# Options of one defense kind only (None when not given), with their config defaults
FM_OPTIONS = ("codes", "n_morphs", "rho", "threshold_mode", "precision")
DEFAULT_OPTIONS = ("alpha", "combine", "tails", "purify", "magnet", "no_magnet")
ENSEMBLE_OPTIONS = ("members", "mode")


def _classifier(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from fmdefense.defenses.jobs import load_classifier

    return load_classifier(args.dataset, device, args.classifier, args.classifier_weights)


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in names if getattr(args, k) not in (None, False)}


def _check_kind_options(args: argparse.Namespace) -> None:
    """Options of the other defense kind are an error, not silently ignored."""
    other = {
        "fm": DEFAULT_OPTIONS + ENSEMBLE_OPTIONS,
        "default": FM_OPTIONS + ENSEMBLE_OPTIONS,
        "ensemble": (*FM_OPTIONS, "purify", "vae"),
    }[args.defense_kind]
    wrong = sorted(_given(args, other))
    if wrong:
        flag = "--" + wrong[0].replace("_", "-")
        raise InputError(f"{flag} does not apply to --defense-kind {args.defense_kind}")


def _fm_config(args: argparse.Namespace) -> FMDefenseConfig:
    given = _given(args, FM_OPTIONS)
    return FMDefenseConfig(**given, **({"eta": args.eta} if args.eta is not None else {}))


def _default_config(args: argparse.Namespace) -> DefaultConfig:
    given = _given(args, ("alpha", "combine", "tails", "purify"))
    return DefaultConfig(**given, **({"eta": args.eta} if args.eta is not None else {}))


def _calibrate_fm(args: argparse.Namespace, device: torch.device, out: Path) -> None:
    from fmdefense.defenses.jobs import run_calibrate

    d = run_calibrate(
        args.dataset,
        out,
        device,
        _fm_config(args),
        val_limit=args.val_limit,
        classifier=_classifier(args, device),
        vae=args.vae,
        data_dir=args.data_dir,
    )
    print(
        f"calibrated on VAL: {len(d.code_idx_)} codes, VAL false-positive rate {d.val_fpr_:.4f}, "
        f"θ_d {d.theta_d_:.3f}, z_u {d.z_u_mode_} -> {out}"
    )


def _calibrate_default(args: argparse.Namespace, device: torch.device, out: Path) -> None:
    from fmdefense.core.paths import model_dir
    from fmdefense.defenses.jobs import load_autoencoders, run_calibrate_default

    clf = _classifier(args, device)
    aes = None
    if not args.no_magnet:
        aes = load_autoencoders(args.magnet or model_dir(args.dataset, "magnet"), clf)
    d = run_calibrate_default(
        args.dataset,
        out,
        device,
        _default_config(args),
        autoencoders=aes,
        val_limit=args.val_limit,
        classifier=clf,
        vae=args.vae,
        data_dir=args.data_dir,
    )
    print(
        f"default defense calibrated on VAL: {len(d.names_)} scores, threshold "
        f"{d.threshold_:.3f}, held-out VAL false-positive rate {d.val_fpr_:.4f} "
        f"(α {d.config.alpha:g}) -> {out}"
    )


def _calibrate_ensemble(args: argparse.Namespace, device: torch.device, out: Path) -> None:
    from fmdefense.core.paths import model_dir
    from fmdefense.defenses.ensemble import EnsembleConfig
    from fmdefense.defenses.jobs import load_autoencoders, run_calibrate_ensemble

    if not args.members:
        raise InputError("--defense-kind ensemble needs --members (the combo-VAE folders)")
    clf = _classifier(args, device)
    aes = None
    if not args.no_magnet:
        aes = load_autoencoders(args.magnet or model_dir(args.dataset, "magnet"), clf)
    config = EnsembleConfig(mode=args.mode or "random", member=_default_config(args))
    d = run_calibrate_ensemble(
        args.dataset,
        out,
        device,
        config,
        members=args.members,
        autoencoders=aes,
        val_limit=args.val_limit,
        classifier=clf,
        data_dir=args.data_dir,
    )
    print(
        f"ensemble ({config.mode}, {len(d.members_)} members, member α "
        f"{d.member_config.alpha:g}) calibrated on VAL: held-out VAL false-positive rate "
        f"{d.val_fpr_:.4f} -> {out}"
    )


def calibrate_command(args: argparse.Namespace) -> None:
    """Fit FM-Defense or the default defense on the clean VAL split and save it."""
    _check_kind_options(args)
    device = resolve_device(args.device)
    folder = {"fm": "defense", "default": "default", "ensemble": "ensemble"}[args.defense_kind]
    out = default_out(args.out, args.dataset, folder)
    if args.defense_kind == "fm":
        _calibrate_fm(args, device, out)
    elif args.defense_kind == "ensemble":
        _calibrate_ensemble(args, device, out)
    else:
        _calibrate_default(args, device, out)


def _open(args: argparse.Namespace, device: torch.device) -> Any:
    """The defense of --defense (any kind), else the dataset's pretrained default."""
    from fmdefense.core.paths import model_dir
    from fmdefense.defenses.jobs import open_defense

    folder = args.defense or model_dir(args.dataset, "default")
    if args.defense is None and not folder.is_dir():
        raise InputError(
            f"no pretrained default defense for {args.dataset} at {folder}: calibrate one "
            f"(fmdefense calibrate --dataset {args.dataset} --defense-kind default --out DIR) "
            "and pass --defense DIR"
        )
    return open_defense(folder, args.dataset, device, _classifier(args, device), args.vae)


def _defend_images(args: argparse.Namespace, defense: Any) -> None:
    from fmdefense.data.user import load_images
    from fmdefense.defenses.jobs import run_defend_images

    out = args.out or default_out(None, args.dataset, "decisions", f"{args.images.stem}.csv")
    if out.suffix.lower() != ".csv" or out.is_dir():
        raise InputError(f"with --images, --out names a .csv file, got {out}")
    cfg = defense.classifier.cfg
    images = load_images(args.images, cfg.in_channels, tuple(cfg.image_size))
    m = run_defend_images(defense, images, out, limit=args.limit)
    known = (
        f"accuracy {m['accuracy']:.4f} (rejections wrong), {m['defended_accuracy']:.4f} "
        "(rejections defended)"
        if "accuracy" in m
        else "no true labels"
    )
    print(
        f"{m['inputs']} images: accept {m['accept']}, purify {m['purify']}, reject "
        f"{m['reject']}; {known} -> {out}"
    )


def _defend_set(args: argparse.Namespace, defense: Any) -> None:
    from fmdefense.attacks.runner import load_adversarial_set
    from fmdefense.data import load_raw, split_tensors
    from fmdefense.defenses.jobs import run_defend

    if args.input == "clean":
        x, y = split_tensors(load_raw(args.dataset, data_dir=args.data_dir), "cle")
        source: dict[str, Any] = {"set": "CLE"}
    else:
        adv = load_adversarial_set(Path(args.input))
        x, y, source = adv.x_adv, adv.y_true, {"set": str(args.input), **adv.config}
    x, y = x[: args.limit], y[: args.limit]
    name = "clean" if args.input == "clean" else Path(args.input).name
    out = default_out(args.out, args.dataset, "decisions", name)
    m = run_defend(defense, x, y, out, source)
    print(
        f"{m['inputs']} inputs: accept {m['accept_share']:.3f}, purify {m['purify_share']:.3f}, "
        f"reject {m['reject_share']:.3f}; accuracy {m['accuracy']:.4f} (rejections wrong), "
        f"{m['defended_accuracy']:.4f} (rejections defended) -> {out}"
    )


def defend_command(args: argparse.Namespace) -> None:
    """Accept, purify or reject a dataset split, an adversarial set or your own images."""
    defense = _open(args, resolve_device(args.device))
    if args.images is not None:
        _defend_images(args, defense)
    else:
        _defend_set(args, defense)


def _calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit a defense on the clean VAL split (resumable)")
    p.add_argument("--dataset", choices=MODEL_DATASETS, required=True)
    p.add_argument(
        "--defense-kind",
        "--defense",
        dest="defense_kind",
        choices=("fm", "default", "ensemble"),
        default="fm",
        help="fm: FM-Defense (the paper's); default: the fused one-decode default defense; "
        "ensemble: one default per combo-VAE of --members",
    )
    p.add_argument("--out", type=Path, default=None, help="defense folder (runs/D/defense|default)")
    p.add_argument("--val-limit", type=positive_int, default=None, help="use only N VAL images")
    p.add_argument("--eta", type=unit_interval, default=None, help="η fractile (default 0.9)")
    p.add_argument("--vae", type=Path, default=None, help="combo-VAE folder (shipped weights)")
    add_classifier_spec(p)
    fm = p.add_argument_group("FM-Defense (--defense-kind fm)")
    fm.add_argument("--codes", type=codes, default=None, help="all (default), auto or 0,3,5")
    fm.add_argument("--n-morphs", type=positive_int, default=None, help="N morphs (100)")
    fm.add_argument("--rho", type=probability, default=None, help="clean pass rate (0.999)")
    fm.add_argument("--threshold-mode", choices=THRESHOLD_MODES, default=None)
    fm.add_argument("--precision", choices=PRECISIONS, default=None)
    de = p.add_argument_group("default defense (--defense-kind default)")
    de.add_argument("--alpha", type=open_probability, default=None, help="VAL FPR (0.01)")
    de.add_argument("--combine", choices=COMBINERS, default=None, help="fusion (harmonic)")
    de.add_argument("--tails", choices=TAILS, default=None, help="p-value tails (exponential)")
    de.add_argument("--purify", choices=PURIFY_POLICIES, default=None, help="policy (reject)")
    de.add_argument("--magnet", type=Path, default=None, help="MagNet folder (weights/D/magnet)")
    de.add_argument("--no-magnet", action="store_true", help="fuse no autoencoder scores")
    en = p.add_argument_group("combo-VAE ensemble (--defense-kind ensemble; default options too)")
    en.add_argument("--members", type=Path, nargs="+", default=None, help="combo-VAE folders")
    en.add_argument("--mode", choices=MODES, default=None, help="random (default) or all")
    add_common(p)
    add_executor(p)
    p.set_defaults(func=calibrate_command)


def _defend_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("defend", help="accept, purify or reject inputs or your own images")
    p.add_argument("--dataset", choices=MODEL_DATASETS, default="mnist")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="'clean' (the CLE split) or an adversarial-set folder")
    src.add_argument(
        "--images",
        type=Path,
        help="your images: a folder (one subfolder per class, named by label, or flat), "
        "an image file, or an .npz with x (n, H, W[, C]) and optional y",
    )
    p.add_argument(
        "--defense",
        type=Path,
        default=None,
        help="a calibrated defense folder of any kind (default: weights/D/default)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="--input: decisions folder (runs/D/decisions/NAME); --images: a .csv file "
        "(runs/D/decisions/NAME.csv)",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N inputs")
    p.add_argument("--vae", type=Path, default=None, help="combo-VAE folder (shipped weights)")
    add_classifier_spec(p)
    add_common(p)
    add_executor(p)
    p.set_defaults(func=defend_command)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `calibrate` and `defend`."""
    _calibrate_parser(sub)
    _defend_parser(sub)
