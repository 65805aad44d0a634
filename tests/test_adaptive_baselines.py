"""Adaptive attacks on the baselines, the one judging rule, and `fmdefense adaptive` resuming.

Toy world: 8×8 "ramp" images, brightness 0.5 + 0.45·s·(column − 3.5)/3.5 for a slope s in
[−1, 1]; the toy classifier labels an image by the sign of its slope. MagNet's autoencoders and
FBGAN's E and G learn the ramps, so noise off the ramp family raises their reconstruction error.
One table of targets (defense, attack, parameters, what it must achieve) drives the checks every
baseline attack passes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import fmdefense.attacks.adaptive.sweep as sweep
from fmdefense.attacks.adaptive import (
    ADAPTIVE_ATTACKS,
    DEFAULT_ATTACK,
    PGDAttack,
    attacks_for,
    make_attack,
    run_adaptive,
    run_sweep,
)
from fmdefense.attacks.adaptive.jobs import load_inputs
from fmdefense.attacks.defended import outcomes
from fmdefense.cli import main
from fmdefense.core.errors import InputError, NotFittedError
from fmdefense.defenses.base import REJECT_LABEL, Defense
from fmdefense.defenses.defense_gan import DefenseGAN
from fmdefense.defenses.fbgan import FBGANDefense, FBGANDefenseConfig
from fmdefense.defenses.magnet import MagNet
from fmdefense.defenses.rule import outcome_rates
from fmdefense.models.fbgan import FBGAN, FBGANConfig
from fmdefense.models.gan import DefenseGANConfig, Generator
from fmdefense.models.magnet import MagNetAutoencoders, MagNetConfig
from fmdefense.training.fbgan import train_fbgan
from fmdefense.training.magnet import train_magnet

COL = (torch.arange(8.0) - 3.5) / 3.5
SLOPES = [-0.6, -0.5, -0.4, -0.35, -0.3, 0.3, 0.35, 0.4, 0.5, 0.6]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class RampCfg:
    in_channels: int = 1
    image_size: tuple[int, int] = (8, 8)


class RampClassifier(nn.Module):
    """Logits ±20·mean(x · column weight): the sign of the ramp's slope."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = RampCfg()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 2)
        s = (x * COL.view(1, 1, 1, 8)).flatten(1).mean(1)
        return torch.stack([-s, s], 1) * self.scale


def ramps(slopes: list[float] | torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(slopes, dtype=torch.float).view(-1, 1, 1, 1)
    return (0.5 + 0.45 * s * COL.view(1, 1, 1, 8)).expand(-1, 1, 8, 8).clone()


def toy_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return ramps(SLOPES), (torch.tensor(SLOPES) > 0).long()


@pytest.fixture(scope="module")
def magnet() -> MagNet:
    gen = torch.Generator().manual_seed(0)
    x = ramps(torch.rand(256, generator=gen) * 2 - 1)
    cfg = MagNetConfig(image_size=(8, 8), epochs=20, batch_size=32, drop_rate=0.02, lr=1e-2)
    aes = MagNetAutoencoders(cfg)
    train_magnet(aes, x, torch.device("cpu"))
    return MagNet(RampClassifier(), aes, cfg).fit(x)


TINY_GAN = DefenseGANConfig(
    image_size=(8, 8), z_dim=8, width=8, search_steps=15, restarts=2, search_batch_size=8
)


@pytest.fixture(scope="module")
def gan() -> DefenseGAN:
    """A random (untrained) tiny generator with its threshold fitted on ramps."""
    gen = torch.Generator().manual_seed(1)
    cfg = dataclasses.replace(TINY_GAN, drop_rate=0.1)
    model = DefenseGAN(RampClassifier(), Generator(cfg).eval(), cfg)
    return model.fit(ramps(torch.rand(20, generator=gen) * 2 - 1))


@pytest.fixture(scope="module")
def fbgan() -> FBGANDefense:
    """E and G trained on ramps (with the pixel term), threshold at a 2 % drop rate."""
    gen = torch.Generator().manual_seed(0)
    x = ramps(torch.rand(256, generator=gen) * 2 - 1)
    cfg = FBGANConfig(
        image_size=(8, 8), z_dim=2, width=8, disc_hidden=16, epochs=20, batch_size=32,
        recon_weight=5.0, lr=1e-2,
    )  # fmt: skip
    model = FBGAN(cfg)
    train_fbgan(model, x, torch.device("cpu"))
    return FBGANDefense(RampClassifier(), model, FBGANDefenseConfig(drop_rate=0.02)).fit(x)


@pytest.fixture
def baseline(request: pytest.FixtureRequest) -> Defense:
    """The toy baseline a target names (`magnet`, `gan` or `fbgan`)."""
    return request.getfixturevalue(request.param)


def accepted_wrong(defense: Defense, x_adv: torch.Tensor, y: torch.Tensor) -> int:
    label = defense.predict(x_adv)
    return int(((label != REJECT_LABEL) & (label != y)).sum())


@dataclass(frozen=True)
class BaselineTarget:
    """One baseline under one attack: its parameters, and how many toy inputs (of 10) it must
    get accepted and wrong beyond plain PGD on the classifier (None: not checked)."""

    defense: str  # fixture name
    attack: str
    params: dict[str, object]
    beats_plain_by: int | None


THROUGH = {"eps": 0.3, "steps": 30, "kappa": 0.0}
BASELINE_TARGETS = [
    BaselineTarget("magnet", "magnet_joint", THROUGH, 6),
    BaselineTarget("fbgan", "fbgan_joint", THROUGH, 6),
    BaselineTarget("gan", "defensegan_bpda", {"eps": 0.1, "steps": 4, "check_every": 2}, None),
]
KINDS = {"magnet": "magnet", "gan": "defensegan", "fbgan": "fbgan"}


def test_the_table_covers_each_baselines_own_attack() -> None:
    own = sorted(DEFAULT_ATTACK[KINDS[t.defense]] for t in BASELINE_TARGETS)
    assert own == sorted(t.attack for t in BASELINE_TARGETS)
    assert sorted(DEFAULT_ATTACK) == sorted(["default", "ensemble", "fm", *KINDS.values()])


@pytest.mark.parametrize(
    ("baseline", "target"),
    [(t.defense, t) for t in BASELINE_TARGETS],
    ids=[t.attack for t in BASELINE_TARGETS],
    indirect=["baseline"],
)
def test_each_baseline_attack_stays_in_the_ball_is_seeded_and_is_judged_by_the_defense(
    baseline: Defense, target: BaselineTarget
) -> None:
    x, y = toy_inputs()
    assert bool((baseline.predict(x) == y).all()) or target.beats_plain_by is None  # clean: right
    result = run_adaptive(target.attack, baseline, x, y, **target.params)  # type: ignore[arg-type]
    eps = float(target.params["eps"])  # type: ignore[arg-type]
    assert result.x_adv.shape == x.shape
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    assert float((result.x_adv - x).abs().max()) <= eps + 1e-6
    label = baseline.predict(result.x_adv)  # its flags are the defense's own verdict
    assert torch.equal(result.success, (label != y) & (label != REJECT_LABEL))
    again = run_adaptive(target.attack, baseline, x, y, **target.params)  # type: ignore[arg-type]
    assert torch.equal(again.x_adv, result.x_adv)  # seeded
    if target.beats_plain_by is None:
        return
    plain = run_adaptive("undefended", baseline, x, y, **THROUGH)  # type: ignore[arg-type]
    assert bool(plain.success.all())  # it fools the bare classifier every time ...
    n_plain = accepted_wrong(baseline, plain.x_adv, y)
    assert n_plain <= 2  # ... but its noise trips the detector (or the reconstruction undoes it)
    # through the defense's own transform, under its thresholds: accepted and wrong
    assert accepted_wrong(baseline, result.x_adv, y) >= n_plain + target.beats_plain_by


def test_fbgan_joint_differentiates_through_e_and_g_and_its_hinge_reads_the_threshold(
    fbgan: FBGANDefense,
) -> None:
    x, y = toy_inputs()
    attack = make_attack("fbgan_joint", fbgan, eps=0.3, kappa=0.0)
    xa = x.clone().requires_grad_(True)
    loss = attack.loss(xa, y, torch.arange(len(x)), torch.Generator())  # (n,)
    (grad,) = torch.autograd.grad(loss.sum(), xa)
    assert loss.shape == (len(x),) and bool(torch.isfinite(grad).all())
    assert bool((grad.flatten(1).abs().amax(1) > 0).all())  # no masked gradient
    with torch.no_grad():
        recon = fbgan.reconstruct(x)
        error = (recon - x).pow(2).flatten(1).sum(1)
    lower = FBGANDefense(fbgan.classifier, fbgan.model, fbgan.config)
    lower.threshold_ = float(error.min()) / 2  # every clean ramp now over τ
    hinge = make_attack("fbgan_joint", lower, eps=0.3, kappa=0.0, w_cls=0.0)
    expected = 10.0 * (error / lower.threshold_ - 0.9)  # w_stealth · (ratio − (1 − m))
    got = hinge.loss(x, y, torch.arange(len(x)), torch.Generator()).detach()
    assert torch.allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("starts", ["defense", "fresh"])
def test_bpda_on_a_tiny_random_defense_gan_stays_in_the_ball_and_box(
    gan: DefenseGAN, starts: str
) -> None:
    x, y = toy_inputs()
    attack = make_attack("defensegan_bpda", gan, eps=0.1, steps=4, check_every=2, starts=starts)
    assert attack.params["steps"] == 4 and make_attack("defensegan_bpda", gan).steps == 40
    result = attack.run(x, y)
    assert result.x_adv.shape == x.shape
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    assert float((result.x_adv - x).abs().max()) <= 0.1 + 1e-6
    # its flags are Defense-GAN's own verdict on the returned set, judged in the same order
    label = gan.predict(result.x_adv)
    assert torch.equal(result.success, (label != y) & (label != REJECT_LABEL))


def test_bpda_moves_the_input_where_the_defense_does_not_already_fail(gan: DefenseGAN) -> None:
    x, y = toy_inputs()
    attack = make_attack("defensegan_bpda", gan, eps=0.1, steps=3)
    attack.success_at = lambda xa, ya, idx: torch.zeros(len(xa), dtype=torch.bool)  # type: ignore[method-assign]
    result = attack.run(x, y)  # never "fooled": every input takes every step
    moved = (result.x_adv - x).abs().flatten(1).amax(1)
    assert bool((moved > 0).all()) and float(moved.max()) <= 0.1 + 1e-6


def test_one_rule_on_hard_decisions() -> None:
    y = torch.tensor([0, 1, 2, 3])
    row = outcome_rates(torch.tensor([0, REJECT_LABEL, 1, 3]), y)
    assert row["robust_accuracy_with_rejection"] == 0.75  # right, rejected, right: safe
    assert row["attack_success"] == 0.25  # labelled, not rejected, wrong
    assert row["accept_rate"] == 0.75 and row["rejected"] == 1
    assert row["labelled_right"] == 2 and row["labelled_wrong"] == 1


def test_one_judgement_for_every_defense_and_the_sweep_is_json(
    magnet: MagNet, gan: DefenseGAN
) -> None:
    from tests.test_adaptive import toy_defense
    from tests.test_adaptive import toy_inputs as fm_inputs

    x, y = toy_inputs()
    fm = toy_defense()
    fx, fy = fm_inputs()
    for defense, (xs, ys) in ((magnet, (x, y)), (gan, (x, y)), (fm, (fx, fy))):
        row = outcomes(defense, xs, ys)
        dec = defense.decide(xs)
        assert row["accept_rate"] == pytest.approx(
            float((dec.label != REJECT_LABEL).float().mean())
        )
        assert row["actions"] == dec.counts() and set(row["mean_scores"]) == set(dec.scores)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    row = outcomes(magnet, noise, y)  # far off the ramps: the detectors count their flags
    assert row["flagged_ae_i"] + row["flagged_ae_ii"] >= row["rejected"] > 0
    with pytest.raises(NotFittedError):
        cfg = MagNetConfig(image_size=(8, 8))
        make_attack("magnet_joint", MagNet(RampClassifier(), MagNetAutoencoders(cfg), cfg))
    with pytest.raises(InputError, match="attacks MagNet"):
        make_attack("magnet_joint", gan)
    with pytest.raises(InputError, match="attacks FMDefense"):
        make_attack("joint", magnet)
    changes = {"steps": 15, "kappa": 0.0}
    out = run_sweep(magnet, x, y, ["magnet_joint"], [0.3, 0.05], changes=changes)
    json.dumps(out)
    assert out["defense"] == "magnet" and out["clean"]["accept_rate"] == 1.0
    res = out["attacks"]["magnet_joint"]
    assert res["params"]["restarts"] == 4  # its own default
    assert [row["eps"] for row in res["per_eps"]] == [0.05, 0.3]
    s = res["sanity"]
    assert s["success_non_decreasing_in_eps"] and s["more_budget_within_2se"]
    assert s["more_restarts_not_lower"] and s["undefended_reaches_100"] and s["passed"]


def test_registry_lists_the_baseline_attacks_by_defense() -> None:
    assert {"magnet_joint", "defensegan_bpda", "fbgan_joint"} <= set(ADAPTIVE_ATTACKS)
    assert attacks_for("magnet") == ["cw_transfer", "undefended", "magnet_joint"]
    assert attacks_for("defensegan") == ["cw_transfer", "undefended", "defensegan_bpda"]
    assert attacks_for("fbgan") == ["cw_transfer", "undefended", "fbgan_joint"]
    assert "fbgan_joint" not in attacks_for("magnet")
    assert "joint" in attacks_for("fm") and "magnet_joint" not in attacks_for("fm")
    with pytest.raises(InputError, match="unknown defense"):
        attacks_for("nope")


def test_bpda_rejects_unknown_starts(gan: DefenseGAN) -> None:
    with pytest.raises(InputError, match="starts"):
        make_attack("defensegan_bpda", gan, starts="mine")


def test_cli_resumes_without_recomputing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real MNIST CLE images and the shipped classifier against an untrained 28×28 MagNet."""
    from fmdefense.core.paths import classifier_dir
    from fmdefense.models.classifiers import Classifier

    x, _ = load_inputs("mnist", 8)
    clf = Classifier.load(classifier_dir("mnist"), torch.device("cpu"))
    cfg = MagNetConfig()
    MagNet(clf, MagNetAutoencoders(cfg), cfg).fit(x).save(tmp_path / "magnet")
    out = tmp_path / "adaptive"
    argv = [
        "adaptive",
        "--dataset",
        "mnist",
        "--defense",
        "magnet",
        "--defense-dir",
        str(tmp_path / "magnet"),
        "--attack",
        "magnet_joint",
        "undefended",
        "--eps",
        "0.1",
        "0.2",
        "--limit",
        "4",
        "--steps",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    first = json.loads((out / "summary.json").read_text())
    assert (out / "magnet_joint" / "eps-0.1.json").is_file()
    assert (out / "undefended-eps-0.2.json").is_file()
    assert "robust accuracy with rejection" in capsys.readouterr().out

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed a finished unit")

    monkeypatch.setattr(PGDAttack, "_run", boom)  # both attacks run the shared PGD loop
    monkeypatch.setattr(sweep, "outcomes", boom)  # the clean rates
    assert main(argv) == 0  # every unit is on disk with the same config
    second = json.loads((out / "summary.json").read_text())
    first.pop("wall_seconds"), second.pop("wall_seconds")
    assert first == second  # the units' compute seconds included
    changed = list(argv)
    changed[changed.index("--steps") + 1] = "3"  # a new config, so the attack runs again
    with pytest.raises(AssertionError, match="recomputed"):
        main(changed)


def test_cli_takes_fbgan_with_its_own_attack_by_default(tmp_path: Path) -> None:
    """`fmdefense adaptive --defense fbgan`: real MNIST CLE images, an untrained 28×28 FBGAN."""
    from fmdefense.core.paths import classifier_dir
    from fmdefense.models.classifiers import Classifier

    x, _ = load_inputs("mnist", 8)
    clf = Classifier.load(classifier_dir("mnist"), torch.device("cpu"))
    FBGANDefense(clf, FBGAN(FBGANConfig())).fit(x).save(tmp_path / "fbgan")
    out = tmp_path / "adaptive"
    argv = ["adaptive", "--dataset", "mnist", "--defense", "fbgan", "--defense-dir"]
    argv += [str(tmp_path / "fbgan"), "--eps", "0.1", "--limit", "3", "--steps", "2"]
    assert main([*argv, "--no-checks", "--out", str(out), "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["defense"] == "fbgan" and list(summary["attacks"]) == ["fbgan_joint"]
    assert (out / "fbgan_joint" / "eps-0.1.json").is_file()
