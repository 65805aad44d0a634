"""Factories `--classifier tests.user_model:NAME` imports in the tests (a user's own code)."""

from __future__ import annotations

import torch
from torch import nn


def small_mnist() -> nn.Module:
    """A tiny MNIST-shaped classifier: (n, 1, 28, 28) -> logits (n, 10)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))


def five_classes() -> nn.Module:
    """Logits of the wrong width for MNIST."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))


def not_a_module() -> object:
    return object()


def broken() -> nn.Module:
    """Fails on MNIST-shaped input (expects 3 channels)."""
    return nn.Conv2d(3, 10, 28)


def rgb_32() -> nn.Module:
    """A 3-channel 32×32 classifier with 4 classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
