"""Suspicion scores the classifier, the combo-VAE and pixel-space autoencoders give without any
adversarial data. Each is (n,), larger = more suspicious, and differentiable where its model is
(adaptive attacks go through them; the bit-depth squeezer's rounding passes its gradient
straight through).

- combo-VAE (one encode, two decodes): pixel error ‖x − x̂‖² for both z_u readings, the
  reconstruction check 1 − p_C(x̂)[C(x)] for both, DGMM's doubt 1 − p_DGMM[C(x)];
- classifier: the negated logit margin (minimal-perturbation attacks stop at the boundary);
- MagNet's autoencoders (Meng & Chen 2017): ‖x − AE_I(x)‖² and ‖x − AE_II(x)‖₁ per pixel;
- feature squeezing (Xu et al., NDSS 2018): ‖softmax C(x) − softmax C(squeeze(x))‖₁ for a 1-bit
  depth reduction and a 2 × 2 median filter (their MNIST squeezers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Scores = dict[str, torch.Tensor]


def _true_prob(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """p[label] from logits (n, K) and labels (n,) -> (n,)."""
    return logits.softmax(1).gather(1, label.view(-1, 1)).squeeze(1)


def margin_score(logits: torch.Tensor) -> torch.Tensor:
    """−(top-1 logit − top-2 logit): near 0 on the decision boundary.  (n, K) -> (n,)"""
    top = logits.topk(2, dim=1).values
    return -(top[:, 0] - top[:, 1])


@dataclass(frozen=True)
class VAEReadout:
    """What one encode and two decodes give: the scores, and the labels a purifier needs."""

    scores: Scores
    recon_label: torch.Tensor  # (n,) C(class-mean reconstruction): the purified label
    dgmm_label: torch.Tensor  # (n,) DGMM's class
    recon: torch.Tensor  # (n, C, H, W) the class-mean reconstruction


def combo_vae_scores(
    classifier: nn.Module, vae: Any, x: torch.Tensor, logits: torch.Tensor
) -> VAEReadout:
    """Pixel errors, reconstruction checks (both z_u readings) and DGMM's doubt about C(x)."""
    label = logits.argmax(1)  # (n,)
    z_s, z_u = vae.encode(x)
    dgmm_logits = vae.dgmm.logits(z_u)  # (n, classes)
    recon = {
        "feature": vae.decode(z_s, z_u),  # (n, C, H, W)
        "class_mean": vae.decode(z_s, vae.dgmm.means[dgmm_logits.argmax(1)]),
    }
    out: Scores = {}
    recon_logits = {}
    for mode, x_hat in recon.items():
        out[f"pixel_error_{mode}"] = (x - x_hat).pow(2).flatten(1).sum(1)
        recon_logits[mode] = classifier(x_hat)
        out[f"recon_check_{mode}"] = 1 - _true_prob(recon_logits[mode], label)
    out["dgmm_doubt"] = 1 - _true_prob(dgmm_logits, label)
    return VAEReadout(
        out, recon_logits["class_mean"].argmax(1), dgmm_logits.argmax(1), recon["class_mean"]
    )


def autoencoder_scores(ae_i: nn.Module, ae_ii: nn.Module, x: torch.Tensor) -> Scores:
    """MagNet's two reconstruction errors (mean squared, mean absolute per pixel)."""
    return {
        "magnet_ae_i": (ae_i(x) - x).pow(2).flatten(1).mean(1),
        "magnet_ae_ii": (ae_ii(x) - x).abs().flatten(1).mean(1),
    }


def bit_depth(x: torch.Tensor, bits: int = 1) -> torch.Tensor:
    """Round every pixel to 2^bits levels; the gradient passes straight through (BPDA, so an
    adaptive attack is not stopped by the rounding's zero gradient)."""
    levels = 2**bits - 1
    rounded = torch.round(x * levels) / levels
    return x + (rounded - x).detach()


def median_filter(x: torch.Tensor, size: int = 2) -> torch.Tensor:
    """Median over size × size windows (padded right/bottom by reflection), same shape."""
    pad = size - 1
    padded = F.pad(x, (0, pad, 0, pad), mode="reflect")
    n, c, h, w = x.shape
    patches = F.unfold(padded, size)  # (n, c·size², h·w)
    return patches.view(n, c, size * size, h * w).median(2).values.view(n, c, h, w)


SQUEEZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "bits1": lambda x: bit_depth(x, 1),
    "median2": lambda x: median_filter(x, 2),
}


def squeeze_scores(
    classifier: nn.Module, x: torch.Tensor, logits: torch.Tensor, squeezers: tuple[str, ...]
) -> Scores:
    """L1 distance of the softmax before and after each squeezer."""
    p = logits.softmax(1)
    return {
        f"squeeze_{name}": (classifier(SQUEEZERS[name](x)).softmax(1) - p).abs().sum(1)
        for name in squeezers
    }
