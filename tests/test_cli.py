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
