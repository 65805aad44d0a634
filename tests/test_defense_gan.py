"""Defense-GAN baseline on tiny 8×8 data: shapes, search, fit/detect/save/load, WGAN-GP training."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fmdefense.core.artifacts import RESUME_FILE, load_resume_state
from fmdefense.core.errors import InputError, NotFittedError
from fmdefense.defenses.defense_gan import (
    Critic,
    DefenseGAN,
    DefenseGANConfig,
    Generator,
    gradient_penalty,
    train_defense_gan,
)

CPU = torch.device("cpu")
TINY = DefenseGANConfig(
    image_size=(8, 8),
    z_dim=8,
    width=8,
    epochs=1,
    batch_size=16,
    n_critic=2,
    search_steps=30,
    restarts=3,
    search_batch_size=8,
    drop_rate=0.1,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny ops run fastest on one thread (two threads spin for seconds on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 8, 8), generator=gen)


def test_networks_and_projection_have_the_documented_shapes() -> None:
    cfg = DefenseGANConfig()  # MNIST: 128 → 28×28
    g = Generator(cfg).eval()
    with torch.no_grad():
        out = g(torch.randn(3, cfg.z_dim))
    assert out.shape == (3, 1, 28, 28)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    with torch.no_grad():
        assert Critic(cfg)(out).shape == (3,)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in Critic(cfg).modules())
    model = DefenseGAN(TINY).eval()
    p = model.project(_images(5))
    assert p.z.shape == (5, TINY.z_dim)
    assert p.recon.shape == (5, 1, 8, 8)
    assert p.error.shape == (5,)
    # the error is ‖G(z*) − x‖² of the returned code and reconstruction
    assert torch.allclose(p.error, (model.generator(p.z) - _images(5)).pow(2).sum((1, 2, 3)))
    assert torch.allclose(p.recon, model.generator(p.z))


def test_search_reduces_the_reconstruction_error_of_its_random_starts() -> None:
    model = DefenseGAN(TINY).eval()
    start = DefenseGAN(dataclasses.replace(TINY, search_steps=0))
    start.load_state_dict(model.state_dict())
    start.eval()
    with torch.no_grad():  # targets the generator can make, from codes the search never sees
        x = model.generator(torch.randn(12, TINY.z_dim, generator=torch.Generator().manual_seed(5)))
    before, after = start.score(x), model.score(x)  # same seeded starts; best of R each
    assert bool((after < before).all())
    assert float(after.mean()) < 0.5 * float(before.mean())
    # uniform noise lies far off the generator's range: its error stays far larger
    assert float(model.score(_images(12)).mean()) > 100 * float(after.mean())


def test_scores_are_seeded_and_independent_of_the_search_batching() -> None:
    x = _images(10)
    a = DefenseGAN(TINY).eval()
    b = DefenseGAN(dataclasses.replace(TINY, search_batch_size=3)).eval()
    assert torch.equal(a.score(x), a.score(x))
    assert torch.allclose(a.score(x), b.score(x), rtol=1e-4, atol=1e-5)


def test_fit_detect_predict_and_save_load_round_trip(tmp_path: Path) -> None:
    model = DefenseGAN(TINY).eval()
    x_val, x = _images(20, seed=1), _images(6, seed=2)
    with pytest.raises(NotFittedError):
        model.detect(x)
    with pytest.raises(NotFittedError):
        model.predict(nn.Flatten(), x)
    assert model.fit_thresholds(x_val) is model
    assert model.val_fpr_ <= TINY.drop_rate
    noise = torch.bernoulli(torch.full((6, 1, 8, 8), 0.5), generator=torch.Generator())
    flagged = model.detect(noise)
    assert flagged.dtype == torch.bool and flagged.shape == (6,)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    labels = model.predict(clf, noise)
    assert bool(((labels == -1) == flagged).all())
    assert bool((labels[~flagged] >= 0).all())
    model.save(tmp_path / "dg")
    back = DefenseGAN.load(tmp_path / "dg")
    assert back.cfg == model.cfg
    assert torch.equal(back.threshold, model.threshold)
    assert torch.equal(back.score(x), model.score(x))
    assert torch.equal(back.reconstruct(x), model.purify(x))
    assert torch.equal(back.predict(clf, noise), labels)
    scores, labels_too = back.score_and_predict(clf, noise)
    assert torch.equal(scores, model.score(noise)) and torch.equal(labels_too, labels)


@pytest.mark.parametrize(
    "bad",
    [
        torch.rand(2, 1, 28, 28),  # wrong size
        torch.rand(2, 3, 8, 8),  # wrong channels
        torch.rand(2, 1, 8, 8) * 2,  # out of [0, 1]
        torch.full((2, 1, 8, 8), float("nan")),
        (torch.rand(2, 1, 8, 8) * 255).to(torch.uint8),
        torch.rand(1, 8, 8),
    ],
)
def test_bad_inputs_raise_input_error(bad: torch.Tensor) -> None:
    model = DefenseGAN(TINY)
    with pytest.raises(InputError):
        model.score(bad)


def test_config_rejects_sizes_the_generator_cannot_make() -> None:
    with pytest.raises(InputError):
        DefenseGANConfig(image_size=(30, 30))
    with pytest.raises(InputError):
        DefenseGANConfig(restarts=0)


def test_gradient_penalty_of_a_linear_critic_is_its_weight_norm_minus_one_squared() -> None:
    critic = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    with torch.no_grad():
        critic[1].weight.fill_(0.5)  # ‖w‖ = 0.5 · 8 = 4
    real, fake = _images(4, 1), _images(4, 2)
    gp = gradient_penalty(critic, real, fake, torch.rand(4, 1, 1, 1))
    assert gp.item() == pytest.approx(9.0)
    gp.backward()  # differentiable in the critic's weights (create_graph)
    assert critic[1].weight.grad is not None and float(critic[1].weight.grad.abs().sum()) > 0


def test_one_epoch_trains_and_resumes_to_the_same_weights(tmp_path: Path) -> None:
    x = _images(64)
    model = DefenseGAN(TINY)
    history = train_defense_gan(model, x, CPU, tmp_path / "a")
    (row,) = history
    assert row["critic_steps"] == 4 and row["generator_steps"] == 2
    assert row["gp"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
    state = load_resume_state(tmp_path / "a")  # safetensors + JSON header, no pickle
    assert state is not None and state["epoch"] == 1
    # one more epoch on top of the resume state equals two epochs in one go
    two = dataclasses.replace(TINY, epochs=2)
    resumed = DefenseGAN(two)
    h_resumed = train_defense_gan(resumed, x, CPU, tmp_path / "a")
    straight = DefenseGAN(two)
    h_straight = train_defense_gan(straight, x, CPU, tmp_path / "b")
    assert len(h_resumed) == 2 and h_resumed[0] == row
    assert h_resumed[1]["wasserstein"] == pytest.approx(h_straight[1]["wasserstein"])
    for (name, a), b in zip(
        resumed.state_dict().items(), straight.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6, equal_nan=True), name
    assert (tmp_path / "a" / RESUME_FILE).is_file()
    assert not resumed.generator.training  # left in eval mode for the search
