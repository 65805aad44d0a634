"""FBGAN baseline on tiny 4×4 data: config, seeded init, resumable training, the contract."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fmdefense.cli.fbgan import add_train_fbgan
from fmdefense.core.artifacts import RESUME_FILE, load_resume_state
from fmdefense.core.errors import ArtifactError, InputError, NotFittedError
from fmdefense.defenses.base import ACCEPT, REJECT, REJECT_LABEL
from fmdefense.defenses.fbgan import FBGANDefense, FBGANDefenseConfig
from fmdefense.defenses.registry import DEFENSES
from fmdefense.models.fbgan import (
    FBGAN,
    FBGANConfig,
    build_discriminator,
    load_fbgan,
    save_fbgan,
    threshold_at_drop_rate,
)
from fmdefense.training.fbgan import train_fbgan
from tests.toys import ToyClassifier

CPU = torch.device("cpu")
TINY = FBGANConfig(
    image_size=(4, 4), z_dim=3, width=4, disc_hidden=8, epochs=1, batch_size=8, recon_weight=0.5
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Random 4×4 images (n, 1, 4, 4) in [0, 1]."""
    return torch.rand((n, 1, 4, 4), generator=torch.Generator().manual_seed(seed))


def _fitted(drop_rate: float = 0.25) -> FBGANDefense:
    model = FBGAN(TINY).eval()
    return FBGANDefense(ToyClassifier(), model, FBGANDefenseConfig(drop_rate, batch_size=5)).fit(
        _images(40, seed=1)
    )


def test_networks_have_the_documented_shapes() -> None:
    cfg = FBGANConfig()  # MNIST: 28×28, z 32
    model = FBGAN(cfg).eval()
    x = _images(3).repeat(1, 1, 7, 7)  # (3, 1, 28, 28)
    with torch.no_grad():
        z, recon = model.encode(x), model.reconstruct(x)
        d = build_discriminator(cfg).eval()(x, z)
    assert z.shape == (3, 32) and recon.shape == (3, 1, 28, 28) and d.shape == (3,)
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0


@pytest.mark.parametrize(
    "bad",
    [
        {"image_size": (6, 8)},
        {"z_dim": 0},
        {"mi_weight": -1.0},
        {"disc_dropout": 1.0},
        {"betas": (0.5, 1.0)},
        {"lr": 0.0},
        {"epochs": 1.5},
    ],
)
def test_config_refuses_invalid_fields(bad: dict) -> None:
    with pytest.raises(InputError):
        FBGANConfig(**bad)


def test_defense_config_refuses_invalid_fields() -> None:
    with pytest.raises(InputError):
        FBGANDefenseConfig(drop_rate=1.0)
    with pytest.raises(InputError):
        FBGANDefenseConfig(batch_size=0)


def test_seeded_init_is_identical_and_the_seed_matters() -> None:
    a, b = FBGAN(TINY).state_dict(), FBGAN(TINY).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = FBGAN(dataclasses.replace(TINY, seed=1)).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)
    da, db = build_discriminator(TINY).state_dict(), build_discriminator(TINY).state_dict()
    assert all(torch.equal(da[k], db[k]) for k in da)


def test_training_resumes_from_its_resume_state(tmp_path: Path) -> None:
    x = _images(24)
    straight = FBGAN(dataclasses.replace(TINY, epochs=2))
    hist = train_fbgan(straight, x, CPU)
    chunked = FBGAN(TINY)  # first chunk: 1 epoch, leaves resume state
    train_fbgan(chunked, x, CPU, tmp_path)
    state = load_resume_state(tmp_path)
    assert state is not None and state["epoch"] == 1
    resumed = FBGAN(dataclasses.replace(TINY, epochs=2))  # fresh object, continues at epoch 2
    hist2 = train_fbgan(resumed, x, CPU, tmp_path)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in hist2] == [1, 2] and hist2[1]["d_loss"] == hist[1]["d_loss"]
    assert (tmp_path / RESUME_FILE).is_file()


def test_training_with_other_settings_starts_over(tmp_path: Path) -> None:
    x = _images(16)
    train_fbgan(FBGAN(TINY), x, CPU, tmp_path)
    other = dataclasses.replace(TINY, mi_weight=2.0)
    hist = train_fbgan(FBGAN(other), x, CPU, tmp_path)
    assert [r["epoch"] for r in hist] == [1]


def test_threshold_keeps_the_drop_rate() -> None:
    errors = torch.arange(100, dtype=torch.float)
    tau = threshold_at_drop_rate(errors, 0.05)
    assert float((errors > tau).float().mean()) == pytest.approx(0.05)
    assert threshold_at_drop_rate(errors, 0.0) == 99.0


def test_fit_returns_self_and_decide_before_fit_raises() -> None:
    defense = FBGANDefense(ToyClassifier(), FBGAN(TINY).eval())
    with pytest.raises(NotFittedError):
        defense.decide(_images(3))
    with pytest.raises(NotFittedError):
        defense.save(Path("unused"))
    assert defense.fit(_images(20)) is defense and defense.is_fitted
    assert 0.0 <= defense.val_fpr_ <= defense.config.drop_rate


def test_reject_exactly_where_the_score_exceeds_the_threshold() -> None:
    defense = _fitted()
    x = _images(30, seed=2)
    dec = defense.decide(x)
    err = defense.score(x)["reconstruction_error"]
    assert torch.equal(dec.scores["reconstruction_error"], err)
    flagged = err > defense.threshold_
    assert 0 < int(flagged.sum()) < len(x)  # both outcomes occur
    assert torch.equal(dec.action == REJECT, flagged)
    assert bool((dec.action[~flagged] == ACCEPT).all())
    assert bool((dec.label[flagged] == REJECT_LABEL).all())
    with torch.no_grad():
        recon_label = defense.classifier(defense.model.reconstruct(x)).argmax(1)
        input_label = defense.classifier(x).argmax(1)
    assert torch.equal(dec.label[~flagged], recon_label[~flagged])
    assert torch.equal(dec.input_label, input_label)
    assert torch.equal(defense.detect(x), flagged) and torch.equal(defense.predict(x), dec.label)


def test_save_load_gives_identical_decisions(tmp_path: Path) -> None:
    defense = _fitted()
    x = _images(30, seed=3)
    defense.save(tmp_path / "fb")
    loaded = FBGANDefense.load(tmp_path / "fb", ToyClassifier())
    assert loaded.threshold_ == defense.threshold_ and loaded.config == defense.config
    a, b = defense.decide(x), loaded.decide(x)
    assert torch.equal(a.action, b.action) and torch.equal(a.label, b.label)
    assert torch.equal(a.scores["reconstruction_error"], b.scores["reconstruction_error"])


def test_artifact_without_calibration_loads_unfitted(tmp_path: Path) -> None:
    save_fbgan(tmp_path / "raw", FBGAN(TINY))
    model, calibration = load_fbgan(tmp_path / "raw")
    assert calibration is None and not model.training
    defense = FBGANDefense.load(tmp_path / "raw", ToyClassifier())
    assert not defense.is_fitted
    with pytest.raises(NotFittedError):
        defense.decide(_images(2))


def test_load_refuses_mismatched_or_wrong_artifacts(tmp_path: Path) -> None:
    save_fbgan(tmp_path / "a", FBGAN(TINY))
    (tmp_path / "a" / "config.json").write_text(
        (tmp_path / "a" / "config.json").read_text().replace('"z_dim": 3', '"z_dim": 5')
    )
    with pytest.raises(ArtifactError):
        load_fbgan(tmp_path / "a")
    with pytest.raises(ArtifactError):
        load_fbgan(tmp_path / "missing")


def test_the_defended_classifier_is_differentiable() -> None:
    defense = _fitted()
    x = _images(4, seed=4).requires_grad_(True)
    defense.logits(x)[:, 1].sum().backward()  # (the toy's two logits sum to 0)
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_decide_validates_inputs() -> None:
    defense = _fitted()
    with pytest.raises(InputError):
        defense.decide(_images(2) * 2)  # outside [0, 1]
    with pytest.raises(InputError):
        defense.decide(torch.rand(2, 1, 8, 8))  # wrong size


def test_registered_and_cli_parses() -> None:
    assert DEFENSES["fbgan"] is FBGANDefense
    parser = argparse.ArgumentParser()
    add_train_fbgan(parser.add_subparsers(dest="what"))
    args = parser.parse_args(["fbgan", "--dataset", "fmnist", "--epochs", "3", "--keep-resume"])
    assert (args.dataset, args.epochs, args.keep_resume, args.out) == ("fmnist", 3, True, None)


def test_the_papers_variant_trains_without_the_pixel_term() -> None:
    hist = train_fbgan(FBGAN(dataclasses.replace(TINY, recon_weight=0.0)), _images(16), CPU)
    assert hist[0]["recon_term"] == 0.0 and hist[0]["mi"] > 0.0
