"""Command-line interface: `fmdefense <data|train|evaluate> ...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmdefense.core.device import resolve_device
from fmdefense.core.errors import FMDefenseError, InputError

if TYPE_CHECKING:
    from fmdefense.defenses.fm.config import FMDefenseConfig

log = logging.getLogger("fmdefense")
DATASETS = ("mnist", "fmnist", "orl", "celeba")
# Modules that add their own subcommands; one line each.
COMMAND_MODULES: list[str] = [
    "fmdefense.cli_attack",
    "fmdefense.cli_adaptive",
]


def _data_fetch(args: argparse.Namespace) -> None:
    from fmdefense.data import fetch, load_raw

    for name in args.dataset:
        fetch(name)
        ds = load_raw(name, data_dir=args.data_dir)
        print(f"{name}: {len(ds.y_train)} train / {len(ds.y_test)} test images ready")


def _data_info(args: argparse.Namespace) -> None:
    from fmdefense.core.artifacts import read_json
    from fmdefense.core.paths import data_home
    from fmdefense.data import load_raw
    from fmdefense.data.sources import cache_key, cache_paths

    ds = load_raw(args.dataset, data_dir=args.data_dir)
    _, record = cache_paths(cache_key(args.dataset, args.data_dir), data_home())
    info = {
        "dataset": ds.name,
        "train": len(ds.y_train),
        "test": len(ds.y_test),
        "image_shape": list(ds.image_shape),
        "classes": ds.num_classes,
        "train_label_counts": np.bincount(ds.y_train).tolist(),
        "test_label_counts": np.bincount(ds.y_test).tolist(),
        "sha256": read_json(record)["sha256"] if record.is_file() else None,
    }
    print(json.dumps(info, indent=2))


def _train_classifier(args: argparse.Namespace) -> None:
    from fmdefense.training.jobs import run_train_classifier

    out = args.out or Path("runs") / args.dataset / "classifier"
    metrics = run_train_classifier(
        args.dataset,
        out,
        resolve_device(args.device),
        epochs=args.epochs,
        seed=args.seed,
        data_dir=args.data_dir,
    )
    print(f"{args.dataset}: test accuracy {metrics['test_accuracy']:.4f} -> {out}")


def _train_vae(args: argparse.Namespace) -> None:
    from fmdefense.training.vae import run_train_vae

    out = args.out or Path("runs") / args.dataset / "combo_vae"
    overrides = {
        k: v
        for k, v in {
            "epochs_dgmm": args.epochs_dgmm,
            "epochs_vae": args.epochs_vae,
            "gamma": args.gamma,
            "free_bits": args.free_bits,
            "seed": args.seed,
            "limit": args.limit,
        }.items()
        if v is not None
    }
    m = run_train_vae(
        args.dataset, out, resolve_device(args.device), overrides=overrides, data_dir=args.data_dir
    )
    print(
        f"{args.dataset} combo-VAE: recon MSE/pixel {m['recon_mse_per_pixel']:.4f}, "
        f"DGMM accuracy {m['dgmm_test_accuracy']:.4f}, C on reconstructions "
        f"{m.get('classifier_accuracy_on_reconstructions')} -> {out}"
    )


def _reproduce(args: argparse.Namespace) -> None:
    from fmdefense.evaluation.pipeline import run_reproduce
    from fmdefense.evaluation.profiles import ATTACKS

    chosen = (
        ATTACKS
        if args.attacks is None
        else tuple(a for a in ATTACKS if a[0] in args.attacks or "-".join(a) in args.attacks)
    )
    run = args.out or Path("runs") / args.dataset / f"reproduce-{args.profile}"
    defenses = tuple(d for part in args.defenses for d in part.split(",") if d)
    if "fm" not in defenses:
        raise InputError("--defenses must include fm: FM-Defense is what reproduce evaluates")
    results = run_reproduce(
        args.dataset,
        args.profile,
        run,
        resolve_device(args.device),
        attacks=chosen,
        baselines=tuple(d for d in defenses if d != "fm"),
        overrides=_profile_overrides(args),
    )
    for name, row in results["table2"].items():
        print(f"{name:>16}: no defense {row['no_defense']:.4f}  FM-Defense {row['fm_defense']:.4f}")
    print(f"report: {run / 'report.md'} ({results['meta']['seconds']:.0f} s)")


def _profile_overrides(args: argparse.Namespace) -> dict[str, int]:
    """Profile fields changed on the command line (stated in the run's profile.json)."""
    out = {}
    if args.adaptive_limit is not None:
        out["adaptive_limit"] = args.adaptive_limit
    if args.n_cle is not None:
        if args.n_cle < 1:
            raise InputError("--n-cle must be a positive number of images")
        out["n_cle"] = args.n_cle
    return out


def _defense_config(args: argparse.Namespace) -> FMDefenseConfig:
    from fmdefense.defenses.fm.config import FMDefenseConfig

    codes: str | tuple[int, ...] = args.codes
    if args.codes not in ("all", "auto"):
        codes = tuple(int(c) for c in args.codes.split(","))
    return FMDefenseConfig(
        codes=codes,
        n_morphs=args.n_morphs,
        rho=args.rho,
        eta=args.eta,
        threshold_mode=args.threshold_mode,
        precision=args.precision,
    )


def _calibrate(args: argparse.Namespace) -> None:
    from fmdefense.defenses.jobs import run_calibrate

    out = args.out or Path("runs") / args.dataset / "defense"
    d = run_calibrate(
        args.dataset,
        out,
        resolve_device(args.device),
        _defense_config(args),
        val_limit=args.val_limit,
        data_dir=args.data_dir,
    )
    print(
        f"calibrated on VAL: {len(d.code_idx_)} codes, VAL false-positive rate {d.val_fpr_:.4f}, "
        f"θ_d {d.theta_d_:.3f}, z_u {d.z_u_mode_} -> {out}"
    )


def _defend(args: argparse.Namespace) -> None:
    from fmdefense.attacks.runner import load_adversarial_set
    from fmdefense.data import load_raw, split_tensors
    from fmdefense.defenses.jobs import load_defense, run_defend

    device = resolve_device(args.device)
    defense = load_defense(
        args.defense or Path("runs") / args.dataset / "defense", args.dataset, device
    )
    if args.input == "clean":
        x, y = split_tensors(load_raw(args.dataset, data_dir=args.data_dir), "cle")
        source = {"set": "CLE"}
    else:
        adv = load_adversarial_set(Path(args.input))
        x, y, source = adv.x_adv, adv.y_true, {"set": str(args.input), **adv.config}
    if args.limit is not None:
        x, y = x[: args.limit], y[: args.limit]
    name = "clean" if args.input == "clean" else Path(args.input).name
    out = args.out or Path("runs") / args.dataset / "decisions" / name
    m = run_defend(defense, x, y, out, source)
    print(
        f"{m['inputs']} inputs: accept {m['accept_share']:.3f}, purify {m['purify_share']:.3f}, "
        f"reject {m['reject_share']:.3f}; accuracy {m['accuracy']:.4f} (rejections wrong), "
        f"{m['defended_accuracy']:.4f} (rejections defended) -> {out}"
    )


def _train_magnet(args: argparse.Namespace) -> None:
    from fmdefense.defenses.magnet import run_train_magnet

    out = args.out or Path("runs") / args.dataset / "magnet"
    m = run_train_magnet(args.dataset, out, resolve_device(args.device))
    print(
        f"MagNet: VAL false-positive rate {m['val_fpr']:.4f}, thresholds {m['thresholds']} -> {out}"
    )


def _train_defensegan(args: argparse.Namespace) -> None:
    from fmdefense.defenses.defense_gan import run_train_defense_gan

    out = args.out or Path("runs") / args.dataset / "defense_gan"
    m = run_train_defense_gan(
        args.dataset, out, resolve_device(args.device), epochs=args.epochs, limit=args.limit
    )
    print(f"Defense-GAN: VAL false-positive rate {m['val_fpr']:.4f} -> {out}")


def _evaluate_vae(args: argparse.Namespace) -> None:
    from fmdefense.core.paths import vae_dir
    from fmdefense.data import load_raw, split_tensors
    from fmdefense.defenses.jobs import load_models
    from fmdefense.training.vae import disentanglement, traversal_label_stability

    folder = vae_dir(args.dataset, args.weights)
    clf, vae = load_models(args.dataset, resolve_device(args.device), vae=folder)
    ds = load_raw(args.dataset)
    x, _ = split_tensors(ds, "test")
    d = disentanglement(vae, x)
    stab = traversal_label_stability(vae, clf, x[: args.limit], split_tensors(ds, "val")[0])
    print(
        f"{folder}: {d['active_dims']} active z_s dims, Gaussian TC of their means "
        f"{d['gaussian_tc_active']:.4f} nats (test, {len(x)} images); C keeps its label on "
        f"{stab['mean']:.4f} of single-z_s-code traversals ({stab['images']} test images, "
        f"{stab['steps']} values per code; per code {[round(v, 3) for v in stab['per_code']]})"
    )


def _evaluate_classifier(args: argparse.Namespace) -> None:
    from fmdefense.training.jobs import measure_classifier

    for name in args.dataset:
        m = measure_classifier(name, args.weights, resolve_device(args.device), args.data_dir)
        print(
            f"{name}: test accuracy {m['test_accuracy']:.4f} on {m['test_images']} images "
            f"({m['weights']})"
        )


def _common(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with the dataset's own files (IDX, or CelebA's layout)",
    )
    if device:
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each leaf command sets `func`."""
    parser = argparse.ArgumentParser(prog="fmdefense", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="fetch and inspect datasets").add_subparsers(
        dest="action", required=True
    )
    p = data.add_parser("fetch", help="download the offline sources and build the caches")
    p.add_argument("--dataset", nargs="+", choices=DATASETS, default=["mnist"])
    _common(p, device=False)
    p.set_defaults(func=_data_fetch)
    p = data.add_parser("info", help="counts, shapes, label histogram and checksum")
    p.add_argument("--dataset", choices=DATASETS, default="mnist")
    _common(p, device=False)
    p.set_defaults(func=_data_info)

    train = sub.add_parser("train", help="train models").add_subparsers(dest="what", required=True)
    p = train.add_parser("classifier", help="train a target classifier (resumes when interrupted)")
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--out", type=Path, default=None, help="artifact folder (runs/D/classifier)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    _common(p)
    p.set_defaults(func=_train_classifier)

    p = train.add_parser("vae", help="train a combo-VAE in two stages (resumes when interrupted)")
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--out", type=Path, default=None, help="artifact folder (runs/D/combo_vae)")
    p.add_argument("--epochs-dgmm", type=int, default=None)
    p.add_argument("--epochs-vae", type=int, default=None)
    p.add_argument("--gamma", type=float, default=None, help="TC weight (paper: 40; 0: no TC)")
    p.add_argument("--free-bits", type=float, default=None, help="KL-free nats per code")
    p.add_argument("--limit", type=int, default=None, help="use only N training images")
    p.add_argument("--seed", type=int, default=None)
    _common(p)
    p.set_defaults(func=_train_vae)

    p = sub.add_parser("calibrate", help="fit FM-Defense on the clean VAL split (resumable)")
    p.add_argument("--dataset", choices=("mnist", "fmnist", "orl"), required=True)
    p.add_argument("--out", type=Path, default=None, help="defense folder (runs/D/defense)")
    p.add_argument("--codes", default="all", help="all, auto, or comma-separated indices")
    p.add_argument("--n-morphs", type=int, default=100)
    p.add_argument("--rho", type=float, default=0.999)
    p.add_argument("--eta", type=float, default=0.9)
    p.add_argument("--threshold-mode", choices=("per_code", "unified", "joint"), default="per_code")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--val-limit", type=int, default=None, help="use only N VAL images")
    _common(p)
    p.set_defaults(func=_calibrate)
    p = sub.add_parser("defend", help="accept, purify or reject a set of inputs (resumable)")
    p.add_argument("--dataset", choices=("mnist", "fmnist", "orl"), required=True)
    p.add_argument("--input", required=True, help="an adversarial-set folder, or 'clean' for CLE")
    p.add_argument("--defense", type=Path, default=None, help="calibrated defense folder")
    p.add_argument("--out", type=Path, default=None, help="decisions folder")
    p.add_argument("--limit", type=int, default=None)
    _common(p)
    p.set_defaults(func=_defend)

    p = sub.add_parser("reproduce", help="the paper's evaluation end to end (resumable)")
    p.add_argument("--dataset", choices=("mnist", "fmnist", "orl"), default="mnist")
    p.add_argument("--profile", choices=("quick", "paper"), default="quick")
    p.add_argument("--attacks", nargs="+", default=None, help="subset: fgsm deepfool_linf cw_l2")
    p.add_argument("--out", type=Path, default=None, help="run folder (runs/D/reproduce-P)")
    p.add_argument(
        "--defenses",
        nargs="+",
        default=["fm,recon,magnet,defensegan"],
        help="comma- or space-separated: fm (always), recon, magnet, defensegan",
    )
    p.add_argument(
        "--adaptive-limit",
        type=int,
        default=None,
        help="defense-aware attacks on the first N CLE images (quick: 0 = off; paper: 500)",
    )
    p.add_argument(
        "--n-cle",
        type=int,
        default=None,
        help="evaluate on the first N CLE images (default: the profile's; paper: all 5,000); "
        "use a fresh --out, and N ≥ --adaptive-limit",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    p.set_defaults(func=_reproduce)

    p = train.add_parser("magnet", help="train the MagNet baseline's two autoencoders")
    p.add_argument("--dataset", choices=("mnist", "fmnist"), required=True)
    p.add_argument("--out", type=Path, default=None, help="artifact folder (runs/D/magnet)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    p.set_defaults(func=_train_magnet)
    p = train.add_parser("defensegan", help="train the Defense-GAN baseline's WGAN-GP generator")
    p.add_argument("--dataset", choices=("mnist", "fmnist"), required=True)
    p.add_argument("--out", type=Path, default=None, help="artifact folder (runs/D/defense_gan)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--limit", type=int, default=None, help="use only N training images")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    p.set_defaults(func=_train_defensegan)

    ev = sub.add_parser("evaluate", help="measure artifacts").add_subparsers(
        dest="what", required=True
    )
    p = ev.add_parser("classifier", help="test accuracy of a classifier artifact")
    p.add_argument("--dataset", nargs="+", choices=DATASETS, default=["mnist"])
    p.add_argument("--weights", type=Path, default=None, help="artifact folder (shipped weights)")
    _common(p)
    p.set_defaults(func=_evaluate_classifier)
    p = ev.add_parser("vae", help="active codes, Gaussian TC, label stability of z_s traversals")
    p.add_argument("--limit", type=int, default=1000, help="test images for the traversal check")
    p.add_argument("--dataset", choices=("mnist", "fmnist", "orl"), default="mnist")
    p.add_argument("--weights", type=Path, default=None, help="artifact folder (shipped weights)")
    _common(p)
    p.set_defaults(func=_evaluate_vae)
    _register_plugins(sub)
    return parser


def _register_plugins(sub: argparse._SubParsersAction) -> None:
    """Subcommands that live beside the code they drive (each module has `register(sub)`)."""
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fmdefense` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except FMDefenseError as exc:
        print(f"fmdefense: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
