"""Cost per input of each defense on MNIST: milliseconds per input and network passes per input.

    .venv/bin/python benchmarks/defense_cost.py [--inputs 64] [--device auto] [--force-bf16]

FM-Defense at the paper config (m = 20 codes × N = 100 morphs, fp32, and bf16 where native),
the one-decode reconstruction check, MagNet (two autoencoders + the classifier on the reformed
input) and Defense-GAN (R restarts × L search steps, each a generator forward and backward). Shipped
weights where they exist, random weights of the same shapes otherwise (cost does not depend
on the weights). Inputs are random images: the work per input is the same for any image.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from fmdefense.core.device import resolve_device
from fmdefense.core.errors import ArtifactError
from fmdefense.defenses.defense_gan import DefenseGAN
from fmdefense.defenses.fm.detector import FMDefense, FMDefenseConfig
from fmdefense.defenses.magnet import MagNet
from fmdefense.defenses.recon_check import ReconCheckConfig, ReconstructionCheck
from fmdefense.evaluation.baselines import defensegan_dir
from fmdefense.models.gan import DefenseGANConfig, Generator
from fmdefense.models.magnet import MagNetAutoencoders, MagNetConfig
from morph_throughput import load, precisions


def timed(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    """Wall time (seconds) of fn(x), after a warm-up call on 4 inputs."""
    fn(x[:4])
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--force-bf16", action="store_true", help="time bf16 even if not native")
    args = parser.parse_args()
    device = resolve_device(args.device)
    clf, vae, source = load(device)
    x = torch.rand(args.inputs, 1, 28, 28)
    n = args.inputs
    print(f"device {device}, {torch.get_num_threads()} threads, {source}, {n} inputs")
    rows: list[tuple[str, float, str]] = []

    for precision in precisions(device, args.force_bf16):
        cfg = FMDefenseConfig(n_morphs=100, precision=precision)
        fm = FMDefense(clf, vae, cfg).fit(torch.rand(32, 1, 28, 28))
        sec = timed(fm.decide, x)
        m = vae.num_codes
        passes = f"1 encode + {m * 100:,} decodes + {m * 100 + 1:,} classifier passes"
        rows.append((f"FM-Defense ({precision}, m = {m}, N = 100)", sec, passes))

    check = ReconstructionCheck(clf, vae, ReconCheckConfig()).fit(torch.rand(64, 1, 28, 28))
    rows.append(
        (
            "reconstruction check",
            timed(check.predict, x),
            "1 encode + 1 decode + 2 classifier passes",
        )
    )

    mcfg = MagNetConfig()
    magnet = MagNet(clf, MagNetAutoencoders(mcfg).to(device).eval(), mcfg).fit(x)
    rows.append(
        (
            "MagNet",
            timed(magnet.predict, x),
            "2 autoencoder passes + 1 classifier pass",
        )
    )

    try:
        gan = DefenseGAN.load(defensegan_dir("mnist"), clf)
    except ArtifactError:
        gcfg = DefenseGANConfig()
        gan = DefenseGAN(clf, Generator(gcfg).to(device).eval(), gcfg).fit(x[:8])
    r, steps = gan.config.restarts, gan.config.search_steps
    rows.append(
        (
            f"Defense-GAN (R = {r}, L = {steps})",
            timed(gan.predict, x),  # one search: scores and labels
            f"{r * steps:,} generator forward+backward + {r} forward + 1 classifier pass",
        )
    )

    fastest = min(sec for _, sec, _ in rows)
    print(f"{'defense':<34} {'ms/input':>10} {'× fastest':>10}  passes per input")
    for name, sec, passes in rows:
        print(f"{name:<34} {1000 * sec / n:>10.2f} {sec / fastest:>10.0f}  {passes}")


if __name__ == "__main__":
    main()
