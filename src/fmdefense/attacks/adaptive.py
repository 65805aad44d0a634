"""Defense-aware (adaptive) attacks on FM-Defense, MagNet and Defense-GAN (issue 7).

The paper's attackers know the classifier only. Here the attacker also knows the combo-VAE and
the calibrated detector (codes, normal ranges, θ_r, θ_d, the z_u reading), as Carlini & Wagner
(2017) and Tramèr et al. (2020) ask of every detection defense; the baselines are attacked the
same way. Every defense is judged by one rule on its hard decisions (`attacks.defended`): an
attack succeeds on an input when the defense labels it (accepted, purified or reformed), does
not reject it, and the label is wrong; a rejected input, or one labelled correctly, is a failure.

Registry `ADAPTIVE_ATTACKS` (name → factory(classifier, vae, defense, config); `attacks_for`
lists those that apply to a defense kind, `default_config` gives an attack's default settings):

- `joint`: PGD-L∞ on one differentiable objective — misclassify C(x′), keep the labels of
  morphs C(D(codes(x′) with code i shifted by Δ)) equal to C(x′)'s wrong class (expectation over
  transformation: fresh codes i and shifts Δ each step, drawn by the defense's own widening search
  inside [lo_, hi_]), and make the purified reconstruction's label wrong too.
- `latent`: PGD-L∞ pulling the E_s/DGMM codes of x′ toward those of a target-class guide image,
  plus a targeted margin on C(x′).
- `cw_transfer`: high-confidence Carlini–Wagner L2 (κ = 20 by default) on the classifier alone,
  through Foolbox (`library.run_attack`), clipped to the L∞ ε and transferred to the pipeline.
- `square`: a gradient-free Square-style random search (Andriushchenko et al. 2020), *hand-written
  in a few lines, not the reference implementation*, on a score computed from the hard-decision
  pipeline; it catches gradient masking the gradient attacks would miss.
- `undefended`: PGD-L∞ on the classifier alone, success = C(x′) ≠ y (sanity: ~100 % at ε = 0.3
  on MNIST). With κ = 0 it is also the oblivious baseline: it stops at the first misclassification.
- `magnet_joint` (MagNet): PGD-L∞ on a margin loss through the reformer, C(AE_I(x′)), plus hinges
  keeping both detectors' reconstruction errors under their thresholds (Carlini & Wagner 2017).
- `defensegan_bpda` (Defense-GAN): BPDA — the projection G(z*(x′)) runs forward with the
  defense's own search and is the identity backward — plus a hinge on ‖G(z*) − x′‖² with z*
  fixed, under the detection threshold. 40 steps by default: every step runs a search.
- `cw_transfer` applies to all three defenses; `joint`, `latent` and `square` to FM-Defense.

The PGD attacks share one loop (`PGDAttack.run`, template method): each supplies `loss(x′)`
(per example, lower is better for the attacker); the loop does signed-gradient steps, projects onto
the ε-ball ∩ [0, 1], restarts from random points, follows a step-size schedule, checks success on
the hard-decision pipeline every `check_every` steps and freezes an input at its first success.

`evaluate_adaptive` sweeps ε (`evaluate_eps` runs one ε) and returns a JSON-serialisable dict:
robust accuracy with rejection, attack success, the clean accept rate at the same thresholds, and
the sanity checks (`sanity_checks`). `fmdefense adaptive` (`adaptive_commands`) runs the same
units resumably from the command line.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fmdefense.attacks.defended import (
    Defended,
    as_defended,
    defended_success,
    outcome_rates,
)
from fmdefense.core.errors import InputError, NotFittedError
from fmdefense.core.validation import check_images, check_labels
from fmdefense.defenses.base import REJECT_LABEL
from fmdefense.defenses.defense_gan import DefenseGAN
from fmdefense.defenses.fm.config import MorphableVAE
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.fm.morphs import MorphConfig, draw_table, natural_deltas
from fmdefense.defenses.fm.ranges import code_values
from fmdefense.defenses.fm.thresholds import NEVER
from fmdefense.defenses.magnet import MagNet

log = logging.getLogger(__name__)

SCHEDULES = ("halving", "cosine", "constant")
MORPH_SOURCES = ("fresh", "defense")
BPDA_STARTS = ("defense", "fresh")


@dataclass(frozen=True)
class AdaptiveConfig:
    """Settings of the adaptive attacks; each attack reads the fields that concern it."""

    eps: float = 0.3  # L∞ radius (1.0: unbounded)
    steps: int = 100  # PGD steps per restart
    restarts: int = 1  # PGD restarts (each from a random point in the ε-ball)
    step_size: float | None = None  # initial α; None: ε/4
    schedule: str = "halving"  # halving (α/2 each quarter) | cosine | constant
    random_start: bool = True
    check_every: int = 10  # steps between hard-decision success checks (and at each restart end)
    kappa: float = 5.0  # margin cap of every margin loss (a satisfied term stops pulling)
    # joint: expectation over transformation
    eot_codes: int = 4  # codes sampled per step (among the defense's flagging codes)
    eot_values: int = 4  # morph shifts sampled per sampled code and input
    morph_source: str = "fresh"  # fresh draws | the defense's own common draws (exact white box)
    w_cls: float = 1.0  # misclassify C(x′)
    w_morph: float = 1.0  # morph labels agree with C(x′)'s wrong class
    w_purify: float = 1.0  # purified reconstruction misclassified
    w_latent: float = 1.0  # latent: code distance to the guide
    # cw_transfer
    cw_confidence: float = 20.0
    cw_steps: int = 100
    cw_binary_steps: int = 5
    cw_stepsize: float = 0.1  # guide §8: 0.01 leaves pixels at 0/1 unmoved in 100 steps
    cw_initial_const: float = 1e-2
    # square
    square_queries: int = 200
    square_p_init: float = 0.1  # initial share of pixels in the square
    w_detect: float = 10.0  # square: weight of the resistance deficit in the score
    # magnet_joint, defensegan_bpda: stay under the baseline's detection thresholds
    w_stealth: float = 10.0  # weight of the hinge on score/threshold
    stealth_margin: float = 0.1  # the hinge pulls until score ≤ (1 − margin) · threshold
    # defensegan_bpda: starts of the forward search (defense: its own seeded starts, the exact
    # white box; fresh: new random starts each step, EOT with one draw per step)
    bpda_starts: str = "defense"
    batch_size: int = 64  # inputs attacked together
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.eps <= 1:
            raise InputError(f"eps must lie in (0, 1] for images in [0, 1], got {self.eps}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.morph_source not in MORPH_SOURCES:
            raise InputError(f"morph_source must be one of {MORPH_SOURCES}")
        if self.bpda_starts not in BPDA_STARTS:
            raise InputError(f"bpda_starts must be one of {BPDA_STARTS}, got {self.bpda_starts!r}")
        if not 0 <= self.stealth_margin < 1:
            raise InputError(f"stealth_margin must lie in [0, 1), got {self.stealth_margin}")
        counts = {
            "steps": self.steps,
            "restarts": self.restarts,
            "check_every": self.check_every,
            "eot_codes": self.eot_codes,
            "eot_values": self.eot_values,
            "cw_steps": self.cw_steps,
            "cw_binary_steps": self.cw_binary_steps,
            "square_queries": self.square_queries,
            "batch_size": self.batch_size,
        }
        for name, value in counts.items():
            if int(value) != value or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value}")
        weights = ("kappa", "w_cls", "w_morph", "w_purify", "w_latent", "w_detect", "w_stealth")
        for name in weights:
            if not getattr(self, name) >= 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.step_size is not None and not self.step_size > 0:
            raise InputError(f"step_size must be > 0 (or None for ε/4), got {self.step_size}")
        if not 0 < self.square_p_init <= 1:
            raise InputError(f"square_p_init must lie in (0, 1], got {self.square_p_init}")

    def with_restarts(self, factor: int) -> AdaptiveConfig:
        """The same attack with `factor` times the restarts (the first repeats this run)."""
        return dataclasses.replace(self, restarts=self.restarts * factor)

    def with_budget(self, factor: int) -> AdaptiveConfig:
        """The same attack with `factor` times the iterations (PGD steps, CW steps, queries)."""
        return dataclasses.replace(
            self,
            steps=self.steps * factor,
            cw_steps=self.cw_steps * factor,
            square_queries=self.square_queries * factor,
        )


@dataclass(frozen=True)
class AttackResult:
    """What an adaptive attack returns: x′ and the success flags by its own criterion."""

    x_adv: torch.Tensor  # (n, C, H, W) in [0, 1], ‖x′ − x‖∞ ≤ ε
    success: torch.Tensor  # (n,) bool
    seconds: float


# ---------------------------------------------------------------------- losses and helpers


def margin(logits: torch.Tensor, y: torch.Tensor, kappa: float) -> torch.Tensor:
    """Untargeted CW margin max(Z_y − max_{j≠y} Z_j, −κ): below 0 means misclassified. (n,)"""
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return (true - other).clamp(min=-kappa)


def targeted_margin(logits: torch.Tensor, t: torch.Tensor, kappa: float) -> torch.Tensor:
    """Targeted CW margin max(max_{j≠t} Z_j − Z_t, −κ): below 0 means labelled t. (n,)"""
    return margin(logits, t, float("inf")).neg().clamp(min=-kappa)


def best_wrong_class(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The most likely class other than y. (n,)"""
    return logits.detach().scatter(1, y.view(-1, 1), float("-inf")).argmax(1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Projection onto the L∞ ball of radius ε around x, intersected with [0, 1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)


def step_size(cfg: AdaptiveConfig, t: int) -> float:
    """α at step t of a restart under the configured schedule."""
    alpha = cfg.step_size if cfg.step_size is not None else cfg.eps / 4
    if cfg.schedule == "halving":  # α, α/2, α/4, α/8 over the four quarters
        return alpha / 2 ** min(3, (4 * t) // cfg.steps)
    if cfg.schedule == "cosine":
        floor = alpha / 100
        return floor + 0.5 * (alpha - floor) * (1 + math.cos(math.pi * t / cfg.steps))
    return alpha


def shift_codes(codes: torch.Tensor, code_idx: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Differentiable morph codes: code `code_idx[j]` of each input shifted by `deltas[:, j, k]`.

    codes: (n, M[, h, w]); code_idx: (k,); deltas: (n, k, V) -> (n, k, V, M[, h, w]).
    A feature-map code moves as a whole channel, as in `morphs.morph_codes`.
    """
    n, k, V = deltas.shape
    rest = codes.shape[1:]
    onehot = torch.zeros(k, rest[0], dtype=codes.dtype, device=codes.device)
    onehot[torch.arange(k), code_idx.to(codes.device)] = 1.0  # (k, M)
    shift = deltas.to(codes.device).unsqueeze(-1) * onehot.view(1, k, 1, -1)  # (n, k, V, M)
    shift = shift.view(n, k, V, *rest[:1], *([1] * (len(rest) - 1)))
    return codes.view(n, 1, 1, *rest) + shift


def _eval_mode(*modules: object) -> None:
    for module in modules:
        if isinstance(module, nn.Module):
            module.eval()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    device = _device(model)
    return torch.cat(
        [
            model(x[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(x), batch_size)
        ]
    )


def pipeline_success(
    defense: FMDefense | Defended, x_adv: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Hard-decision success (n,): labelled (accepted or purified), not rejected, and wrong."""
    return defended_success(as_defended(defense), x_adv, y)


# ---------------------------------------------------------------------- attack classes


AnyDefense = FMDefense | MagNet | DefenseGAN


class AdaptiveAttack(ABC):
    """An attack on the defended pipeline; models are given at construction, inputs at `run`.

    `defense_types` are the defenses the attack knows how to attack; `target` is the defense's
    `Defended` adapter, whose hard decisions judge success.
    """

    needs_defense = True
    defense_types: tuple[type, ...] = (FMDefense,)
    # AdaptiveConfig fields whose AdaptiveConfig default does not suit this attack
    default_overrides: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        classifier: nn.Module,
        vae: MorphableVAE | None,
        defense: AnyDefense | None,
        config: AdaptiveConfig,
    ) -> None:
        self.target: Defended | None = None
        if self.needs_defense:
            name = type(self).__name__
            if defense is None:
                raise InputError(f"{name} attacks a defense: pass a fitted one")
            if not isinstance(defense, self.defense_types):
                kinds = " or ".join(t.__name__ for t in self.defense_types)
                raise InputError(f"{name} attacks {kinds}, got {type(defense).__name__}")
            if isinstance(defense, FMDefense) and not hasattr(defense, "theta_"):
                raise NotFittedError("the defense is not calibrated: call defense.fit(x_val)")
            self.target = as_defended(defense, classifier)  # raises NotFittedError if unfitted
        self.classifier = classifier
        self.vae = vae
        self.defense = defense
        self.config = config

    @property
    def fm(self) -> FMDefense:
        """The defense, for attacks on FM-Defense only."""
        assert isinstance(self.defense, FMDefense)
        return self.defense

    def success(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Default criterion: the hard-decision defended pipeline is fooled. (n,) bool"""
        assert self.target is not None
        return defended_success(self.target, x_adv, y)

    def success_at(self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """`success` of the run's inputs `idx` (for defenses whose decision depends on them)."""
        return self.success(x_adv, y)

    def _check_inputs(self, x: object, y: object) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = getattr(self.classifier, "cfg", None)
        x = check_images(
            x, channels=getattr(cfg, "in_channels", None), size=getattr(cfg, "image_size", None)
        )
        num_classes = int(_logits(self.classifier, x[:1]).shape[1])
        return x.detach().float().cpu(), check_labels(y, len(x), num_classes).cpu()

    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        pool: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> AttackResult:
        """Attack images x (n, C, H, W) in [0, 1] with true labels y (n,).

        `pool` (images, labels) supplies guide images for `latent` (default: the batch itself).
        """
        x, y = self._check_inputs(x, y)
        _eval_mode(self.classifier, self.vae, self.defense)
        t0 = time.perf_counter()
        x_adv, success = self._run(x, y, pool)
        return AttackResult(x_adv, success, time.perf_counter() - t0)

    @abstractmethod
    def _run(
        self, x: torch.Tensor, y: torch.Tensor, pool: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class PGDAttack(AdaptiveAttack):
    """The shared PGD-L∞ loop; subclasses supply `loss` (and optionally `prepare`)."""

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, pool: tuple[torch.Tensor, torch.Tensor] | None
    ) -> None:
        """Per-run precomputation over all inputs (e.g. guide codes); none by default."""

    @abstractmethod
    def loss(
        self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        """Per-example objective (n,) to minimise; `idx` are the rows' indices in the run."""

    def _run(
        self, x: torch.Tensor, y: torch.Tensor, pool: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        self.prepare(x, y, pool)
        done = self.success_at(x, y, torch.arange(len(x)))  # already fooling: no attack
        x_out = x.clone()
        best_loss = torch.full((len(x),), float("inf"))
        for restart in range(cfg.restarts):
            todo = (~done).nonzero().flatten()
            for b in range(0, len(todo), cfg.batch_size):
                idx = todo[b : b + cfg.batch_size]
                self._restart(x, y, idx, gen, x_out, done, best_loss)
            log.debug("restart %d: %d/%d fooled", restart, int(done.sum()), len(x))
        return x_out, done

    def _restart(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        gen: torch.Generator,
        x_out: torch.Tensor,
        done: torch.Tensor,
        best_loss: torch.Tensor,
    ) -> None:
        """One restart over the inputs `idx`; writes successes and fallbacks into x_out/done."""
        cfg = self.config
        device = _device(self.classifier)
        x0, y0 = x[idx], y[idx]
        x_adv = x0.clone()
        if cfg.random_start:
            x_adv = project(
                x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1) * cfg.eps, x0, cfg.eps
            )
        live = torch.ones(len(idx), dtype=torch.bool)  # not yet fooled in this restart
        for t in range(cfg.steps + 1):
            rows = live.nonzero().flatten()
            xa = x_adv[rows].to(device).requires_grad_(True)
            with warnings.catch_warnings():  # the VAE's input check reads min/max of x′
                warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
                loss = self.loss(xa, y0[rows].to(device), idx[rows], gen)  # (r,)
            if t == cfg.steps or (t > 0 and t % cfg.check_every == 0):
                self._record(
                    x_adv, y0, idx, rows, loss.detach().cpu(), live, x_out, done, best_loss
                )
                if t == cfg.steps or not bool(live.any()):
                    return
            (grad,) = torch.autograd.grad(loss.sum(), xa)
            keep = live[rows]  # rows fooled at this check stay where they are
            rows = rows[keep]
            step = step_size(cfg, t) * grad.detach().cpu()[keep].sign()
            x_adv[rows] = project(x_adv[rows] - step, x0[rows], cfg.eps)

    def _record(
        self,
        x_adv: torch.Tensor,
        y0: torch.Tensor,
        idx: torch.Tensor,
        rows: torch.Tensor,
        loss: torch.Tensor,
        live: torch.Tensor,
        x_out: torch.Tensor,
        done: torch.Tensor,
        best_loss: torch.Tensor,
    ) -> None:
        """Check success on the hard pipeline; freeze successes; keep the lowest-loss fallback."""
        ok = self.success_at(x_adv[rows], y0[rows], idx[rows])  # (r,)
        g = idx[rows]
        better = ~ok & (loss < best_loss[g])
        for mask in (ok, better):
            x_out[g[mask]] = x_adv[rows[mask]]
        best_loss[g[better]] = loss[better]
        done[g[ok]] = True
        live[rows[ok]] = False


class UndefendedPGD(PGDAttack):
    """PGD on the classifier alone; success is C(x′) ≠ y (no defense involved)."""

    needs_defense = False

    def success(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _logits(self.classifier, x_adv).argmax(1) != y

    def loss(
        self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        return margin(self.classifier(x_adv).float(), y, self.config.kappa)


class JointPGD(PGDAttack):
    """Misclassify C(x′) + morphs agree with C(x′)'s wrong class (EOT) + purified label wrong."""

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, pool: tuple[torch.Tensor, torch.Tensor] | None
    ) -> None:
        d = self.fm
        active = d.code_idx_[d.theta_ > NEVER]  # codes that flag nothing need no care
        self.active_codes = active.long()
        self.morph_cfg: MorphConfig = d.config.morph
        self.defense_table = draw_table(self.morph_cfg, int(d.lo_.numel()))  # (T, M, B)

    def _eot_deltas(
        self, values: torch.Tensor, codes: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        """Shifts (n, k, V) of the sampled codes, drawn by the defense's widening search."""
        cfg = self.config
        lo, hi = self.fm.lo_[codes], self.fm.hi_[codes]
        mc = self.morph_cfg
        if cfg.morph_source == "defense":
            table = self.defense_table[:, codes]
        else:
            table = torch.rand(mc.max_iters, len(codes), mc.draws_per_iter, generator=gen) * 2 - 1
        deltas = natural_deltas(values, lo, hi, table, mc)  # (n, k, N)
        pick = torch.randint(0, mc.n_morphs, (*values.shape, cfg.eot_values), generator=gen)
        return deltas.gather(2, pick)  # (n, k, V)

    def loss(
        self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        cfg, d, vae = self.config, self.fm, self.vae
        assert vae is not None
        logits = self.classifier(x_adv).float()
        target = best_wrong_class(logits, y)  # (n,)
        total = cfg.w_cls * margin(logits, y, cfg.kappa)
        if cfg.w_morph > 0 and len(self.active_codes) > 0:
            pick = torch.randperm(len(self.active_codes), generator=gen)[: cfg.eot_codes]
            codes_i = self.active_codes[pick]  # (k,)
            codes = vae.codes(x_adv)  # (n, M[, h, w])
            z_u = vae.encode(x_adv)[1]  # (n, K)
            values = code_values(codes.detach().float().cpu())[:, codes_i]  # (n, k)
            deltas = self._eot_deltas(values, codes_i, gen)  # (n, k, V)
            n, k, V = deltas.shape
            morphs = shift_codes(codes, codes_i, deltas).flatten(0, 2)  # (n*k*V, M[, h, w])
            z_u_all = z_u.repeat_interleave(k * V, 0)
            m_logits = self.classifier(vae.decode_codes(morphs, z_u_all)).float()
            m_loss = targeted_margin(m_logits, target.repeat_interleave(k * V), cfg.kappa)
            total = total + cfg.w_morph * m_loss.view(n, k * V).mean(1)
        if cfg.w_purify > 0:
            recon = vae.reconstruct(x_adv, z_u_mode=d.z_u_mode_)
            total = total + cfg.w_purify * margin(self.classifier(recon).float(), y, cfg.kappa)
        return total


class LatentPGD(PGDAttack):
    """Pull the E_s/DGMM codes of x′ toward a target-class guide's codes (+ targeted margin)."""

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        assert self.vae is not None
        z_s, z_u = self.vae.encode(x)
        return torch.cat([z_s.flatten(1), z_u.flatten(1)], 1).float()

    @torch.no_grad()
    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, pool: tuple[torch.Tensor, torch.Tensor] | None
    ) -> None:
        """Guide of each input: the pool image of another class whose codes are nearest."""
        device = _device(self.classifier)
        px, py = pool if pool is not None else (x, y)
        px = check_images(px, name="pool images").float().cpu()
        num_classes = int(_logits(self.classifier, x[:1]).shape[1])
        py = check_labels(py, len(px), num_classes, name="pool labels").cpu()
        e_x = torch.cat(
            [self._embed(x[i : i + 256].to(device)).cpu() for i in range(0, len(x), 256)]
        )
        e_p = torch.cat(
            [self._embed(px[i : i + 256].to(device)).cpu() for i in range(0, len(px), 256)]
        )
        dist = torch.cdist(e_x, e_p)  # (n, P)
        dist[y.view(-1, 1) == py.view(1, -1)] = float("inf")
        nearest = dist.argmin(1)
        if bool(torch.isinf(dist.gather(1, nearest.view(-1, 1))).any()):
            raise InputError("latent needs a pool image of another class for every input")
        self.guide_codes, self.guide_labels = e_p[nearest], py[nearest].long()

    def loss(
        self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        cfg = self.config
        dev = x_adv.device
        pull = (self._embed(x_adv) - self.guide_codes[idx].to(dev)).pow(2).mean(1)
        logits = self.classifier(x_adv).float()
        push = targeted_margin(logits, self.guide_labels[idx].to(dev), cfg.kappa)
        return cfg.w_latent * pull + cfg.w_cls * push


class CWTransfer(AdaptiveAttack):
    """High-confidence CW-L2 on the classifier alone (Foolbox), clipped to ε, then transferred."""

    def _run(
        self, x: torch.Tensor, y: torch.Tensor, pool: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from fmdefense.attacks.library import CWConfig, degenerate, run_attack

        cfg = self.config
        cw = CWConfig(
            binary_search_steps=cfg.cw_binary_steps,
            steps=cfg.cw_steps,
            stepsize=cfg.cw_stepsize,
            confidence=cfg.cw_confidence,
            initial_const=cfg.cw_initial_const,
        )
        out = []
        for i in range(0, len(x), cfg.batch_size):
            xb, yb = x[i : i + cfg.batch_size], y[i : i + cfg.batch_size]
            x_cw = run_attack("cw_l2", self.classifier, xb, yb, config=cw)
            failed = degenerate(x_cw) & ~degenerate(xb)  # Foolbox's placeholder: nothing found
            x_cw = torch.where(failed.view(-1, 1, 1, 1), xb, x_cw)
            out.append(project(x_cw, xb, cfg.eps))
        x_adv = torch.cat(out)
        return x_adv, self.success(x_adv, y)


class SquareSearch(AdaptiveAttack):
    """Square-style L∞ random search on the hard-decision pipeline (hand-written, minimal).

    After Andriushchenko et al. (2020): start from vertical stripes of ±ε, then per query set one
    random square (side from the p schedule) of each input's perturbation to a fresh ±ε per
    channel, keeping it when the score falls. Score (lower is better for the attacker), with
    m = max(margin of C(x′) at y, −κ) and deficit = w_detect · Σ_i max(θ_i + 1/N − r_i, 0) from
    the defense's own resistance: −∞ on success; deficit + m when C(x′) is wrong; else the
    largest possible deficit + m, so that crossing the class boundary is always an improvement.
    """

    def _score(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d, cfg = self.fm, self.config
        dec = d.decide(x_adv)
        fooled = (dec.label != y) & (dec.label != REJECT_LABEL)
        need = d.theta_.view(1, -1) + 1.0 / d.config.n_morphs  # r_i must exceed θ_i
        deficit = cfg.w_detect * (need - dec.details["resistance"]).clamp(min=0).sum(1)  # (n,)
        ceiling = cfg.w_detect * need.clamp(min=0).sum()  # largest possible deficit
        m = margin(_logits(self.classifier, x_adv), y, cfg.kappa)
        score = torch.where(m < 0, deficit + m, ceiling + m)  # any wrong x′ beats any right one
        return torch.where(fooled, torch.full_like(score, float("-inf")), score)

    def _p(self, it: int) -> float:
        """The paper's piecewise-halving share of pixels, rescaled to the query budget."""
        q = self.config.square_queries
        marks = [10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000]
        halvings = sum(it >= int(m * q / 10000) for m in marks)
        return self.config.square_p_init / 2**halvings

    def _run(
        self, x: torch.Tensor, y: torch.Tensor, pool: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        n, c, h, w = x.shape
        stripes = (torch.randint(0, 2, (n, c, 1, w), generator=gen) * 2 - 1).float() * cfg.eps
        x_best = project(x + stripes, x, cfg.eps)
        score = self._score(x_best, y)
        for it in range(cfg.square_queries):
            rows = torch.isfinite(score).nonzero().flatten()
            if len(rows) == 0:
                break
            s = max(1, min(h, w, round(math.sqrt(self._p(it) * h * w))))
            r0 = torch.randint(0, h - s + 1, (len(rows),), generator=gen)
            c0 = torch.randint(0, w - s + 1, (len(rows),), generator=gen)
            signs = (torch.randint(0, 2, (len(rows), c), generator=gen) * 2 - 1).float() * cfg.eps
            delta = x_best[rows] - x[rows]
            for j in range(len(rows)):
                delta[j, :, r0[j] : r0[j] + s, c0[j] : c0[j] + s] = signs[j].view(c, 1, 1)
            cand = project(x[rows] + delta, x[rows], cfg.eps)
            new = self._score(cand, y[rows])
            better = new < score[rows]
            x_best[rows[better]] = cand[better]
            score[rows[better]] = new[better]
        return x_best, torch.isinf(score) & (score < 0)


class MagNetJointPGD(PGDAttack):
    """MagNet's adaptive attack: through the reformer, under both detectors' thresholds.

    As Carlini & Wagner (2017, "MagNet and 'efficient defenses against adversarial attacks' are
    not robust to adversarial examples") attack the defense they know: one loss, minimised by
    the shared PGD loop, = w_cls · margin(C(AE_I(x′)), y) (the label MagNet gives an accepted
    input is that of the reformed image) + w_stealth · Σ_j max(e_j(x′)/τ_j − (1 − m), 0) over
    detector I (mean squared error of AE_I) and detector II (mean absolute error of AE_II), so
    each error is pushed below its threshold τ_j by the relative margin m = `stealth_margin`.

    Four restarts by default (a run costs ≈ 0.02 s per MNIST image here): with one, a second
    restart still raised success 94.0 → 96.4 % at ε = 0.3 on the MNIST paper-profile run.
    """

    defense_types = (MagNet,)
    default_overrides: ClassVar[dict[str, Any]] = {"restarts": 4}

    def loss(
        self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        cfg, magnet = self.config, self.defense
        assert isinstance(magnet, MagNet)
        reformed = magnet.ae1(x_adv)  # (n, C, H, W)
        e1 = (reformed - x_adv).pow(2).flatten(1).mean(1)
        e2 = (magnet.ae2(x_adv) - x_adv).abs().flatten(1).mean(1)
        ratio = torch.stack([e1, e2], 1) / magnet.thresholds.to(x_adv.device)  # (n, 2)
        hinge = (ratio - (1 - cfg.stealth_margin)).clamp(min=0).sum(1)
        wrong = margin(self.classifier(reformed).float(), y, cfg.kappa)
        return cfg.w_cls * wrong + cfg.w_stealth * hinge.float()


class DefenseGANBPDA(PGDAttack):
    """BPDA on Defense-GAN's projection (Athalye, Carlini & Wagner 2018).

    Forward: x̂ = G(z*(x′)) from the defense's own search (R restarts × L steps, its settings).
    Backward: the projection is treated as the identity, so the gradient of the margin loss at
    G(z*) is applied to x′ (x̂ = x′ + stop_grad(G(z*) − x′)). A second term keeps the detector
    quiet: w_stealth · max(‖G(z*) − x′‖²/τ − (1 − m), 0) with z* held fixed (its gradient
    2(x′ − G(z*)) pulls x′ toward its own projection).

    `bpda_starts="defense"` (default) runs the search from the defense's seeded starts for each
    input's position in the run: the forward pass is then exactly the deterministic defense the
    final judgement runs (judge the returned set in the same order), and the success check at a
    step reuses that step's search. `bpda_starts="fresh"` draws new starts every step (EOT over
    the restarts with one draw per step) and checks success with a separate search.

    Cost: one search per live input per step (≈ 0.3–0.6 s per MNIST image on 2 busy cores at
    L = 100, R = 4), so the defaults are 40 steps with a check every 5 (`default_overrides`);
    at 20 steps the MNIST paper-profile run was not converged (doubling the steps raised success
    80.6 → 89.0 % at ε = 0.3).
    """

    defense_types = (DefenseGAN,)
    default_overrides: ClassVar[dict[str, Any]] = {"steps": 40, "check_every": 5}

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, pool: tuple[torch.Tensor, torch.Tensor] | None
    ) -> None:
        assert isinstance(self.defense, DefenseGAN)
        self.starts = self.defense.starts(len(x))  # (n, R, z_dim): the defense's own, by position
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _labels(self, recon: torch.Tensor, error: torch.Tensor) -> torch.Tensor:
        """The hard decision from one search: C(G(z*)), or REJECT_LABEL above the threshold."""
        gan = self.defense
        assert isinstance(gan, DefenseGAN)
        labels = _logits(self.classifier, recon).argmax(1)
        flagged = error.cpu() > gan.threshold.cpu()
        return torch.where(flagged, torch.full_like(labels, REJECT_LABEL), labels)

    def loss(
        self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        cfg, gan = self.config, self.defense
        assert isinstance(gan, DefenseGAN)
        x_now = x_adv.detach()
        starts = self.starts[idx]
        if cfg.bpda_starts == "fresh":
            starts = torch.randn(starts.shape, generator=gen)
        p = gan.project(x_now, starts.to(gan.device))
        recon = p.recon.detach().to(x_adv.device)
        if cfg.bpda_starts == "defense":  # this search is the defense's decision on x_now
            self._last = (x_now.cpu().clone(), idx.clone(), self._labels(recon, p.error))
        x_hat = x_adv + (recon - x_adv).detach()  # value G(z*), gradient identity (BPDA)
        error = (recon - x_adv).pow(2).flatten(1).sum(1)  # z* held fixed
        hinge = (error / gan.threshold.to(x_adv.device) - (1 - cfg.stealth_margin)).clamp(min=0)
        wrong = margin(self.classifier(x_hat).float(), y, cfg.kappa)
        return cfg.w_cls * wrong + cfg.w_stealth * hinge.float()

    def success_at(self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        gan = self.defense
        assert isinstance(gan, DefenseGAN)
        last = self._last
        if last is not None and torch.equal(last[1], idx) and torch.equal(last[0], x_adv):
            labels = last[2]
        else:
            p = gan.project(x_adv, self.starts[idx].to(gan.device))
            labels = self._labels(p.recon, p.error)
        return (labels != y.cpu()) & (labels != REJECT_LABEL)


# The gradient-free and transfer attacks judge any defense by its hard decisions.
CWTransfer.defense_types = (FMDefense, MagNet, DefenseGAN)

AttackFactory = Callable[
    [nn.Module, MorphableVAE | None, AnyDefense | None, AdaptiveConfig], AdaptiveAttack
]
ADAPTIVE_ATTACKS: dict[str, AttackFactory] = {
    "joint": JointPGD,
    "latent": LatentPGD,
    "cw_transfer": CWTransfer,
    "square": SquareSearch,
    "undefended": UndefendedPGD,
    "magnet_joint": MagNetJointPGD,
    "defensegan_bpda": DefenseGANBPDA,
}
# The adaptive attack each defense is judged by first (the CLI's default).
DEFAULT_ATTACK = {"fm": "joint", "magnet": "magnet_joint", "defensegan": "defensegan_bpda"}


def _factory(name: str) -> AttackFactory:
    if name not in ADAPTIVE_ATTACKS:
        raise InputError(
            f"unknown adaptive attack {name!r}; choose one of {', '.join(ADAPTIVE_ATTACKS)}"
        )
    return ADAPTIVE_ATTACKS[name]


def attacks_for(kind: str) -> list[str]:
    """Registered attacks that apply to a defense kind ("fm", "magnet", "defensegan")."""
    types = {"fm": FMDefense, "magnet": MagNet, "defensegan": DefenseGAN}
    if kind not in types:
        raise InputError(f"unknown defense kind {kind!r}; choose one of {', '.join(types)}")
    return [
        name
        for name, factory in ADAPTIVE_ATTACKS.items()
        if not getattr(factory, "needs_defense", True)
        or types[kind] in getattr(factory, "defense_types", ())
    ]


def default_config(name: str, **changes: Any) -> AdaptiveConfig:
    """AdaptiveConfig with the attack's own defaults (e.g. few steps for defensegan_bpda)."""
    overrides = dict(getattr(_factory(name), "default_overrides", {}))
    return AdaptiveConfig(**{**overrides, **changes})


def make_attack(
    name: str,
    defense: AnyDefense | None,
    config: AdaptiveConfig | None = None,
    *,
    classifier: nn.Module | None = None,
    vae: MorphableVAE | None = None,
) -> AdaptiveAttack:
    """Build a registered attack; classifier and vae default to the defense's own.

    MagNet and Defense-GAN do not hold the classifier they protect: pass `classifier`.
    The config defaults to `default_config(name)`.
    """
    factory = _factory(name)
    if defense is not None and not isinstance(defense, FMDefense | MagNet | DefenseGAN):
        raise InputError(
            f"defense must be an FMDefense, a MagNet or a DefenseGAN, got {type(defense).__name__}"
        )
    classifier = classifier if classifier is not None else getattr(defense, "classifier", None)
    vae = vae if vae is not None else getattr(defense, "vae", None)
    if classifier is None:
        raise InputError("pass a classifier (or a defense that holds one)")
    return factory(classifier, vae, defense, config or default_config(name))


def run_adaptive(
    name: str,
    defense: AnyDefense | None,
    x: torch.Tensor,
    y: torch.Tensor,
    config: AdaptiveConfig | None = None,
    *,
    pool: tuple[torch.Tensor, torch.Tensor] | None = None,
    classifier: nn.Module | None = None,
) -> AttackResult:
    """`make_attack(name, defense, config, classifier=classifier).run(x, y, pool=pool)`."""
    return make_attack(name, defense, config, classifier=classifier).run(x, y, pool=pool)


# ---------------------------------------------------------------------- evaluation


def evaluate_eps(
    defense: AnyDefense,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str,
    eps: float,
    *,
    config: AdaptiveConfig | None = None,
    pool: tuple[torch.Tensor, torch.Tensor] | None = None,
    classifier: nn.Module | None = None,
) -> dict[str, Any]:
    """One attack at one ε, judged by the one rule on the defense's hard decisions.

    Keys of `outcome_rates` plus eps, linf (largest ‖x′ − x‖∞), seconds, seconds_per_image and
    attack_reported_success (the attack's own flags, for comparison with the judgement).
    """
    cfg = dataclasses.replace(config or default_config(attack), eps=float(eps))
    attacker = make_attack(attack, defense, cfg, classifier=classifier)
    x, y = attacker._check_inputs(x, y)
    result = attacker.run(x, y, pool=pool)
    row = outcome_rates(defense, result.x_adv, y, classifier=attacker.classifier)
    n = len(x)
    row.update(
        eps=float(eps),
        linf=float((result.x_adv - x).abs().amax()) if n else 0.0,
        seconds=result.seconds,
        seconds_per_image=result.seconds / max(n, 1),
        attack_reported_success=float(result.success.float().mean()) if n else 0.0,
    )
    log.info(
        "%s at eps %.3f: robust accuracy with rejection %.4f, success %.4f (%.2f s/image)",
        attack,
        eps,
        row["robust_accuracy_with_rejection"],
        row["attack_success"],
        row["seconds_per_image"],
    )
    return row


def undefended_success(
    classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, config: AdaptiveConfig
) -> float:
    """Share of inputs PGD fools on the bare classifier at ε (sanity: ~100 % at large ε)."""
    cfg = dataclasses.replace(config, eps=float(eps))
    result = make_attack("undefended", None, cfg, classifier=classifier).run(x, y)
    return float(result.success.float().mean()) if len(y) else 0.0


def sanity_checks(
    per_eps: Sequence[dict[str, Any]],
    *,
    double_budget: dict[str, Any] | None = None,
    double_restarts: dict[str, Any] | None = None,
    undefended: float | None = None,
    unbounded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The adaptive-attack literature's checks from rows of `evaluate_eps` (sorted by ε).

    `double_budget`: the top-ε row with twice the PGD steps — another trajectory (the step-size
    schedule stretches), so it is judged within two binomial standard errors
    (`more_budget_within_2se`). `double_restarts`: the top-ε row with twice the restarts, whose
    first restart repeats the base run, so a correct implementation can only add successes
    (`more_restarts_not_lower`, strict). `converged`: neither doubling raises success by more
    than two standard errors (otherwise the top-ε robust accuracy is only an upper bound).
    `passed` joins the checks that were run (all but `converged`, which is reported beside).
    """
    success = [row["attack_success"] for row in per_eps]
    sanity: dict[str, Any] = {
        "success_by_eps": success,
        "success_non_decreasing_in_eps": all(b >= a for a, b in itertools.pairwise(success)),
    }
    verdicts = ["success_non_decreasing_in_eps"]
    top = success[-1]
    n = int(per_eps[-1].get("n", 0))
    se = math.sqrt(top * (1 - top) / n) if n else 0.0
    if double_budget is not None:
        more = double_budget["attack_success"]
        sanity["success_double_budget"] = more
        sanity["more_budget_not_lower"] = more >= top  # strict, reported for transparency
        sanity["more_budget_within_2se"] = more >= top - 2 * se
        verdicts.append("more_budget_within_2se")
    if double_restarts is not None:
        sanity["success_double_restarts"] = double_restarts["attack_success"]
        sanity["more_restarts_not_lower"] = double_restarts["attack_success"] >= top
        verdicts.append("more_restarts_not_lower")
    more_runs = [r["attack_success"] for r in (double_budget, double_restarts) if r is not None]
    if more_runs:  # neither doubling gains more than noise: the top-ε figure is not a bound
        sanity["converged"] = max(more_runs) <= top + 2 * se
    if undefended is not None:
        sanity["undefended_success"] = undefended
        sanity["undefended_reaches_100"] = undefended >= 0.99
        verdicts.append("undefended_reaches_100")
    if unbounded is not None:
        sanity["unbounded_eps"] = unbounded["eps"]
        sanity["success_unbounded"] = unbounded["attack_success"]
        sanity["unbounded_reaches_100"] = unbounded["attack_success"] >= 0.99
        verdicts.append("unbounded_reaches_100")
    sanity["passed"] = all(sanity[k] for k in verdicts)
    return sanity


def more_restarts_apply(attack: str) -> bool:
    """Whether `attack` restarts (PGD family); the others would just repeat themselves."""
    factory = _factory(attack)
    return isinstance(factory, type) and issubclass(factory, PGDAttack)


def evaluate_adaptive(
    defense: AnyDefense,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str,
    eps_list: Sequence[float],
    *,
    config: AdaptiveConfig | None = None,
    pool: tuple[torch.Tensor, torch.Tensor] | None = None,
    check_budget: bool = True,
    check_undefended: bool = True,
    unbounded_eps: float | None = None,
    classifier: nn.Module | None = None,
) -> dict[str, Any]:
    """Sweep ε with one adaptive attack; JSON-serialisable results and sanity checks.

    `defense` is an FMDefense, a MagNet or a DefenseGAN (the baselines need `classifier`).
    Per ε: robust accuracy with rejection (adversarial inputs safe when rejected or labelled y,
    after purification or reforming where the defense does so), attack success (labelled, not
    rejected, and wrong), the accept rate, the defense's own counts, and the time per image.
    `clean` holds the clean accept rate at the same thresholds. Sanity: success non-decreasing
    in ε; at the largest ε, twice the steps and twice the restarts (`check_budget`) do not lower
    success (see `sanity_checks`); undefended
    PGD reaches ~100 % at the largest ε (`check_undefended`); with `unbounded_eps` (e.g. 1.0),
    success there (should be ~100 %).
    """
    if not eps_list:
        raise InputError("eps_list is empty: give at least one ε")
    eps_sorted = sorted(float(e) for e in eps_list)
    base = config or default_config(attack)
    attacker = make_attack(attack, defense, base, classifier=classifier)  # name, defense
    x, y = attacker._check_inputs(x, y)
    clf = attacker.classifier

    def one(eps: float, cfg: AdaptiveConfig) -> dict[str, Any]:
        return evaluate_eps(defense, x, y, attack, eps, config=cfg, pool=pool, classifier=clf)

    top = eps_sorted[-1]
    per_eps = [one(e, base) for e in eps_sorted]
    sanity = sanity_checks(
        per_eps,
        double_budget=one(top, base.with_budget(2)) if check_budget else None,
        double_restarts=(
            one(top, base.with_restarts(2))
            if check_budget and more_restarts_apply(attack)
            else None
        ),
        undefended=undefended_success(clf, x, y, top, base) if check_undefended else None,
        unbounded=one(float(unbounded_eps), base) if unbounded_eps is not None else None,
    )
    return {
        "attack": attack,
        "defense": as_defended(defense, clf).name,
        "config": asdict(base),
        "n": len(x),
        "clean": outcome_rates(defense, x, y, classifier=clf),
        "per_eps": per_eps,
        "sanity": sanity,
    }
