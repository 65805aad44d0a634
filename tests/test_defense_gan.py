"""Defense-GAN on tiny 8×8 data: networks, search, the contract (fit/score/decide/save/load),
WGAN-GP training and resuming, seeded init, and the shipped MNIST artifact still loading."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fmdefense.core.artifacts import RESUME_FILE, WEIGHTS_FILE, load_resume_state, load_tensors
from fmdefense.core.errors import InputError, NotFittedError
from fmdefense.core.paths import REPO_ROOT
from fmdefense.defenses.base import REJECT
from fmdefense.defenses.defense_gan import DefenseGAN
from fmdefense.models.gan import Critic, DefenseGANConfig, Generator
from fmdefense.models.seeding import seeded
from fmdefense.training.defense_gan import gradient_penalty, train_defense_gan

CPU = torch.device("cpu")
SHIPPED = REPO_ROOT / "weights" / "mnist" / "defense_gan"
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


def _classifier() -> nn.Module:
    with seeded(0):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def _gan(cfg: DefenseGANConfig = TINY, generator: Generator | None = None) -> DefenseGAN:
    return DefenseGAN(_classifier(), generator or Generator(cfg).eval(), cfg)


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
    model = _gan()
    p = model.project(_images(5))
    assert p.z.shape == (5, TINY.z_dim)
    assert p.recon.shape == (5, 1, 8, 8)
    assert p.error.shape == (5,)
    # the error is ‖G(z*) − x‖² of the returned code and reconstruction
    with torch.no_grad():
        again = model.generator(p.z)
    assert torch.allclose(p.error, (again - _images(5)).pow(2).sum((1, 2, 3)))
    assert torch.allclose(p.recon, again)


def test_network_init_is_seeded_by_the_config() -> None:
    a, b = Generator(TINY).state_dict(), Generator(TINY).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = Generator(dataclasses.replace(TINY, seed=1)).state_dict()
    assert not torch.equal(a["fc.0.weight"], other["fc.0.weight"])
    c1, c2 = Critic(TINY).state_dict(), Critic(TINY).state_dict()
    assert all(torch.equal(c1[k], c2[k]) for k in c1)


def test_search_reduces_the_reconstruction_error_of_its_random_starts() -> None:
    model = _gan()
    start = _gan(dataclasses.replace(TINY, search_steps=0), model.generator)
    with torch.no_grad():  # targets the generator can make, from codes the search never sees
        x = model.generator(torch.randn(12, TINY.z_dim, generator=torch.Generator().manual_seed(5)))
    before, after = start.project(x).error, model.project(x).error  # same seeded starts
    assert bool((after < before).all())
    assert float(after.mean()) < 0.5 * float(before.mean())
    # uniform noise lies far off the generator's range: its error stays far larger
    assert float(model.project(_images(12)).error.mean()) > 100 * float(after.mean())


def test_search_is_seeded_and_independent_of_the_search_batching() -> None:
    x = _images(10)
    a = _gan()
    b = _gan(dataclasses.replace(TINY, search_batch_size=3), a.generator)
    assert torch.equal(a.project(x).error, a.project(x).error)
    assert torch.allclose(a.project(x).error, b.project(x).error, rtol=1e-4, atol=1e-5)


def test_fit_decide_and_save_load_round_trip(tmp_path: Path) -> None:
    model = _gan()
    x_val, x = _images(20, seed=1), _images(6, seed=2)
    for method in (model.detect, model.predict, model.score, model.decide):
        with pytest.raises(NotFittedError):
            method(x)
    assert model.fit(x_val) is model
    assert model.val_fpr_ <= TINY.drop_rate
    noise = torch.bernoulli(torch.full((6, 1, 8, 8), 0.5), generator=torch.Generator())
    dec = model.decide(noise)  # one search: scores, flags and labels agree
    error = dec.scores["reconstruction_error"]
    assert torch.equal(error, model.project(noise).error)
    assert torch.equal(dec.action == REJECT, error > model.threshold_)
    assert bool((dec.label[error <= model.threshold_] >= 0).all())
    with torch.no_grad():
        recon_labels = model.classifier(model.project(noise).recon).argmax(1)
    accepted = error <= model.threshold_
    assert torch.equal(dec.label[accepted], recon_labels[accepted])  # C(G(z*))
    model.save(tmp_path / "dg")
    back = DefenseGAN.load(tmp_path / "dg", model.classifier)
    assert back.config == model.config and back.threshold_ == model.threshold_
    assert back.val_fpr_ == model.val_fpr_
    assert torch.equal(
        back.score(x)["reconstruction_error"], model.score(x)["reconstruction_error"]
    )
    assert torch.equal(back.project(x).recon, model.project(x).recon)
    assert torch.equal(back.predict(noise), dec.label)
    with pytest.raises(InputError, match="no other models"):
        DefenseGAN.load(tmp_path / "dg", model.classifier, vae=object())


def test_the_shipped_mnist_artifact_loads_with_its_tensor_names(tmp_path: Path) -> None:
    """weights/mnist/defense_gan, written before the split, loads as the defense; saving it
    again writes the same tensors under the same names (generator.*, threshold)."""
    from fmdefense.core.paths import classifier_dir
    from fmdefense.models.classifiers import Classifier

    clf = Classifier.load(classifier_dir("mnist"), CPU)
    gan = DefenseGAN.load(SHIPPED, clf)
    stored = load_tensors(SHIPPED / WEIGHTS_FILE)
    assert gan.is_fitted and gan.threshold_ == float(stored["threshold"])
    mine = gan.state_dict()
    assert set(mine) == set(stored) and all(torch.equal(mine[k], stored[k]) for k in stored)
    gan.save(tmp_path / "again")
    again = load_tensors(tmp_path / "again" / WEIGHTS_FILE)
    assert all(torch.equal(again[k], stored[k]) for k in stored)
    fast = DefenseGAN(clf, gan.generator, dataclasses.replace(gan.config, search_steps=5))
    fast.threshold_, fast.val_fpr_ = gan.threshold_, gan.val_fpr_
    dec = fast.decide(torch.zeros(2, 1, 28, 28).index_fill_(3, torch.tensor([13, 14]), 1.0))
    assert dec.label.shape == (2,)


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
    model = _gan()
    with pytest.raises(InputError):
        model.project(bad)


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


def test_one_epoch_trains_resumes_to_the_same_weights_and_is_seeded(tmp_path: Path) -> None:
    x = _images(64)
    g = Generator(TINY)
    history = train_defense_gan(g, x, CPU, tmp_path / "a")
    (row,) = history
    assert row["critic_steps"] == 4 and row["generator_steps"] == 2
    assert row["gp"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
    state = load_resume_state(tmp_path / "a")  # safetensors + JSON header, no pickle
    assert state is not None and state["epoch"] == 1
    twin = Generator(TINY)  # the same command again: the same weights
    train_defense_gan(twin, x, CPU)
    assert all(
        torch.equal(a, b)
        for a, b in zip(g.state_dict().values(), twin.state_dict().values(), strict=True)
    )
    # one more epoch on top of the resume state equals two epochs in one go
    two = dataclasses.replace(TINY, epochs=2)
    resumed = Generator(two)
    h_resumed = train_defense_gan(resumed, x, CPU, tmp_path / "a")
    straight = Generator(two)
    h_straight = train_defense_gan(straight, x, CPU, tmp_path / "b")
    assert len(h_resumed) == 2 and h_resumed[0] == row
    assert h_resumed[1]["wasserstein"] == pytest.approx(h_straight[1]["wasserstein"])
    for (name, a), b in zip(
        resumed.state_dict().items(), straight.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6, equal_nan=True), name
    assert (tmp_path / "a" / RESUME_FILE).is_file()
    assert not resumed.training  # left in eval mode for the search
