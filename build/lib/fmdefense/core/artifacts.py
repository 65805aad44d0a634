"""Artifacts on disk: one folder holding config.json, model.safetensors and metrics.json.

Everything is written to a temporary name and renamed, so a killed run never leaves a half-written
file. Nothing here unpickles: weights are safetensors, and so is resume state (its tensors in the
file's body, everything else as JSON in the file's header metadata).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fmdefense.core.errors import ArtifactError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
RESUME_FILE = "resume.safetensors"
_RESUME_META = "fmdefense_resume"  # header metadata key holding the JSON skeleton


def _atomic_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename."""
    tmp = _atomic_path(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON atomically."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    """Read a JSON file, raising ArtifactError naming the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"corrupt JSON in {path}: {exc}") from exc


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Save a flat dict of tensors as safetensors, atomically (tensors made contiguous on CPU)."""
    tmp = _atomic_path(Path(path))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.chmod(tmp, 0o644)  # save_file recreates the file with its own mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, raising ArtifactError naming the file when missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing weights file {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"corrupt safetensors file {path}: {exc}") from exc


def save_artifact(
    folder: Path,
    *,
    kind: str,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """Write an artifact folder; the weights land before the config so a config implies weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / WEIGHTS_FILE, tensors)
    if metrics is not None:
        write_json(folder / METRICS_FILE, dict(metrics))
    write_json(
        folder / CONFIG_FILE,
        {"kind": kind, "format_version": FORMAT_VERSION, "config": dict(config)},
    )


def read_config(folder: Path, kind: str) -> dict[str, Any]:
    """Read an artifact's config.json and check its kind and format version."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist")
    meta = read_json(folder / CONFIG_FILE)
    if not isinstance(meta, dict) or "kind" not in meta or "config" not in meta:
        raise ArtifactError(f"{folder / CONFIG_FILE} is not an fmdefense artifact config")
    if meta["kind"] != kind:
        raise ArtifactError(f"{folder} holds a {meta['kind']!r} artifact, expected {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{folder} has format_version {meta.get('format_version')}, expected {FORMAT_VERSION}"
        )
    return dict(meta["config"])


def read_metrics(folder: Path) -> dict[str, Any]:
    """Read an artifact's metrics.json (empty dict when absent)."""
    path = Path(folder) / METRICS_FILE
    return dict(read_json(path)) if path.is_file() else {}


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` as JSON-ready data; each tensor is moved into `tensors` and left as a reference."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _flatten(v, tensors) for k, v in obj.items()}}
        if all(isinstance(k, int) for k in obj):  # optimizer state is keyed by parameter index
            return {"__intdict__": [[k, _flatten(v, tensors)] for k, v in obj.items()]}
        raise TypeError(f"resume state: dict keys must be all str or all int, got {list(obj)}")
    if isinstance(obj, list | tuple):
        items = [_flatten(v, tensors) for v in obj]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"resume state cannot hold a {type(obj).__name__}")


def _unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of `_flatten`; a malformed node raises ValueError."""
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) != 1:
        raise ValueError(f"malformed node with keys {sorted(obj)}")
    ((tag, body),) = obj.items()
    if tag == "__tensor__" and isinstance(body, str) and body in tensors:
        return tensors[body]
    if tag == "__dict__" and isinstance(body, dict):
        return {k: _unflatten(v, tensors) for k, v in body.items()}
    if tag == "__intdict__" and isinstance(body, list):
        if not all(isinstance(kv, list) and len(kv) == 2 and type(kv[0]) is int for kv in body):
            raise ValueError("malformed __intdict__ node")
        return {k: _unflatten(v, tensors) for k, v in body}
    if tag == "__tuple__" and isinstance(body, list):
        return tuple(_unflatten(v, tensors) for v in body)
    raise ValueError(f"malformed {tag!r} node")


def save_resume_state(folder: Path, state: Mapping[str, Any]) -> None:
    """Save optimizer/model/epoch state for resuming, as one safetensors file written atomically.

    Tensors (weights, optimizer moments, RNG states) go in the body; the nesting and the plain
    values (epochs, history, configs) go as JSON in the header metadata, so one rename publishes
    both together.
    """
    path = Path(folder) / RESUME_FILE
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_flatten(dict(state), tensors))
    tmp = _atomic_path(path)
    try:
        # contiguous copies: safetensors refuses shared storage (tied weights) and strided layouts
        body = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        save_file(body, str(tmp), metadata={_RESUME_META: skeleton})
        os.chmod(tmp, 0o644)  # save_file recreates the file with its own mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_resume_state(folder: Path) -> dict[str, Any] | None:
    """Load the state `save_resume_state` wrote (no unpickling); None when absent."""
    path = Path(folder) / RESUME_FILE
    if not path.is_file():
        if (Path(folder) / "resume.pt").is_file():
            log.warning("%s: ignoring resume.pt (old pickle format); training starts over", folder)
        return None
    try:
        with safe_open(str(path), framework="pt") as f:  # one open: header and tensors agree
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        state = _unflatten(json.loads(meta[_RESUME_META]), tensors)
    except (SafetensorError, OSError, KeyError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"corrupt resume state {path}: {exc}; delete it to start over") from exc
    if not isinstance(state, dict):
        raise ArtifactError(f"corrupt resume state {path}: not a mapping; delete it to start over")
    return state


M = TypeVar("M", bound=nn.Module)


def load_module(
    folder: Path,
    kind: str,
    build: Callable[[dict[str, Any]], M],
    device: str | torch.device = "cpu",
) -> M:
    """Rebuild a network from its artifact: `build(config)` then its safetensors weights.

    The config's `image_size` list becomes a tuple; mismatched weights raise ArtifactError.
    """
    raw = read_config(folder, kind)
    if "image_size" in raw:
        raw["image_size"] = tuple(raw["image_size"])
    model = build(raw)
    try:
        model.load_state_dict(load_tensors(Path(folder) / WEIGHTS_FILE, device))
    except RuntimeError as exc:
        raise ArtifactError(f"weights in {folder} do not match its config: {exc}") from exc
    return model.to(device).eval()


class GeneratorState:
    """Adapter so a torch.Generator resumes like a module (state_dict / load_state_dict)."""

    def __init__(self, gen: torch.Generator) -> None:
        self.gen = gen

    def state_dict(self) -> torch.Tensor:
        return self.gen.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)
