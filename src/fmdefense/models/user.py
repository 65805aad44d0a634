"""Your own classifier, from a spec string (what `--classifier SPEC` accepts).

Three forms, none of which unpickles anything:

- a folder: an fmdefense classifier artifact (config.json + model.safetensors);
- `FILE.pt` (or `.pth`, `.ts`): a TorchScript file (`torch.jit.save` of `torch.jit.script` or
  `torch.jit.trace`), read with `torch.jit.load`; files written by `torch.save` are refused;
- `package.module:factory`: the factory is imported and called with no arguments; it returns an
  `nn.Module`, into which `weights` (a `.safetensors` state dict) is loaded strictly.

The model must map float images (n, C, H, W) in [0, 1] to logits (n, num_classes). A model
without a `cfg` is wrapped in `UserClassifier`, whose `cfg` states the input shape the defenses
check (given by the caller, usually the dataset's); a probe pass checks the output shape.
"""

from __future__ import annotations

import importlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmdefense.core.device import module_device
from fmdefense.core.errors import InputError

log = logging.getLogger(__name__)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
SPEC_FORMS = (
    "an fmdefense classifier folder, a TorchScript FILE.pt (torch.jit.save), or "
    "package.module:factory with --classifier-weights FILE.safetensors"
)


@dataclass(frozen=True)
class UserClassifierConfig:
    """The input and output sizes a wrapped classifier is used with."""

    in_channels: int
    image_size: tuple[int, int]
    num_classes: int


class UserClassifier(nn.Module):
    """A user's network with the `cfg` the defenses read (input channels and size)."""

    def __init__(self, net: nn.Module, cfg: UserClassifierConfig) -> None:
        super().__init__()
        self.net = net
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, C, H, W) -> (n, num_classes)
        return self.net(x)


def _torchscript(path: Path, device: torch.device) -> nn.Module:
    if not path.is_file():
        raise InputError(f"classifier file {path} does not exist; give {SPEC_FORMS}")
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; still supported
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as exc:
        raise InputError(
            f"{path} is not a TorchScript file ({str(exc).splitlines()[0]}); fmdefense never "
            "unpickles torch.save files: export with torch.jit.save(torch.jit.script(model), "
            "path) or give package.module:factory with --classifier-weights FILE.safetensors"
        ) from exc


def _from_factory(spec: str, weights: Path | None) -> nn.Module:
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(
            f"--classifier {spec}: cannot import {module_name!r} ({exc}); install its package "
            "or put its folder on PYTHONPATH"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"--classifier {spec}: {module_name} has no callable {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise InputError(
            f"--classifier {spec}: {attr}() returned {type(model).__name__}, not a torch.nn.Module"
        )
    if weights is not None:
        _load_weights(model, Path(weights), spec)
    else:
        log.warning("%s: no --classifier-weights given, using the factory's own weights", spec)
    return model


def _load_weights(model: nn.Module, path: Path, spec: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"classifier weights {path} do not exist")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable .safetensors state dict ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise InputError(f"{path} does not fit the model of {spec}: {first}") from exc


def _probe(model: nn.Module, cfg: UserClassifierConfig, spec: str) -> None:
    """One forward pass on two blank images: logits (2, num_classes) or a clear error."""
    device = module_device(model)
    x = torch.zeros(2, cfg.in_channels, *cfg.image_size, device=device)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # the user's code: any failure becomes one clear line
        raise InputError(
            f"classifier {spec} fails on images shaped {tuple(x.shape)}: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, cfg.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(
            f"classifier {spec} must return logits (n, {cfg.num_classes}) for images "
            f"{tuple(x.shape)}, got {shape}"
        )


def load_user_classifier(
    spec: str | Path,
    weights: Path | None = None,
    device: str | torch.device = "cpu",
    *,
    in_channels: int = 1,
    image_size: tuple[int, int] = (28, 28),
    num_classes: int = 10,
) -> nn.Module:
    """The classifier `spec` names (folder, TorchScript file or `module:factory`), in eval mode
    on `device`; networks without a `cfg` are wrapped with one for the given input shape."""
    from fmdefense.models.classifiers import Classifier

    device = torch.device(device)
    text, path = str(spec), Path(spec)
    if path.is_dir():
        if weights is not None:
            raise InputError("--classifier-weights goes with package.module:factory, not a folder")
        return Classifier.load(path, device).eval()
    if path.suffix.lower() in TORCHSCRIPT_SUFFIXES:
        if weights is not None:
            raise InputError(
                "--classifier-weights goes with package.module:factory; a "
                "TorchScript file holds its own weights"
            )
        model = _torchscript(path, device)
    elif _FACTORY.match(text):
        model = _from_factory(text, weights)
    else:
        raise InputError(f"--classifier {text!r} is not {SPEC_FORMS}")
    model = model.to(device).eval()
    cfg = UserClassifierConfig(in_channels, (int(image_size[0]), int(image_size[1])), num_classes)
    wrapped = model if hasattr(model, "cfg") else UserClassifier(model, cfg).eval()
    _probe(wrapped, cfg, text)
    return wrapped
