"""Resume state: safetensors + JSON header round trip, no pickle, clear errors."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fmdefense.core.artifacts import RESUME_FILE, load_resume_state, save_resume_state
from fmdefense.core.errors import ArtifactError


def _trained_parts() -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_round_trip_restores_model_optimizer_scheduler_and_rng(tmp_path: Path) -> None:
    model, opt, sched = _trained_parts()
    gen = torch.Generator().manual_seed(7)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "history": [{"epoch": 1, "loss": 0.5, "nan": float("nan")}],
        "epoch": 1,
        "train_config": {"lr": 0.01, "size": [28, 28], "name": None},
    }
    save_resume_state(tmp_path, state)
    path = tmp_path / RESUME_FILE
    assert not zipfile.is_zipfile(path)  # not torch.save's zip of pickles
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file
        assert len(list(f.keys())) > 0 and "fmdefense_resume" in (f.metadata() or {})
    back = load_resume_state(tmp_path)
    assert back is not None
    assert back["epoch"] == 1 and back["train_config"] == state["train_config"]
    assert back["history"][0]["loss"] == 0.5 and math.isnan(back["history"][0]["nan"])
    betas = back["optimizer"]["param_groups"][0]["betas"]
    assert isinstance(betas, tuple) and betas == opt.state_dict()["param_groups"][0]["betas"]
    assert sorted(back["optimizer"]["state"]) == [0, 1, 2, 3]  # int keys again
    # loading into fresh objects continues exactly where the saved ones were
    model2, opt2, sched2 = _trained_parts()
    for p in model2.parameters():
        p.data.zero_()
    model2.load_state_dict(back["model"])
    opt2.load_state_dict(back["optimizer"])
    sched2.load_state_dict(back["scheduler"])
    gen2 = torch.Generator()
    gen2.set_state(back["generator"])
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=gen2))
    x = torch.randn(5, 3)
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
        s.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_missing_is_none_and_old_pickle_is_ignored(tmp_path: Path) -> None:
    assert load_resume_state(tmp_path) is None
    (tmp_path / "resume.pt").write_bytes(b"\x80\x04\x95whatever")
    assert load_resume_state(tmp_path) is None  # never unpickled


def test_corrupt_state_raises_artifact_error(tmp_path: Path) -> None:
    save_resume_state(tmp_path, {"epoch": 3, "w": torch.ones(2)})
    path = tmp_path / RESUME_FILE
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ArtifactError, match="corrupt resume state"):
        load_resume_state(tmp_path)


def test_unsupported_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot hold"):
        save_resume_state(tmp_path, {"f": object()})
    assert not (tmp_path / RESUME_FILE).exists()


@pytest.mark.parametrize(
    "skeleton",
    [
        '{"__tensor__": [1]}',
        '{"__tensor__": "missing"}',
        '{"__dict__": [1]}',
        '{"__intdict__": 5}',
        '{"__intdict__": [[[1], 2]]}',
        '{"__tuple__": 5}',
        '{"__dict__": {}, "extra": 1}',
        '{"__other__": 1}',
        "[" * 100_000 + "]" * 100_000,  # deeper than Python's recursion limit
        "not json",
    ],
)
def test_crafted_headers_raise_artifact_error(tmp_path: Path, skeleton: str) -> None:
    header = {"fmdefense_resume": skeleton}
    save_file({"t0": torch.ones(1)}, str(tmp_path / RESUME_FILE), metadata=header)
    with pytest.raises(ArtifactError, match="corrupt resume state"):
        load_resume_state(tmp_path)


def test_strided_and_shared_tensors_are_saved(tmp_path: Path) -> None:
    w = torch.arange(6.0).reshape(2, 3)
    save_resume_state(
        tmp_path,
        {
            "t": w.t(),
            "same": w,
            "again": w,
            "cl": torch.ones(1, 2, 3, 3).to(memory_format=torch.channels_last),
        },
    )
    back = load_resume_state(tmp_path)
    assert back is not None and torch.equal(back["t"], w.t()) and torch.equal(back["again"], w)
    assert (tmp_path / RESUME_FILE).stat().st_mode & 0o777 == 0o644
