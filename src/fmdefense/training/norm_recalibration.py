"""Decoder batch-norm statistics re-estimated on what inference decodes: posterior means.

Stage 2 trains the decoder on sampled codes z_s = μ + σ·ε, so the running statistics of its
BatchNorm layers describe noisy codes; reconstructions, morphs and the defense decode μ. Where σ
stays near the prior's (image-sized face maps: ≈ 0.007 nats per unit) the two differ, and
eval-mode reconstructions drift (ORL, 16 maps of 64 × 64: C recognised 37.5 % of the test
reconstructions in eval mode, 92.5 % after re-estimation). One pass of the training images through
torch's `update_bn` (its SWA utility: cumulative averages, no momentum) re-estimates them; the
encoder and DGMM keep theirs (they see images, in training as at inference).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from fmdefense.core.config import check_int
from fmdefense.core.validation import check_images
from fmdefense.models.combo_vae import ComboVAE

log = logging.getLogger(__name__)


class _PosteriorMeanDecoder(nn.Module):
    """x -> D(μ(x) ⊕ z_u(x)) with the decoder as the only submodule, so `update_bn` resets and
    re-estimates the decoder's statistics alone; E_s and DGMM run in eval mode, without grads."""

    def __init__(self, vae: ComboVAE) -> None:
        super().__init__()
        self.decoder = vae.decoder
        self._encode = vae.encode  # a bound method: not registered, left in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        z_s, z_u = self._encode(x)
        return self.decoder(z_s, z_u)


def decoder_norm_layers(vae: ComboVAE) -> int:
    """How many BatchNorm layers the decoder has (0 for the vector variant: nothing to redo)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in vae.decoder.modules())


def recalibrate_decoder_norms(
    vae: ComboVAE, x: torch.Tensor, device: torch.device, batch_size: int = 64
) -> int:
    """Re-estimate the decoder's BatchNorm statistics on posterior-mean codes of `x` (training
    images, never test ones); returns the number of layers re-estimated. Leaves `vae` in eval."""
    check_int("batch_size", batch_size, low=2)
    x = check_images(x, channels=vae.cfg.in_channels, size=vae.cfg.image_size)
    vae.to(device).eval()
    layers = decoder_norm_layers(vae)
    if layers:
        batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
        update_bn(batches, _PosteriorMeanDecoder(vae), device=device)
        log.info("decoder: %d BatchNorm layers re-estimated on %d posterior means", layers, len(x))
    vae.eval()
    return layers
