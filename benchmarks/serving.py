"""Serving cost of the default defense beside MagNet and Defense-GAN (same run, ratios), and the
morphs FM-Defense's sequential engine decodes per input at the paper configuration.

    .venv/bin/python benchmarks/serving.py [--device auto] [--per-set 64]

1. ms/input at batch 256 and at batch 1 (median of repeated single-image calls) on MNIST VAL
   images: the default (shipped `weights/mnist/default`, else fitted here on VAL), MagNet and
   Defense-GAN (shipped or the paper run's artifacts).
2. Mean morphs per input on the first `--per-set` images of CLE and each attack set of the
   paper-profile run, at its joint operating point (VAL FPR ≤ 5 %): full (m × N), exact early
   stop (identical decisions, checked) and the SPRT (δ 0.1, α 0.01, agreement with full).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fmdefense.attacks.runner import load_adversarial_set
from fmdefense.core.device import resolve_device
from fmdefense.core.errors import ArtifactError
from fmdefense.core.paths import model_dir
from fmdefense.data import load_raw, split_tensors
from fmdefense.defenses.default import DefaultConfig, DefaultDefense
from fmdefense.defenses.defense_gan import DefenseGAN
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.fm.sequential import SequentialConfig
from fmdefense.defenses.jobs import load_models
from fmdefense.defenses.magnet import MagNet

RUN = Path("results/mnist/reproduce-paper")


def per_input_ms(fn: Callable[[torch.Tensor], object], x: torch.Tensor, reps: int = 1) -> float:
    """ms per input of fn on the batch x (after one warm-up call)."""
    fn(x[:2])
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return 1000 * (time.perf_counter() - t0) / (reps * len(x))


def single_ms(fn: Callable[[torch.Tensor], object], x: torch.Tensor, n: int = 30) -> float:
    """Median ms of one-image calls."""
    fn(x[:1])
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(x[i % len(x) : i % len(x) + 1])
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _default(clf: torch.nn.Module, vae: object, x_val: torch.Tensor) -> tuple[DefaultDefense, str]:
    try:
        return DefaultDefense.load(model_dir("mnist", "default"), clf, vae), "shipped"
    except ArtifactError:
        magnet = MagNet.load(RUN / "magnet", clf)
        d = DefaultDefense(
            clf, vae, (magnet.autoencoders.ae1, magnet.autoencoders.ae2), DefaultConfig()
        ).fit(x_val)
        return d, "fitted on VAL here"


def serving(device: torch.device) -> None:
    clf, vae = load_models("mnist", device)
    ds = load_raw("mnist")
    x_val, _ = split_tensors(ds, "val")
    default, how = _default(clf, vae, x_val)
    magnet = MagNet.load(RUN / "magnet", clf)
    gan = DefenseGAN.load(model_dir("mnist", "defense_gan"), clf)
    x = x_val[:256]
    rows = [
        (f"default ({how})", default.decide, 4),
        ("MagNet", magnet.decide, 4),
        (f"Defense-GAN (R = {gan.config.restarts}, L = {gan.config.search_steps})", gan.decide, 1),
    ]
    print(f"device {device}, {torch.get_num_threads()} threads")
    print(f"{'defense':<40} {'ms/input @256':>14} {'ms @1':>8} {'÷ MagNet @256':>14}")
    results = []
    for name, fn, reps in rows:
        xb = x if "Defense-GAN" not in name else x[:64]
        results.append(
            (name, per_input_ms(fn, xb, reps), single_ms(fn, x, 10 if reps == 1 else 30))
        )
    base = results[1][1]
    for name, batched, one in results:
        print(f"{name:<40} {batched:>14.3f} {one:>8.2f} {batched / base:>14.1f}")


def sequential(per_set: int) -> None:
    clf, vae = load_models("mnist", torch.device("cpu"))
    fm = FMDefense.load(RUN / "defense", clf, vae).with_config(threshold_mode="joint", rho=0.95)
    ds = load_raw("mnist")
    sets = {"CLE": split_tensors(ds, "cle")[0][:per_set]}
    for name in ("fgsm", "deepfool_linf", "cw_l2-fast", "cw_l2-kappa20", "pgd_linf-eps0.3"):
        try:
            sets[name] = load_adversarial_set(RUN / "attacks" / name).x_adv[:per_set]
        except ArtifactError:
            continue
    full = len(fm.code_idx_) * fm.config.n_morphs
    print(f"FM-Defense paper config, joint 5 %: {full:,} morphs per input in full")
    print(f"{'set':<18} {'exact: morphs':>14} {'same':>6} {'SPRT: morphs':>13} {'agree':>7}")
    for name, xs in sets.items():
        ref = fm.decide(xs)
        ex = fm.decide_sequential(xs, SequentialConfig(mode="exact"))
        sp = fm.decide_sequential(xs, SequentialConfig(mode="sprt"))
        same = bool(torch.equal(ex.action, ref.action))
        agree = float((sp.action == ref.action).float().mean())
        print(
            f"{name:<18} {float(ex.details['morphs'].float().mean()):>14.0f} {same!s:>6} "
            f"{float(sp.details['morphs'].float().mean()):>13.0f} {100 * agree:>6.1f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--per-set", type=int, default=64)
    args = parser.parse_args()
    serving(resolve_device(args.device))
    sequential(args.per_set)


if __name__ == "__main__":
    main()
