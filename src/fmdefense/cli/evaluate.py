"""`fmdefense evaluate classifier|vae`: measure trained artifacts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from fmdefense.cli.common import DATASETS, MODEL_DATASETS, add_common, positive_int
from fmdefense.core.device import resolve_device


def classifier_command(args: argparse.Namespace) -> None:
    """Test accuracy of each dataset's classifier artifact."""
    from fmdefense.training.jobs import measure_classifier

    for name in args.dataset:
        m = measure_classifier(name, args.weights, resolve_device(args.device), args.data_dir)
        print(
            f"{name}: test accuracy {m['test_accuracy']:.4f} on {m['test_images']} images "
            f"({m['weights']})"
        )


def vae_command(args: argparse.Namespace) -> None:
    """Active codes, Gaussian TC and label stability of z_s traversals of a combo-VAE."""
    from fmdefense.core.paths import vae_dir
    from fmdefense.data import load_raw, split_tensors
    from fmdefense.defenses.jobs import load_models
    from fmdefense.training.vae import disentanglement, traversal_label_stability
    from fmdefense.training.vae_measures import traversal_pixel_change

    folder, device = vae_dir(args.dataset, args.weights), resolve_device(args.device)
    clf, vae = load_models(args.dataset, device, vae=folder)
    ds = load_raw(args.dataset, data_dir=args.data_dir)
    x, _ = split_tensors(ds, "test")
    d = disentanglement(vae, x)
    x_val = split_tensors(ds, "val")[0]
    stab = traversal_label_stability(vae, clf, x[: args.limit], x_val)
    change = traversal_pixel_change(vae, x[: args.limit], x_val)
    print(
        f"{folder}: {d['active_dims']} active z_s dims, Gaussian TC of their means "
        f"{d['gaussian_tc_active']:.4f} nats (test, {len(x)} images); C keeps its label on "
        f"{stab['mean']:.4f} of single-z_s-code traversals ({stab['images']} test images, "
        f"{stab['steps']} values per code; per code {[round(v, 3) for v in stab['per_code']]}); "
        "a traversal's pixel change |D(1 % value) - D(99 % value)| per code, mean "
        f"{[round(v, 4) for v in change['per_code_mean']]}, 99th percentile "
        f"{[round(v, 3) for v in change['per_code_p99']]}"
    )
    accuracy = _recon_accuracy(vae, clf, ds, device)
    print(f"C on reconstructions (z_u = feature / class mean): {accuracy}")


def _recon_accuracy(vae: Any, clf: Any, ds: Any, device: torch.device) -> str:
    """C's accuracy on the reconstructions of the training and VAL images: VAL is where a
    choice among trained models may be made (the test split is reported, never chosen on)."""
    from fmdefense.data import split_tensors
    from fmdefense.training.vae_measures import held_out_measures

    parts = []
    for split in ("vae_train", "val"):
        x, y = split_tensors(ds, split)
        with torch.inference_mode():
            acc = held_out_measures(vae, x, y, clf, device)
        c = acc["classifier_accuracy_on_reconstructions"]
        parts.append(f"{split} {c['feature']:.4f} / {c['class_mean']:.4f} ({len(x)} images)")
    return ", ".join(parts)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `evaluate classifier` and `evaluate vae`."""
    ev = sub.add_parser("evaluate", help="measure artifacts").add_subparsers(
        dest="what", required=True
    )
    p = ev.add_parser("classifier", help="test accuracy of a classifier artifact")
    p.add_argument("--dataset", nargs="+", choices=DATASETS, default=["mnist"])
    p.add_argument("--weights", type=Path, default=None, help="artifact folder (shipped weights)")
    add_common(p)
    p.set_defaults(func=classifier_command)
    p = ev.add_parser("vae", help="active codes, Gaussian TC, label stability of z_s traversals")
    p.add_argument(
        "--limit", type=positive_int, default=1000, help="test images for the traversal check"
    )
    p.add_argument("--dataset", choices=MODEL_DATASETS, default="mnist")
    p.add_argument("--weights", type=Path, default=None, help="artifact folder (shipped weights)")
    add_common(p)
    p.set_defaults(func=vae_command)
