"""The target classifiers C that FM-Defense protects, one factory per dataset.

- `cw_mnist`: Carlini & Wagner's MNIST network (conv32-conv32-pool-conv64-conv64-pool-fc200-fc200).
- `small_resnet`: a ResNet with three stages of basic blocks for Fashion-MNIST.
- `small_vgg`: VGG-style blocks with global pooling, for faces (grey ORL 64×64 or RGB CelebA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.core.artifacts import load_module, save_artifact
from fmdefense.core.errors import ArtifactError
from fmdefense.core.validation import check_images

KIND = "classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    """What rebuilds a classifier: its architecture name and input/output sizes."""

    arch: str
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)
    num_classes: int = 10
    width: int = 32
    extra: dict[str, Any] = field(default_factory=dict)


class CWMnist(nn.Module):
    """Carlini & Wagner (2017) MNIST classifier: 3×3 convs without padding, dropout 0.5."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        c = cfg.in_channels
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        h, w = ((cfg.image_size[0] - 4) // 2 - 4) // 2, ((cfg.image_size[1] - 4) // 2 - 4) // 2
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * h * w, 200),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, cfg.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, 10)
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv-BN layers and an identity or 1×1 shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet for 28×28 inputs: stem, three stages (w, 2w, 4w) of two blocks, global pooling."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        w = cfg.width
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        blocks = []
        for c_in, c_out, stride in [(w, w, 1), (w, 2 * w, 2), (2 * w, 4 * w, 2)]:
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, cfg.num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) -> (B, 10)
        return self.head(self.stages(self.stem(x)))


class SmallVGG(nn.Module):
    """VGG-style face-identity network: four conv-conv-pool blocks, global pooling, dropout."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for c_out in (cfg.width, 2 * cfg.width, 4 * cfg.width, 8 * cfg.width):
            layers += [
                nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(c_in, cfg.num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.head(self.features(x))


ARCHITECTURES: dict[str, Callable[[ClassifierConfig], nn.Module]] = {
    "cw_mnist": CWMnist,
    "small_resnet": SmallResNet,
    "small_vgg": SmallVGG,
}

DATASET_CLASSIFIERS: dict[str, ClassifierConfig] = {
    "mnist": ClassifierConfig("cw_mnist"),
    "fmnist": ClassifierConfig("small_resnet", width=16),
    "orl": ClassifierConfig("small_vgg", image_size=(64, 64), num_classes=40, width=16),
    "celeba": ClassifierConfig("small_vgg", in_channels=3, image_size=(64, 64), num_classes=100),
}


class Classifier(nn.Module):
    """A network plus its config; validates inputs and returns logits (B, num_classes)."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        if cfg.arch not in ARCHITECTURES:
            raise ArtifactError(
                f"unknown classifier arch {cfg.arch!r}; known: {list(ARCHITECTURES)}"
            )
        self.cfg = cfg
        self.net = ARCHITECTURES[cfg.arch](cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Validated forward pass for public use (shape, dtype, range, finiteness)."""
        check_images(x, channels=self.cfg.in_channels, size=self.cfg.image_size)
        return self.net(x)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Labels (N,) for validated images, in eval mode, batched."""
        check_images(x, channels=self.cfg.in_channels, size=self.cfg.image_size)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = [
            self.net(x[i : i + batch_size].to(device)).argmax(1).cpu()
            for i in range(0, len(x), batch_size)
        ]
        self.train(was_training)
        return torch.cat(out)

    def save(self, folder: Path, metrics: dict[str, Any] | None = None) -> None:
        """Write config.json + model.safetensors (+ metrics.json) atomically."""
        save_artifact(
            folder, kind=KIND, config=asdict(self.cfg), tensors=self.state_dict(), metrics=metrics
        )

    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu") -> Classifier:
        """Rebuild from an artifact folder (no pickle); raises ArtifactError when broken."""
        return load_module(folder, KIND, lambda raw: cls(ClassifierConfig(**raw)), device)


def build_classifier(dataset: str) -> Classifier:
    """A fresh, untrained classifier with the default architecture for `dataset`."""
    if dataset not in DATASET_CLASSIFIERS:
        raise ArtifactError(
            f"no classifier for dataset {dataset!r}; known: {list(DATASET_CLASSIFIERS)}"
        )
    return Classifier(DATASET_CLASSIFIERS[dataset])
