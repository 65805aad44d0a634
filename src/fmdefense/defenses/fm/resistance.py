"""Resistance r_i(x): share of the N morphs of code i that keep the label C(x) of the input."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fmdefense.defenses.fm.morphs import morph_rows

Decoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (codes, z_u) -> images
Labeller = Callable[[torch.Tensor], torch.Tensor]  # images -> labels


@torch.inference_mode()
def resistance(
    codes: torch.Tensor,
    z_u: torch.Tensor,
    labels: torch.Tensor,
    code_idx: torch.Tensor,
    deltas: torch.Tensor,
    decode: Decoder,
    classify: Labeller,
    batch_size: int = 512,
) -> torch.Tensor:
    """Resistance (n, m) in [0, 1]: each morph decoded and classified in batches.

    codes: (n, M[, h, w]); z_u: (n, K) passed to the decoder beside each morph;
    labels: (n,) the classifier's label of each input; deltas: (n, m, N).
    """
    n, m, N = deltas.shape
    agree = torch.empty(n * m * N, dtype=torch.bool)
    for i in range(0, n * m * N, batch_size):
        stop = min(i + batch_size, n * m * N)
        morphs, owners = morph_rows(codes, code_idx, deltas, i, stop)  # (b, M[, h, w]), (b,)
        pred = classify(decode(morphs, z_u[owners]))
        agree[i:stop] = pred.cpu() == labels[owners]
    return agree.view(n, m, N).float().mean(-1)
