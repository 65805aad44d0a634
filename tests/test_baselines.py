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
