"""SHA-256 records of the files an artifact holds, written into its config.json and checked on
load, so a truncated, edited or swapped weights file is refused instead of silently used."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from fmdefense.core.errors import ArtifactError

_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What config.json records about one file: {"sha256": hex, "bytes": size}."""
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def check_records(files: object, where: Path) -> dict[str, dict[str, Any]]:
    """Validate the `files` entry of a config.json (name -> record), naming the bad key."""
    if not isinstance(files, dict):
        raise ArtifactError(f"{where}: 'files' must be a JSON object, got {type(files).__name__}")
    for name, rec in files.items():
        ok = isinstance(rec, dict) and set(rec) == {"sha256", "bytes"}
        ok = ok and isinstance(rec["sha256"], str) and bool(_HEX64.fullmatch(rec["sha256"]))
        ok = ok and type(rec["bytes"]) is int and rec["bytes"] >= 0
        if not ok:
            raise ArtifactError(
                f"{where}: files[{name!r}] must be {{'sha256': 64 hex digits, 'bytes': int}}, "
                f"got {rec!r}"[:300]
            )
    return files


def verify_file(path: Path, record: dict[str, Any], fix: str) -> None:
    """Refuse `path` unless its size and SHA-256 match `record`; the message names the file."""
    path = Path(path)
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ArtifactError(
            f"{path} has {size} bytes but its config.json records {record['bytes']} "
            f"(truncated or replaced); {fix}"
        )
    if sha256_file(path) != record["sha256"]:
        raise ArtifactError(
            f"{path} does not match the SHA-256 recorded in its config.json "
            f"(corrupt or edited); {fix}"
        )
