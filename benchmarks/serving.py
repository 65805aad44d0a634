"""Serving cost of the default defense beside MagNet and Defense-GAN (same run, ratios), and
whether `torch.compile` pays on this machine.

    .venv/bin/python benchmarks/serving.py [--device auto] [--compile-timeout 420]

1. ms/input at batch 256 (wall and CPU time of this process) and at batch 1 (median of repeated
   one-image calls) on MNIST VAL images: the default (shipped `weights/mnist/default`, else fitted
   here on VAL), its forward pass without the channels_last inference copies, MagNet and
   Defense-GAN. The machine's load average is printed first: other processes share the cores.
2. `torch.compile` (inductor, freezing) of the default's networks, in a child process with a
   timeout: compile seconds, ms/input at batch 256 against eager in the same process, the
   largest score change, and which one the library uses and why.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fmdefense.core.device import resolve_device
from fmdefense.core.errors import ArtifactError
from fmdefense.core.inference import inference_copy
from fmdefense.core.paths import model_dir
from fmdefense.data import load_raw, split_tensors
from fmdefense.defenses.default import DefaultConfig, DefaultDefense
from fmdefense.defenses.defense_gan import DefenseGAN
from fmdefense.defenses.jobs import load_models
from fmdefense.defenses.magnet import MagNet
from fmdefense.defenses.scores import default_scores, network_outputs

RUN = Path("results/mnist/reproduce-paper")


def per_input_ms(
    fn: Callable[[torch.Tensor], object], x: torch.Tensor, reps: int = 1
) -> tuple[float, float]:
    """(wall, CPU) ms per input of fn on the batch x, best of `reps` (after one warm-up call)."""
    fn(x[:2])
    walls, cpus = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(x)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return 1000 * min(walls) / len(x), 1000 * min(cpus) / len(x)


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


def _setup(device: torch.device) -> tuple[DefaultDefense, str, torch.Tensor]:
    clf, vae = load_models("mnist", device)
    x_val, _ = split_tensors(load_raw("mnist"), "val")
    default, how = _default(clf, vae, x_val)
    return default, how, x_val[:256]


def serving(device: torch.device) -> None:
    default, how, x = _setup(device)
    clf = default.classifier
    magnet = MagNet.load(RUN / "magnet", clf)
    gan = DefenseGAN.load(model_dir("mnist", "defense_gan"), clf)

    def plain_forward(xb: torch.Tensor) -> object:
        with torch.no_grad():
            return default._forward(xb.to(device))  # the original modules (NCHW weights)

    rows = [
        (f"default ({how})", default.decide, 4),
        ("default forward, no channels_last copies", plain_forward, 4),
        ("MagNet", magnet.decide, 4),
        (f"Defense-GAN (R = {gan.config.restarts}, L = {gan.config.search_steps})", gan.decide, 1),
    ]
    load = os.getloadavg()
    print(f"device {device}, {torch.get_num_threads()} threads, load average {load[0]:.1f}")
    head = f"{'defense':<42} {'ms/input @256':>14} {'CPU ms @256':>12} {'ms @1':>8}"
    print(f"{head} {'÷ MagNet @256':>14}")
    results = []
    for name, fn, reps in rows:
        xb = x if "Defense-GAN" not in name else x[:64]
        wall, cpu = per_input_ms(fn, xb, reps)
        results.append((name, wall, cpu, single_ms(fn, x, 10 if reps == 1 else 30)))
    base = results[2][1]
    for name, wall, cpu, one in results:
        print(f"{name:<42} {wall:>14.3f} {cpu:>12.3f} {one:>8.2f} {wall / base:>14.1f}")
    print("targets: default ≤ 2 ms/input @256, ≤ 20 ms @1 (CPU ms: this process's CPU time)")


def compiled(device: torch.device) -> None:
    """Child process: eager inference copies against inductor-compiled ones, batch 256."""
    import torch._inductor.config as inductor

    default, _, x = _setup(device)
    eager = (
        inference_copy(default.classifier),
        inference_copy(default.vae),
        default.autoencoders,
    )
    inductor.freezing = True  # weights as constants: prepacked convolutions, fused ReLUs
    t0 = time.perf_counter()
    vae = copy.deepcopy(eager[1])
    for part in ("encoder", "dgmm", "decoder"):
        setattr(vae, part, torch.compile(getattr(vae, part), dynamic=False))
    aes = eager[2]
    if aes is not None:
        aes = (torch.compile(aes[0], dynamic=False), torch.compile(aes[1], dynamic=False))
    fast = (torch.compile(copy.deepcopy(eager[0]), dynamic=False), vae, aes)
    squeezers = default.config.squeezers

    def run(models: tuple[object, ...]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = network_outputs(*models, x, squeezers, 256)  # type: ignore[arg-type]
            return default_scores(x, out)

    ref = run(eager)
    got = run(fast)
    compile_s = time.perf_counter() - t0
    change = max(float(((ref[k] - got[k]).abs() / ref[k].abs().clamp(min=1e-3)).max()) for k in ref)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(4):
        for name, models in (("eager", eager), ("compiled", fast)):
            t1 = time.perf_counter()
            run(models)
            times[name].append(1000 * (time.perf_counter() - t1) / len(x))
    e, c = min(times["eager"]), min(times["compiled"])
    saving = (e - c) / 1000  # seconds per input
    even = f"{compile_s / saving:,.0f} inputs" if saving > 0 else "never"
    print(
        f"torch.compile (inductor, freezing): compile {compile_s:.0f} s; forward @256 "
        f"{e:.3f} ms/input eager, {c:.3f} compiled; largest relative score change {change:.1e}"
    )
    verdict = "faster" if saving > 0 else "slower"
    print(
        f"library uses the eager channels_last copies: compiled is {verdict} here and pays back "
        f"after {even} per process (a defense is loaded per command; a compiled model "
        "recompiles for each new batch size)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile-timeout", type=float, default=420.0)
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.compile_only:
        compiled(device)
        return
    serving(device)
    cmd = [sys.executable, __file__, "--compile-only", "--device", args.device]
    try:
        done = subprocess.run(cmd, timeout=args.compile_timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        print(f"torch.compile: not finished in {args.compile_timeout:.0f} s; library uses eager")
        return
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"torch.compile failed here ({last}); library uses eager")
        return
    print(done.stdout.strip())


if __name__ == "__main__":
    main()
