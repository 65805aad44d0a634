"""MagNet's training: both autoencoders on clean images plus Gaussian noise (MSE to the clean
image), as in Meng & Chen (2017). Seeded: the batch order and the noise come from the config's
seed, the initial weights too (`MagNetAutoencoders`), so one command gives one model."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from fmdefense.core.validation import check_images
from fmdefense.models.magnet import MagNetAutoencoders

log = logging.getLogger(__name__)


def train_magnet(model: MagNetAutoencoders, x: torch.Tensor, device: torch.device) -> list[float]:
    """Train both autoencoders on clean images x (n, C, H, W); the mean loss of each epoch."""
    cfg = model.cfg
    check_images(x, channels=cfg.in_channels, size=cfg.image_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history = []
    for epoch in range(cfg.epochs):
        perm, total = torch.randperm(len(x), generator=gen), 0.0
        for i in tqdm(
            range(0, len(x), cfg.batch_size), desc=f"MagNet {epoch + 1}", leave=False, disable=None
        ):
            xb = x[perm[i : i + cfg.batch_size]]
            noisy = (xb + cfg.noise * torch.randn(xb.shape, generator=gen)).clamp(0, 1).to(device)
            xb = xb.to(device)
            loss = (model.ae1(noisy) - xb).pow(2).mean() + (model.ae2(noisy) - xb).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(xb)
        history.append(total / len(x))
        log.info("MagNet epoch %d: loss %.5f", epoch + 1, history[-1])
    model.eval()
    return history
