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
