"""FM-Defense's settings and what it needs of a combo-VAE; every field is validated."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from fmdefense.core.config import (
    check_choice,
    check_int,
    check_range,
    dataclass_kwargs,
)
from fmdefense.core.errors import InputError
from fmdefense.core.precision import PRECISIONS
from fmdefense.defenses.fm.morphs import MorphConfig
from fmdefense.defenses.fm.purifier import Z_U_MODES
from fmdefense.defenses.fm.thresholds import THRESHOLD_MODES


def check_codes(codes: object) -> None:
    """ "all", "auto" or a non-empty tuple of distinct non-negative code indices."""
    if codes in ("all", "auto"):
        return
    items = list(codes) if isinstance(codes, tuple | list) else []
    ok = len(items) > 0
    ok = ok and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in items)
    if not ok or len(set(items)) != len(items):
        raise InputError(
            f"codes must be 'all', 'auto' or distinct non-negative indices, got {codes!r}"
        )


class MorphableVAE(Protocol):
    """What the defense needs of a combo-VAE (fmdefense.models.combo_vae.ComboVAE)."""

    num_codes: int

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def codes(self, x: torch.Tensor) -> torch.Tensor: ...
    def decode_codes(
        self, codes: torch.Tensor, z_u: torch.Tensor | None = None
    ) -> torch.Tensor: ...
    def reconstruct(self, x: torch.Tensor, z_u_mode: str = "feature") -> torch.Tensor: ...
    def parameters(self) -> Iterator[nn.Parameter]: ...
    def state_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class FMDefenseConfig:
    """Defense settings; paper values where the paper gives them (IV.A)."""

    codes: str | tuple[int, ...] = "all"  # "all", "auto" (chosen on VAL) or code indices
    n_auto_codes: int = 10  # how many codes "auto" keeps
    n_morphs: int = 100  # N
    draws_per_iter: int = 10  # B
    step_frac: float = 0.05  # Δr, fraction of the normal-range width
    max_iters: int = 2000
    range_quantiles: tuple[float, float] = (0.01, 0.99)
    rho: float = 0.999  # clean pass rate on VAL
    threshold_mode: str = "per_code"  # per_code (paper) | unified | joint
    eta: float = 0.9  # θ_d = η-fractile of Dis over suspicious VAL
    z_u_mode: str = "auto"  # feature | class_mean | auto (better on VAL)
    batch_size: int = 128  # morphs per decode+classify batch (fastest on the 2-core CPU)
    channels_last: bool = True  # convert both networks' memory format (in place) for speed
    chunk_size: int = 32  # instances per morph chunk
    precision: str = "auto"  # morphs: auto | fp32 | bf16 (autocast); input labels stay fp32
    # torch.compile the morph decode + classify (static shapes: batches padded to batch_size);
    # pays back its compile time only over many morphs (benchmarks/morph_throughput.py)
    compile: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("threshold_mode", self.threshold_mode, THRESHOLD_MODES)
        check_choice("z_u_mode", self.z_u_mode, (*Z_U_MODES, "auto"))
        check_choice("precision", self.precision, PRECISIONS)
        check_codes(self.codes)
        for name in ("n_auto_codes", "n_morphs", "draws_per_iter", "max_iters"):
            check_int(name, getattr(self, name), low=1)
        for name in ("batch_size", "chunk_size", "seed"):
            check_int(name, getattr(self, name), low=0 if name == "seed" else 1)
        check_range("rho", self.rho, 0.0, 1.0, low_open=True)
        check_range("eta", self.eta, 0.0, 1.0)
        check_range("step_frac", self.step_frac, 0.0, 1.0, low_open=True)
        q = self.range_quantiles
        if len(q) != 2 or not 0.0 <= q[0] < q[1] <= 1.0:
            raise InputError(f"range_quantiles must be (lo, hi) with 0 <= lo < hi <= 1, got {q}")
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, raw: object) -> FMDefenseConfig:
        """Rebuild from JSON: unknown or missing keys and wrong types give one clear line."""
        d = dataclass_kwargs(cls, raw, "FMDefenseConfig", tuples=True)
        if isinstance(d["codes"], list):
            d["codes"] = tuple(d["codes"])
        return cls(**d)

    @property
    def morph(self) -> MorphConfig:
        return MorphConfig(
            self.n_morphs, self.draws_per_iter, self.step_frac, self.max_iters, self.seed
        )
