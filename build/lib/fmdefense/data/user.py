"""Your own images: a folder (one subfolder per class, or flat), one image file, or an `.npz`
with `x` (n, H, W[, C]) and optional `y`; resized and scaled to [0, 1] float32 (n, C, H, W).

Read with Pillow (PNG, JPEG, PGM, BMP, ...); `.npz` files are opened with `allow_pickle=False`.
Every problem is a `DataError` naming the file and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmdefense.core.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class UserImages:
    """Images ready for a defense, with where each came from."""

    x: torch.Tensor  # (n, C, H, W) float32 in [0, 1]
    y: torch.Tensor | None  # (n,) int64 labels when the source gave them
    names: list[str]  # file path or "index i" per image
    classes: list[str] | None = None  # class-folder names, in label order


def _pil_image(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as raw:
            img = raw.convert("L" if channels == 1 else "RGB")
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from exc
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)  # (C, H, W)


def _from_files(
    files: list[Path], channels: int, size: tuple[int, int]
) -> torch.Tensor:  # (n, C, H, W)
    return torch.from_numpy(np.stack([_pil_image(f, channels, size) for f in files]))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _from_folder(folder: Path, channels: int, size: tuple[int, int]) -> UserImages:
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if subdirs:  # one subfolder per class, in sorted order = label order
        files, labels = [], []
        for k, sub in enumerate(subdirs):
            found = _images_in(sub)
            files += found
            labels += [k] * len(found)
        if not files:
            raise DataError(f"{folder}: its class subfolders hold no images ({IMAGE_SUFFIXES})")
        y = torch.tensor(labels, dtype=torch.long)
        x = _from_files(files, channels, size)
        return UserImages(x, y, [str(f) for f in files], [d.name for d in subdirs])
    files = _images_in(folder)
    if not files:
        raise DataError(f"{folder}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    return UserImages(_from_files(files, channels, size), None, [str(f) for f in files])


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[2:]) == size:
        return x
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True)


def _from_npz(path: Path, channels: int, size: tuple[int, int]) -> UserImages:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f:
                raise DataError(f"{path}: needs an array 'x' (n, H, W[, C]); has {list(f)}")
            x, y = np.asarray(f["x"]), (np.asarray(f["y"]) if "y" in f else None)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npz without pickles ({exc})") from exc
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or len(x) == 0:
        raise DataError(f"{path}: 'x' must be (n, H, W) or (n, H, W, 1|3), got {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: 'x' must be numeric, got {x.dtype}")
    scale = 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0
    t = torch.from_numpy(x.astype(np.float32) / scale).permute(0, 3, 1, 2)  # (n, C, H, W)
    if not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1:
        raise DataError(f"{path}: 'x' must be finite, in [0, 1] (floats) or [0, 255] (ints)")
    if t.shape[1] != channels:
        t = t.mean(1, keepdim=True) if channels == 1 else t.expand(-1, channels, -1, -1)
    labels = None
    if y is not None:
        if y.shape != (len(t),) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: 'y' must be integer labels of shape ({len(t)},)")
        labels = torch.from_numpy(y.astype(np.int64))
    names = [f"index {i}" for i in range(len(t))]
    return UserImages(_resize(t, size).clamp(0, 1).contiguous(), labels, names)


def load_images(path: Path, channels: int, size: tuple[int, int]) -> UserImages:
    """Images from a folder, one image file or an `.npz`, as the defended classifier expects."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist: give an image folder, an image file or an .npz")
    if path.is_dir():
        return _from_folder(path, channels, size)
    if path.suffix.lower() == ".npz":
        return _from_npz(path, channels, size)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return UserImages(_from_files([path], channels, size), None, [str(path)])
    raise DataError(f"{path}: expected a folder, an .npz or one of {', '.join(IMAGE_SUFFIXES)}")
