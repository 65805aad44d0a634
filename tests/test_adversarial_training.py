"""Adversarial training of the target classifier (FGSM with random start, PGD-k) on tiny toys."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fmdefense.core.artifacts import load_resume_state, save_resume_state
from fmdefense.core.errors import InputError
from fmdefense.models.classifiers import Classifier, ClassifierConfig
from fmdefense.training.adversarial import Perturbation, perturb, pgd, robust_accuracy
from fmdefense.training.loops import TRAIN_CONFIGS, TrainConfig, train_classifier
from tests.toys import ToyClassifier, images

CPU = torch.device("cpu")


def tiny_classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(ClassifierConfig("small_resnet", image_size=(16, 16), width=2))


def tiny_data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 16, 16, generator=gen)
    x[: n // 4] = x[: n // 4].round()  # pixels at 0 and 1 exercise the clipping
    return x, torch.arange(n) % 10


@pytest.mark.parametrize(
    "p", [Perturbation(0.3, 0.375, 1), pgd(0.3, 5), Perturbation(1.0, 2.5, 2)], ids=str
)
def test_perturbation_stays_in_the_eps_ball_and_the_unit_interval(p: Perturbation) -> None:
    model = tiny_classifier().train()
    x, y = tiny_data()
    x_adv = perturb(model, x, y, p, torch.Generator().manual_seed(1))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= p.eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert all(q.grad is None for q in model.parameters())  # only the input got a gradient


def test_perturbation_is_deterministic_for_a_seed() -> None:
    model = tiny_classifier().eval()
    x, y = tiny_data()
    p = pgd(0.2, 3)
    a, b, c = (perturb(model, x, y, p, torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_signed_step_goes_up_the_loss_to_the_edge_of_the_ball() -> None:
    """The toy labels by mean brightness: raising the loss on label 1 darkens every pixel, and a
    step of 2 ε from any random start lands on x − ε (clipped at 0); label 0 brightens."""
    x, y = images([0.2, 0.9, 0.1]), torch.tensor([1, 1, 0])
    x_adv = perturb(ToyClassifier(), x, y, Perturbation(0.3, 0.6), torch.Generator())
    assert torch.allclose(x_adv, images([0.0, 0.6, 0.4]), atol=1e-6)
    x, y = images([0.6, 0.7, 0.3]), torch.tensor([1, 1, 0])
    assert robust_accuracy(ToyClassifier(), x, y, Perturbation(0.3, 0.6)) == 0.0
    assert robust_accuracy(ToyClassifier(), x, y, Perturbation(0.05, 0.1)) == 1.0


def killed_after_epoch_1(
    monkeypatch: pytest.MonkeyPatch, data: tuple, cfg: TrainConfig, folder: Path
) -> None:
    """Run `cfg` into `folder` until its first resume state is written, then die."""
    import fmdefense.training.loops as loops

    def save_then_die(folder: Path, state: dict) -> None:
        save_resume_state(folder, state)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loops, "save_resume_state", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train_classifier(tiny_classifier(), data, data, cfg, folder, CPU)


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_fgsm_rs_training_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tiny_data()
    cfg = TrainConfig(epochs=2, batch_size=8, shift=1, adversarial="fgsm_rs", adv_eps=0.2)
    ref = tiny_classifier()
    out = train_classifier(ref, data, data, cfg, tmp_path / "ref", CPU)
    assert out["perturbation"] == {"eps": 0.2, "step": 0.25, "steps": 1}
    row = out["history"][-1]
    assert {"train_adv_acc", "train_clean_acc", "val_acc", "val_pgd_acc"} <= set(row)
    assert 0.0 <= row["val_pgd_acc"] <= 1.0
    killed_after_epoch_1(monkeypatch, data, cfg, tmp_path / "run")
    resumed = tiny_classifier(seed=7)  # other initial weights: the resume state replaces them
    back = train_classifier(resumed, data, data, cfg, tmp_path / "run", CPU)
    assert without_time(back["history"]) == without_time(out["history"])
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_resume_state_from_before_adversarial_training_is_continued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, cfg = tiny_data(8), TrainConfig(epochs=2, batch_size=8, shift=0)
    killed_after_epoch_1(monkeypatch, data, cfg, tmp_path)
    state = load_resume_state(tmp_path)
    assert state is not None
    for key in ("adversarial", "adv_eps", "adv_step", "adv_steps"):
        del state["train_config"][key]
    save_resume_state(tmp_path, state)
    out = train_classifier(tiny_classifier(), data, data, cfg, tmp_path, CPU)
    assert out["history"][0] == state["history"][0]  # epoch 1 was not trained again


def test_config_recorded_before_adversarial_training_loads_as_none() -> None:
    recorded = {  # weights/mnist/classifier/metrics.json's train_config
        "batch_size": 128,
        "epochs": 12,
        "hflip": False,
        "lr": 0.001,
        "optimizer": "adam",
        "seed": 0,
        "shift": 2,
        "weight_decay": 0.0,
    }
    cfg = TrainConfig.from_dict(recorded)
    assert cfg == TRAIN_CONFIGS["mnist"] and cfg.adversarial == "none"
    assert cfg.perturbation is None
    with pytest.raises(InputError, match="unknown key 'adv_alpha'"):
        TrainConfig.from_dict({**recorded, "adv_alpha": 0.1})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"adversarial": "fgsm"}, "adversarial must be one of none, fgsm_rs, pgd"),
        ({"adv_eps": 0.0}, r"adv_eps must lie in \(0.0, 1.0\]"),
        ({"adv_eps": 1.5}, r"adv_eps must lie in \(0.0, 1.0\]"),
        ({"adv_eps": float("nan")}, "adv_eps must be a finite number"),
        ({"adv_step": -0.1}, "adv_step must lie in"),
        ({"adv_step": "0.1"}, "adv_step must be a finite number"),
        ({"adv_steps": 0}, r"adv_steps must be in \[1, 1000\]"),
        ({"adv_steps": 2.0}, "adv_steps must be an integer"),
        ({"adversarial": "fgsm_rs", "adv_steps": 3}, "adv_steps must be 1 with adversarial="),
    ],
)
def test_bad_adversarial_settings_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        TrainConfig(**fields)


def test_cli_offers_the_training_modes() -> None:
    import fmdefense.cli.train as cli
    import fmdefense.training.loops as loops

    assert cli.ADVERSARIAL == loops.ADVERSARIAL


def test_step_sizes_resolve_as_documented() -> None:
    assert TrainConfig(adversarial="fgsm_rs").perturbation == Perturbation(0.3, 0.375, 1)
    assert TrainConfig(adversarial="pgd", adv_steps=10).perturbation == Perturbation(0.3, 0.075, 10)
    given = TrainConfig(adversarial="fgsm_rs", adv_step=0.1).perturbation
    assert given == Perturbation(0.3, 0.1, 1)


def test_a_collapse_of_pgd_accuracy_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    from fmdefense.training.loops import _warn_overfitting

    with caplog.at_level(logging.WARNING, logger="fmdefense.training.loops"):
        _warn_overfitting([{"val_pgd_acc": 0.8}, {"val_pgd_acc": 0.7}])
        assert not caplog.records
        _warn_overfitting([{"val_pgd_acc": 0.8}, {"val_pgd_acc": 0.1}])
    assert "catastrophic overfitting" in caplog.records[0].getMessage()


def test_cli_passes_the_adversarial_options_to_the_job(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import fmdefense.training.jobs as jobs
    from fmdefense.cli import main

    seen: dict = {}

    def fake_job(dataset: str, out: Path, device: torch.device, **kwargs: object) -> dict:
        seen.update(kwargs, dataset=dataset, out=out)
        pgd = {"steps": 20, "eps": 0.3, "accuracy": 0.5, "images": 1000}
        return {"test_accuracy": 0.99, "test_pgd": pgd}

    monkeypatch.setattr(jobs, "run_train_classifier", fake_job)
    argv = ["train", "classifier", "--dataset", "mnist", "--out", str(tmp_path)]
    argv += ["--adversarial", "fgsm_rs", "--adv-eps", "0.3", "--device", "cpu"]
    assert main(argv) == 0
    assert seen["overrides"] == {
        "epochs": None,
        "seed": None,
        "adversarial": "fgsm_rs",
        "adv_eps": 0.3,
        "adv_step": None,
        "adv_steps": None,
    }
    assert "under PGD-20 at eps 0.3 0.5000" in capsys.readouterr().out


def test_train_job_records_a_quick_pgd_check_for_adversarial_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import fmdefense.training.jobs as jobs

    monkeypatch.setattr(jobs, "build_classifier", lambda dataset: tiny_classifier())
    monkeypatch.setattr(jobs, "load_raw", lambda dataset, data_dir=None: None)
    monkeypatch.setattr(jobs, "split_tensors", lambda ds, split: tiny_data(8))
    monkeypatch.setattr(jobs, "provenance", dict)
    overrides = {"epochs": 1, "adversarial": "pgd", "adv_steps": 2, "adv_eps": 0.1, "seed": None}
    m = jobs.run_train_classifier("mnist", tmp_path / "c", CPU, overrides=overrides)
    assert m["train_config"]["adversarial"] == "pgd" and m["train_config"]["seed"] == 0
    assert m["perturbation"] == {"eps": 0.1, "step": 0.125, "steps": 2}
    assert m["test_pgd"]["images"] == 8 and m["test_pgd"]["steps"] == jobs.TEST_PGD_CHECK[1]
    assert 0.0 <= m["test_pgd"]["accuracy"] <= 1.0
    assert Classifier.load(tmp_path / "c").cfg.image_size == (16, 16)
    plain = jobs.run_train_classifier("mnist", tmp_path / "d", CPU, overrides={"epochs": 1})
    assert "test_pgd" not in plain and "perturbation" not in plain
