"""Morph-engine throughput: morphs/s and instances/s for the paper config (MNIST, m = 20 codes,
N = 100 morphs), with the ratio to this machine's measured fp32 GEMM rate.

    .venv/bin/python benchmarks/morph_throughput.py [--instances 32] [--device auto]
        [--compile-timeout 420] [--force-bf16]

Uses the shipped MNIST classifier and combo-VAE (random weights of the same shape if absent:
throughput does not depend on the weights). Last, decode + classify at the precision "auto"
picks, eager against `FMDefenseConfig(compile=True)` (inductor, frozen weights, static batches),
in a child process with a timeout.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

from fmdefense.core.device import resolve_device
from fmdefense.core.paths import classifier_dir
from fmdefense.core.precision import resolve_precision
from fmdefense.defenses.fm.detector import FMDefense, FMDefenseConfig
from fmdefense.defenses.jobs import vae_dir
from fmdefense.models.classifiers import Classifier, build_classifier
from fmdefense.models.combo_vae import DATASET_VAES, ComboVAE


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (Conv, ConvTranspose, Linear layers)."""
    total = 0

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features * (out.numel() // m.out_features)
        elif isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total += out.numel() * k
        elif isinstance(m, nn.ConvTranspose2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            total += inp[0].numel() * k

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    with torch.inference_mode():
        module(*inputs)
    for h in handles:
        h.remove()
    return total


def gemm_gflops(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    """Measured fp32 matrix-multiply rate (GFLOP/s) on `device`."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def load(device: torch.device) -> tuple[Classifier, ComboVAE, str]:
    try:
        clf = Classifier.load(classifier_dir("mnist"), device)
        vae = ComboVAE.load(vae_dir("mnist"), device)
        return clf, vae, "shipped weights"
    except Exception:
        clf = build_classifier("mnist").to(device).eval()
        return clf, ComboVAE(DATASET_VAES["mnist"]).to(device).eval(), "random weights"


def precisions(device: torch.device, force_bf16: bool) -> list[str]:
    """The precisions worth timing here: bf16 only where it is native (what `auto` would pick)
    or when forced; a non-native bf16 autocast on an AVX2-only CPU ran ≈ 100× slower than fp32
    (2026-12-08), so timing it would keep `make bench` busy for hours. One line says why."""
    auto = resolve_precision("auto", device)
    print(f"precision auto on {device.type}: {auto}", end="")
    if auto == "bf16" or force_bf16:
        print("" if auto == "bf16" else " (bf16 forced by --force-bf16)")
        return ["fp32", "bf16"]
    print(" (bf16 is not native here: its line is skipped; --force-bf16 times it anyway)")
    return ["fp32"]


def engine_rate(clf: nn.Module, vae: ComboVAE, cfg: FMDefenseConfig, instances: int) -> Any:
    """(morphs/s, seconds of the warm-up call, resistances) of the engine under `cfg`."""
    defense = FMDefense(clf, vae, cfg).fit(torch.rand(32, 1, 28, 28))
    xs = torch.rand(instances, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    defense.resistance(xs[:4])  # warm-up (the compile, when compiling)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = defense.resistance(xs)
    return instances * vae.num_codes * cfg.n_morphs / (time.perf_counter() - t0), warm, r


def compiled_rate(device: torch.device, batch: int, instances: int) -> None:
    """Child process: the engine at precision auto, eager against `compile=True`."""
    clf, vae, _ = load(device)
    cfg = FMDefenseConfig(n_morphs=100, rho=0.999, precision="auto", batch_size=batch)
    precision = resolve_precision("auto", device)
    eager, _, r_eager = engine_rate(clf, vae, cfg, instances)
    fast, compile_s, r_fast = engine_rate(
        copy.deepcopy(clf), copy.deepcopy(vae), dataclasses.replace(cfg, compile=True), instances
    )
    saving = 1 / eager - 1 / fast  # seconds per morph
    even = f"{compile_s / saving:,.0f} morphs" if saving > 0 else "never (compiled is slower)"
    print(
        f"engine, {precision}, batch {batch}, compile=True: {fast:,.0f} morphs/s against eager "
        f"{eager:,.0f} ({fast / eager:.2f}x; first call incl. compile {compile_s:.0f} s; mean "
        f"|Δr| {float((r_fast - r_eager).abs().mean()):.4f}); compiling pays back after {even} "
        "(paper-scale MNIST: 44 M)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--compile-timeout", type=float, default=420.0)
    parser.add_argument("--force-bf16", action="store_true", help="time bf16 even if not native")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.compile_only:
        compiled_rate(device, args.batch_size, args.instances)
        return
    clf, vae, source = load(device)
    x = torch.rand(32, 1, 28, 28)  # calibration set (only the engine speed matters here)
    macs = count_macs(
        vae.decoder, torch.zeros(1, 10, device=device), torch.zeros(1, 10, device=device)
    ) + count_macs(clf, torch.zeros(1, 1, 28, 28, device=device))
    peak = gemm_gflops(device)
    print(f"device {device}, {torch.get_num_threads()} threads, {source}")
    print(f"one morph (decode + classify): {macs / 1e6:.2f} M MACs = {2 * macs / 1e6:.1f} MFLOP")
    print(f"measured fp32 GEMM: {peak:.0f} GFLOP/s")
    for precision in precisions(device, args.force_bf16):
        cfg = FMDefenseConfig(
            n_morphs=100, rho=0.999, precision=precision, batch_size=args.batch_size
        )
        defense = FMDefense(clf, vae, cfg).fit(x)
        xs = torch.rand(args.instances, 1, 28, 28)
        defense.resistance(xs[:4])  # warm-up
        t0 = time.perf_counter()
        defense.resistance(xs)
        sec = time.perf_counter() - t0
        morphs = args.instances * vae.num_codes * cfg.n_morphs
        rate = morphs / sec
        gflops = rate * 2 * macs / 1e9
        print(
            f"{precision}: {rate:,.0f} morphs/s, {args.instances / sec:.2f} instances/s "
            f"(m = {vae.num_codes}, N = {cfg.n_morphs}); {gflops:.0f} GFLOP/s = "
            f"{gflops / peak:.2f} × fp32 GEMM rate"
        )
    cmd = [sys.executable, __file__, "--compile-only", "--device", args.device]
    cmd += ["--batch-size", str(args.batch_size), "--instances", str(args.instances)]
    try:
        done = subprocess.run(cmd, timeout=args.compile_timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        print(f"torch.compile: not finished in {args.compile_timeout:.0f} s; the engine runs eager")
        return
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"torch.compile failed here ({last}); the engine runs eager")
        return
    print(done.stdout.strip())


if __name__ == "__main__":
    main()
