"""Purifier (paper III.D): reconstruct with the combo-VAE, then classify the reconstruction.

z_s comes from E_s's mean; z_u is read one of two ways, since the paper is ambiguous:
"feature" (DGMM's own feature vector of x) or "class_mean" (the mean μ_ĉ of DGMM's most likely
class). Both are kept; the detector picks the better on VAL unless told.
"""

from __future__ import annotations

from typing import Protocol

import torch

Z_U_MODES = ("feature", "class_mean")


class Reconstructor(Protocol):
    def reconstruct(self, x: torch.Tensor, z_u_mode: str = "feature") -> torch.Tensor: ...


@torch.inference_mode()
def purified_labels(
    vae: Reconstructor,
    classify: torch.nn.Module,
    x: torch.Tensor,
    z_u_mode: str,
    batch_size: int = 512,
) -> torch.Tensor:
    """Labels (n,) of the classifier on the combo-VAE reconstructions of x (n, C, H, W)."""
    if z_u_mode not in Z_U_MODES:
        raise ValueError(f"unknown z_u mode {z_u_mode!r}; choose one of {Z_U_MODES}")
    device = next(classify.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        recon = vae.reconstruct(x[i : i + batch_size].to(device), z_u_mode=z_u_mode)
        out.append(classify(recon).argmax(1).cpu())
    return torch.cat(out)
