"""Resumable chunked computation: each finished chunk is saved, a re-run skips it.

Long jobs (VAL resistance, defending 5,000 inputs, attacks) go through `chunked`, so a killed
run keeps every finished chunk and continues where it stopped. The chunks still to do run on
the command's executor (`core.executor`: serial here, or Ray tasks), and each is saved here
as soon as it arrives.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fmdefense.core.artifacts import load_tensors, read_json, save_tensors, write_json
from fmdefense.core.config import check_int
from fmdefense.core.errors import ArtifactError
from fmdefense.core.executor import SerialExecutor, current_executor

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def config_hash(config: Any) -> str:
    """Short stable hash of a JSON-serialisable config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chunked(
    n: int,
    chunk_size: int,
    folder: Path | None,
    compute: Callable[[int, int], dict[str, torch.Tensor]],
    *,
    config: Any,
    desc: str = "chunks",
    upgrade: Callable[[int, int, dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]
    | None = None,
) -> dict[str, torch.Tensor]:
    """Run `compute(start, stop)` over [0, n) in chunks and concatenate each output tensor.

    With a `folder`, every chunk is saved there and reused by a later run with the same
    `config` (a manifest records its hash; a different config in the same folder is an error).
    `upgrade(start, stop, saved)` may return a corrected chunk for one written by an older
    version (it is saved in place), or None to keep the saved chunk as it is.
    """
    check_int("n", n, low=0)
    check_int("chunk_size", chunk_size, low=1)
    starts = list(range(0, n, chunk_size))
    if folder is not None:
        _check_manifest(Path(folder), {"config": config_hash(config), "n": n, "chunk": chunk_size})
    parts: dict[int, dict[str, torch.Tensor]] = {}
    todo: list[tuple[int, int]] = []
    for start in starts:
        stop = min(start + chunk_size, n)
        path = _chunk_path(folder, start)
        if path is None or not path.is_file():
            todo.append((start, stop))
            continue
        saved = load_tensors(path, fix=f"delete {path} to recompute that chunk")
        fixed = upgrade(start, stop, saved) if upgrade is not None else None
        if fixed is not None:
            save_tensors(path, fixed)
        parts[start] = fixed if fixed is not None else saved
    if len(todo) < len(starts):
        log.info(
            "%s: reused %d of %d finished chunks from %s", desc, len(parts), len(starts), folder
        )

    def finished(i: int, out: dict[str, torch.Tensor]) -> None:
        start = todo[i][0]
        path = _chunk_path(folder, start)
        if path is not None:  # saved the moment it arrives: a later failure cannot lose it
            save_tensors(path, out)
        parts[start] = out

    # Resumable stages (with a folder) run on the command's executor; others stay here.
    executor = current_executor() if folder is not None else SerialExecutor()
    executor.map(compute, todo, finished, desc=desc, unit="chunk")
    if not parts:
        return {}
    ordered = [parts[start] for start in starts]
    return {key: torch.cat([p[key] for p in ordered]) for key in ordered[0]}


def _chunk_path(folder: Path | None, start: int) -> Path | None:
    return Path(folder) / f"chunk-{start:07d}.safetensors" if folder is not None else None


def _check_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    path = folder / MANIFEST
    if folder.exists() and not folder.is_dir():
        raise ArtifactError(f"{folder} is a file, not a chunk folder; remove it or use another")
    if path.exists():
        found = read_json(path)
        if found != manifest:
            raise ArtifactError(
                f"{folder} holds chunks of another run ({found}); delete it or use another folder"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, manifest)
