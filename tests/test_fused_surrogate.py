"""The differentiable stand-in for the default's fused statistic that `default_joint` aims at."""

from __future__ import annotations

import torch

from fmdefense.attacks.adaptive.default_joint import link_of
from fmdefense.attacks.adaptive.fused_surrogate import (
    raw_from_linked,
    smooth_log_pvalues,
    smooth_statistic,
)
from fmdefense.defenses import fusion
from tests.test_adaptive import toy_default, toy_inputs


def test_raw_from_linked_inverts_every_link() -> None:
    names = ["recon_check_feature", "dgmm_doubt", "squeeze_bits1", "margin", "pixel_error_x"]
    raw = torch.tensor([[0.3, 1e-6, 1.5, -4.0, 12.0], [0.999, 0.5, 0.01, -0.1, 0.5]])
    linked = torch.stack([link_of(n)(raw[:, i]) for i, n in enumerate(names)], 1)
    assert torch.allclose(raw_from_linked(linked, names), raw, rtol=1e-4, atol=1e-9)


def test_smooth_pvalues_follow_the_defense_and_have_a_gradient_inside_the_clean_range() -> None:
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 3, generator=gen)
    s = torch.linspace(-2, 5, 50).view(-1, 1).repeat(1, 3).requires_grad_(True)
    smooth = smooth_log_pvalues(ref, s, "exponential")
    exact = fusion.log_pvalues(ref, s.detach(), "exponential")
    assert float((smooth.detach().exp() - exact.exp()).abs().max()) < 0.1  # close on the p scale
    beyond = s.detach() > ref.max(0).values
    assert torch.equal(smooth[beyond].detach(), exact[beyond])  # the defense's own tail
    (grad,) = torch.autograd.grad(smooth.sum(), s)
    assert bool((grad[~beyond] < 0).all())  # larger score, smaller p: a pull everywhere


def test_smooth_statistic_is_close_to_the_fused_statistic_of_the_toy_default() -> None:
    d = toy_default()
    x, _ = toy_inputs()
    scores = d.score(x)
    raw = torch.stack([scores[k] for k in d.names_], 1)
    approx = smooth_statistic(d, raw)
    assert float((approx - scores["fused"].double()).abs().max()) < 1.0
