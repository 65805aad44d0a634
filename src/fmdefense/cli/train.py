"""`fmdefense train classifier|vae|magnet|defensegan`: train a model into an artifact folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from fmdefense.cli.common import (
    DATASETS,
    MODEL_DATASETS,
    add_common,
    add_device,
    default_out,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
)
from fmdefense.cli.fbgan import add_train_fbgan
from fmdefense.core.device import resolve_device
from fmdefense.core.errors import InputError


def classifier_command(args: argparse.Namespace) -> None:
    """Train (or resume) a target classifier; print its test accuracy."""
    from fmdefense.training.jobs import run_train_classifier

    out = default_out(args.out, args.dataset, "classifier")
    _check_adversarial_options(args)
    overrides = {
        "epochs": args.epochs,
        "seed": args.seed,
        "adversarial": args.adversarial,
        "adv_eps": args.adv_eps,
        "adv_step": args.adv_step,
        "adv_steps": args.adv_steps,
    }
    metrics = run_train_classifier(
        args.dataset,
        out,
        resolve_device(args.device),
        overrides=overrides,
        data_dir=args.data_dir,
    )
    line = f"{args.dataset}: test accuracy {metrics['test_accuracy']:.4f}"
    if "test_pgd" in metrics:
        pgd = metrics["test_pgd"]
        line += (
            f", under PGD-{pgd['steps']} at eps {pgd['eps']:g} {pgd['accuracy']:.4f} "
            f"(first {pgd['images']} test images)"
        )
    print(f"{line} -> {out}")


def vae_command(args: argparse.Namespace) -> None:
    """Train (or resume) a combo-VAE; print its reconstruction and DGMM metrics."""
    from fmdefense.training.vae import run_train_vae

    out = default_out(args.out, args.dataset, "combo_vae")
    given = {
        "epochs_dgmm": args.epochs_dgmm,
        "epochs_vae": args.epochs_vae,
        "gamma": args.gamma,
        "free_bits": args.free_bits,
        "w_consistency": args.w_consistency,
        "consistency_codes": args.consistency_codes,
        "recalibrate_norms": args.recalibrate_norms,
        "seed": args.seed,
        "limit": args.limit,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    arch = {"map_size": args.map_size, "z_s_dim": args.channels, "width": args.width}
    m = run_train_vae(
        args.dataset,
        out,
        resolve_device(args.device),
        overrides=overrides,
        architecture={k: v for k, v in arch.items() if v is not None},
        data_dir=args.data_dir,
    )
    print(
        f"{args.dataset} combo-VAE: recon MSE/pixel {m['recon_mse_per_pixel']:.4f}, "
        f"DGMM accuracy {m['dgmm_test_accuracy']:.4f}, C on reconstructions "
        f"{m.get('classifier_accuracy_on_reconstructions')} -> {out}"
    )


def magnet_command(args: argparse.Namespace) -> None:
    """Train MagNet's two autoencoders and threshold them on VAL."""
    from fmdefense.defenses.magnet import run_train_magnet

    out = default_out(args.out, args.dataset, "magnet")
    m = run_train_magnet(args.dataset, out, resolve_device(args.device))
    print(
        f"MagNet: VAL false-positive rate {m['val_fpr']:.4f}, thresholds {m['thresholds']} -> {out}"
    )


def defensegan_command(args: argparse.Namespace) -> None:
    """Train Defense-GAN's WGAN-GP generator and threshold it on VAL."""
    from fmdefense.defenses.defense_gan import run_train_defense_gan

    out = default_out(args.out, args.dataset, "defense_gan")
    m = run_train_defense_gan(
        args.dataset, out, resolve_device(args.device), epochs=args.epochs, limit=args.limit
    )
    print(f"Defense-GAN: VAL false-positive rate {m['val_fpr']:.4f} -> {out}")


def _out(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", type=Path, default=None, help=f"artifact folder (runs/D/{default})")


ADV_OPTIONS = ("adv_eps", "adv_step", "adv_steps")
ADVERSARIAL = ("none", "fgsm_rs", "pgd")  # training.loops.ADVERSARIAL, without importing torch


def _check_adversarial_options(args: argparse.Namespace) -> None:
    """--adv-* without adversarial training is an error, not silently recorded."""
    given = [k for k in ADV_OPTIONS if getattr(args, k) is not None]
    if given and args.adversarial in (None, "none"):
        flag = "--" + given[0].replace("_", "-")
        raise InputError(f"{flag} does not apply without --adversarial fgsm_rs or pgd")


def _adversarial_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adversarial",
        choices=ADVERSARIAL,
        default=None,
        help="adversarial training: FGSM with random start (Wong et al. 2020) or PGD-k "
        "(Madry et al. 2018); default none",
    )
    p.add_argument(
        "--adv-eps", type=probability, default=None, help="L∞ radius on [0, 1] images (0.3)"
    )
    p.add_argument(
        "--adv-step",
        type=probability,
        default=None,
        help="step size α (default 1.25·ε for fgsm_rs, 2.5·ε/k for pgd)",
    )
    p.add_argument(
        "--adv-steps",
        type=positive_int,
        default=None,
        help="k, steps of pgd (default 1; fgsm_rs takes exactly 1)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train classifier|vae|magnet|defensegan`."""
    train = sub.add_parser("train", help="train models").add_subparsers(dest="what", required=True)
    p = train.add_parser("classifier", help="train a target classifier (resumes when interrupted)")
    p.add_argument("--dataset", choices=DATASETS, required=True)
    _out(p, "classifier")
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--seed", type=non_negative_int, default=None)
    _adversarial_options(p)
    add_common(p)
    p.set_defaults(func=classifier_command)

    p = train.add_parser("vae", help="train a combo-VAE in two stages (resumes when interrupted)")
    p.add_argument("--dataset", choices=DATASETS, required=True)
    _out(p, "combo_vae")
    p.add_argument("--epochs-dgmm", type=positive_int, default=None)
    p.add_argument("--epochs-vae", type=positive_int, default=None)
    p.add_argument(
        "--gamma", type=non_negative_float, default=None, help="TC weight (paper: 40; 0: no TC)"
    )
    p.add_argument(
        "--free-bits", type=non_negative_float, default=None, help="KL-free nats per code"
    )
    p.add_argument(
        "--w-consistency",
        type=non_negative_float,
        default=None,
        help="weight of the decoder-only classifier-consistency term (0: the paper's L_R only)",
    )
    p.add_argument(
        "--consistency-codes",
        choices=("sample", "mean"),
        default=None,
        help="codes the consistency term decodes: sampled (default) or posterior means (what "
        "the defense decodes)",
    )
    p.add_argument(
        "--recalibrate-norms",
        action="store_const",
        const=True,
        default=None,
        help="after training, re-estimate the decoder's BatchNorm statistics on posterior means "
        "of the training images (what inference decodes)",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="use only N training images")
    p.add_argument("--seed", type=non_negative_int, default=None)
    p.add_argument(
        "--map-size",
        type=positive_int,
        default=None,
        help="faces: side of each z_s feature map (side/8 shipped; the image side = the paper's "
        "64 × 64 reading; 1 = a vector z_s through a linear bottleneck)",
    )
    p.add_argument(
        "--channels", type=positive_int, default=None, help="z_s size: dims, or maps for faces"
    )
    p.add_argument("--width", type=positive_int, default=None, help="network width (channels)")
    add_common(p)
    p.set_defaults(func=vae_command)

    p = train.add_parser("magnet", help="train the MagNet baseline's two autoencoders")
    p.add_argument("--dataset", choices=MODEL_DATASETS, required=True)
    _out(p, "magnet")
    add_device(p)
    p.set_defaults(func=magnet_command)

    p = train.add_parser("defensegan", help="train the Defense-GAN baseline's WGAN-GP generator")
    p.add_argument("--dataset", choices=MODEL_DATASETS, required=True)
    _out(p, "defense_gan")
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--limit", type=positive_int, default=None, help="use only N training images")
    add_device(p)
    p.set_defaults(func=defensegan_command)
    add_train_fbgan(train)
