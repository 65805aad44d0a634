"""The FMDefense object: fit on clean VAL, then accept, purify or reject every input.

defense = FMDefense(classifier, vae, FMDefenseConfig())
defense.fit(x_val)             # normal ranges, thresholds θ_r, θ_d, z_u reading
decision = defense.decide(x)   # resistance, distance, action, label per input
defense.save(path); FMDefense.load(path, classifier, vae)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.core.artifacts import load_tensors, read_config, save_artifact
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.core.fingerprints import fingerprint
from fmdefense.defenses.base import ACCEPT, PURIFY, Decision, Defense
from fmdefense.defenses.fm.config import FMDefenseConfig, MorphableVAE
from fmdefense.defenses.fm.engine import MorphEngine
from fmdefense.defenses.fm.purifier import Z_U_MODES, purified_labels
from fmdefense.defenses.fm.ranges import normal_ranges
from fmdefense.defenses.fm.sequential import SequentialConfig
from fmdefense.defenses.fm.thresholds import (
    distance,
    distance_threshold,
    flags,
    thresholds,
)
from fmdefense.defenses.rule import apply_rule

log = logging.getLogger(__name__)
INPUT_LABELS = "fp32"  # C(x) and purified labels are float32 whatever the morph precision

KIND = "fm_defense"
THRESHOLD_FIELDS = {"rho", "threshold_mode", "eta"}  # what with_config may change


class FMDefense(Defense):
    """FM-Defense detector and purifier around a classifier and a combo-VAE."""

    name = "fm"
    kind = KIND
    fitted_attribute = "theta_"

    def __init__(self, classifier: nn.Module, vae: MorphableVAE, config: FMDefenseConfig) -> None:
        self.classifier = classifier
        self.vae = vae
        self.config = config
        if config.channels_last:  # same values, faster convolutions on CPU (guide §6)
            classifier.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            vae.to(memory_format=torch.channels_last)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ engine

    @property
    def engine(self) -> MorphEngine:
        """The morph engine of the current models and config (rebuilt when they change)."""
        engine: MorphEngine | None = getattr(self, "_engine", None)
        if engine is None or engine.config != self.config:
            engine = self._engine = MorphEngine(self.classifier, self.vae, self.config)
        return engine

    def _labels(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine.labels(x)

    def _morph_labels(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine.morph_labels(x)

    def _latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.engine.latents(x)

    def _resistance(
        self,
        x: torch.Tensor,
        code_idx: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        cache_dir: Path | None = None,
    ) -> torch.Tensor:
        return self.engine.resistance(x, code_idx, lo, hi, cache_dir)

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
        if isinstance(cfg.codes, str):  # "all", or "auto" choosing on every code's VAL r
            r_all = self._resistance(
                x_val, torch.arange(self.vae.num_codes), self.lo_, self.hi_, cache_dir
            )  # (n, M)
            self.code_idx_ = self._select_codes(r_all)
            self.val_resistance_ = r_all[:, self.code_idx_]
        else:  # given codes: only their morphs (the sets' resistance is computed the same way)
            self.code_idx_ = self._select_codes(torch.empty(0, self.vae.num_codes))
            self.val_resistance_ = self._resistance(
                x_val, self.code_idx_, self.lo_, self.hi_, cache_dir
            )  # (n, m)
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

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Suspicion from the resistance (n,) each: 1 − min_i r_i, 1 − mean_i r_i, Dis(r, θ)."""
        return self._scores(self.resistance(x))

    def _scores(self, r: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "resistance_min": 1 - r.min(1).values,
            "resistance_mean": 1 - r.mean(1),
            "distance": distance(r, self.theta_),
        }

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

    def decide_sequential(
        self, x: torch.Tensor, config: SequentialConfig | None = None
    ) -> Decision:
        """`decide` with early stopping of the morphs (exact: identical actions; confidence: at
        its error rates). details: resistance estimates and the morphs decoded per input."""
        self._require_fit()
        x = self._check(x)
        cfg = config or SequentialConfig()
        parts = [
            self.engine.sequential(
                x[i : i + self.config.chunk_size],
                self.code_idx_,
                self.lo_,
                self.hi_,
                self.theta_,
                self.theta_d_,
                cfg,
            )
            for i in range(0, len(x), self.config.chunk_size)
        ]
        action, r_hat, used, input_label = (torch.cat(p) for p in zip(*parts, strict=True))
        purify = action == PURIFY
        purified = input_label.clone()
        if bool(purify.any()):
            purified[purify] = self._purified(x[purify], self.z_u_mode_)
        _, label = apply_rule(action != ACCEPT, purify, input_label, purified)
        details = {"resistance_estimate": r_hat, "morphs": used}
        return Decision(action, label, input_label, self._scores(r_hat), details)

    def decide_from_resistance(self, x: torch.Tensor, r: torch.Tensor) -> Decision:
        """`decide` with resistances (n, m) already computed (for sweeps over thresholds)."""
        self._require_fit()
        x = self._check(x)
        if r.dim() != 2 or r.shape != (len(x), len(self.code_idx_)):
            raise InputError(
                f"resistance must have shape ({len(x)}, {len(self.code_idx_)}), "
                f"got {tuple(r.shape)}"
            )
        if not bool(torch.isfinite(r).all()) or float(r.min()) < 0 or float(r.max()) > 1:
            raise InputError("resistance must be finite and lie in [0, 1]")
        dist = distance(r, self.theta_)
        suspicious = flags(r, self.theta_)
        purifiable = dist <= self.theta_d_ + 1e-12
        input_label = self._batched_labels(x)
        purified = None
        if bool((suspicious & purifiable).any()):
            purified = input_label.clone()
            ix = suspicious & purifiable
            purified[ix] = self._purified(x[ix], self.z_u_mode_)
        action, label = apply_rule(suspicious, purifiable, input_label, purified)
        details = {"resistance": r, "distance": dist}
        return Decision(action, label, input_label, self._scores(r), details)

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
    def load(  # type: ignore[override]
        cls,
        folder: Path,
        classifier: nn.Module,
        vae: MorphableVAE | None = None,
        *,
        strict: bool = True,
    ) -> FMDefense:
        """Rebuild a calibrated defense; with `strict`, refuse models other than those fitted."""
        if vae is None:
            raise InputError("FMDefense.load needs the combo-VAE it was calibrated with (vae=)")
        raw = read_config(folder, KIND)
        for key in ("defense", "theta_d", "z_u_mode", "fingerprints"):
            if key not in raw:
                raise ArtifactError(f"{folder}/config.json lacks {key!r}: recalibrate it")
        try:
            config = FMDefenseConfig.from_dict(raw["defense"])
        except InputError as exc:
            raise ArtifactError(f"{folder}/config.json: {exc}") from exc
        defense = cls(classifier, vae, config)
        fingerprints = raw["fingerprints"]
        if strict:
            for name, module in (("classifier", classifier), ("vae", vae)):
                if not isinstance(fingerprints, dict) or name not in fingerprints:
                    raise ArtifactError(f"{folder}/config.json lacks the {name}'s fingerprint")
                if fingerprint(module) != fingerprints[name]:
                    raise ArtifactError(
                        f"{folder} was calibrated for another {name}'s weights; "
                        "recalibrate (fmdefense calibrate) or pass strict=False"
                    )
        t = load_tensors(Path(folder) / "model.safetensors", finite=True)
        defense._restore(folder, raw, t)
        return defense

    def _restore(self, folder: Path, raw: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        """Calibrated attributes from a saved artifact, checked for shape, range and modes."""
        missing = sorted({"lo", "hi", "theta", "code_idx", "val_resistance"} - set(t))
        if missing:
            raise ArtifactError(f"{folder}/model.safetensors lacks {missing}: recalibrate it")
        M, code_idx = self.vae.num_codes, t["code_idx"].long()
        m = len(code_idx)
        ok = code_idx.dim() == 1 and m > 0 and int(code_idx.min()) >= 0
        ok = ok and int(code_idx.max()) < M and t["lo"].shape == t["hi"].shape == (M,)
        ok = ok and t["theta"].shape == (m,) and t["val_resistance"].dim() == 2
        ok = ok and t["val_resistance"].shape[1] == m
        if not ok:
            raise ArtifactError(f"{folder}: calibration shapes do not fit a {M}-code combo-VAE")
        if not all(bool(torch.isfinite(t[k]).all()) for k in ("lo", "hi", "theta")):
            raise ArtifactError(f"{folder}: calibration holds NaN or infinite values")
        theta_d, z_u_mode = raw["theta_d"], raw["z_u_mode"]
        if not isinstance(theta_d, int | float) or not theta_d == theta_d or theta_d < 0:
            raise ArtifactError(f"{folder}: theta_d must be a number >= 0, got {theta_d!r}")
        if z_u_mode not in Z_U_MODES:
            raise ArtifactError(f"{folder}: z_u_mode must be one of {Z_U_MODES}, not {z_u_mode!r}")
        self.lo_, self.hi_, self.theta_ = t["lo"], t["hi"], t["theta"]
        self.code_idx_, self.val_resistance_ = code_idx, t["val_resistance"]
        self.theta_d_, self.z_u_mode_ = float(theta_d), str(z_u_mode)
        self.fingerprints_ = dict(raw["fingerprints"])
        self.input_labels_ = str(raw.get("input_labels", "morph precision"))
        if self.input_labels_ != INPUT_LABELS and self.config.precision != "fp32":
            log.warning("%s was calibrated with bf16 input labels: recalibrate it", folder)
        self.val_fpr_ = float(flags(self.val_resistance_, self.theta_).float().mean())

    def with_config(self, **changes: Any) -> FMDefense:
        """A copy with other threshold settings, refitted from the stored VAL resistance."""
        self._require_fit()
        fixed = sorted(set(changes) - THRESHOLD_FIELDS)
        if fixed:
            raise InputError(
                f"with_config changes only {sorted(THRESHOLD_FIELDS)}; {fixed[0]!r} changes the "
                "morphs the VAL resistance was measured with: build and fit a new FMDefense"
            )
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
