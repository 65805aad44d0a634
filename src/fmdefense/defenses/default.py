"""The default defense: every clean-calibrated one-decode signal, fused at a clean FPR α.

defense = DefaultDefense(classifier, vae, autoencoders, DefaultConfig(alpha=0.01)).fit(x_val)
defense.decide(x)   # reject (or purify) where the fused statistic exceeds its VAL threshold

Scores (`fmdefense.defenses.scores`): the combo-VAE's pixel errors, reconstruction checks and
DGMM's doubt, the classifier's margin, MagNet's two autoencoder errors and two feature squeezers.
Which scores are used is fixed by a principle stated before any attack was run on the reported
sets: all of them (`scores=None`); subsets exist for the ablation only. Calibration: VAL is split
in half with a seed; one half is each score's clean reference (p-values: empirical inside the
clean range, an exponential tail beyond it, `fusion`), the other sets the threshold of the
combined statistic at α. Purification policies: "reject" (flagged inputs are rejected), "paper"
(the paper's η rule on the statistic: the η-fractile of flagged VAL statistics bounds what is
purified), "consistent" (purify only if DGMM's class equals the label of the class-mean
reconstruction and the reconstruction itself passes the detector).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.core.artifacts import load_tensors, read_config, save_artifact
from fmdefense.core.config import check_choice, check_int, check_range, dataclass_kwargs
from fmdefense.core.device import module_device
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.core.fingerprints import fingerprint
from fmdefense.core.inference import inference_copy
from fmdefense.defenses import fusion
from fmdefense.defenses.base import Decision, Defense
from fmdefense.defenses.rule import apply_rule
from fmdefense.defenses.scores import SQUEEZERS, Outputs, default_scores, network_outputs

log = logging.getLogger(__name__)
KIND = "default_defense"
PURIFY_POLICIES = ("reject", "paper", "consistent")


@dataclass(frozen=True)
class DefaultConfig:
    """Operating point and what is fused; α is the clean false-positive rate targeted on VAL."""

    alpha: float = 0.01
    combine: str = "harmonic"  # fisher | min_p | harmonic (fusion.COMBINERS)
    tails: str = "exponential"  # empirical | exponential p-values beyond the clean range
    purify: str = "reject"  # reject | paper | consistent
    eta: float = 0.9  # "paper" policy: η-fractile of the flagged VAL statistics
    squeezers: tuple[str, ...] = ("bits1", "median2")
    scores: tuple[str, ...] | None = None  # None: every available score (the default's rule)
    batch_size: int = 256
    seed: int = 0  # the VAL split

    def __post_init__(self) -> None:
        check_range("alpha", self.alpha, 0.0, 1.0, low_open=True, high_open=True)
        check_choice("combine", self.combine, fusion.COMBINERS)
        check_choice("tails", self.tails, fusion.TAILS)
        check_choice("purify", self.purify, PURIFY_POLICIES)
        check_range("eta", self.eta, 0.0, 1.0)
        for name in self.squeezers:
            check_choice("squeezers", name, tuple(SQUEEZERS))
        if self.scores is not None and not self.scores:
            raise InputError("scores must be None (all) or a non-empty tuple of score names")
        check_int("batch_size", self.batch_size, low=1)
        check_int("seed", self.seed, low=0)

    @classmethod
    def from_dict(cls, raw: object) -> DefaultConfig:
        if isinstance(raw, dict) and "tails" not in raw:  # saved before tails existed
            raw = {**raw, "tails": "empirical"}
        d = dataclass_kwargs(cls, raw, "DefaultConfig")
        d["squeezers"] = tuple(d["squeezers"])
        d["scores"] = None if d["scores"] is None else tuple(d["scores"])
        return cls(**d)


@dataclass(frozen=True)
class ScorePass:
    """Everything `decide` reads, from one pass over n inputs."""

    s: torch.Tensor  # (n, k) scores in `names_` order
    label: torch.Tensor  # (n,) C(x)
    recon_label: torch.Tensor  # (n,) C(class-mean reconstruction)
    dgmm_label: torch.Tensor  # (n,) DGMM's class
    recon: torch.Tensor | None = None  # (n, C, H, W) class-mean reconstructions
    recon_s: torch.Tensor | None = None  # (n, k) the reconstructions' own scores


class DefaultDefense(Defense):
    """Fused one-decode detector over a classifier, a combo-VAE and MagNet-style autoencoders."""

    name = "default"
    kind = KIND
    fitted_attribute = "threshold_"

    def __init__(
        self,
        classifier: nn.Module,
        vae: Any,
        autoencoders: tuple[nn.Module, nn.Module] | None,
        config: DefaultConfig,
    ) -> None:
        self.classifier = classifier
        self.vae = vae
        self.autoencoders = autoencoders
        self.config = config

    # ------------------------------------------------------------------ scores

    def _forward(
        self, x: torch.Tensor, *, serving: bool = False
    ) -> tuple[dict[str, torch.Tensor], Outputs]:
        """Every score (n,) of a batch and the network outputs it reads, one batched pass;
        `serving`: through channels_last inference copies of the networks (no gradient)."""
        clf, vae, aes = self.classifier, self.vae, self.autoencoders
        if serving:
            clf, vae = inference_copy(clf), inference_copy(vae)
            aes = None if aes is None else (inference_copy(aes[0]), inference_copy(aes[1]))
        out = network_outputs(clf, vae, aes, x, self.config.squeezers, self.config.batch_size)
        return default_scores(x, out), out

    def raw_scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every score (n,) of a batch, differentiable (attacks call this under grad)."""
        return self._forward(x)[0]

    def _pass(self, x: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, ...]:
        """Scores (n, k) in `names` order, C(x), C(x̂), DGMM's class and x̂, batched, in
        inference mode (the results are concatenated outside it: ordinary tensors)."""
        parts: list[list[torch.Tensor]] = [[], [], [], [], []]
        for i in range(0, len(x), self.config.batch_size):
            xb = x[i : i + self.config.batch_size].to(self.device)
            with torch.inference_mode():
                s, out = self._forward(xb, serving=True)
                row = (
                    torch.stack([s[k].float() for k in names], 1),
                    out.logits.argmax(1),
                    out.recon_label,
                    out.dgmm_label,
                    out.recon["class_mean"].contiguous(),
                )
            for part, t in zip(parts, row, strict=True):
                part.append(t.cpu())
        return tuple(torch.cat(p) for p in parts)

    def _score_matrix(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        return self._pass(x, names)[0]

    def _names(self, x: torch.Tensor) -> list[str]:
        with torch.no_grad():
            available = list(self.raw_scores(x[:1].to(self.device)))
        if self.config.scores is None:
            return available
        unknown = sorted(set(self.config.scores) - set(available))
        if unknown:
            raise InputError(f"unknown scores {unknown}; available: {', '.join(available)}")
        return [k for k in available if k in self.config.scores]

    def statistic(self, s: torch.Tensor) -> torch.Tensor:
        """The fused statistic (n,) from a score matrix (n, k) in `names_` order."""
        log_p = fusion.log_pvalues(self.reference_, s, self.config.tails)
        return fusion.combine(log_p, self.config.combine).float()

    # ------------------------------------------------------------------ contract

    def fit(self, x_val: torch.Tensor, y_val: torch.Tensor | None = None) -> DefaultDefense:
        """Reference scores on one half of VAL, the threshold at α on the other half."""
        x_val = self._check(x_val, "x_val")
        if len(x_val) < 4:
            raise InputError(f"x_val needs at least 4 clean images, got {len(x_val)}")
        self.names_ = self._names(x_val)
        s = self._score_matrix(x_val, self.names_)  # (n, k)
        ref, cal = fusion.split_indices(len(x_val), self.config.seed)
        self.reference_, self.calibration_ = s[ref], s[cal]
        self._set_thresholds()
        self.fingerprints_ = {
            "classifier": fingerprint(self.classifier),
            "vae": fingerprint(self.vae),
        }
        log.info(
            "default defense: %d scores, threshold %.3f, held-out VAL FPR %.4f (α %.3f)",
            len(self.names_),
            self.threshold_,
            self.val_fpr_,
            self.config.alpha,
        )
        return self

    def _set_thresholds(self) -> None:
        """θ at α and the "paper" policy's purification bound, from the held-out VAL half."""
        stat = self.statistic(self.calibration_)
        self.threshold_ = fusion.threshold_at(stat, self.config.alpha)
        flagged = stat > self.threshold_
        self.purify_threshold_ = (
            float(torch.quantile(stat[flagged].double(), self.config.eta))
            if bool(flagged.any())
            else self.threshold_
        )
        self.val_fpr_ = float(flagged.float().mean())

    @classmethod
    def from_calibration(
        cls,
        classifier: nn.Module,
        vae: Any,
        autoencoders: tuple[nn.Module, nn.Module] | None,
        config: DefaultConfig,
        calibration: dict[str, Any],
    ) -> DefaultDefense:
        """A fitted default from stored VAL scores (`calibration`: names, reference (n, k),
        calibration (m, k), fingerprints), thresholds recomputed at `config`'s α."""
        defense = cls(classifier, vae, autoencoders, config)
        defense.names_ = [str(n) for n in calibration["names"]]
        defense.reference_ = calibration["reference"]
        defense.calibration_ = calibration["calibration"]
        defense.fingerprints_ = dict(calibration["fingerprints"])
        defense._set_thresholds()
        return defense

    def with_config(self, **changes: Any) -> DefaultDefense:
        """A copy at another operating point (α, combination, tails, policy, η), from the stored VAL
        scores; what is scored cannot change this way."""
        self._require_fit()
        fixed = sorted(set(changes) - {"alpha", "combine", "tails", "purify", "eta"})
        if fixed:
            raise InputError(f"with_config cannot change {fixed[0]!r}: fit a new DefaultDefense")
        clone = DefaultDefense(
            self.classifier,
            self.vae,
            self.autoencoders,
            dataclasses.replace(self.config, **changes),
        )
        clone.names_, clone.fingerprints_ = self.names_, self.fingerprints_
        clone.reference_, clone.calibration_ = self.reference_, self.calibration_
        clone._set_thresholds()
        return clone

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every fused score (n,) and the fused statistic itself under "fused"."""
        self._require_fit()
        s = self._score_matrix(self._check(x), self.names_)
        return {**{k: s[:, i] for i, k in enumerate(self.names_)}, "fused": self.statistic(s)}

    def decide(self, x: torch.Tensor) -> Decision:
        """Accept below the threshold; above it reject, or purify as the policy allows."""
        self._require_fit()
        return self.decide_from_pass(self.score_pass(self._check(x)))

    def score_pass(self, x: torch.Tensor, *, with_recon_scores: bool = False) -> ScorePass:
        """One batched pass over validated images; optionally the reconstructions' scores too
        (the "consistent" policy reads them; evaluations cache them for every policy)."""
        s, label, recon_label, dgmm_label, recon = self._pass(x, self.names_)
        recon_s = self._score_matrix(recon, self.names_) if with_recon_scores else None
        return ScorePass(s, label, recon_label, dgmm_label, recon, recon_s)

    def decide_from_pass(self, p: ScorePass) -> Decision:
        """`decide` from a score pass (sweeps over policies reuse one pass)."""
        self._require_fit()
        stat = self.statistic(p.s)
        flagged = stat > self.threshold_
        purifiable = self._purifiable(p, stat, flagged)
        action, final = apply_rule(flagged, purifiable, p.label, p.recon_label)
        scores = {**{k: p.s[:, i] for i, k in enumerate(self.names_)}, "fused": stat}
        return Decision(action, final, p.label, scores)

    def _purifiable(
        self, p: ScorePass, stat: torch.Tensor, flagged: torch.Tensor
    ) -> torch.Tensor | None:
        policy = self.config.purify
        if policy == "reject":
            return None
        if policy == "paper":
            return stat <= self.purify_threshold_
        ok = p.recon_label == p.dgmm_label
        ix = (flagged & ok).nonzero().flatten()
        if len(ix):  # the reconstruction itself must pass the detector
            if p.recon_s is not None:
                recon_s = p.recon_s[ix]
            elif p.recon is not None:
                recon_s = self._score_matrix(p.recon[ix], self.names_)
            else:
                raise InputError("the consistent policy needs the reconstructions or their scores")
            ok[ix] = self.statistic(recon_s) <= self.threshold_
        return ok

    # ------------------------------------------------------------------ persistence

    def save(self, folder: Path) -> None:
        """Calibration and the autoencoders' weights as one artifact (safetensors + JSON)."""
        self._require_fit()
        tensors = {"reference": self.reference_, "calibration": self.calibration_}
        tensors |= autoencoder_tensors(self.autoencoders)
        config = {
            "defense": asdict(self.config),
            "names": self.names_,
            "threshold": self.threshold_,  # recomputed on load from the stored VAL scores
            "fingerprints": self.fingerprints_,
            "in_channels": classifier_channels(self.classifier),
            "autoencoders": self.autoencoders is not None,
        }
        metrics = {"val_fpr_held_out": self.val_fpr_, "val_reference": len(self.reference_)}
        save_artifact(folder, kind=KIND, config=config, tensors=tensors, metrics=metrics)

    @classmethod
    def load(  # type: ignore[override]
        cls, folder: Path, classifier: nn.Module, vae: Any = None, *, strict: bool = True
    ) -> DefaultDefense:
        """Rebuild the calibrated default around its classifier and combo-VAE."""
        if vae is None:
            raise InputError("DefaultDefense.load needs its combo-VAE (vae=)")
        raw = read_config(folder, KIND)
        try:
            config = DefaultConfig.from_dict(raw.get("defense"))
        except InputError as exc:
            raise ArtifactError(f"{folder}/config.json: {exc}") from exc
        t = load_tensors(Path(folder) / "model.safetensors")
        device = module_device(classifier)  # the contract's device
        channels = int(raw.get("in_channels", 1))
        autoencoders = _autoencoders(t, channels, device) if raw.get("autoencoders") else None
        if strict:
            for name, module in (("classifier", classifier), ("vae", vae)):
                if fingerprint(module) != raw.get("fingerprints", {}).get(name):
                    raise ArtifactError(
                        f"{folder} was calibrated for another {name}'s weights; recalibrate it "
                        "(fmdefense calibrate --defense default) or pass strict=False"
                    )
        names, ref, cal = raw.get("names"), t.get("reference"), t.get("calibration")
        check_calibration(str(folder), names, ref, cal)
        stored = {"names": names, "reference": ref, "calibration": cal}
        return cls.from_calibration(
            classifier,
            vae,
            autoencoders,
            config,
            {**stored, "fingerprints": raw.get("fingerprints", {})},
        )


def check_calibration(where: str, names: object, ref: object, cal: object) -> None:
    """Stored VAL scores that can calibrate a default: names (k,), reference (n, k) and held-out
    calibration (m, k), finite (ArtifactError naming `where` otherwise)."""
    if (
        not isinstance(names, list)
        or not isinstance(ref, torch.Tensor)
        or ref.dim() != 2
        or ref.shape[1] != len(names)
    ):
        raise ArtifactError(f"{where}: the reference scores do not match their names")
    if not isinstance(cal, torch.Tensor) or cal.dim() != 2 or cal.shape[1] != ref.shape[1]:
        raise ArtifactError(f"{where}: the held-out calibration scores are missing")
    if not (bool(torch.isfinite(ref).all()) and bool(torch.isfinite(cal).all())):
        raise ArtifactError(f"{where}: the calibration holds NaN or infinite scores")


def autoencoder_tensors(aes: tuple[nn.Module, nn.Module] | None) -> dict[str, torch.Tensor]:
    """MagNet's two autoencoders' weights under "ae_i." / "ae_ii." (none without them)."""
    if aes is None:
        return {}
    return {
        prefix + k: v
        for prefix, ae in zip(("ae_i.", "ae_ii."), aes, strict=True)
        for k, v in ae.state_dict().items()
    }


def classifier_channels(classifier: nn.Module) -> int:
    """The input channels a classifier's config declares (1 when it declares none)."""
    return int(getattr(getattr(classifier, "cfg", None), "in_channels", 1))


def _autoencoders(
    t: dict[str, torch.Tensor], channels: int, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """MagNet's autoencoder architectures filled with the saved weights, on `device` (the
    classifier's: a default loaded around a CUDA classifier scores on CUDA)."""
    from fmdefense.models.magnet import autoencoder_i, autoencoder_ii

    pair = (autoencoder_i(channels), autoencoder_ii(channels))
    for prefix, ae in zip(("ae_i.", "ae_ii."), pair, strict=True):
        ae.load_state_dict({k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)})
        ae.to(device).eval()
    return pair
