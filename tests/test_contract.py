"""One contract suite over every registered defense (scikit-learn's `parametrize_with_checks`
idea): a defense gets every check here by being in `DEFENSES` and having a toy builder below."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmdefense.core.errors import FMDefenseError, InputError, NotFittedError
from fmdefense.defenses.base import ACCEPT, PURIFY, REJECT, REJECT_LABEL, Decision, Defense
from fmdefense.defenses.default import DefaultConfig, DefaultDefense
from fmdefense.defenses.defense_gan import DefenseGAN
from fmdefense.defenses.fm.config import FMDefenseConfig
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.magnet import MagNet
from fmdefense.defenses.recon_check import ReconCheckConfig, ReconstructionCheck
from fmdefense.defenses.registry import DEFENSES
from fmdefense.models.gan import DefenseGANConfig, Generator
from fmdefense.models.magnet import MagNetAutoencoders, MagNetConfig, autoencoder_i, autoencoder_ii
from tests.toys import ToyClassifier, ToyComboVAE, images

X_VAL = images([0.05 * i for i in range(1, 20)] + [0.33, 0.67, 0.12, 0.88])
X = images([0.45, 0.9, 0.52, 0.2, 0.55, 0.05])


def _fm() -> tuple[Defense, Callable[[Path], Defense]]:
    clf, vae = ToyClassifier(), ToyComboVAE()
    d = FMDefense(clf, vae, FMDefenseConfig(n_morphs=10, rho=0.8, codes=(0, 1), chunk_size=4))
    return d, lambda folder: FMDefense.load(folder, clf, vae)


def _recon() -> tuple[Defense, Callable[[Path], Defense]]:
    clf, vae = ToyClassifier(), ToyComboVAE()
    with torch.no_grad():
        vae.bias.fill_(0.1)
    d = ReconstructionCheck(clf, vae, ReconCheckConfig(rho=0.8, z_u_mode="feature"))
    return d, lambda folder: ReconstructionCheck.load(folder, clf, vae)


def _default() -> tuple[Defense, Callable[[Path], Defense]]:
    clf, vae = ToyClassifier(), ToyComboVAE()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        aes = (autoencoder_i(1), autoencoder_ii(1))
    d = DefaultDefense(clf, vae, aes, DefaultConfig(alpha=0.2, purify="paper"))
    return d, lambda folder: DefaultDefense.load(folder, clf, vae)


def _magnet() -> tuple[Defense, Callable[[Path], Defense]]:
    clf, cfg = ToyClassifier(), MagNetConfig(image_size=(4, 4), drop_rate=0.1)
    d = MagNet(clf, MagNetAutoencoders(cfg), cfg)  # untrained, seeded
    return d, lambda folder: MagNet.load(folder, clf)


def _defensegan() -> tuple[Defense, Callable[[Path], Defense]]:
    clf = ToyClassifier()
    cfg = DefenseGANConfig(
        image_size=(4, 4), z_dim=4, width=4, search_steps=5, restarts=2, drop_rate=0.1
    )
    d = DefenseGAN(clf, Generator(cfg), cfg)  # untrained, seeded
    return d, lambda folder: DefenseGAN.load(folder, clf)


def _fbgan() -> tuple[Defense, Callable[[Path], Defense]]:
    from fmdefense.defenses.fbgan import FBGANDefense, FBGANDefenseConfig
    from fmdefense.models.fbgan import FBGAN, FBGANConfig

    clf = ToyClassifier()
    cfg = FBGANConfig(image_size=(4, 4), z_dim=3, width=4, disc_hidden=8)
    d = FBGANDefense(clf, FBGAN(cfg), FBGANDefenseConfig(drop_rate=0.1))  # untrained, seeded
    return d, lambda folder: FBGANDefense.load(folder, clf)


def _ensemble() -> tuple[Defense, Callable[[Path], Defense]]:
    from fmdefense.defenses.ensemble import EnsembleConfig, EnsembleDefense

    clf, vaes = ToyClassifier(), [ToyComboVAE(), ToyComboVAE()]
    with torch.no_grad():
        vaes[1].bias.fill_(0.05)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        aes = (autoencoder_i(1), autoencoder_ii(1))
    cfg = EnsembleConfig(mode="random", member=DefaultConfig(alpha=0.2))
    d = EnsembleDefense(clf, vaes, aes, cfg, vae_dirs=[Path("vae-0"), Path("vae-1")])
    return d, lambda folder: EnsembleDefense.load(folder, clf, vaes=vaes)


BUILDERS: dict[str, Callable[[], tuple[Defense, Callable[[Path], Defense]]]] = {
    "fm": _fm,
    "recon": _recon,
    "default": _default,
    "magnet": _magnet,
    "defensegan": _defensegan,
    "fbgan": _fbgan,
    "ensemble": _ensemble,
}
# Defenses whose accepted label is not C(x): MagNet's is C(AE_I(x)), Defense-GAN's C(G(z*)).
RELABELS = ("default", "magnet", "defensegan", "fbgan")
NAMES = sorted(DEFENSES)


def _fitted(name: str) -> tuple[Defense, Callable[[Path], Defense]]:
    if name not in BUILDERS:
        pytest.fail(f"registered defense {name!r} has no toy builder in tests/test_contract.py")
    defense, load = BUILDERS[name]()
    assert defense.fit(X_VAL) is defense  # fit returns self
    return defense, load


def _same(a: Decision, b: Decision) -> None:
    assert torch.equal(a.action, b.action) and torch.equal(a.label, b.label)
    assert torch.equal(a.input_label, b.input_label)
    assert a.scores.keys() == b.scores.keys()
    for k in a.scores:
        assert torch.allclose(a.scores[k], b.scores[k], atol=1e-6), k


def test_every_registered_defense_has_a_toy_builder() -> None:
    assert set(DEFENSES) <= set(BUILDERS), sorted(set(DEFENSES) - set(BUILDERS))


@pytest.mark.parametrize("name", NAMES)
def test_decide_before_fit_raises_not_fitted(name: str) -> None:
    defense, _ = BUILDERS[name]()
    for method in (defense.decide, defense.predict, defense.detect, defense.score):
        with pytest.raises(NotFittedError):
            method(X)


@pytest.mark.parametrize("name", NAMES)
def test_decision_shape_and_reject_label_exactly_where_rejected(name: str) -> None:
    defense, _ = _fitted(name)
    dec = defense.decide(X)
    assert len(dec) == len(X) and dec.action.dtype == torch.long
    assert set(dec.action.tolist()) <= {ACCEPT, PURIFY, REJECT}
    assert torch.equal(dec.label == REJECT_LABEL, dec.action == REJECT)
    assert torch.equal(defense.predict(X), dec.label)
    assert torch.equal(defense.detect(X), dec.action != ACCEPT)
    accepted = dec.action == ACCEPT
    assert dec.scores and all(v.shape == (len(X),) for v in dec.scores.values())
    assert all(bool(torch.isfinite(v).all()) for v in defense.score(X).values())
    assert dec[0].action in ("accept", "purify", "reject")
    if name not in RELABELS:
        assert torch.equal(dec.label[accepted], dec.input_label[accepted])


@pytest.mark.parametrize("name", NAMES)
def test_save_then_load_gives_identical_decisions(name: str, tmp_path: Path) -> None:
    defense, load = _fitted(name)
    defense.save(tmp_path / name)
    _same(defense.decide(X), load(tmp_path / name).decide(X))


@pytest.mark.parametrize("name", NAMES)
def test_one_image_alone_decides_as_inside_a_batch(name: str) -> None:
    defense, _ = _fitted(name)
    batch = defense.decide(X)
    for i in range(len(X)):
        alone = defense.decide(X[i : i + 1])
        assert int(alone.action[0]) == int(batch.action[i])
        assert int(alone.label[0]) == int(batch.label[i])


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_twice_gives_identical_decisions(name: str) -> None:
    a, _ = _fitted(name)
    b, _ = _fitted(name)
    _same(a.decide(X), b.decide(X))


@pytest.mark.parametrize("name", NAMES)
def test_other_float_precisions_are_converted(name: str) -> None:
    defense, _ = _fitted(name)
    _same(defense.decide(X), defense.decide(X.double()))


def _bad_inputs() -> st.SearchStrategy[Any]:
    """Objects that are not a float batch (n, 1, 4, 4) in [0, 1] with n ≥ 1, all finite."""
    shapes = st.sampled_from([(4,), (1, 4, 4), (2, 2, 4, 4), (2, 1, 5, 4), (0, 1, 4, 4)])
    bad_value = st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.01, 1.0 + 1e-6])
    wrong_shape = shapes.map(lambda s: torch.rand(s))
    wrong_dtype = st.sampled_from([torch.uint8, torch.int64, torch.bool]).map(
        lambda dt: torch.zeros(2, 1, 4, 4, dtype=dt)
    )

    def poke(args: tuple[float, int]) -> torch.Tensor:
        x = torch.rand(3, 1, 4, 4)
        x.view(-1)[args[1]] = args[0]
        return x

    wrong_value = st.tuples(bad_value, st.integers(0, 47)).map(poke)
    not_a_tensor = st.sampled_from([None, 3.0, "x", [[0.5]], X.numpy()])
    return st.one_of(wrong_shape, wrong_dtype, wrong_value, not_a_tensor)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=_bad_inputs())
def test_bad_inputs_raise_input_error(name: str, bad: Any) -> None:
    defense = FITTED[name]
    for method in (defense.decide, defense.score):
        with pytest.raises(InputError):
            method(bad)


FITTED: dict[str, Defense] = {}


@pytest.fixture(autouse=True, scope="module")
def _fit_once() -> None:
    for name in NAMES:
        if name in BUILDERS:
            FITTED[name] = _fitted(name)[0]


def test_errors_are_fmdefense_errors() -> None:
    assert issubclass(InputError, FMDefenseError) and issubclass(NotFittedError, FMDefenseError)
