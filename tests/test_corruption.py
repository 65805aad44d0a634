"""Corrupt artifacts give one line naming the file (issue 21).

One table of corruptions (of the weights file and of config.json) drives one test over every
artifact kind written by `save_artifact` here: a tiny classifier, a tiny combo-VAE and a plain
tensor artifact as the defenses write them. Each runs twice: as saved now (with checksums) and as
saved before checksums existed ("legacy", no `files` record), which must still be read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from fmdefense.core.artifacts import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_tensors,
    read_config,
    save_artifact,
)
from fmdefense.core.checksums import file_record, sha256_file
from fmdefense.core.chunks import chunked
from fmdefense.core.errors import ArtifactError, FMDefenseError
from fmdefense.core.paths import classifier_dir, vae_dir
from fmdefense.models.classifiers import Classifier, ClassifierConfig
from fmdefense.models.combo_vae import ComboVAE, ComboVAEConfig


@dataclass(frozen=True)
class Kind:
    """How to write and read one artifact kind."""

    name: str
    save: Callable[[Path], None]
    load: Callable[[Path], Any]
    is_model: bool  # a network rebuilt from its config (config keys and weight names checked)


def _save_classifier(folder: Path) -> None:
    torch.manual_seed(0)
    cfg = ClassifierConfig("small_resnet", image_size=(16, 16), num_classes=2, width=1)
    Classifier(cfg).save(folder, {"note": "tiny"})


def _save_vae(folder: Path) -> None:
    torch.manual_seed(0)
    ComboVAE(ComboVAEConfig(num_classes=2, z_s_dim=1, z_u_dim=1, width=2, tc_hidden=2)).save(folder)


def _save_plain(folder: Path) -> None:
    tensors = {"lo": torch.zeros(3), "theta": torch.full((3,), 0.5), "idx": torch.arange(3)}
    save_artifact(folder, kind="toy_defense", config={"rho": 0.99}, tensors=tensors)


def _load_plain(folder: Path) -> dict[str, torch.Tensor]:
    read_config(folder, "toy_defense")
    return load_tensors(folder / WEIGHTS_FILE, finite=True)


KINDS = [
    Kind("classifier", _save_classifier, Classifier.load, True),
    Kind("combo_vae", _save_vae, ComboVAE.load, True),
    Kind("plain", _save_plain, _load_plain, False),
]


# ----------------------------------------------------------------------------- corruptions


def _edit_config(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = folder / CONFIG_FILE
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _rewrite_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the tensors and record the new file's checksum, so only the content is wrong."""
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILE
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))

    def rerecord(meta: dict[str, Any]) -> None:
        if "files" in meta:
            meta["files"][WEIGHTS_FILE] = file_record(path)

    _edit_config(folder, rerecord)


def _bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        path = folder / WEIGHTS_FILE
        path.write_bytes(edit(path.read_bytes()))

    return run


def _flip_body(raw: bytes) -> bytes:
    return raw[:-16] + bytes(b ^ 0xFF for b in raw[-16:])


def _first_float(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in sorted(tensors.items()) if v.is_floating_point() and v.numel())


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    key = _first_float(tensors)
    tensors[key] = tensors[key].clone().view(-1).index_fill(0, torch.tensor([0]), math_nan())


def math_nan() -> float:
    return float("nan")


def _double(tensors: dict[str, torch.Tensor]) -> None:
    key = _first_float(tensors)
    tensors[key] = tensors[key].double()


def _weights_dir(folder: Path) -> None:
    (folder / WEIGHTS_FILE).unlink()
    (folder / WEIGHTS_FILE).mkdir()


def _config_dir(folder: Path) -> None:
    (folder / CONFIG_FILE).unlink()
    (folder / CONFIG_FILE).mkdir()


def _inner(key: str, value: Any) -> Callable[[Path], None]:
    return lambda folder: _edit_config(folder, lambda m: m["config"].__setitem__(key, value))


def _drop_inner(key: str) -> Callable[[Path], None]:
    return lambda folder: _edit_config(folder, lambda m: m["config"].pop(key))


def _top(key: str, value: Any) -> Callable[[Path], None]:
    return lambda folder: _edit_config(folder, lambda m: m.__setitem__(key, value))


W, C = WEIGHTS_FILE, CONFIG_FILE
# name -> (corrupt(folder), file the message must name, applies to: "all" or "model",
#          detectable without a checksum)
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, str, bool]] = {
    "weights truncated": (_bytes(lambda r: r[: len(r) // 2]), W, "all", True),
    "weights cut inside the header length": (_bytes(lambda r: r[:4]), W, "all", True),
    "weights empty": (_bytes(lambda r: b""), W, "all", True),
    "weights body bytes flipped": (_bytes(_flip_body), W, "all", False),
    "weights random bytes": (_bytes(lambda r: os.urandom(len(r))), W, "all", True),
    "weights huge header": (
        _bytes(lambda r: (2**62).to_bytes(8, "little") + r[8:]),
        W,
        "all",
        True,
    ),
    "weights header not JSON": (_bytes(lambda r: r[:8] + b"{" * 8 + r[16:]), W, "all", True),
    "weights deleted": (lambda f: (f / W).unlink(), W, "all", True),
    "weights a directory": (_weights_dir, W, "all", True),
    "weights hold NaN": (lambda f: _rewrite_weights(f, _nan), W, "all", True),
    "weights extra tensor": (
        lambda f: _rewrite_weights(f, lambda t: t.__setitem__("extra", torch.ones(1))),
        W,
        "model",
        True,
    ),
    "weights wrong dtype": (lambda f: _rewrite_weights(f, _double), W, "model", True),
    "config bad JSON": (lambda f: (f / C).write_text('{"kind": '), C, "all", True),
    "config empty": (lambda f: (f / C).write_text(""), C, "all", True),
    "config binary": (lambda f: (f / C).write_bytes(b"\xff\xfe\x00"), C, "all", True),
    "config a list": (lambda f: (f / C).write_text("[1, 2]"), C, "all", True),
    "config deleted": (lambda f: (f / C).unlink(), C, "all", True),
    "config a directory": (_config_dir, C, "all", True),
    "config null": (_top("config", None), C, "all", True),
    "config a string": (_top("config", "x"), C, "all", True),
    "missing key kind": (lambda f: _edit_config(f, lambda m: m.pop("kind")), C, "all", True),
    "unknown top-level key": (_top("surprise", 1), C, "all", True),
    "format_version a string": (_top("format_version", "1"), C, "all", True),
    "format_version 2": (_top("format_version", 2), C, "all", True),
    "files not an object": (_top("files", [1]), C, "all", True),
    "files bad sha256": (_top("files", {W: {"sha256": "abc", "bytes": 1}}), C, "all", True),
    "unknown config key": (_inner("bogus", 1), C, "model", True),
    "wrong type in_channels": (_inner("in_channels", "1"), C, "model", True),
    "wrong type image_size": (_inner("image_size", "28x28"), C, "model", True),
    "null width": (_inner("width", None), C, "model", True),
    "negative num_classes": (_inner("num_classes", -2), C, "model", True),
    "float width": (_inner("width", 2.5), C, "model", True),
    "missing config key": (_drop_inner("num_classes"), C, "model", True),
}


def _legacy(folder: Path) -> None:
    """As saved before checksums: no `files` record."""
    _edit_config(folder, lambda m: m.pop("files"))


CASES = [
    pytest.param(kind, name, legacy, id=f"{kind.name}-{name}{'-legacy' if legacy else ''}")
    for kind in KINDS
    for name, (_, _, applies, detectable) in CORRUPTIONS.items()
    for legacy in (False, True)
    if (applies == "all" or kind.is_model) and (detectable or not legacy)
    if not (name == "files bad sha256" and legacy)
    if not (name == "files not an object" and legacy)
]


@pytest.mark.parametrize(("kind", "corruption", "legacy"), CASES)
def test_corrupt_artifacts_give_one_line_naming_the_file(
    tmp_path: Path, kind: Kind, corruption: str, legacy: bool
) -> None:
    corrupt, named, _, _ = CORRUPTIONS[corruption]
    folder = tmp_path / kind.name
    kind.save(folder)
    if legacy:
        _legacy(folder)
    corrupt(folder)
    with pytest.raises(ArtifactError) as info:
        kind.load(folder)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(folder / named) in message, message


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_intact_artifacts_load_and_legacy_ones_warn(
    tmp_path: Path, kind: Kind, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / kind.name
    kind.save(folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    assert meta["files"][WEIGHTS_FILE]["sha256"] == sha256_file(folder / WEIGHTS_FILE)
    with caplog.at_level(logging.WARNING):
        kind.load(folder)
    assert "no checksum" not in caplog.text
    _legacy(folder)
    with caplog.at_level(logging.WARNING):
        kind.load(folder)
    assert f"{folder / WEIGHTS_FILE} carries no checksum" in caplog.text


@pytest.mark.parametrize("dataset", ["mnist", "fmnist", "orl"])
def test_shipped_artifacts_without_checksums_still_load_unchanged(dataset: str) -> None:
    for folder, load in ((classifier_dir(dataset), Classifier.load), (vae_dir(dataset), None)):
        if not (folder / WEIGHTS_FILE).is_file():
            pytest.skip(f"no shipped weights at {folder}")
        before = {p.name: sha256_file(p) for p in folder.iterdir() if p.is_file()}
        (load or ComboVAE.load)(folder)
        after = {p.name: sha256_file(p) for p in folder.iterdir() if p.is_file()}
        assert before == after  # loading never rewrites a shipped artifact


def test_a_device_torch_cannot_use_is_named_not_called_corrupt(tmp_path: Path) -> None:
    _save_classifier(tmp_path / "c")
    for device in ("xpu", "meta", "cpu:3"):
        with pytest.raises(FMDefenseError, match=f"device '{device}'") as info:
            Classifier.load(tmp_path / "c", device)
        assert "corrupt" not in str(info.value)


def test_a_corrupt_chunk_names_the_file_and_says_to_delete_it(tmp_path: Path) -> None:
    def compute(start: int, stop: int) -> dict[str, torch.Tensor]:
        return {"i": torch.arange(start, stop)}

    chunked(6, 3, tmp_path, compute, config={"a": 1})
    chunk = tmp_path / "chunk-0000003.safetensors"
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(ArtifactError, match=rf"{chunk}.*delete {chunk}"):
        chunked(6, 3, tmp_path, compute, config={"a": 1})
