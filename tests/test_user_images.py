"""Your own images in: folders (per class or flat), single files, npz; clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmdefense.core.errors import DataError
from fmdefense.data.user import load_images


def _png(path: Path, value: int, size: tuple[int, int] = (28, 28)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)


def test_class_folders_give_labels_in_sorted_order(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "a.png", 0)
    _png(tmp_path / "cat" / "b.png", 255)
    _png(tmp_path / "dog" / "c.png", 51, size=(56, 40))  # resized to 28x28
    imgs = load_images(tmp_path, channels=1, size=(28, 28))
    assert imgs.x.shape == (3, 1, 28, 28) and imgs.x.dtype == torch.float32
    assert imgs.y is not None and imgs.y.tolist() == [0, 0, 1]
    assert imgs.classes == ["cat", "dog"]
    assert float(imgs.x[1].min()) == 1.0 and abs(float(imgs.x[2].mean()) - 0.2) < 1e-6
    assert imgs.names[0].endswith("a.png")


def test_flat_folder_single_file_and_rgb(tmp_path: Path) -> None:
    _png(tmp_path / "flat" / "x.png", 128)
    one = load_images(tmp_path / "flat" / "x.png", channels=3, size=(32, 32))
    assert one.x.shape == (1, 3, 32, 32) and one.y is None
    flat = load_images(tmp_path / "flat", channels=1, size=(28, 28))
    assert len(flat.names) == 1


def test_npz_uint8_and_float_with_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "u8.npz", x=np.full((4, 28, 28), 255, np.uint8), y=np.arange(4))
    imgs = load_images(tmp_path / "u8.npz", channels=1, size=(28, 28))
    assert float(imgs.x.max()) == 1.0 and imgs.y is not None and imgs.y.tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "f.npz", x=np.random.rand(2, 14, 14, 1).astype(np.float32))
    assert load_images(tmp_path / "f.npz", channels=1, size=(28, 28)).x.shape == (2, 1, 28, 28)


def _objects(p: Path) -> None:
    np.savez(p, x=np.array([object()], dtype=object))  # only loadable by unpickling


BAD_SOURCES = [
    ("missing.npz", None, "does not exist"),
    ("empty", lambda p: p.mkdir(), "no images"),
    ("notes.txt", lambda p: p.write_text("not an image"), "expected a folder"),
    ("no_x.npz", lambda p: np.savez(p, z=np.zeros(3)), "needs an array 'x'"),
    ("flat.npz", lambda p: np.savez(p, x=np.zeros((2, 5))), "must be"),
    ("range.npz", lambda p: np.savez(p, x=np.full((2, 4, 4), 2.0)), "in \\[0, 1\\]"),
    ("y.npz", lambda p: np.savez(p, x=np.zeros((2, 4, 4)), y=np.zeros(3, int)), "'y'"),
    ("pickled.npz", _objects, "not a readable"),
]


@pytest.mark.parametrize(("name", "make", "match"), BAD_SOURCES)
def test_bad_sources_give_a_data_error_naming_the_file(
    name: str, make: object, match: str, tmp_path: Path
) -> None:
    path = tmp_path / name
    if callable(make):
        make(path)
    with pytest.raises(DataError, match=match) as err:
        load_images(path, channels=1, size=(28, 28))
    assert name in str(err.value)


def test_a_broken_image_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken\.png"):
        load_images(bad, channels=1, size=(28, 28))
