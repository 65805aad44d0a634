"""Baselines on the toy model: fit, detect, predict, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmdefense.baselines.recon_check import ReconCheckConfig, ReconstructionCheck
from fmdefense.errors import NotFittedError
from tests.toys import ToyClassifier, ToyVAE, images


def test_reconstruction_check_flags_label_flips_and_round_trips(tmp_path: Path) -> None:
    clf, vae = ToyClassifier(), ToyVAE()
    check = ReconstructionCheck(clf, vae, ReconCheckConfig(rho=0.9, z_u_mode="class_mean"))
    with pytest.raises(NotFittedError):
        check.detect(images([0.5]))
    x_val = images([0.05 * i for i in range(1, 20) if i != 10])
    check.fit(x_val)
    assert check.val_fpr_ <= 0.1
    # the toy's class-mean reconstruction moves 0.45 to 0.2 and 0.55 to 0.8: no label flip,
    # so a clean-looking input is accepted with its own label
    x = images([0.45, 0.9])
    assert check.predict(x).tolist() == [0, 1]
    check.save(tmp_path / "r")
    back = ReconstructionCheck.load(tmp_path / "r", clf, vae)
    assert back.tau_ == check.tau_
    assert torch.equal(back.predict(x), check.predict(x))
    assert torch.equal(back.score(x), check.score(x))


def test_magnet_trains_fits_its_drop_rate_detects_noise_and_round_trips(tmp_path: Path) -> None:
    from fmdefense.baselines.magnet import MagNet, MagNetConfig, train_magnet

    torch.manual_seed(0)
    x = (torch.rand(64, 1, 8, 8) < 0.2).float() * 0.9  # sparse clean "digits"
    cfg = MagNetConfig(image_size=(8, 8), epochs=30, batch_size=32, drop_rate=0.05, lr=1e-2)
    model = MagNet(cfg)
    with pytest.raises(NotFittedError):
        model.detect(x)
    train_magnet(model, x, torch.device("cpu"))
    model.eval().fit_thresholds(x)
    per_detector = (model.errors(x) > model.thresholds).float().mean(0)
    assert bool((per_detector <= 0.05).all())  # each detector at its drop rate
    assert float(model.detect(x).float().mean()) <= 0.10  # their union at most the sum
    noisy = 1 - x  # far from the clean images the autoencoders learned
    assert float(model.score(noisy).mean()) > 2 * float(model.score(x).mean())
    model.save(tmp_path / "m")
    back = MagNet.load(tmp_path / "m")
    assert torch.equal(back.score(noisy), model.score(noisy))
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    labels = back.predict(clf, noisy)
    assert bool(((labels == -1) == back.detect(noisy)).all())
