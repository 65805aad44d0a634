"""Attacks through Foolbox on a toy model: in-house FGSM equality, bounds, success, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmdefense.attacks.library import (
    CWConfig,
    DeepFoolConfig,
    FGSMConfig,
    attack_config,
    degenerate,
    predict,
    run_attack,
)
from fmdefense.attacks.runner import attack_set, load_adversarial_set
from fmdefense.errors import InputError


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
    return (x + eps * x.grad.sign()).clamp(0, 1).detach()


def test_foolbox_fgsm_equals_the_in_house_fgsm() -> None:
    model, (x, y) = toy_model(), toy_data()
    ours = in_house_fgsm(model, x, y, 0.1)
    theirs = run_attack("fgsm", model, x, y, FGSMConfig(epsilon=0.1))
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "cfg", "bound"),
    [
        ("fgsm", FGSMConfig(epsilon=0.2), ("linf", 0.2)),
        ("deepfool_linf", DeepFoolConfig(steps=20), None),
        ("cw_l2", CWConfig(binary_search_steps=5, steps=100, stepsize=0.1), None),
    ],
)
def test_outputs_stay_in_range_and_inside_the_bound(name: str, cfg: object, bound: object) -> None:
    model, (x, y) = toy_model(), toy_data()
    adv = run_attack(name, model, x, y, cfg)
    assert adv.shape == x.shape and float(adv.min()) >= 0 and float(adv.max()) <= 1
    if bound is not None:
        assert float((adv - x).abs().max()) <= 0.2 + 1e-6
    if name != "fgsm":  # minimal-perturbation attacks succeed on this easy model
        assert float((predict(model, adv) != y).float().mean()) > 0.8


def test_degenerate_outputs_are_not_successes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fmdefense.attacks.runner as runner

    model, (x, y) = toy_model(), toy_data(8)
    monkeypatch.setattr(runner, "run_attack", lambda *a, **k: torch.zeros_like(a[2]))
    adv = attack_set("cw_l2", "fast", model, x, y, tmp_path / "a")
    assert bool(degenerate(adv.x_adv).all()) and not bool(adv.success.any())
    assert adv.metrics["degenerate_outputs"] == 8


def test_success_flags_agree_with_reclassification_and_round_trip(tmp_path: Path) -> None:
    model, (x, y) = toy_model(), toy_data()
    adv = attack_set("fgsm", "default", model, x, y, tmp_path / "a", batch_size=10)
    assert torch.equal(adv.y_adv, predict(model, adv.x_adv))
    assert torch.equal(adv.success, (adv.y_adv != y) & ~degenerate(adv.x_adv))
    back = load_adversarial_set(tmp_path / "a")
    assert torch.equal(back.x_adv, adv.x_adv) and back.config["params"]["epsilon"] == 0.3
    assert back.metrics["images"] == 24 and "foolbox" in back.metrics


def test_an_interrupted_run_resumes_from_finished_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fmdefense.attacks.runner as runner

    model, (x, y) = toy_model(), toy_data()
    full = attack_set("fgsm", "default", model, x, y, tmp_path / "full", batch_size=10)
    calls = {"n": 0}
    original = runner.run_attack

    def dies_on_second_chunk(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "run_attack", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        attack_set("fgsm", "default", model, x, y, tmp_path / "run", batch_size=10)
    assert len(list((tmp_path / "run" / "chunks").glob("chunk-*"))) == 1
    calls["n"] = 10  # from now on every call succeeds
    again = attack_set("fgsm", "default", model, x, y, tmp_path / "run", batch_size=10)
    assert calls["n"] == 12  # only the two missing chunks were attacked
    assert torch.equal(again.x_adv, full.x_adv)


def test_bad_inputs_and_names_raise() -> None:
    model, (x, y) = toy_model(), toy_data(4)
    with pytest.raises(InputError, match="NaN"):
        run_attack("fgsm", model, x * float("nan"), y, FGSMConfig())
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        run_attack("fgsm", model, x + 2, y, FGSMConfig())
    with pytest.raises(InputError, match=r"\(N, C, H, W\)"):
        run_attack("fgsm", model, x[:, 0], y, FGSMConfig())
    with pytest.raises(InputError, match="unknown attack"):
        attack_config("pgd")
    with pytest.raises(InputError, match="settings"):
        attack_config("cw_l2", "slow")
