"""Atomic file writes and JSON I/O shared by every artifact, cache and manifest.

Everything is written to a temporary name in the target folder and renamed, so a killed run never
leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fmdefense.core.errors import ArtifactError


def atomic_path(path: Path) -> Path:
    """A fresh temporary file beside `path` (mode 0644) to write and then rename onto it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
    return Path(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory; remove it or choose another output path")
    tmp = atomic_path(path)
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
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory, not a JSON file; remove it and re-create it")
    if not path.is_file():
        raise ArtifactError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(
            f"corrupt JSON in {path}: {one_line(exc)}; restore it or re-create the artifact"
        ) from exc
    except (OSError, RecursionError) as exc:
        raise ArtifactError(f"cannot read {path}: {one_line(exc)}") from exc


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters (for error messages)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
