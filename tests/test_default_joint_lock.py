"""`default_joint`'s two phases against the 1-bit squeezer: the surrogate rounding and the lock
that keeps the rounding pattern of x′ once C∘round is fooled."""

from __future__ import annotations

from typing import cast

import pytest
import torch

from fmdefense.attacks.adaptive import make_attack
from fmdefense.attacks.adaptive.default_joint import DefaultJointPGD, soft_bits
from tests.test_adaptive import toy_default, toy_inputs


def test_soft_bits_rounds_exactly_and_its_gradient_falls_where_a_pixel_can_cross() -> None:
    x = torch.tensor([0.1, 0.45, 0.5, 0.55, 0.9], requires_grad=True)
    out = soft_bits(0.05)(x)
    assert torch.equal(out.detach(), torch.round(x.detach()))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert float(grad[2]) == pytest.approx(1 / (4 * 0.05))  # the sigmoid's slope at 0.5
    assert float(grad[0]) < float(grad[2]) / 100 > float(grad[4])  # far from 0.5: little pull
    (straight,) = torch.autograd.grad(soft_bits(0.0)(x).sum(), x)
    assert torch.equal(straight, torch.ones(5))  # tau = 0: the defense's straight-through


def test_the_lock_keeps_the_rounding_pattern_inside_the_ball_until_the_next_restart() -> None:
    d = toy_default()
    x, _ = toy_inputs()
    attack = cast(DefaultJointPGD, make_attack("default_joint", d, eps=0.3, steps=10))
    assert attack.locks and attack.lock_step == 5
    with torch.no_grad():
        wrong = 1 - d.classifier(torch.round(x)).argmax(1)  # C∘round fooled on every row
    idx = torch.arange(len(x))
    attack.prepare(x, wrong, None)
    attack.begin_step(0, x, wrong, idx)
    attack.begin_step(attack.lock_step, x, wrong, idx)
    moved = x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 0.5)
    locked = attack.project_at(moved, x, idx)
    assert torch.equal(torch.round(locked), torch.round(x))
    assert float((locked - x).abs().max()) <= 0.3 + 1e-6
    assert float(locked.min()) >= 0 and float(locked.max()) <= 1
    attack.begin_step(0, x, wrong, idx)  # a new restart unlocks
    assert torch.equal(attack.project_at(moved, x, idx), attack.project(moved, x))


def test_the_lock_is_set_only_where_the_rounded_input_is_already_fooled() -> None:
    d = toy_default()
    x, _ = toy_inputs()
    with torch.no_grad():
        right = d.classifier(torch.round(x)).argmax(1)  # C∘round is right: nothing to keep
    attack = cast(DefaultJointPGD, make_attack("default_joint", d, eps=0.3, steps=10))
    idx = torch.arange(len(x))
    attack.prepare(x, right, None)
    attack.begin_step(attack.lock_step, x, right, idx)
    moved = x + 0.2
    assert torch.equal(attack.project_at(moved, x, idx), attack.project(moved, x))
    off = cast(DefaultJointPGD, make_attack("default_joint", d, lock_at=0.0))
    assert not off.locks


def test_restart_zero_starts_at_the_input_and_each_phase_runs_its_own_schedule() -> None:
    d = toy_default()
    attack = cast(DefaultJointPGD, make_attack("default_joint", d, eps=0.3, steps=100))
    assert not attack.starts_at_random(0) and attack.starts_at_random(1)
    assert attack.replace(first_at_input=False).starts_at_random(0)
    assert not attack.replace(random_start=False).starts_at_random(1)
    first, last = attack.step_size_at(0), attack.step_size_at(attack.lock_step - 1)
    assert first == pytest.approx(0.3 / 4) and last == pytest.approx(first / 8)
    assert attack.step_size_at(attack.lock_step) == pytest.approx(first)  # phase 2 starts afresh
    off = cast(DefaultJointPGD, make_attack("default_joint", d, eps=0.3, steps=100, lock_at=0.0))
    assert off.step_size_at(50) == pytest.approx(first / 4)  # one schedule without the lock


def test_phase_one_pulls_the_pixel_space_scores_down_as_well() -> None:
    d = toy_default()
    x, y = toy_inputs()
    x = (x + 0.6 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    attack = cast(DefaultJointPGD, make_attack("default_joint", d, eps=0.3, steps=10))
    attack.prepare(x, y, None)
    quiet = attack.replace(w_stealth=0.0)
    quiet.prepare(x, y, None)
    loud = attack.phase_one_loss(x, y) - quiet.phase_one_loss(x, y)  # the hidden scores' hinge
    linked = attack.linked_scores(x, y)[0]
    hidden = [i for i, k in enumerate(d.names_) if k.startswith(("pixel_error_", "magnet_ae_"))]
    expected = attack.excess(linked)[:, hidden].sum(1)  # (n,), the loss is offset by 1e6
    assert hidden and bool((expected > 1).all())
    assert torch.allclose(loud, expected, atol=0.2)
