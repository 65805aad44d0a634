"""`fmdefense train fbgan`: the FBGAN baseline's training command (in the `train` group)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fmdefense.cli.common import add_device, non_negative_float, positive_int


def _train_fbgan(args: argparse.Namespace) -> None:
    import torch

    from fmdefense.core.device import resolve_device
    from fmdefense.models.fbgan import FBGANConfig
    from fmdefense.training.fbgan import run_train_fbgan

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / args.dataset / "fbgan"
    cfg = None
    if args.recon_weight is not None:
        from fmdefense.data import load_raw

        c, h, w = load_raw(args.dataset).image_shape
        cfg = FBGANConfig(in_channels=c, image_size=(h, w), recon_weight=args.recon_weight)
    m = run_train_fbgan(
        args.dataset,
        out,
        resolve_device(args.device),
        epochs=args.epochs,
        limit=args.limit,
        keep_resume=args.keep_resume,
        cfg=cfg,
    )
    cle = m["cle_first_1000"]
    print(
        f"FBGAN: VAL false-positive rate {m['val_fpr']:.4f} (threshold {m['threshold']:.3f}); "
        f"first 1,000 CLE: reconstruction MSE {cle['recon_mse']:.4f}, classifier accuracy "
        f"{cle.get('classifier_accuracy_recon', float('nan')):.4f} on G(E(x)) -> {out}"
    )


def add_train_fbgan(train_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `train fbgan` in the `train` group's subparsers; returns the new parser."""
    p = train_subparsers.add_parser(
        "fbgan", help="train the FBGAN baseline (bidirectional GAN + MI term; resumable)"
    )
    p.add_argument("--dataset", choices=("mnist", "fmnist"), required=True)
    p.add_argument("--out", type=Path, default=None, help="artifact folder (runs/D/fbgan)")
    p.add_argument(
        "--epochs", type=positive_int, default=30, help="total epochs (a rerun continues)"
    )
    p.add_argument("--limit", type=positive_int, default=None, help="use only N training images")
    p.add_argument(
        "--recon-weight",
        type=non_negative_float,
        default=None,
        help="weight of the pixel term ‖G(E(x)) − x‖² (not in the paper; default 1, 0 = paper)",
    )
    p.add_argument(
        "--keep-resume",
        action="store_true",
        help="keep resume.safetensors so a rerun with more --epochs continues",
    )
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads (default: torch's)"
    )
    add_device(p)
    p.set_defaults(func=_train_fbgan)
    return p
