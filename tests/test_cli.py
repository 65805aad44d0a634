"""The command line: errors are one line that says what is wrong and what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmdefense.cli import main


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("fmdefense: error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_missing_dataset_is_a_one_line_error(
    tmp_path: Path, data_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "info", "--dataset", "fmnist", "--data-dir", str(tmp_path)]) == 2
    assert "apt-get install" in _one_line_error(capsys)


def test_corrupt_cache_is_a_one_line_error(
    idx_folder: Path, data_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "info", "--dataset", "mnist", "--data-dir", str(idx_folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["train"] == 120 and info["train_label_counts"] == [12] * 10
    assert len(info["sha256"]) == 64
    npz = next((data_home / "cache").glob("mnist-*.npz"))
    npz.write_bytes(npz.read_bytes()[:-100])
    assert main(["data", "info", "--dataset", "mnist", "--data-dir", str(idx_folder)]) == 2
    assert "corrupt" in _one_line_error(capsys)


def test_missing_weights_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["evaluate", "classifier", "--dataset", "mnist", "--weights", str(tmp_path / "w")])
    assert code == 2
    assert "does not exist" in _one_line_error(capsys)


def test_unknown_device_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "classifier", "--device", "tpu"]) == 2
    assert "unknown device" in _one_line_error(capsys)


def test_calibrate_then_defend_a_clean_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Shipped MNIST models: calibrate on 30 VAL images, then decide on 10 CLE images."""
    args = ["--dataset", "mnist", "--device", "cpu"]
    code = main(
        [
            "calibrate",
            *args,
            "--val-limit",
            "30",
            "--n-morphs",
            "4",
            "--rho",
            "0.9",
            "--out",
            str(tmp_path / "d"),
        ]
    )
    assert code == 0 and (tmp_path / "d" / "config.json").is_file()
    code = main(
        [
            "defend",
            *args,
            "--input",
            "clean",
            "--limit",
            "10",
            "--defense",
            str(tmp_path / "d"),
            "--out",
            str(tmp_path / "dec"),
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "dec" / "metrics.json").read_text())
    shares = metrics["accept_share"] + metrics["purify_share"] + metrics["reject_share"]
    assert metrics["inputs"] == 10 and abs(shares - 1) < 1e-9
    assert "inputs: accept" in capsys.readouterr().out
