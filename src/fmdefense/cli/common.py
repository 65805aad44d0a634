"""Shared pieces of the command line: the parser class, bounded number types, common options.

Every number the CLI reads has a `type=` here, so a bad value is an argparse error (exit 2, one
line naming the option and what it accepts) before any work starts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from fmdefense.core.executor import Executor

DATASETS = ("mnist", "fmnist", "orl", "celeba")
MODEL_DATASETS = ("mnist", "fmnist", "orl")  # datasets with shipped classifier and combo-VAE
ERROR_PREFIX = "fmdefense: error:"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `fmdefense: error: ... (see '... --help')`."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        self.exit(2, f"{ERROR_PREFIX} {line} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------------- bounded number types


def _number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1 (counts of images, epochs, steps, batch sizes)."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (≥ 1), got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer ≥ 0 (seeds; counts where 0 means off)."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer (≥ 0), got {text!r}")
    return value


def _float_in(low: float, high: float, *, low_open: bool, high_open: bool, what: str) -> Callable:
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    interval = f"{left}{low:g}, {high:g}{right}"

    def parse(text: str) -> float:
        value = float(_number(text, float))
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {what} in {interval}, got {text!r}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


probability = _float_in(0.0, 1.0, low_open=True, high_open=False, what="a probability")
"""A float in (0, 1] (ρ, ε of L∞ attacks on images in [0, 1])."""
open_probability = _float_in(0.0, 1.0, low_open=True, high_open=True, what="a rate")
"""A float in (0, 1) (a false-positive rate α)."""
unit_interval = _float_in(0.0, 1.0, low_open=False, high_open=False, what="a fraction")
"""A float in [0, 1] (η fractiles)."""
non_negative_float = _float_in(
    0.0, math.inf, low_open=False, high_open=True, what="a non-negative number"
)
"""A float ≥ 0 (loss weights, free nats)."""


def codes(text: str) -> str | tuple[int, ...]:
    """`all`, `auto` or comma-separated distinct code indices ≥ 0 (`0,3,5`)."""
    if text in ("all", "auto"):
        return text
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(
            f"must be all, auto or comma-separated code indices such as 0,3,5; got {text!r}"
        )
    values = tuple(int(p) for p in parts)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"code indices must be distinct, got {text!r}")
    return values


# ---------------------------------------------------------------------- common options


def add_data_dir(p: argparse.ArgumentParser) -> None:
    """--data-dir: the dataset's own files instead of the offline sources."""
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with the dataset's own files (IDX, or CelebA's layout)",
    )


def add_device(p: argparse.ArgumentParser) -> None:
    """--device auto|cpu|cuda[:N]."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")


def add_common(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    """--data-dir and (unless `device=False`) --device."""
    add_data_dir(p)
    if device:
        add_device(p)


def add_executor(p: argparse.ArgumentParser) -> None:
    """--executor serial|ray and --ray-address: where the resumable chunks of long stages run."""
    p.add_argument(
        "--executor",
        choices=("serial", "ray"),
        default="serial",
        help="run the chunks of long stages here (serial) or as Ray tasks (ray; needs "
        "fmdefense[ray]); finished chunks are saved either way, and a rerun resumes",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="with --executor ray: a running cluster (HOST:PORT as `ray start --head` printed, "
        "or auto for one on this machine); default: start a local Ray on this machine",
    )


def executor_of(args: argparse.Namespace) -> Executor:
    """The executor a command asked for (serial for commands without --executor)."""
    from fmdefense.core.executor import make_executor

    return make_executor(
        getattr(args, "executor", "serial"), address=getattr(args, "ray_address", None)
    )


def add_classifier_spec(p: argparse.ArgumentParser) -> None:
    """--classifier SPEC and --classifier-weights FILE (see `fmdefense.models.user`)."""
    p.add_argument(
        "--classifier",
        default=None,
        metavar="SPEC",
        help="the protected classifier: an fmdefense classifier folder, a TorchScript FILE.pt, "
        "or package.module:factory (with --classifier-weights); default: the dataset's shipped one",
    )
    p.add_argument(
        "--classifier-weights",
        type=Path,
        default=None,
        metavar="FILE.safetensors",
        help="state dict loaded strictly into the model that package.module:factory returns",
    )


def default_out(out: Path | None, *parts: str) -> Path:
    """`out` when given, else runs/<parts...> (relative to the working directory)."""
    return out if out is not None else Path("runs", *parts)
