"""Resume state for long training runs, without pickle: one safetensors file whose body holds
the tensors (weights, optimizer moments, RNG states) and whose header metadata holds everything
else as JSON, so one atomic rename publishes both together."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fmdefense.core.errors import ArtifactError
from fmdefense.core.files import atomic_path

log = logging.getLogger(__name__)

RESUME_FILE = "resume.safetensors"
_RESUME_META = "fmdefense_resume"  # header metadata key holding the JSON skeleton


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
    tmp = atomic_path(path)
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


class GeneratorState:
    """Adapter so a torch.Generator resumes like a module (state_dict / load_state_dict)."""

    def __init__(self, gen: torch.Generator) -> None:
        self.gen = gen

    def state_dict(self) -> torch.Tensor:
        return self.gen.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)
