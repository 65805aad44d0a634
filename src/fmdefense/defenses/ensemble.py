"""The randomized combo-VAE ensemble the paper's conclusion proposes, over the default defense.

ensemble = EnsembleDefense(clf, [vae_0, ..., vae_K-1], aes, EnsembleConfig()).fit(x_val)
ensemble.decide(x)

K combo-VAEs trained with different seeds each carry one default defense (`defenses/default.py`:
same classifier, MagNet autoencoders and squeezers; own pixel errors, reconstruction checks and
DGMM doubt), calibrated on the same clean VAL split. Two modes:

- "random": each input is judged by one member, drawn by a keyed hash of the input's bytes and
  `seed`. Every distinct query gets a fresh draw, while the same input always gets the same
  verdict (decisions stay reproducible and batch-independent, and resubmitting the same bytes
  cannot re-roll it; changing one bit can, so an attacker who can query is bounded by "some
  member fooled", which evaluations report as `any_member_accepted_wrong`). Members are
  calibrated at α, so the clean FPR stays α.
- "all": an input is accepted only if every member accepts it. Members are calibrated at the
  largest common per-member rate α′ ≤ α whose union flags at most α of the held-out VAL half
  (Bonferroni's α / K would be safe but wastes the budget: the members agree on most clean
  images, and α / K = 0.2 % left a union FPR of 0.3 % on MNIST VAL).

The ensemble only rejects (a flagged input has no single reconstruction to purify with), and its
decisions carry every member's verdict (`details["member_flags"]`, (n, K)) so an evaluation can
also report the expected outcome of a fresh uniform draw. The combo-VAEs are not copied into the
artifact: it records their folders relative to itself and their weights' fingerprints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.core.artifacts import load_tensors, read_config, save_artifact
from fmdefense.core.config import check_choice, check_int, dataclass_kwargs
from fmdefense.core.device import module_device
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.core.fingerprints import fingerprint
from fmdefense.defenses.base import Decision, Defense
from fmdefense.defenses.default import (
    DefaultConfig,
    DefaultDefense,
    _autoencoders,
    autoencoder_tensors,
    check_calibration,
    classifier_channels,
)
from fmdefense.defenses.rule import apply_rule

log = logging.getLogger(__name__)
KIND = "ensemble_defense"
MODES = ("random", "all")


@dataclass(frozen=True)
class EnsembleConfig:
    """How members are combined; `member` is each member's default config (its α is the
    ensemble's clean FPR target; in mode "all" the members run at the fitted α′ ≤ α)."""

    mode: str = "random"  # random | all
    seed: int = 0  # key of the per-input draw ("random")
    member: DefaultConfig = field(default_factory=DefaultConfig)

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_int("seed", self.seed, low=0, high=2**63 - 1)
        if not isinstance(self.member, DefaultConfig):
            raise InputError(f"member must be a DefaultConfig, got {type(self.member).__name__}")
        if self.member.purify != "reject":
            raise InputError("an ensemble rejects what it flags: member purify must be 'reject'")

    @classmethod
    def from_dict(cls, raw: object) -> EnsembleConfig:
        d = dataclass_kwargs(cls, raw, "EnsembleConfig")
        member = d.get("member")
        if not isinstance(member, dict):
            raise InputError("EnsembleConfig needs 'member': the members' DefaultConfig object")
        d["member"] = DefaultConfig.from_dict(member)
        return cls(**d)


def draw_members(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """(n,) member index per input: a keyed BLAKE2b hash of its float32 bytes, modulo k."""
    key = seed.to_bytes(8, "little")
    rows = x.detach().float().cpu().contiguous().reshape(len(x), -1).numpy()
    picks = [
        int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8, key=key).digest(), "little") % k
        for r in rows
    ]
    return torch.tensor(picks, dtype=torch.long)


class EnsembleDefense(Defense):
    """K default defenses over one classifier, one per combo-VAE: a random member, or all."""

    name = "ensemble"
    kind = KIND
    fitted_attribute = "members_"

    def __init__(
        self,
        classifier: nn.Module,
        vaes: list[Any],
        autoencoders: tuple[nn.Module, nn.Module] | None,
        config: EnsembleConfig,
        vae_dirs: list[Path] | None = None,
    ) -> None:
        if not vaes:
            raise InputError("an ensemble needs at least one combo-VAE")
        if vae_dirs is not None and len(vae_dirs) != len(vaes):
            raise InputError(f"{len(vaes)} combo-VAEs but {len(vae_dirs)} folders")
        self.classifier = classifier
        self.vaes = list(vaes)
        self.autoencoders = autoencoders
        self.config = config
        self.vae_dirs = vae_dirs

    @property
    def member_config(self) -> DefaultConfig:
        """Each member's config: α in mode "random", the fitted common rate α′ in "all"."""
        return dataclasses.replace(self.config.member, alpha=self.member_alpha_)

    def _set_members(self, members: list[DefaultDefense]) -> None:
        """Members fitted at α, recalibrated at α′ in mode "all"; then the ensemble's VAL FPR."""
        alpha = self.config.member.alpha
        self.member_alpha_ = union_alpha(members, alpha) if self.config.mode == "all" else alpha
        self.members_ = [m.with_config(alpha=self.member_alpha_) for m in members]
        self._measure_val_fpr()

    # ------------------------------------------------------------------ contract

    def fit(self, x_val: torch.Tensor, y_val: torch.Tensor | None = None) -> EnsembleDefense:
        """Fit every member on the same clean VAL images (same split); measure the ensemble's
        own false-positive rate on the held-out half."""
        x_val = self._check(x_val, "x_val")
        cfg = self.config.member
        fitted = [DefaultDefense(self.classifier, v, self.autoencoders, cfg) for v in self.vaes]
        self._set_members([m.fit(x_val) for m in fitted])
        return self

    def _measure_val_fpr(self) -> None:
        """The ensemble's FPR on the held-out VAL half (members share the split: same rows);
        in mode "random" the expectation over a uniform draw."""
        flags = torch.stack(
            [m.statistic(m.calibration_) > m.threshold_ for m in self.members_], 1
        )  # (m, K)
        shared = flags.any(1) if self.config.mode == "all" else flags.float().mean(1)
        self.val_fpr_ = float(shared.float().mean())
        log.info(
            "ensemble (%s, K = %d): member α %.4f, held-out VAL FPR %.4f",
            self.config.mode,
            len(self.members_),
            self.member_config.alpha,
            self.val_fpr_,
        )

    def _member_excess(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's fused statistic minus its threshold (n, K) and C(x) (n,)."""
        rows, label = [], None
        for m in self.members_:
            p = m.score_pass(x)
            rows.append(m.statistic(p.s) - m.threshold_)
            label = p.label
        assert label is not None
        return torch.stack(rows, 1), label

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """ "fused": the deciding excess over threshold (> 0: flagged); "fused_m{k}" per member."""
        self._require_fit()
        return self._decision(self._check(x)).scores

    def decide(self, x: torch.Tensor) -> Decision:
        """Reject what the drawn member (or any member, mode "all") flags; accept with C(x)."""
        self._require_fit()
        return self._decision(self._check(x))

    def _decision(self, x: torch.Tensor) -> Decision:
        excess, label = self._member_excess(x)  # (n, K), (n,)
        flags = excess > 0
        if self.config.mode == "all":
            flagged, fused = flags.any(1), excess.max(1).values
        else:
            draw = draw_members(x, len(self.members_), self.config.seed)
            flagged, fused = flags[torch.arange(len(x)), draw], excess[torch.arange(len(x)), draw]
        action, final = apply_rule(flagged, None, label)
        scores = {"fused": fused, **{f"fused_m{k}": excess[:, k] for k in range(excess.shape[1])}}
        return Decision(action, final, label, scores, {"member_flags": flags})

    # ------------------------------------------------------------------ persistence

    def save(self, folder: Path) -> None:
        """Every member's VAL scores and the autoencoders as one artifact; the combo-VAEs'
        folders are recorded relative to it (they must be saved artifacts already)."""
        self._require_fit()
        if self.vae_dirs is None:
            raise InputError("saving an ensemble needs the combo-VAEs' folders (vae_dirs=)")
        folder = Path(folder)
        tensors: dict[str, torch.Tensor] = {}
        for k, m in enumerate(self.members_):
            tensors |= {f"m{k}.reference": m.reference_, f"m{k}.calibration": m.calibration_}
        tensors |= autoencoder_tensors(self.autoencoders)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "ensemble": asdict(self.config),
            "names": self.members_[0].names_,
            "vaes": [_relative(Path(d), folder) for d in self.vae_dirs],
            "fingerprints": [m.fingerprints_ for m in self.members_],
            "in_channels": classifier_channels(self.classifier),
            "autoencoders": self.autoencoders is not None,
        }
        metrics = {"val_fpr_held_out": self.val_fpr_, "members": len(self.members_)}
        save_artifact(folder, kind=KIND, config=config, tensors=tensors, metrics=metrics)

    @classmethod
    def load(  # type: ignore[override]
        cls, folder: Path, classifier: nn.Module, vaes: list[Any] | None = None
    ) -> EnsembleDefense:
        """Rebuild around `classifier`; the combo-VAEs from their recorded folders unless given."""
        folder = Path(folder)
        raw = read_config(folder, KIND)
        try:
            config = EnsembleConfig.from_dict(raw.get("ensemble"))
        except InputError as exc:
            raise ArtifactError(f"{folder}/config.json: {exc}") from exc
        recorded, prints = raw.get("vaes"), raw.get("fingerprints")
        if (
            not isinstance(recorded, list)
            or not recorded
            or not all(isinstance(d, str) for d in recorded)
            or not isinstance(prints, list)
            or len(prints) != len(recorded)
        ):
            raise ArtifactError(f"{folder}: the members' combo-VAEs are not recorded")
        channels = raw.get("in_channels", 1)
        if type(channels) is not int or channels < 1:
            raise ArtifactError(f"{folder}: in_channels must be a positive integer")
        dirs = [folder / d for d in recorded]
        if vaes is None:
            vaes = [_load_vae(d, classifier) for d in dirs]
        if len(vaes) != len(dirs):
            raise InputError(f"{folder} has {len(dirs)} members, got {len(vaes)} combo-VAEs")
        t = load_tensors(folder / "model.safetensors")
        device = module_device(classifier)  # beside the classifier
        aes = _autoencoders(t, channels, device) if raw.get("autoencoders") else None
        ensemble = cls(classifier, vaes, aes, config, dirs)
        ensemble._set_members(
            [_member(ensemble, k, vae, t, raw, prints[k], folder) for k, vae in enumerate(vaes)]
        )
        return ensemble


def _member(
    ensemble: EnsembleDefense,
    k: int,
    vae: Any,
    t: dict[str, torch.Tensor],
    raw: dict[str, Any],
    prints: object,
    folder: Path,
) -> DefaultDefense:
    """Member k from the stored scores, its weights checked against its fingerprints."""
    if not isinstance(prints, dict):
        raise ArtifactError(f"{folder}: member {k}'s fingerprints are missing")
    for name, module in (("classifier", ensemble.classifier), ("vae", vae)):
        if fingerprint(module) != prints.get(name):
            raise ArtifactError(
                f"{folder}: member {k} was calibrated for another {name}'s weights; recalibrate "
                "it (fmdefense calibrate --defense-kind ensemble)"
            )
    names, ref, cal = raw.get("names"), t.get(f"m{k}.reference"), t.get(f"m{k}.calibration")
    check_calibration(f"{folder} member {k}", names, ref, cal)
    first = t.get("m0.calibration")
    assert cal is not None and first is not None  # checked above (member 0 first)
    if cal.shape != first.shape:
        raise ArtifactError(f"{folder}: member {k} was calibrated on other VAL images")
    stored = {"names": names, "reference": ref, "calibration": cal, "fingerprints": prints}
    return DefaultDefense.from_calibration(
        ensemble.classifier, vae, ensemble.autoencoders, ensemble.config.member, stored
    )


def union_alpha(members: list[DefaultDefense], alpha: float) -> float:
    """The largest common per-member rate a / m (a flags allowed per member on the m held-out
    VAL images) whose union flags at most α of them (members share the split: same rows)."""
    stats = torch.stack([mem.statistic(mem.calibration_) for mem in members], 1)  # (m, K)
    m = len(stats)
    ordered = stats.double().sort(0, descending=True).values  # (m, K)
    allowed = int(alpha * m + 1e-9)  # as `fusion.threshold_at` counts
    best = 0
    for a in range(min(allowed, m - 1) + 1):
        if int((stats.double() > ordered[a]).any(1).sum()) > allowed:
            break
        best = a
    return (best if best > 0 else 0.5) / m  # a = 0: any rate below 1 / m


def _load_vae(folder: Path, classifier: nn.Module) -> Any:
    from fmdefense.models.combo_vae import ComboVAE

    device = module_device(classifier)
    return ComboVAE.load(folder, device).eval()


def _relative(target: Path, folder: Path) -> str:
    """`target` relative to `folder` (both resolved), for a record that moves with the tree."""
    return os.path.relpath(target.resolve(), folder.resolve())
