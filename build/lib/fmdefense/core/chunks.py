"""Resumable chunked computation: each finished chunk is saved, a re-run skips it.

Long jobs (VAL resistance, defending 5,000 inputs, attacks) go through `chunked`, so a killed
run keeps every finished chunk and continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fmdefense.core.artifacts import load_tensors, read_json, save_tensors, write_json
from fmdefense.core.errors import ArtifactError

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
    starts = list(range(0, n, chunk_size))
    if folder is not None:
        _check_manifest(Path(folder), {"config": config_hash(config), "n": n, "chunk": chunk_size})
    parts: list[dict[str, torch.Tensor]] = []
    done = 0
    for start in tqdm(starts, desc=desc, unit="chunk", disable=None):
        stop = min(start + chunk_size, n)
        path = Path(folder) / f"chunk-{start:07d}.safetensors" if folder is not None else None
        if path is not None and path.is_file():
            saved = load_tensors(path)
            fixed = upgrade(start, stop, saved) if upgrade is not None else None
            if fixed is not None:
                save_tensors(path, fixed)
            parts.append(fixed if fixed is not None else saved)
            done += 1
            continue
        out = compute(start, stop)
        if path is not None:
            save_tensors(path, out)
        parts.append(out)
    if done:
        log.info("%s: reused %d of %d finished chunks from %s", desc, done, len(starts), folder)
    if not parts:
        return {}
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _check_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    path = folder / MANIFEST
    if path.is_file():
        found = read_json(path)
        if found != manifest:
            raise ArtifactError(
                f"{folder} holds chunks of another run ({found}); delete it or use another folder"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, manifest)
