"""Artifacts on disk: one folder holding config.json, model.safetensors and metrics.json.

Everything is written to a temporary name and renamed, so a killed run never leaves a half-written
file. Nothing here unpickles: weights are safetensors, and so is resume state (`core.resume`).
config.json records the size and SHA-256 of every tensor file (`files`), and loading checks them:
a truncated or edited file is refused with a line naming it. Artifacts written before checksums
existed still load, with a warning that they carry none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fmdefense.core.checksums import check_records, file_record, verify_file
from fmdefense.core.device import resolve_device
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.core.files import atomic_path, atomic_write_bytes, one_line, read_json, write_json
from fmdefense.core.resume import (
    RESUME_FILE,
    GeneratorState,
    load_resume_state,
    save_resume_state,
)

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "METRICS_FILE",
    "RESUME_FILE",
    "WEIGHTS_FILE",
    "GeneratorState",
    "atomic_write_bytes",
    "load_module",
    "load_resume_state",
    "load_tensors",
    "read_config",
    "read_json",
    "read_metrics",
    "recorded_checksum",
    "save_artifact",
    "save_resume_state",
    "save_tensors",
    "write_json",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
_META_KEYS = ("kind", "format_version", "config")  # required in every config.json
_OPTIONAL_META_KEYS = ("files",)  # checksums; absent in artifacts saved before them
_FIX = "restore the file (git checkout, or copy it again) or re-run the command that wrote it"
_warned_legacy: set[Path] = set()


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Save a flat dict of tensors as safetensors, atomically (tensors made contiguous on CPU)."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory; remove it or choose another output path")
    tmp = atomic_path(path)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.chmod(tmp, 0o644)  # save_file recreates the file with its own mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def recorded_checksum(path: Path) -> dict[str, Any] | None:
    """The size/SHA-256 record of `path` in the config.json beside it, if that config has one.

    A config.json of an artifact saved before checksums existed gives None and a warning (once
    per file); a folder without config.json (chunk caches, stage outputs) gives None silently.
    """
    path = Path(path)
    config = path.parent / CONFIG_FILE
    if not config.is_file():
        return None
    meta = read_json(config)
    if not isinstance(meta, dict) or "kind" not in meta:
        return None  # not an fmdefense artifact config
    if "files" not in meta:
        if path not in _warned_legacy:
            _warned_legacy.add(path)
            log.warning(
                "%s carries no checksum in its config.json (saved before checksums were "
                "recorded, or by a writer that records none); loading it unverified. Re-save "
                "the artifact to add one.",
                path,
            )
        return None
    return check_records(meta["files"], config).get(path.name)


def load_tensors(
    path: Path,
    device: str | torch.device = "cpu",
    *,
    finite: bool = False,
    fix: str = _FIX,
) -> dict[str, torch.Tensor]:
    """Load a safetensors file, verified against the checksum its artifact's config.json records.

    Raises ArtifactError naming the file (and `fix`) when it is missing, corrupt, does not match
    its checksum or, with `finite`, holds NaN or infinite floats; InputError for a device torch
    cannot use. Tensors are read on the CPU and then moved to `device`.
    """
    path = Path(path)
    target = resolve_device(str(device))
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory, not a safetensors file; {fix}")
    if not path.is_file():
        raise ArtifactError(f"missing weights file {path}; {fix}")
    record = recorded_checksum(path)
    if record is not None:
        verify_file(path, record, fix)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as exc:
        raise ArtifactError(f"corrupt safetensors file {path} ({one_line(exc)}); {fix}") from exc
    if finite:
        _check_finite(path, tensors, fix)
    return {k: v.to(target) for k, v in tensors.items()} if target.type != "cpu" else tensors


def _check_finite(path: Path, tensors: Mapping[str, torch.Tensor], fix: str) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ArtifactError(f"{path}: tensor {key!r} holds NaN or infinite values; {fix}")


def save_artifact(
    folder: Path,
    *,
    kind: str,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    metrics: Mapping[str, Any] | None = None,
    tensors_file: str = WEIGHTS_FILE,
) -> None:
    """Write an artifact folder; the weights land before the config so a config implies weights.

    config.json records the size and SHA-256 of the tensors file (`files`), checked on load.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ArtifactError(f"{folder} exists and is not a folder; choose another output path")
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / tensors_file, tensors)
    if metrics is not None:
        write_json(folder / METRICS_FILE, dict(metrics))
    meta = {"kind": kind, "format_version": FORMAT_VERSION, "config": dict(config)}
    meta["files"] = {tensors_file: file_record(folder / tensors_file)}
    write_json(folder / CONFIG_FILE, meta)


def read_config(folder: Path, kind: str) -> dict[str, Any]:
    """Read an artifact's config.json and check its keys, kind, format version and checksums."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist")
    path = folder / CONFIG_FILE
    fix = "restore the file or re-create the artifact"
    if not path.exists():
        raise ArtifactError(f"{folder} is not an artifact: missing {path}; {fix}")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} must hold a JSON object, got {type(meta).__name__}; {fix}")
    for key in _META_KEYS:
        if key not in meta:
            raise ArtifactError(f"{path} lacks key {key!r} (not an fmdefense artifact); {fix}")
    unknown = sorted(set(meta) - {*_META_KEYS, *_OPTIONAL_META_KEYS})
    if unknown:
        raise ArtifactError(f"{path} has unknown key {unknown[0]!r}; {fix}")
    if meta["kind"] != kind:
        raise ArtifactError(f"{folder} holds a {meta['kind']!r} artifact, expected {kind!r}")
    version = meta["format_version"]
    if version != FORMAT_VERSION or type(version) is not int:
        raise ArtifactError(
            f"{path} has format_version {version!r}, expected {FORMAT_VERSION}; {fix}"
        )
    if not isinstance(meta["config"], dict):
        got = "null" if meta["config"] is None else type(meta["config"]).__name__
        raise ArtifactError(f"{path}: 'config' must be a JSON object, got {got}; {fix}")
    if "files" in meta:
        check_records(meta["files"], path)
    return dict(meta["config"])


def read_metrics(folder: Path) -> dict[str, Any]:
    """Read an artifact's metrics.json (empty dict when absent)."""
    path = Path(folder) / METRICS_FILE
    if not path.exists():
        return {}
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{path} must hold a JSON object, got {type(metrics).__name__}")
    return metrics


M = TypeVar("M", bound=nn.Module)


def load_module(
    folder: Path,
    kind: str,
    build: Callable[[dict[str, Any]], M],
    device: str | torch.device = "cpu",
) -> M:
    """Rebuild a network from its artifact: `build(config)` then its verified, finite weights.

    The config's `image_size` list becomes a tuple. A config `build` refuses (InputError, or
    TypeError for unexpected keys) and weights that do not fit the network raise ArtifactError.
    """
    target = resolve_device(str(device))
    folder = Path(folder)
    raw = read_config(folder, kind)
    if isinstance(raw.get("image_size"), list):
        raw["image_size"] = tuple(raw["image_size"])
    try:
        model = build(raw)
    except (InputError, TypeError) as exc:
        raise ArtifactError(
            f"{folder / CONFIG_FILE}: {one_line(exc)}; fix the file or re-create the artifact"
        ) from exc
    path = folder / WEIGHTS_FILE
    state = load_tensors(path, finite=True)
    _check_state(path, model, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"weights in {path} do not match its config: {one_line(exc)}") from exc
    return model.to(target).eval()


def _check_state(path: Path, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights whose names, shapes or dtypes differ from the network's (one line)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        which = f"lacks {missing[0]!r}" if missing else f"has unexpected {unexpected[0]!r}"
        raise ArtifactError(
            f"weights in {path} do not match its config: {which} "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors); {_FIX}"
        )
    for key, ref in expected.items():
        got = state[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise ArtifactError(
                f"weights in {path} do not match its config: {key!r} is {got.dtype} "
                f"{tuple(got.shape)}, expected {ref.dtype} {tuple(ref.shape)}; {_FIX}"
            )
