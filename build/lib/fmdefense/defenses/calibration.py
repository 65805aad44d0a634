"""What MagNet and Defense-GAN share: detection thresholds at a clean "drop" rate, and an
artifact holding their networks' weights beside those thresholds (the format both have written
since before the defense contract: config.json = the network config, model.safetensors = the
weights plus one threshold tensor, NaN when saved unfitted)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from fmdefense.core.artifacts import WEIGHTS_FILE, load_tensors, read_config, read_metrics
from fmdefense.core.errors import ArtifactError, InputError

C = TypeVar("C")
N = TypeVar("N", bound=nn.Module)


def drop_rate_threshold(scores: torch.Tensor, drop_rate: float) -> torch.Tensor:
    """Threshold of each score column so that flagging scores strictly above it flags at most
    `drop_rate` of the clean scores (the ⌊rate·n⌋-th largest value). (n[, k]) -> ([k])"""
    allowed = int(drop_rate * len(scores) + 1e-9)
    ordered = torch.sort(scores, dim=0, descending=True).values
    return ordered[min(allowed, len(scores) - 1)]


@dataclass(frozen=True)
class NetworkArtifact(Generic[C, N]):
    """A loaded artifact: its config, its network (weights in, eval mode, on the CPU), the
    stored threshold tensor (None when saved unfitted) and the recorded VAL false-positive rate."""

    config: C
    network: N
    threshold: torch.Tensor | None
    val_fpr: float


def read_network_artifact(
    folder: Path,
    kind: str,
    config_from: Callable[[dict[str, Any]], C],
    build: Callable[[C], N],
    *,
    threshold_key: str,
    threshold_shape: tuple[int, ...],
    prefix: str = "",
    models: dict[str, Any] | None = None,
) -> NetworkArtifact[C, N]:
    """Read a MagNet/Defense-GAN-style artifact; every mismatch is an ArtifactError naming it.

    `prefix` is stripped from the weight names (Defense-GAN's "generator."); `models` are
    extra models a caller passed to `load`, which these defenses do not take.
    """
    if models:
        raise InputError(f"a {kind} artifact takes no other models, got {sorted(models)}")
    try:
        config = config_from(read_config(folder, kind))
    except (InputError, TypeError) as exc:
        raise ArtifactError(f"{folder}/config.json: {exc}") from exc
    tensors = load_tensors(Path(folder) / WEIGHTS_FILE)
    threshold = tensors.pop(threshold_key, None)
    if threshold is None or tuple(threshold.shape) != threshold_shape:
        raise ArtifactError(f"{folder}/{WEIGHTS_FILE} lacks {threshold_key!r} {threshold_shape}")
    network = build(config)
    try:
        network.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()})
    except RuntimeError as exc:
        raise ArtifactError(f"weights in {folder} do not match its config: {exc}") from exc
    fitted = bool(torch.isfinite(threshold).all())
    val_fpr = float(read_metrics(folder).get("val_fpr", float("nan")))
    return NetworkArtifact(config, network.eval(), threshold.float() if fitted else None, val_fpr)
