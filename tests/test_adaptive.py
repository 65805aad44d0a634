"""Adaptive attacks on the toy pipeline of tests/toys.py (closed-form classifier and VAE).

The toy classifier labels a 4×4 image by its mean brightness (> 0.5 → 1); the toy VAE's only
effective code is that mean, so an input near 0.5 has low resistance and is flagged, while one
pushed well past 0.5 keeps its (wrong) label on every morph and is accepted. The toy default
defense fuses the same models' scores (and two untrained MagNet autoencoders') with clean VAL
images of varied texture, so an input moved flat across 0.5 looks clean. One table of attack
targets (Foolbox's `AttackTestTarget` idea) over both defenses drives the checks every attack
must pass.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import torch

from fmdefense.attacks.adaptive import (
    ADAPTIVE_ATTACKS,
    DEFAULT_ATTACK,
    PGDAttack,
    attacks_for,
    make_attack,
    project_linf,
    run_adaptive,
    run_sweep,
    sanity_checks,
)
from fmdefense.attacks.adaptive.default_joint import (
    DefaultJointPGD,
    link_of,
    nll,
    overlap_nll,
    reference_quantiles,
)
from fmdefense.attacks.adaptive.losses import margin, targeted_margin
from fmdefense.attacks.adaptive.square import DEFICITS
from fmdefense.attacks.defended import defended_success
from fmdefense.core.errors import InputError, NotFittedError
from fmdefense.defenses.base import ACCEPT, REJECT_LABEL, Defense
from fmdefense.defenses.default import PURIFY_POLICIES, DefaultConfig, DefaultDefense
from fmdefense.defenses.fm.config import FMDefenseConfig
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.fm.morphs import morph_codes
from fmdefense.models.magnet import autoencoder_i, autoencoder_ii
from tests.toys import ToyClassifier, ToyComboVAE, ToyVAE, images

PATTERN = torch.tensor([1.0, -1.0] * 8).view(1, 1, 4, 4) * 0.03  # zero-mean texture


def toy_defense() -> FMDefense:
    x_val = images([0.05 * i for i in range(1, 20) if i != 10])
    cfg = FMDefenseConfig(n_morphs=40, rho=0.9, eta=0.5, z_u_mode="class_mean", channels_last=False)
    return FMDefense(ToyClassifier(), ToyVAE(), cfg).fit(x_val)


def toy_default(purify: str = "reject", seed: int = 0) -> DefaultDefense:
    """The default defense on the toys, fitted on flat VAL images of growing texture."""
    means = [0.05 * i for i in range(1, 20) if i != 10] * 2
    amplitude = torch.linspace(0, 2, len(means)).view(-1, 1, 1, 1)
    x_val = (images(means) + amplitude * PATTERN).clamp(0, 1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        aes = (autoencoder_i(1), autoencoder_ii(1))
    cfg = DefaultConfig(alpha=0.1, purify=purify)
    return DefaultDefense(ToyClassifier(), ToyComboVAE(), aes, cfg).fit(x_val)


def toy_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    means = [0.35, 0.38, 0.4, 0.42, 0.44, 0.56, 0.58, 0.6, 0.62, 0.65]
    x = (images(means) + PATTERN).clamp(0, 1)  # textured, so no output is a constant image
    return x, torch.tensor([int(m > 0.5) for m in means])


@pytest.fixture(scope="module")
def defense() -> FMDefense:
    return toy_defense()


@pytest.fixture(scope="module")
def default() -> DefaultDefense:
    return toy_default()


@dataclass(frozen=True)
class AttackTarget:
    """One attack on a toy defense: fast parameters and what it must reach."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    min_success: int = 0  # successes on the 10 toy inputs
    judged_by_defense: bool = True  # its success flags are the defense's verdict
    defense: str = "fm"  # the toy defense's registry name


PGD = {"eps": 0.2, "steps": 20, "kappa": 0.0}
DEFAULT_PGD = {"eps": 0.3, "steps": 20}  # κ = 5: the default's margin score wants confidence
TARGETS = [
    AttackTarget("joint", PGD, 5),
    AttackTarget("latent", PGD, 3),
    AttackTarget("square", {"eps": 0.2, "queries": 60, "kappa": 0.0}, 3),
    AttackTarget("cw_transfer", {"eps": 0.2, "confidence": 3.0}, 3),
    AttackTarget("undefended", PGD, 10, judged_by_defense=False),
    AttackTarget("default_joint", DEFAULT_PGD, 8, defense="default"),
    AttackTarget("square", {"eps": 0.3, "queries": 60}, 1, defense="default"),
    AttackTarget("cw_transfer", {"eps": 0.3, "confidence": 3.0}, 8, defense="default"),
    AttackTarget("undefended", DEFAULT_PGD, 10, judged_by_defense=False, defense="default"),
]


@pytest.mark.parametrize("kind", ["fm", "default"])
def test_the_table_covers_every_attack_on_each_toy_defense(kind: str) -> None:
    assert sorted(t.name for t in TARGETS if t.defense == kind) == sorted(attacks_for(kind))


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t.defense}-{t.name}")
def test_every_attack_stays_in_the_box_and_ball_is_seeded_and_reaches_the_pipeline(
    defense: FMDefense, default: DefaultDefense, target: AttackTarget
) -> None:
    d: Defense = {"fm": defense, "default": default}[target.defense]
    x, y = toy_inputs()
    a = run_adaptive(target.name, d, x, y, **target.params)
    b = run_adaptive(target.name, d, x, y, **target.params)
    assert a.x_adv.shape == x.shape and a.success.shape == (len(x),)
    assert float(a.x_adv.min()) >= 0.0 and float(a.x_adv.max()) <= 1.0
    assert float((a.x_adv - x).abs().max()) <= target.params["eps"] + 1e-6
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    assert int(a.success.sum()) >= target.min_success
    if target.judged_by_defense:  # its own flags are the hard pipeline's verdict
        label = d.predict(a.x_adv)
        assert torch.equal(a.success, (label != y) & (label != REJECT_LABEL))


def accepted_wrong(defense: FMDefense, x_adv: torch.Tensor, y: torch.Tensor) -> int:
    dec = defense.decide(x_adv)
    return int(((dec.action == ACCEPT) & (dec.label != y)).sum())


def test_joint_beats_the_oblivious_attack_against_the_detector(defense: FMDefense) -> None:
    x, y = toy_inputs()
    oblivious = run_adaptive("undefended", defense, x, y, **PGD)  # PGD on C alone
    joint = run_adaptive("joint", defense, x, y, **PGD)
    assert bool(oblivious.success.all())  # it fools the bare classifier every time ...
    n_obl = accepted_wrong(defense, oblivious.x_adv, y)
    assert n_obl <= 2  # ... but lands by the boundary, where morphs flip: flagged
    # the joint attack moves where morphs agree: accepted and wrong
    assert accepted_wrong(defense, joint.x_adv, y) >= n_obl + 5


def test_a_different_seed_gives_a_different_random_start(defense: FMDefense) -> None:
    x, y = toy_inputs()
    a = run_adaptive("joint", defense, x, y, eps=0.1, steps=2, seed=0)
    b = run_adaptive("joint", defense, x, y, eps=0.1, steps=2, seed=1)
    assert not torch.equal(a.x_adv, b.x_adv)


def test_the_sweep_without_a_folder_is_json_and_its_sanity_checks_hold(
    defense: FMDefense,
) -> None:
    x, y = toy_inputs()
    changes = {"steps": 10, "kappa": 0.0}
    out = run_sweep(defense, x, y, ["joint"], [0.2, 0.05], changes=changes, unbounded_eps=1.0)
    json.dumps(out)  # serialisable as is
    assert out["defense"] == "fm" and out["eps"] == [0.05, 0.2]
    res = out["attacks"]["joint"]
    assert res["params"]["steps"] == 10 and res["params"]["kappa"] == 0.0
    assert [row["eps"] for row in res["per_eps"]] == [0.05, 0.2]
    for row in res["per_eps"]:
        assert row["robust_accuracy_with_rejection"] + row["attack_success"] == pytest.approx(1)
        assert row["linf"] <= row["eps"] + 1e-6
        assert sum(row["actions"].values()) == len(x)
    assert out["clean"]["accept_rate"] == 1.0 and out["clean"]["attack_success"] == 0.0
    s = res["sanity"]
    assert s["success_non_decreasing_in_eps"] and s["more_budget_within_2se"]
    assert s["more_restarts_not_lower"] and s["success_double_restarts"] >= s["success_by_eps"][-1]
    assert s["undefended_reaches_100"] and s["success_unbounded"] == 1.0
    assert s["unbounded_reaches_100"] and s["passed"]


def test_a_second_restart_only_adds_successes(defense: FMDefense) -> None:
    """The first of two restarts repeats the one-restart run, so no input it fooled is lost."""
    x, y = toy_inputs()
    attack = make_attack("joint", defense, eps=0.15, steps=10, kappa=0.0)
    one = attack.run(x, y)
    two = attack.with_restarts(2).run(x, y)
    assert attack.with_restarts(2).params["restarts"] == 2 and attack.restartable
    assert 0 < int(one.success.sum()) < len(x)  # room to add, something to lose
    assert bool((two.success | ~one.success).all())
    assert torch.equal(two.x_adv[one.success], one.x_adv[one.success])


def test_budget_and_parameters_of_each_attack_are_its_own(defense: FMDefense) -> None:
    joint = make_attack("joint", defense)
    assert joint.with_budget(2).params["steps"] == 200 and joint.with_budget(2).budget == 2
    assert make_attack("square", defense).with_budget(2).params["queries"] == 400
    cw = make_attack("cw_transfer", defense)
    assert "restarts" not in cw.params and not cw.restartable
    assert cw.with_budget(3).params["steps"] == 300
    for name, cls in ADAPTIVE_ATTACKS.items():
        assert cls.name == name
    with pytest.raises(InputError, match="no parameter"):
        joint.replace(queries=5)  # square's, not joint's


def test_bad_inputs_raise_clear_errors(defense: FMDefense) -> None:
    x, y = toy_inputs()
    with pytest.raises(InputError, match="unknown adaptive attack"):
        make_attack("pgd9000", defense)
    with pytest.raises(InputError, match="eps"):
        make_attack("joint", defense, eps=0.0)
    with pytest.raises(InputError, match="schedule"):
        make_attack("joint", defense, schedule="linear")
    with pytest.raises(InputError, match="steps"):
        make_attack("joint", defense, steps=0)
    with pytest.raises(InputError, match="morph_source"):
        make_attack("joint", defense, morph_source="mine")
    with pytest.raises(TypeError):
        make_attack("joint", defense, queries=5)  # not a parameter of joint
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        run_adaptive("joint", defense, x * 3, y, **PGD)
    with pytest.raises(InputError, match="y must have shape"):
        run_adaptive("joint", defense, x, y[:3], **PGD)
    with pytest.raises(InputError, match="pass a fitted one"):
        make_attack("joint", None, classifier=ToyClassifier())
    unfitted = FMDefense(ToyClassifier(), ToyVAE(), FMDefenseConfig(n_morphs=5))
    with pytest.raises(NotFittedError, match="fit"):
        make_attack("joint", unfitted)
    with pytest.raises(InputError, match="another class"):
        run_adaptive("latent", defense, x[:2], y[:2], **PGD)  # the pool holds one class only
    with pytest.raises(InputError, match="eps"):
        run_sweep(defense, x, y, ["joint"], [])
    # undefended needs no defense at all
    und = make_attack("undefended", None, classifier=ToyClassifier(), **PGD)
    assert bool(und.run(x, y).success.all())


def test_helpers_margins_projection_schedule_and_differentiable_morph_codes() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    y = torch.tensor([0, 1])
    assert margin(logits, y, 100.0).tolist() == [2.0, -3.0]
    assert margin(logits, y, 1.0).tolist() == [2.0, -1.0]  # capped at −κ
    assert targeted_margin(logits, torch.tensor([1, 2]), 100.0).tolist() == [2.0, -3.0]
    x = torch.full((1, 1, 2, 2), 0.98)
    assert float(project_linf(x + 0.5, x, 0.05).max()) == 1.0  # the box cuts the ball
    assert float(project_linf(x - 0.5, x, 0.05).min()) == pytest.approx(0.93)
    clf = ToyClassifier()
    halving = make_attack("undefended", classifier=clf, eps=0.4, steps=8)
    assert [halving.step_size_at(t) for t in (0, 2, 4, 6, 7)] == pytest.approx(
        [0.1, 0.05, 0.025, 0.0125, 0.0125]
    )
    cos = make_attack("undefended", classifier=clf, eps=0.4, steps=8, schedule="cosine")
    assert cos.step_size_at(0) == pytest.approx(0.1) and cos.step_size_at(7) < 0.01
    # the joint attack shifts codes with the defense's own morph_codes: differentiable in codes
    codes = torch.randn(3, 5, requires_grad=True)
    shifted = morph_codes(codes, torch.tensor([1, 4]), torch.randn(3, 2, 6))
    shifted.sum().backward()
    assert codes.grad is not None and torch.equal(codes.grad, torch.full((3, 5), 12.0))


def test_double_budget_check_tolerates_two_standard_errors_only() -> None:
    rows = [
        {"eps": 0.1, "attack_success": 0.5, "n": 500},
        {"eps": 0.3, "attack_success": 0.94, "n": 500},
    ]
    close = sanity_checks(rows, double_budget={"attack_success": 0.936})  # 2 of 500 images fewer
    assert not close["more_budget_not_lower"] and close["more_budget_within_2se"]
    far = sanity_checks(rows, double_budget={"attack_success": 0.90})  # 2 SE ≈ 0.021
    assert not far["more_budget_within_2se"]
    assert sanity_checks(rows, double_budget={"attack_success": 0.95})["more_budget_not_lower"]
    assert close["converged"] and close["passed"] and not far["passed"]
    rising = sanity_checks(rows, double_budget={"attack_success": 0.955})  # +1.4 SE: converged
    assert rising["converged"]
    assert not sanity_checks(rows, double_budget={"attack_success": 0.99})["converged"]
    lost = sanity_checks(rows, double_restarts={"attack_success": 0.938})  # strict
    assert not lost["more_restarts_not_lower"] and not lost["passed"]
    both = {"double_budget": {"attack_success": 0.945}, "double_restarts": {"attack_success": 0.97}}
    gained = sanity_checks(rows, **both)  # restarts gain 3 points > 2 SE: not converged
    assert gained["passed"] and not gained["converged"]
    undefended_short = sanity_checks(rows, undefended=0.95)
    assert not undefended_short["undefended_reaches_100"] and not undefended_short["passed"]


# ------------------------------------------------------------------ the default defense


def _loss(attack: PGDAttack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The attack's per-input objective at x (after its per-run preparation; at its last step,
    so a phased attack reads its full objective). (n,)"""
    attack.prepare(x, y, None)
    attack.begin_step(attack.steps, x, y, torch.arange(len(x)))
    with torch.no_grad():
        return attack.loss(x, y, torch.arange(len(x)), torch.Generator().manual_seed(0))


def test_default_joint_reads_the_default_own_scores_where_the_classifier_is_wrong(
    default: DefaultDefense,
) -> None:
    x, y = toy_inputs()
    wrong = 1 - y  # C(x) ≠ these labels everywhere, so the attack's label t is C(x) itself
    attack = cast(DefaultJointPGD, make_attack("default_joint", default))
    with torch.no_grad():
        linked = attack.linked_scores(x, wrong)[0]  # (n, k)
        raw = default.raw_scores(x)
    for i, name in enumerate(default.names_):
        expected = link_of(name)(raw[name].double()).float()
        assert torch.allclose(linked[:, i], expected, rtol=1e-4, atol=1e-5), name


def test_links_are_stable_log_forms_of_the_probability_scores() -> None:
    a = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.2, 0.1], [60.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.2, 0.1], [0.0, 60.0, 0.0]])
    label = torch.tensor([1, 0, 1])
    p, q = a.softmax(1), b.softmax(1)
    one_minus_p = 1 - p.gather(1, label.view(-1, 1)).squeeze(1)
    l1 = (p - q).abs().sum(1)
    assert torch.allclose(nll(a, label)[:2], link_of("recon_check_feature")(one_minus_p)[:2])
    assert torch.allclose(overlap_nll(a, b)[:2], link_of("squeeze_bits1")(l1)[:2], atol=1e-6)
    assert float(overlap_nll(a, b)[1]) == pytest.approx(0.0, abs=1e-6)  # the same softmax
    # saturated softmaxes: 1 − p and the L1 distance round to 1 and 2, the links keep going
    assert float(nll(a, label)[2]) == pytest.approx(60.0, abs=1e-3)
    assert float(overlap_nll(a, b)[2]) == pytest.approx(60.0 - math.log(3), abs=1e-3)
    assert link_of("margin") is link_of("pixel_error_feature")  # the identity


def test_ratio_one_sits_at_each_clean_quantile() -> None:
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(200, 3, generator=gen) * 0.5
    names = ["margin", "recon_check_feature", "squeeze_median2"]
    t, g_t, spread = reference_quantiles(ref, names, 0.9)
    assert torch.allclose(t, torch.quantile(ref, 0.9, dim=0))
    for i, name in enumerate(names):
        assert float(g_t[i]) == pytest.approx(float(link_of(name)(t[i].double())), rel=1e-5)
    assert bool((spread > 0).all())
    flat = reference_quantiles(torch.zeros(10, 1), ["margin"], 0.9)[2]  # no spread at all
    assert float(flat[0]) > 0


@pytest.mark.parametrize("purify", PURIFY_POLICIES)
def test_default_joint_fools_more_at_a_larger_eps_lowers_its_loss_and_is_judged_by_decide(
    purify: str,
) -> None:
    d = toy_default(purify)
    x, y = toy_inputs()
    small = run_adaptive("default_joint", d, x, y, eps=0.05, steps=20)
    attack = make_attack("default_joint", d, eps=0.3, steps=20)
    large = attack.run(x, y)
    assert int(small.success.sum()) < int(large.success.sum())
    for result in (small, large):
        assert torch.equal(result.success, defended_success(d, result.x_adv, y))
    before, after = _loss(attack, x, y), _loss(attack, large.x_adv, y)
    assert float(after.mean()) < float(before.mean())
    assert bool((after[large.success] < before[large.success]).all())


def test_default_joint_adds_the_purified_label_only_when_the_policy_purifies() -> None:
    x, y = toy_inputs()
    loss = {p: _loss(make_attack("default_joint", toy_default(p)), x, y) for p in PURIFY_POLICIES}
    assert torch.equal(loss["paper"], loss["consistent"])
    assert bool((loss["paper"] > loss["reject"]).all())  # C(x̂) is right at a clean input
    off = _loss(make_attack("default_joint", toy_default("paper"), w_purify=0.0), x, y)
    assert torch.equal(off, loss["reject"])


def test_default_joint_warns_when_every_score_at_its_quantile_is_still_flagged(
    default: DefaultDefense, caplog: pytest.LogCaptureFixture
) -> None:
    x, y = toy_inputs()
    where = "fmdefense.attacks.adaptive.default_joint"
    with caplog.at_level(logging.WARNING, logger=where):
        make_attack("default_joint", default, quantile=0.6).prepare(x, y, None)
        assert not caplog.records
        make_attack("default_joint", default).prepare(x, y, None)  # 0.9 is too lax here
    assert "lower quantile" in caplog.text


def test_square_reads_the_default_fused_excess(default: DefaultDefense) -> None:
    x = toy_inputs()[0]
    noisy = (x + torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 0.3).clamp(0, 1)
    dec = default.decide(torch.cat([x, noisy]))
    deficit, most = DEFICITS["default"](default, dec)
    assert most == 1.0 and bool(((deficit >= 0) & (deficit <= 1)).all())
    assert torch.equal(deficit > 0, dec.flagged) and bool(dec.flagged.any())


def test_default_registry_sweep_and_eval_mode(default: DefaultDefense, defense: FMDefense) -> None:
    assert DEFAULT_ATTACK["default"] == "default_joint"
    assert attacks_for("default") == ["cw_transfer", "square", "undefended", "default_joint"]
    assert "default_joint" not in attacks_for("fm")
    with pytest.raises(InputError, match="attacks DefaultDefense"):
        make_attack("default_joint", defense)
    with pytest.raises(InputError, match="quantile"):
        make_attack("default_joint", default, quantile=0.4)
    with pytest.raises(InputError, match="hinge"):
        make_attack("default_joint", default, hinge="square")
    x, y = toy_inputs()
    d = toy_default()
    assert d.autoencoders is not None
    for ae in d.autoencoders:
        ae.train()
    out = run_sweep(d, x, y, ["default_joint"], [0.3, 0.05], changes={"steps": 10}, checks=False)
    json.dumps(out)
    assert not any(ae.training for ae in d.autoencoders)  # held in a tuple, still put in eval
    assert out["defense"] == "default" and out["attacks"]["default_joint"]["params"]["steps"] == 10
    small, large = (row["attack_success"] for row in out["attacks"]["default_joint"]["per_eps"])
    assert small < large
