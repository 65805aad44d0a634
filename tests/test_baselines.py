"""Baselines on the toy model: fit, detect, predict, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmdefense.core.errors import NotFittedError
from fmdefense.defenses.base import ACCEPT, PURIFY
from fmdefense.defenses.recon_check import ReconCheckConfig, ReconstructionCheck
from tests.toys import ToyClassifier, ToyVAE, images


def test_reconstruction_check_flags_label_flips_and_round_trips(tmp_path: Path) -> None:
    clf, vae = ToyClassifier(), ToyVAE()
    with torch.no_grad():
        vae.bias.fill_(0.1)  # the reconstruction is 0.1 brighter: 0.45 comes back as 0.55
    check = ReconstructionCheck(clf, vae, ReconCheckConfig(rho=0.9, z_u_mode="feature"))
    with pytest.raises(NotFittedError):
        check.detect(images([0.5]))
    x_val = images([0.05 * i for i in range(1, 20) if not 7 <= i <= 10])  # none flips
    check.fit(x_val)
    assert check.val_fpr_ <= 0.1
    x = images([0.45, 0.9, 0.2])  # 0.45: C(x) = 0 but C(x̂) = 1, a label flip
    dec = check.decide(x)
    assert dec.action.tolist() == [PURIFY, ACCEPT, ACCEPT]
    assert dec.label.tolist() == [1, 1, 0]  # the flagged input gets its reconstruction's label
    assert dec.input_label.tolist() == [0, 1, 0]
    assert float(dec.scores["recon_check"][0]) > 0.5 > float(dec.scores["recon_check"][1])
    check.save(tmp_path / "r")
    back = ReconstructionCheck.load(tmp_path / "r", clf, vae)
    assert back.tau_ == check.tau_
    assert torch.equal(back.predict(x), check.predict(x))
    assert torch.equal(back.score(x)["recon_check"], check.score(x)["recon_check"])


def test_magnet_trains_fits_its_drop_rate_detects_noise_and_round_trips(tmp_path: Path) -> None:
    from fmdefense.defenses.magnet import MagNet, MagNetConfig, train_magnet

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
