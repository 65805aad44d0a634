"""Baselines on toy models: fit, detect, predict, save/load; the committed MagNet still loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fmdefense.core.artifacts import WEIGHTS_FILE, load_tensors
from fmdefense.core.errors import InputError, NotFittedError
from fmdefense.defenses.base import ACCEPT, PURIFY, REJECT
from fmdefense.defenses.magnet import MagNet
from fmdefense.defenses.recon_check import ReconCheckConfig, ReconstructionCheck
from fmdefense.models.magnet import MagNetAutoencoders, MagNetConfig
from fmdefense.training.magnet import train_magnet
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


def _magnet_setup() -> tuple[torch.Tensor, MagNetConfig]:
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand((64, 1, 8, 8), generator=gen) < 0.2).float() * 0.9  # sparse clean "digits"
    return x, MagNetConfig(image_size=(8, 8), epochs=30, batch_size=32, drop_rate=0.05, lr=1e-2)


def _larger(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.maximum(scores["ae_i"], scores["ae_ii"])


def test_magnet_trains_fits_its_drop_rate_detects_noise_and_round_trips(tmp_path: Path) -> None:
    x, cfg = _magnet_setup()
    aes = MagNetAutoencoders(cfg)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    model = MagNet(clf, aes, cfg)
    for method in (model.detect, model.score, model.decide):
        with pytest.raises(NotFittedError):
            method(x)
    train_magnet(aes, x, torch.device("cpu"))
    assert model.fit(x) is model
    per_detector = (model.errors(x) > model.thresholds_).float().mean(0)
    assert bool((per_detector <= 0.05).all())  # each detector at its drop rate
    assert float(model.detect(x).float().mean()) <= 0.10  # their union at most the sum
    scores = model.score(x)
    assert torch.allclose(scores["ae_i"] * model.thresholds_[0], model.errors(x)[:, 0])
    noisy = 1 - x  # far from the clean images the autoencoders learned
    assert float(_larger(model.score(noisy)).mean()) > 2 * float(_larger(scores).mean())
    dec = model.decide(noisy)
    assert torch.equal(dec.flagged, _larger(dec.scores) > 1)  # either detector rejects
    assert torch.equal(dec.action == REJECT, dec.flagged)  # MagNet never purifies
    with torch.no_grad():
        reformed = clf(aes.ae1(noisy)).argmax(1)
    assert torch.equal(dec.label[~dec.flagged], reformed[~dec.flagged])  # the reformer's label
    assert int(dec.details["flagged_ae_i"].sum()) + int(dec.details["flagged_ae_ii"].sum()) >= int(
        dec.flagged.sum()
    )
    model.save(tmp_path / "m")
    back = MagNet.load(tmp_path / "m", clf)
    assert torch.equal(back.thresholds_, model.thresholds_) and back.config == cfg
    assert torch.equal(_larger(back.score(noisy)), _larger(model.score(noisy)))
    assert torch.equal(back.predict(noisy), dec.label)
    assert bool(((back.predict(noisy) == -1) == back.detect(noisy)).all())


def test_magnet_training_is_seeded_by_its_config() -> None:
    """The same command twice gives the same model (init, batch order, noise all seeded)."""
    x, cfg = _magnet_setup()
    cfg = dataclasses.replace(cfg, epochs=2)
    a, b = MagNetAutoencoders(cfg), MagNetAutoencoders(cfg)
    assert train_magnet(a, x, torch.device("cpu")) == train_magnet(b, x, torch.device("cpu"))
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(wa, wb), name
    other = MagNetAutoencoders(dataclasses.replace(cfg, seed=1))
    assert not torch.equal(other.ae1[0].weight, MagNetAutoencoders(cfg).ae1[0].weight)


def test_the_committed_magnet_artifact_loads_with_its_tensor_names(tmp_path: Path) -> None:
    """results/mnist/reproduce-paper/magnet, written before the split, loads as the defense
    and saves again under the same tensor names (ae1.*, ae2.*, thresholds)."""
    from fmdefense.core.paths import REPO_ROOT, classifier_dir
    from fmdefense.models.classifiers import Classifier

    folder = REPO_ROOT / "results" / "mnist" / "reproduce-paper" / "magnet"
    clf = Classifier.load(classifier_dir("mnist"), torch.device("cpu"))
    magnet = MagNet.load(folder, clf)
    stored = load_tensors(folder / WEIGHTS_FILE)
    assert magnet.is_fitted and torch.equal(magnet.thresholds_, stored["thresholds"])
    mine = magnet.state_dict()
    assert set(mine) == set(stored) and all(torch.equal(mine[k], stored[k]) for k in stored)
    magnet.save(tmp_path / "again")
    again = load_tensors(tmp_path / "again" / WEIGHTS_FILE)
    assert all(torch.equal(again[k], stored[k]) for k in stored)
    blank = torch.zeros(3, 1, 28, 28)
    blank[:, :, 8:20, 13:15] = 1.0  # a "1"
    assert magnet.decide(blank).label.shape == (3,)
    with pytest.raises(InputError, match="no other models"):
        MagNet.load(folder, clf, vae=object())


def test_the_reconstruction_check_baseline_is_stored_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fmdefense.attacks.runner import AdversarialSet
    from fmdefense.evaluation import baselines

    clf, vae = ToyClassifier(), ToyVAE()
    x_val, x = images([0.1, 0.3, 0.6, 0.8, 0.2, 0.7]), images([0.45, 0.9, 0.2])
    y = torch.tensor([0, 1, 0])
    flat = torch.zeros(3)
    adv = AdversarialSet(x, torch.arange(3), y, y, y, flat.bool(), flat, flat, flat.bool(), {}, {})
    first = baselines.recon_baseline(tmp_path, clf, vae, x_val, x, y, {"a": adv})
    monkeypatch.setattr(baselines, "recon_rows", lambda *a: pytest.fail("recomputed"))
    again = baselines.recon_baseline(tmp_path, clf, vae, x_val, x, y, {"a": adv})
    assert again[0] == first[0]
    assert all(torch.equal(again[1][k], first[1][k]) for k in first[1])
    with pytest.raises(BaseException, match="recomputed"):  # another set: computed afresh
        baselines.recon_baseline(tmp_path, clf, vae, x_val, x.flip(0), y, {"a": adv})
