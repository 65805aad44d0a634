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

`network_outputs` runs every network once per batch (the classifier once over x, both
reconstructions and the squeezed images stacked); `default_scores` reads the defense's scores
from those outputs, and the adaptive attack `default_joint` reads its own from the same outputs.
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


def pixel_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """‖x − x̂‖² per image.  (n, C, H, W) twice -> (n,)"""
    return (x - x_hat).pow(2).flatten(1).sum(1)


def autoencoder_errors(x: torch.Tensor, ae_i_x: torch.Tensor, ae_ii_x: torch.Tensor) -> Scores:
    """MagNet's two reconstruction errors (mean squared, mean absolute per pixel) of x from
    AE_I(x) and AE_II(x)."""
    return {
        "magnet_ae_i": (ae_i_x - x).pow(2).flatten(1).mean(1),
        "magnet_ae_ii": (ae_ii_x - x).abs().flatten(1).mean(1),
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


@dataclass(frozen=True)
class Outputs:
    """Every network output the scores read, from one batched pass over n inputs."""

    logits: torch.Tensor  # (n, K) C(x)
    dgmm_logits: torch.Tensor  # (n, classes) DGMM's class log-posteriors
    recon: dict[str, torch.Tensor]  # "feature" | "class_mean" -> (n, C, H, W)
    recon_logits: dict[str, torch.Tensor]  # the same keys -> (n, K) C(x̂)
    squeezed_logits: dict[str, torch.Tensor]  # squeezer name -> (n, K) C(squeeze(x))
    autoencoded: tuple[torch.Tensor, torch.Tensor] | None  # AE_I(x), AE_II(x): (n, C, H, W)

    @property
    def recon_label(self) -> torch.Tensor:
        """C(class-mean reconstruction) (n,): the purified label."""
        return self.recon_logits["class_mean"].argmax(1)

    @property
    def dgmm_label(self) -> torch.Tensor:
        """DGMM's class (n,)."""
        return self.dgmm_logits.argmax(1)


def network_outputs(
    classifier: nn.Module,
    vae: Any,
    autoencoders: tuple[nn.Module, nn.Module] | None,
    x: torch.Tensor,
    squeezers: tuple[str, ...],
    chunk: int = 256,
    squeeze_with: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> Outputs:
    """One encode, one decode of both z_u readings, and the classifier once over x, both
    reconstructions and every squeezed x stacked (in batches of `chunk`: larger ones run slower
    per image on a CPU).  x: (n, C, H, W). `squeeze_with` replaces squeezers by name (an
    adaptive attack's surrogate gradients; same forward values)."""
    fns = SQUEEZERS | (squeeze_with or {})
    n = len(x)
    z_s, z_u = vae.encode(x)
    dgmm_logits = vae.dgmm.logits(z_u)  # (n, classes)
    class_mean = vae.dgmm.means[dgmm_logits.argmax(1)]  # (n, K)
    recon = vae.decode(torch.cat([z_s, z_s]), torch.cat([z_u, class_mean]))  # (2n, C, H, W)
    stacked = torch.cat([x, recon, *(fns[name](x) for name in squeezers)])
    logits = torch.cat([classifier(b) for b in stacked.split(chunk)]).split(n)  # (n, K) each
    modes = ("feature", "class_mean")
    autoencoded = None if autoencoders is None else (autoencoders[0](x), autoencoders[1](x))
    return Outputs(
        logits=logits[0],
        dgmm_logits=dgmm_logits,
        recon=dict(zip(modes, recon.split(n), strict=True)),
        recon_logits=dict(zip(modes, logits[1:3], strict=True)),
        squeezed_logits=dict(zip(squeezers, logits[3:], strict=True)),
        autoencoded=autoencoded,
    )


def default_scores(x: torch.Tensor, out: Outputs) -> Scores:
    """Every score (n,) of the default defense, read at the label C(x), in its fixed order:
    pixel error and reconstruction check per z_u reading, DGMM's doubt, the margin, MagNet's
    errors, then one L1 softmax distance per squeezer."""
    label = out.logits.argmax(1)  # (n,)
    s: Scores = {}
    for mode, x_hat in out.recon.items():
        s[f"pixel_error_{mode}"] = pixel_error(x, x_hat)
        s[f"recon_check_{mode}"] = 1 - _true_prob(out.recon_logits[mode], label)
    s["dgmm_doubt"] = 1 - _true_prob(out.dgmm_logits, label)
    s["margin"] = margin_score(out.logits)
    if out.autoencoded is not None:
        s |= autoencoder_errors(x, *out.autoencoded)
    p = out.logits.softmax(1)
    for name, squeezed in out.squeezed_logits.items():
        s[f"squeeze_{name}"] = (squeezed.softmax(1) - p).abs().sum(1)
    return s
