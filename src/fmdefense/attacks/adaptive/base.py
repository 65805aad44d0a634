"""What every adaptive attack shares: construction from a defense, input checks, the result,
and the one PGD-L∞ loop (a template method, like Foolbox's `gradient_descent_base.py`).

An attack is built around the classifier and the fitted defense it attacks, with its own
keyword-only hyperparameters (recorded in `params`, which key the sweep's result files);
`run(x, y)` returns x′ and the success flags by its own criterion. `PGDAttack` owns the loop:
random start in the ε-ball, signed-gradient steps on the `loss` hook (per example, lower is
better for the attacker), the `project` hook (default: the L∞ ball ∩ [0, 1]), a step-size
schedule, restarts, and every `check_every` steps the `success_at` hook on the hard-decision
pipeline, freezing an input at its first success.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

import torch
from torch import nn

from fmdefense.attacks.defended import defended_success, require_fitted
from fmdefense.core.config import check_choice, check_int, check_range
from fmdefense.core.device import module_device
from fmdefense.core.errors import InputError
from fmdefense.core.validation import check_images, check_labels
from fmdefense.defenses.base import Defense
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.registry import DEFENSES

log = logging.getLogger(__name__)
A = TypeVar("A", bound="AdaptiveAttack")
Pool = tuple[torch.Tensor, torch.Tensor] | None
SCHEDULES = ("halving", "cosine", "constant")


@dataclass(frozen=True)
class AttackResult:
    """What an adaptive attack returns: x′ and the success flags by its own criterion."""

    x_adv: torch.Tensor  # (n, C, H, W) in [0, 1], ‖x′ − x‖∞ ≤ ε
    success: torch.Tensor  # (n,) bool
    seconds: float


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Projection onto the L∞ ball of radius ε around x, intersected with [0, 1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)


def device_of(model: nn.Module) -> torch.device:
    return module_device(model)


@torch.no_grad()
def batched_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The model's float logits (n, K) for x, batched, on the CPU."""
    device = device_of(model)
    parts = [
        model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)
    ]
    return torch.cat(parts)


def check_weight(name: str, value: object) -> None:
    """A finite number >= 0 (a loss weight or margin cap)."""
    check_range(name, value, 0.0, math.inf)


class AdaptiveAttack(ABC):
    """An attack on a defended pipeline; models at construction, inputs at `run`."""

    name: ClassVar[str]
    needs_defense: ClassVar[bool] = True
    defenses: ClassVar[tuple[str, ...] | None] = None  # registry names it attacks; None: any
    budget_params: ClassVar[tuple[str, ...]] = ()  # what `with_budget` multiplies
    legacy_names: ClassVar[dict[str, str]] = {}  # param -> its field in the old shared config
    eps: float  # L∞ radius (1.0: unbounded)

    def __init__(
        self, classifier: nn.Module, defense: Defense | None = None, *, eps: float = 0.3
    ) -> None:
        check_range("eps", eps, 0.0, 1.0, low_open=True)
        self.classifier = classifier
        self.defense = defense
        self.params: dict[str, Any] = {}
        self.budget = 1  # how many times the default iterations `with_budget` asked for
        self._keep(eps=eps)
        self._check_defense()

    def _keep(self, **params: Any) -> None:
        """Record hyperparameters: as attributes and in `params`."""
        for key, value in params.items():
            setattr(self, key, value)
        self.params.update(params)

    def _check_defense(self) -> None:
        if not self.needs_defense:
            return
        me = type(self).__name__
        if self.defense is None:
            raise InputError(f"{me} attacks a defense: pass a fitted one")
        if self.defenses is not None and self.defense.name not in self.defenses:
            kinds = " or ".join(DEFENSES[n].__name__ for n in self.defenses)
            raise InputError(f"{me} attacks {kinds}, got {type(self.defense).__name__}")
        require_fitted(self.defense)

    @property
    def fm(self) -> FMDefense:
        """The defense, for attacks on FM-Defense only (checked at construction)."""
        return cast(FMDefense, self.defense)

    # ------------------------------------------------------------------ variants

    def replace(self: A, **changes: Any) -> A:
        """The same attack with other hyperparameters (unknown names raise InputError)."""
        unknown = sorted(set(changes) - set(self.params))
        if unknown:
            raise InputError(
                f"{self.name} has no parameter {unknown[0]!r}; its: {list(self.params)}"
            )
        clone = type(self)(self.classifier, self.defense, **{**self.params, **changes})
        clone.budget = self.budget
        return clone

    def with_budget(self: A, factor: int) -> A:
        """The same attack with `factor` times the iterations (PGD steps, CW steps, queries)."""
        clone = self.replace(**{p: self.params[p] * factor for p in self.budget_params})
        clone.budget = self.budget * factor
        return clone

    @property
    def restartable(self) -> bool:
        """Whether the attack restarts (PGD family); the others would just repeat themselves."""
        return "restarts" in self.params

    def with_restarts(self: A, factor: int) -> A:
        """The same attack with `factor` times the restarts (the first repeats this run)."""
        return self.replace(restarts=self.params["restarts"] * factor)

    # ------------------------------------------------------------------ running

    def success(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Default criterion: the hard-decision defended pipeline is fooled. (n,) bool"""
        assert self.defense is not None
        return defended_success(self.defense, x_adv, y)

    def success_at(self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """`success` of the run's inputs `idx` (for defenses whose decision depends on them)."""
        return self.success(x_adv, y)

    def check_inputs(self, x: object, y: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (n, C, H, W) in [0, 1] and labels (n,) as the classifier takes them, on CPU."""
        cfg = getattr(self.classifier, "cfg", None)
        x = check_images(
            x, channels=getattr(cfg, "in_channels", None), size=getattr(cfg, "image_size", None)
        )
        num_classes = int(batched_logits(self.classifier, x[:1]).shape[1])
        return x.detach().float().cpu(), check_labels(y, len(x), num_classes).cpu()

    def _eval_mode(self) -> None:
        """Classifier and every network the defense holds, alone or in a tuple (the default's
        autoencoders), in eval mode (batch norm, dropout)."""
        held = list(vars(self.defense).values()) if self.defense is not None else []
        for value in [self.classifier, *held]:
            for module in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(module, nn.Module):
                    module.eval()

    def run(self, x: torch.Tensor, y: torch.Tensor, *, pool: Pool = None) -> AttackResult:
        """Attack images x (n, C, H, W) in [0, 1] with true labels y (n,).

        `pool` (images, labels) supplies guide images for `latent` (default: the batch itself).
        """
        x, y = self.check_inputs(x, y)
        self._eval_mode()
        t0 = time.perf_counter()
        x_adv, success = self._run(x, y, pool)
        return AttackResult(x_adv, success, time.perf_counter() - t0)

    @abstractmethod
    def _run(
        self, x: torch.Tensor, y: torch.Tensor, pool: Pool
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class PGDAttack(AdaptiveAttack):
    """The shared PGD-L∞ loop; subclasses supply `loss` (and optionally `prepare`, `project`)."""

    budget_params = ("steps",)
    steps: int  # PGD steps per restart
    restarts: int  # each from a random point in the ε-ball (the first repeats a 1-restart run)
    step_size: float | None  # initial α; None: ε/4
    schedule: str  # halving (α/2 each quarter) | cosine | constant
    random_start: bool
    check_every: int  # steps between hard-decision success checks (and at each restart end)
    kappa: float  # margin cap of every margin loss (a satisfied term stops pulling)
    batch_size: int  # inputs attacked together
    seed: int

    def __init__(
        self,
        classifier: nn.Module,
        defense: Defense | None = None,
        *,
        steps: int = 100,
        restarts: int = 1,
        step_size: float | None = None,
        schedule: str = "halving",
        random_start: bool = True,
        check_every: int = 10,
        kappa: float = 5.0,
        batch_size: int = 64,
        seed: int = 0,
        **common: Any,
    ) -> None:
        for key, count in (("steps", steps), ("restarts", restarts), ("check_every", check_every)):
            check_int(key, count, low=1)
        check_int("batch_size", batch_size, low=1)
        check_int("seed", seed, low=0)
        check_choice("schedule", schedule, SCHEDULES)
        check_weight("kappa", kappa)
        if step_size is not None:
            check_range("step_size", step_size, 0.0, math.inf, low_open=True)
        super().__init__(classifier, defense, **common)
        self._keep(
            steps=steps,
            restarts=restarts,
            step_size=step_size,
            schedule=schedule,
            random_start=bool(random_start),
            check_every=check_every,
            kappa=kappa,
            batch_size=batch_size,
            seed=seed,
        )

    # ------------------------------------------------------------------ hooks

    def prepare(self, x: torch.Tensor, y: torch.Tensor, pool: Pool) -> None:
        """Per-run precomputation over all inputs (e.g. guide codes); none by default."""

    @abstractmethod
    def loss(
        self, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        """Per-example objective (n,) to minimise; `idx` are the rows' indices in the run."""

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The feasible set: the L∞ ball of radius ε around x, intersected with [0, 1]."""
        return project_linf(x_adv, x, self.eps)

    def project_at(self, x_adv: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """`project` for the run's inputs `idx` (for attacks whose feasible set is per input)."""
        return self.project(x_adv, x)

    def begin_step(self, t: int, x_adv: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        """Called before step t of a restart with its live rows (t = 0: before the random start,
        all rows); none by default (a phased attack switches objective or feasible set here)."""

    def starts_at_random(self, restart: int) -> bool:
        """Whether restart `restart` starts at a uniform point of the ε-ball (else at the input)."""
        return self.random_start

    def step_size_at(self, t: int) -> float:
        """α at step t of a restart under the schedule (initial α: `step_size`, else ε/4)."""
        return self.scheduled(t, self.steps)

    def scheduled(self, t: int, n: int) -> float:
        """α at step t of a schedule n steps long (a phased attack runs one per phase)."""
        alpha = self.step_size if self.step_size is not None else self.eps / 4
        if self.schedule == "halving":  # α, α/2, α/4, α/8 over the four quarters
            return alpha / 2 ** min(3, (4 * t) // n)
        if self.schedule == "cosine":
            floor = alpha / 100
            return floor + 0.5 * (alpha - floor) * (1 + math.cos(math.pi * t / n))
        return alpha

    # ------------------------------------------------------------------ the loop

    def _run(
        self, x: torch.Tensor, y: torch.Tensor, pool: Pool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        self.prepare(x, y, pool)
        done = self.success_at(x, y, torch.arange(len(x)))  # already fooling: no attack
        x_out = x.clone()
        best_loss = torch.full((len(x),), float("inf"))
        for restart in range(self.restarts):
            todo = (~done).nonzero().flatten()
            for b in range(0, len(todo), self.batch_size):
                idx = todo[b : b + self.batch_size]
                self._restart(x, y, idx, gen, x_out, done, best_loss, restart)
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
        restart: int = 0,
    ) -> None:
        """One restart over the inputs `idx`; writes successes and fallbacks into x_out/done."""
        device = device_of(self.classifier)
        x0, y0 = x[idx], y[idx]
        x_adv = x0.clone()
        self.begin_step(0, x_adv, y0, idx)
        if self.starts_at_random(restart):
            noise = (torch.rand(x0.shape, generator=gen) * 2 - 1) * self.eps
            x_adv = self.project_at(x0 + noise, x0, idx)
        live = torch.ones(len(idx), dtype=torch.bool)  # not yet fooled in this restart
        for t in range(self.steps + 1):
            rows = live.nonzero().flatten()
            if t > 0:
                self.begin_step(t, x_adv[rows], y0[rows], idx[rows])
            xa = x_adv[rows].to(device).requires_grad_(True)
            with warnings.catch_warnings():  # the VAE's input check reads min/max of x′
                warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
                loss = self.loss(xa, y0[rows].to(device), idx[rows], gen)  # (r,)
            if t == self.steps or (t > 0 and t % self.check_every == 0):
                self._record(
                    x_adv, y0, idx, rows, loss.detach().cpu(), live, x_out, done, best_loss
                )
                if t == self.steps or not bool(live.any()):
                    return
            (grad,) = torch.autograd.grad(loss.sum(), xa)
            keep = live[rows]  # rows fooled at this check stay where they are
            rows = rows[keep]
            step = self.step_size_at(t) * grad.detach().cpu()[keep].sign()
            x_adv[rows] = self.project_at(x_adv[rows] - step, x0[rows], idx[rows])

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
