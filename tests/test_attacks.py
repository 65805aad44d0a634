"""Attacks through Foolbox on a toy model: in-house FGSM equality, bounds, success, resume."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fmdefense.attacks.runner as runner
from fmdefense.attacks.jobs import default_out
from fmdefense.attacks.library import (
    CWConfig,
    DeepFoolConfig,
    FGSMConfig,
    attack_config,
    degenerate,
    judge,
    predict,
    run_attack,
)
from fmdefense.attacks.runner import TENSORS_FILE, attack_set, load_adversarial_set
from fmdefense.cli.attack import register
from fmdefense.core.artifacts import WEIGHTS_FILE
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.data import DEFAULT_SPLITS, SplitConfig
from fmdefense.models.classifiers import build_classifier


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)).eval()


def toy_data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 4, 4, generator=gen)
    return x, predict(toy_model(), x)  # labels the model gets right


def in_house_fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """FGSM in plain PyTorch: x + ε·sign(∇x CE), clipped to [0, 1]."""
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    assert x.grad is not None
    return (x + eps * x.grad.sign()).clamp(0, 1).detach()


def test_foolbox_fgsm_equals_the_in_house_fgsm() -> None:
    model, (x, y) = toy_model(), toy_data()
    ours = in_house_fgsm(model, x, y, 0.1)
    theirs = run_attack("fgsm", model, x, y, config=FGSMConfig(epsilon=0.1))
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "cfg", "linf_bound"),
    [
        ("fgsm", FGSMConfig(epsilon=0.2), 0.2),
        ("deepfool_linf", DeepFoolConfig(steps=20), None),
        ("cw_l2", attack_config("cw_l2", "fast"), None),
        ("cw_l2", CWConfig(binary_search_steps=2, steps=50), None),  # reference step size
    ],
)
def test_outputs_stay_in_range_and_inside_the_bound(
    name: str, cfg: object, linf_bound: float | None
) -> None:
    model, (x, y) = toy_model(), toy_data()
    adv = run_attack(name, model, x, y, config=cfg)
    assert adv.shape == x.shape and adv.dtype == torch.float32
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    if linf_bound is not None:
        assert float((adv - x).abs().max()) <= linf_bound + 1e-6
    if name == "deepfool_linf" or cfg == attack_config("cw_l2", "fast"):
        _, _, success, bad = judge(model, x, adv, y)  # minimal attacks beat this easy model
        assert float(success.float().mean()) > 0.8 and not bool(bad.any())


def test_a_black_cw_placeholder_is_degenerate_and_never_a_success() -> None:
    """One CW step at c = 1e-6 finds nothing, so Foolbox returns its all-zero placeholder."""
    model, (x, y) = toy_model(), toy_data()
    cfg = CWConfig(binary_search_steps=1, steps=1, initial_const=1e-6)
    raw = run_attack("cw_l2", model, x, y, config=cfg)
    assert bool(degenerate(raw).all()) and float(raw.abs().max()) == 0.0
    kept, y_adv, success, bad = judge(model, x, raw, y)
    assert bool(bad.all()) and not bool(success.any())
    assert torch.equal(kept, x) and torch.equal(y_adv, y)  # the clean image is kept instead


def test_degenerate_outputs_are_flagged_and_replaced_in_the_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, (x, y) = toy_model(), toy_data(8)

    def half_nan_half_black(*args: object, **kwargs: object) -> torch.Tensor:
        out = torch.zeros_like(x[: len(args[2])])  # type: ignore[arg-type]
        out[::2] = float("nan")
        return out

    monkeypatch.setattr(runner, "run_attack", half_nan_half_black)
    adv = attack_set("cw_l2", "fast", model, x, y, tmp_path / "a")
    assert bool(adv.degenerate.all()) and not bool(adv.success.any())
    assert torch.equal(adv.x_adv, x) and float(adv.l2.max()) == 0.0
    assert adv.metrics["degenerate_outputs"] == 8 and adv.metrics["success_rate"] == 0.0


def test_success_flags_agree_with_reclassification(tmp_path: Path) -> None:
    model, (x, y) = toy_model(), toy_data()
    adv = attack_set("fgsm", None, model, x, y, tmp_path / "a", batch_size=10)
    assert torch.equal(adv.y_adv, predict(model, adv.x_adv))
    assert torch.equal(adv.y_clean, predict(model, x))
    assert torch.equal(adv.success, (adv.y_adv != y) & ~degenerate(adv.x_adv))
    assert adv.metrics["success_rate"] == pytest.approx(float(adv.success.float().mean()))
    assert adv.metrics["accuracy_on_adv"] == pytest.approx(float((adv.y_adv == y).float().mean()))
    delta = (adv.x_adv - x).flatten(1)
    assert torch.allclose(adv.linf, delta.abs().amax(1)) and float(adv.linf.max()) <= 0.3 + 1e-6
    assert torch.allclose(adv.l2, delta.norm(dim=1))


def test_the_artifact_round_trips(tmp_path: Path) -> None:
    model, (x, y) = toy_model(), toy_data()
    adv = attack_set("deepfool_linf", "default", model, x, y, tmp_path / "a", source={"k": 1})
    assert (tmp_path / "a" / TENSORS_FILE).is_file()
    back = load_adversarial_set(tmp_path / "a")
    for field in ("x_adv", "indices", "y_true", "y_clean", "y_adv", "success", "l2", "linf"):
        assert torch.equal(getattr(back, field), getattr(adv, field)), field
    assert back.x_adv.dtype == torch.float32 and torch.equal(back.indices, torch.arange(24))
    assert back.config["params"] == {
        "steps": 50,
        "candidates": 10,
        "overshoot": 0.02,
        "loss": "logits",
    }
    assert back.config["norm"] == "linf" and back.config["k"] == 1
    assert back.config["provenance"]["foolbox"] == "3.3.4"
    assert back.metrics["images"] == 24 and "seconds_per_image" in back.metrics
    # A set written before the tensors file was renamed still loads.
    (tmp_path / "a" / TENSORS_FILE).rename(tmp_path / "a" / WEIGHTS_FILE)
    assert torch.equal(load_adversarial_set(tmp_path / "a").x_adv, adv.x_adv)


def test_an_interrupted_run_resumes_from_its_finished_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model, (x, y) = toy_model(), toy_data(20)
    full = attack_set("deepfool_linf", None, model, x, y, tmp_path / "full", batch_size=10)
    calls = {"n": 0}
    original = runner.run_attack

    def dies_on_second_chunk(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "run_attack", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        attack_set("deepfool_linf", None, model, x, y, tmp_path / "run", batch_size=10)
    assert len(list((tmp_path / "run" / "chunks").glob("chunk-*"))) == 1
    assert not (tmp_path / "run" / "config.json").exists()
    with caplog.at_level(logging.INFO, logger="fmdefense"):
        again = attack_set("deepfool_linf", None, model, x, y, tmp_path / "run", batch_size=10)
    assert calls["n"] == 3  # only the missing chunk was attacked
    assert "reused 1 of 2 finished chunks" in caplog.text
    assert torch.equal(again.x_adv, full.x_adv) and torch.equal(again.success, full.success)


def test_a_deleted_chunk_is_recomputed_and_a_foreign_chunk_folder_refused(tmp_path: Path) -> None:
    model, (x, y) = toy_model(), toy_data(20)
    first = attack_set("fgsm", "default", model, x, y, tmp_path / "a", batch_size=10)
    (tmp_path / "a" / "chunks" / "chunk-0000010.safetensors").unlink()
    (tmp_path / "a" / TENSORS_FILE).unlink()
    again = attack_set("fgsm", "default", model, x, y, tmp_path / "a", batch_size=10)
    assert torch.equal(again.x_adv, first.x_adv)
    with pytest.raises(ArtifactError, match="chunks of another run"):
        attack_set("deepfool_linf", "default", model, x, y, tmp_path / "a", batch_size=10)


def test_bad_inputs_and_names_raise() -> None:
    model, (x, y) = toy_model(), toy_data(4)
    with pytest.raises(InputError, match="NaN"):
        run_attack("fgsm", model, x * float("nan"), y)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        run_attack("fgsm", model, x + 2, y)
    with pytest.raises(InputError, match=r"\(N, C, H, W\)"):
        run_attack("fgsm", model, x[:, 0], y)
    with pytest.raises(InputError, match="floating-point"):
        run_attack("fgsm", model, (x * 255).to(torch.uint8), y)
    with pytest.raises(InputError, match=r"shape \(4,\)"):
        run_attack("fgsm", model, x, y[:3])
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        run_attack("fgsm", model, x, y + 3)  # the toy model has 3 classes
    with pytest.raises(InputError, match="unknown attack"):
        attack_config("pgd")
    with pytest.raises(InputError, match="settings"):
        attack_config("cw_l2", "slow")
    with pytest.raises(InputError, match="settings"):
        attack_config("fgsm", "reference")
    with pytest.raises(InputError, match="batch_size"):
        attack_set("fgsm", None, model, x, y, Path("unused"), batch_size=0)


def test_default_settings_and_output_folders() -> None:
    assert attack_config("cw_l2") == CWConfig(binary_search_steps=5, steps=100, stepsize=0.1)
    assert attack_config("cw_l2", "reference") == CWConfig()
    assert CWConfig().binary_search_steps == 9 and CWConfig().steps == 1000
    assert attack_config("fgsm").epsilon == 0.3
    assert default_out("mnist", "cw_l2", "fast") == Path("runs/mnist/attacks/cw_l2-fast")
    assert default_out("mnist", "fgsm", "default") == Path("runs/mnist/attacks/fgsm")


def test_the_attack_command_end_to_end(
    tmp_path: Path,
    idx_folder: Path,
    data_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An untrained MNIST classifier on synthetic IDX data, through `register(sub)`."""
    monkeypatch.setitem(DEFAULT_SPLITS, "mnist", SplitConfig(vae_train=20, val=20, cle=30))
    build_classifier("mnist").save(tmp_path / "clf")
    parser = argparse.ArgumentParser(prog="fmdefense")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "attack",
            *("--dataset", "mnist", "--attack", "fgsm", "--limit", "6", "--batch-size", "4"),
            *("--classifier", str(tmp_path / "clf"), "--data-dir", str(idx_folder)),
            *("--out", str(tmp_path / "adv"), "--device", "cpu"),
        ]
    )
    args.func(args)
    assert "fgsm (default) on 6 mnist CLE images" in capsys.readouterr().out
    adv = load_adversarial_set(tmp_path / "adv")
    assert adv.x_adv.shape == (6, 1, 28, 28) and adv.config["dataset"] == "mnist"
    assert adv.config["classifier"] == str(tmp_path / "clf") and adv.config["limit"] == 6
    with pytest.raises(SystemExit):
        parser.parse_args(["attack", "--dataset", "mnist", "--attack", "pgd"])
