"""The FMDefense object: fit on clean VAL, then accept, purify or reject every input.

defense = FMDefense(classifier, vae, FMDefenseConfig())
defense.fit(x_val)             # normal ranges, thresholds θ_r, θ_d, z_u reading
decision = defense.decide(x)   # resistance, distance, action, label per input
defense.save(path); FMDefense.load(path, classifier, vae)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from fmdefense.chunks import chunked
from fmdefense.defense.morphs import MorphConfig, draw_table, natural_deltas
from fmdefense.defense.purifier import Z_U_MODES, purified_labels
from fmdefense.defense.ranges import code_values, normal_ranges
from fmdefense.defense.resistance import resistance
from fmdefense.defense.thresholds import (
    THRESHOLD_MODES,
    distance,
    distance_threshold,
    flags,
    thresholds,
)
from fmdefense.errors import ArtifactError, InputError, NotFittedError
from fmdefense.training.checkpoint import load_tensors, read_config, save_artifact
from fmdefense.validation import check_images

log = logging.getLogger(__name__)
INPUT_LABELS = "fp32"  # C(x) and purified labels are float32 whatever the morph precision

KIND = "fm_defense"
ACCEPT, PURIFY, REJECT = 0, 1, 2
ACTIONS = ("accept", "purify", "reject")
REJECT_LABEL = -1


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
    precision: str = "fp32"  # morphs: fp32 | bf16 (autocast); input/purified labels stay fp32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.threshold_mode not in THRESHOLD_MODES:
            raise InputError(f"threshold_mode must be one of {THRESHOLD_MODES}")
        if self.z_u_mode not in (*Z_U_MODES, "auto"):
            raise InputError(f"z_u_mode must be one of {(*Z_U_MODES, 'auto')}")
        if self.precision not in ("fp32", "bf16"):
            raise InputError("precision must be fp32 or bf16")
        if not (0 < self.rho <= 1 and 0 <= self.eta <= 1 and self.n_morphs > 0):
            raise InputError("need 0 < rho <= 1, 0 <= eta <= 1 and n_morphs > 0")

    @property
    def morph(self) -> MorphConfig:
        return MorphConfig(
            self.n_morphs, self.draws_per_iter, self.step_frac, self.max_iters, self.seed
        )


@dataclass(frozen=True)
class InputDecision:
    """One input's verdict."""

    resistance: list[float]
    distance: float
    action: str
    label: int


@dataclass(frozen=True)
class Decision:
    """Verdicts for a batch: tensors over inputs, indexable per input."""

    resistance: torch.Tensor  # (n, m) in [0, 1]
    distance: torch.Tensor  # (n,) Dis(r, θ_r)
    action: torch.Tensor  # (n,) ACCEPT | PURIFY | REJECT
    label: torch.Tensor  # (n,) final label, REJECT_LABEL where rejected
    input_label: torch.Tensor = field(repr=False)  # (n,) C(x)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> InputDecision:
        return InputDecision(
            self.resistance[i].tolist(),
            float(self.distance[i]),
            ACTIONS[int(self.action[i])],
            int(self.label[i]),
        )

    def counts(self) -> dict[str, int]:
        """How many inputs were accepted, purified and rejected."""
        return {name: int((self.action == k).sum()) for k, name in enumerate(ACTIONS)}


def fingerprint_tensor(x: torch.Tensor) -> str:
    """SHA-256 of a tensor's values and shape (identifies an input set for resumable caches)."""
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint(module: Any) -> str:
    """SHA-256 of a module's weights, to tie a calibration to the models it was fitted on."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FMDefense:
    """FM-Defense detector and purifier around a classifier and a combo-VAE."""

    def __init__(self, classifier: nn.Module, vae: MorphableVAE, config: FMDefenseConfig) -> None:
        self.classifier = classifier
        self.vae = vae
        self.config = config
        if config.channels_last:  # same values, faster convolutions on CPU (guide §6)
            classifier.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            vae.to(memory_format=torch.channels_last)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ engine

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check(self, x: object) -> torch.Tensor:
        cfg = getattr(self.classifier, "cfg", None)
        channels = getattr(cfg, "in_channels", None)
        size = getattr(cfg, "image_size", None)
        return check_images(x, channels=channels, size=size)

    @torch.inference_mode()
    def _labels(self, x: torch.Tensor) -> torch.Tensor:
        """C(x) for a batch of images, always in float32: adversarial inputs sit on the
        decision boundary, and a bf16 C(x) flips some of them back to their true label."""
        return self.classifier(x.to(self.device)).argmax(1).cpu()

    @torch.inference_mode()
    def _morph_labels(self, x: torch.Tensor) -> torch.Tensor:
        """Labels of decoded morphs, at the configured precision (the engine's hot loop)."""
        with self._autocast():
            return self.classifier(x.to(self.device)).argmax(1).cpu()

    @torch.inference_mode()
    def _latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Manipulable codes (n, M[, h, w]) and z_u (n, K), on the CPU in float32."""
        xd = x.to(self.device)
        return self.vae.codes(xd).float().cpu(), self.vae.encode(xd)[1].float().cpu()

    def _decode(self, codes: torch.Tensor, z_u: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            images = self.vae.decode_codes(codes.to(self.device), z_u.to(self.device))
        if self.config.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def _chunk_resistance(
        self,
        x: torch.Tensor,
        code_idx: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Resistance (n, m) of a chunk against the given input labels C(x) (n,)."""
        codes, z_u = self._latents(x)
        values = code_values(codes)[:, code_idx]  # (n, m)
        table = self._table[:, code_idx]
        deltas = natural_deltas(values, lo[code_idx], hi[code_idx], table, self.config.morph)
        return resistance(
            codes,
            z_u,
            labels,
            code_idx,
            deltas,
            self._decode,
            self._morph_labels,
            self.config.batch_size,
        )

    def _relabelled(
        self,
        x: torch.Tensor,
        saved: dict[str, torch.Tensor],
        code_idx: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
    ) -> dict[str, torch.Tensor] | None:
        """Upgrade a chunk from before fp32 input labels (no "label" tensor): older versions
        compared the morphs with C(x) at the morph precision. Rows whose label is the same are
        kept (an input's morphs depend only on the input and the seed); the others are redone.
        Assumes the chunk was written on this device kind (its bf16 labels are recomputed here)."""
        if "label" in saved:
            return None
        label = self._labels(x)
        changed = (label != self._morph_labels(x)).nonzero().flatten()
        r = saved["r"].clone()
        if len(changed):
            r[changed] = self._chunk_resistance(x[changed], code_idx, lo, hi, label[changed])
        level = logging.INFO if len(changed) else logging.DEBUG
        log.log(level, "relabelled a cached chunk: %d of %d inputs redone", len(changed), len(x))
        return {"r": r, "label": label}

    def _resistance(
        self,
        x: torch.Tensor,
        code_idx: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        cache_dir: Path | None = None,
    ) -> torch.Tensor:
        """Resistance (n, m) chunk by chunk; with `cache_dir` finished chunks are kept/reused."""
        key = None
        if cache_dir is not None:
            key = {
                "morph": asdict(self.config.morph),
                "codes": code_idx.tolist(),
                "lo": lo.tolist(),
                "hi": hi.tolist(),
                "input": fingerprint_tensor(x),
                "classifier": fingerprint(self.classifier),
                "vae": fingerprint(self.vae),
                "precision": self.config.precision,
            }

        def compute(start: int, stop: int) -> dict[str, torch.Tensor]:
            label = self._labels(x[start:stop])
            return {
                "r": self._chunk_resistance(x[start:stop], code_idx, lo, hi, label),
                "label": label,
            }

        def upgrade(
            start: int, stop: int, saved: dict[str, torch.Tensor]
        ) -> dict[str, torch.Tensor] | None:
            return self._relabelled(x[start:stop], saved, code_idx, lo, hi)

        out = chunked(
            len(x),
            self.config.chunk_size,
            cache_dir,
            compute,
            config=key,
            desc="resistance",
            upgrade=upgrade,
        )
        return out["r"]

    @property
    def _table(self) -> torch.Tensor:
        if getattr(self, "_table_cache", None) is None:
            self._table_cache = draw_table(self.config.morph, self.vae.num_codes)
        return self._table_cache

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        x_val: torch.Tensor,
        y_val: torch.Tensor | None = None,
        cache_dir: Path | None = None,
    ) -> FMDefense:
        """Calibrate on clean VAL images: ranges, codes, θ_r, θ_d and the z_u reading.

        `y_val` (true labels) is only used to choose the z_u reading when z_u_mode is "auto";
        without it the purified label is compared with C(x). `cache_dir` makes it resumable.
        """
        x_val = self._check(x_val)
        cfg = self.config
        codes, _ = self._latents(x_val)
        self.lo_, self.hi_ = normal_ranges(codes, cfg.range_quantiles)
        all_idx = torch.arange(self.vae.num_codes)
        r_all = self._resistance(x_val, all_idx, self.lo_, self.hi_, cache_dir)  # (n, M)
        self.code_idx_ = self._select_codes(r_all)
        self.val_resistance_ = r_all[:, self.code_idx_]
        self.theta_ = thresholds(self.val_resistance_, cfg.rho, cfg.threshold_mode)
        self.theta_d_ = distance_threshold(self.val_resistance_, self.theta_, cfg.eta)
        suspicious = flags(self.val_resistance_, self.theta_)
        self.val_fpr_ = float(suspicious.float().mean())
        self.z_u_mode_, self.val_purify_acc_ = self._choose_z_u(x_val, y_val)
        self.input_labels_ = INPUT_LABELS
        self.fingerprints_ = {
            "classifier": fingerprint(self.classifier),
            "vae": fingerprint(self.vae),
        }
        log.info(
            "fitted on %d VAL images: %d codes, VAL FPR %.4f, θ_d %.3f, z_u %s",
            len(x_val),
            len(self.code_idx_),
            self.val_fpr_,
            self.theta_d_,
            self.z_u_mode_,
        )
        return self

    def _select_codes(self, r_all: torch.Tensor) -> torch.Tensor:
        """Code indices from the config; "auto" uses VAL resistance alone (see README).

        Auto rule: drop codes whose mean clean resistance is below 0.5 (they change the class
        itself, a significant feature), then keep the n_auto_codes codes with the lowest mean
        clean resistance — the codes whose morphs move the image the most while clean inputs
        still keep their label.
        """
        chosen = self.config.codes
        M = r_all.shape[1]
        if chosen == "all":
            return torch.arange(M)
        if chosen == "auto":
            mean = r_all.mean(0)
            order = [int(i) for i in torch.argsort(mean) if float(mean[i]) >= 0.5]
            return torch.tensor(sorted(order[: self.config.n_auto_codes]), dtype=torch.long)
        if isinstance(chosen, str):
            raise InputError(f"codes must be 'all', 'auto' or a list of indices, got {chosen!r}")
        idx = torch.tensor(list(chosen), dtype=torch.long)
        if len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= M:
            raise InputError(f"code indices must lie in [0, {M}), got {list(chosen)}")
        return idx

    def _choose_z_u(
        self, x_val: torch.Tensor, y_val: torch.Tensor | None
    ) -> tuple[str, dict[str, float]]:
        target = y_val if y_val is not None else self._batched_labels(x_val)
        acc = {
            mode: float((self._purified(x_val, mode) == target).float().mean())
            for mode in Z_U_MODES
        }
        if self.config.z_u_mode != "auto":
            return self.config.z_u_mode, acc
        return max(Z_U_MODES, key=lambda m: acc[m]), acc

    # ------------------------------------------------------------------ public API

    def _require_fit(self) -> None:
        if not hasattr(self, "theta_"):
            raise NotFittedError("this FMDefense is not calibrated: call fit(x_val) or load()")

    def _batched_labels(self, x: torch.Tensor) -> torch.Tensor:
        bs = self.config.batch_size
        return torch.cat([self._labels(x[i : i + bs]) for i in range(0, len(x), bs)])

    def _purified(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Labels of the purified inputs, in float32 like every final label (one decode each)."""
        return purified_labels(self.vae, self.classifier, x, mode, self.config.batch_size)

    def resistance(self, x: torch.Tensor, cache_dir: Path | None = None) -> torch.Tensor:
        """Resistance vectors (n, m) in [0, 1] over the selected codes (resumable with a cache)."""
        self._require_fit()
        x = self._check(x)
        return self._resistance(x, self.code_idx_, self.lo_, self.hi_, cache_dir)

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """Suspicious inputs (n,) bool: some r_i ≤ θ_i."""
        return flags(self.resistance(x), self.theta_)

    def purify(self, x: torch.Tensor, z_u_mode: str | None = None) -> torch.Tensor:
        """Labels (n,) of the purified (reconstructed) inputs, whatever the detector says;
        `z_u_mode` overrides the reading chosen at fit time."""
        self._require_fit()
        return self._purified(self._check(x), z_u_mode or self.z_u_mode_)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The protected classifier's own labels C(x) (n,), batched."""
        return self._batched_labels(self._check(x))

    def decide(self, x: torch.Tensor, cache_dir: Path | None = None) -> Decision:
        """Accept (label C(x)), purify (label C(D(E_s(x) ⊕ z_u))) or reject each input."""
        r = self.resistance(x, cache_dir)
        return self.decide_from_resistance(x, r)

    def decide_from_resistance(self, x: torch.Tensor, r: torch.Tensor) -> Decision:
        """`decide` with resistances already computed (for sweeps over thresholds)."""
        self._require_fit()
        x = self._check(x)
        dist = distance(r, self.theta_)
        suspicious = flags(r, self.theta_)
        action = torch.full((len(x),), ACCEPT, dtype=torch.long)
        action[suspicious & (dist <= self.theta_d_ + 1e-12)] = PURIFY
        action[suspicious & (dist > self.theta_d_ + 1e-12)] = REJECT
        input_label = self._batched_labels(x)
        label = input_label.clone()
        to_purify = action == PURIFY
        if bool(to_purify.any()):
            label[to_purify] = self._purified(x[to_purify], self.z_u_mode_)
        label[action == REJECT] = REJECT_LABEL
        return Decision(r, dist, action, label, input_label)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Final labels (n,): REJECT_LABEL (−1) where rejected, purified labels where salvaged."""
        return self.decide(x).label

    # ------------------------------------------------------------------ persistence

    def save(self, folder: Path) -> None:
        """Write the calibrated state (config.json + model.safetensors + metrics.json)."""
        self._require_fit()
        config = {
            "defense": asdict(self.config),
            "theta_d": self.theta_d_,
            "z_u_mode": self.z_u_mode_,
            "fingerprints": self.fingerprints_,
            "input_labels": self.input_labels_,
        }
        tensors = {
            "lo": self.lo_,
            "hi": self.hi_,
            "theta": self.theta_,
            "code_idx": self.code_idx_,
            "val_resistance": self.val_resistance_,
        }
        metrics = {
            "val_fpr": self.val_fpr_,
            "val_purify_accuracy": self.val_purify_acc_,
            "val_images": len(self.val_resistance_),
        }
        save_artifact(folder, kind=KIND, config=config, tensors=tensors, metrics=metrics)

    @classmethod
    def load(
        cls, folder: Path, classifier: nn.Module, vae: MorphableVAE, *, strict: bool = True
    ) -> FMDefense:
        """Rebuild a calibrated defense; with `strict`, refuse models other than those fitted."""
        raw = read_config(folder, KIND)
        d = dict(raw["defense"])
        d["range_quantiles"] = tuple(d["range_quantiles"])
        if isinstance(d["codes"], list):
            d["codes"] = tuple(d["codes"])
        defense = cls(classifier, vae, FMDefenseConfig(**d))
        if strict:
            for name, module in (("classifier", classifier), ("vae", vae)):
                if fingerprint(module) != raw["fingerprints"][name]:
                    raise ArtifactError(
                        f"{folder} was calibrated for another {name}'s weights; "
                        "recalibrate (fmdefense calibrate) or pass strict=False"
                    )
        t = load_tensors(Path(folder) / "model.safetensors")
        defense.lo_, defense.hi_, defense.theta_ = t["lo"], t["hi"], t["theta"]
        defense.code_idx_, defense.val_resistance_ = t["code_idx"].long(), t["val_resistance"]
        defense.theta_d_, defense.z_u_mode_ = float(raw["theta_d"]), str(raw["z_u_mode"])
        defense.fingerprints_ = dict(raw["fingerprints"])
        defense.input_labels_ = str(raw.get("input_labels", "morph precision"))
        if defense.input_labels_ != INPUT_LABELS and defense.config.precision != "fp32":
            log.warning("%s was calibrated with bf16 input labels: recalibrate it", folder)
        defense.val_fpr_ = float(flags(defense.val_resistance_, defense.theta_).float().mean())
        return defense

    def with_config(self, **changes: Any) -> FMDefense:
        """A copy with other threshold settings, refitted from the stored VAL resistance."""
        self._require_fit()
        clone = FMDefense(self.classifier, self.vae, dataclasses.replace(self.config, **changes))
        for key, value in vars(self).items():
            if key.endswith("_") and not key.startswith("_"):
                setattr(clone, key, value)
        clone.theta_ = thresholds(
            clone.val_resistance_, clone.config.rho, clone.config.threshold_mode
        )
        clone.theta_d_ = distance_threshold(clone.val_resistance_, clone.theta_, clone.config.eta)
        clone.val_fpr_ = float(flags(clone.val_resistance_, clone.theta_).float().mean())
        return clone
