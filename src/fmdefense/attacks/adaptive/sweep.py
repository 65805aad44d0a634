"""The one ε sweep: each defense under its adaptive attacks, judged on its hard decisions.

`run_sweep` runs every (attack, ε) unit, the clean rates and the sanity checks (`sanity.py`).
With an `out` folder it is resumable: each unit's result is written atomically as its own JSON
file with the key it was computed for (defense source, classifier weights, inputs, the attack's
parameters); a later run with the same key skips it, and a `summary.json` collects them. Keys
written before the attacks had their own parameters (`legacy.py`) are still recognised.

    out/clean.json                              the defense on the clean inputs
    out/<attack>/eps-<ε>.json                   one attack at one ε
    out/<attack>/double-budget-eps-<ε>.json     sanity: twice the iterations at the largest ε
    out/<attack>/double-restarts-eps-<ε>.json   sanity: twice the restarts (PGD attacks)
    out/<attack>/unbounded-eps-<ε>.json         sanity: the unbounded ε (when asked)
    out/undefended-eps-<ε>.json                 sanity: PGD on the bare classifier
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fmdefense.attacks.adaptive.base import AdaptiveAttack, Pool
from fmdefense.attacks.adaptive.legacy import legacy_config
from fmdefense.attacks.adaptive.registry import make_attack
from fmdefense.attacks.adaptive.sanity import sanity_checks
from fmdefense.attacks.defended import outcomes
from fmdefense.core.artifacts import read_json, write_json
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.core.executor import SerialExecutor, current_executor
from fmdefense.core.fingerprints import fingerprint, fingerprint_tensor
from fmdefense.defenses.base import Defense

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"


def evaluate(
    attack: AdaptiveAttack,
    defense: Defense,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    pool: Pool = None,
) -> dict[str, Any]:
    """One attack at its ε, judged by the one rule on `defense`'s hard decisions.

    Keys of `attacks.defended.outcomes` plus eps, linf (largest ‖x′ − x‖∞), seconds,
    seconds_per_image and attack_reported_success (the attack's own flags, for comparison).
    """
    x, y = attack.check_inputs(x, y)
    result = attack.run(x, y, pool=pool)
    row = outcomes(defense, result.x_adv, y)
    n = len(x)
    row.update(
        eps=float(attack.eps),
        linf=float((result.x_adv - x).abs().amax()) if n else 0.0,
        seconds=result.seconds,
        seconds_per_image=result.seconds / max(n, 1),
        attack_reported_success=float(result.success.float().mean()) if n else 0.0,
    )
    log.info(
        "%s at eps %.3f: robust accuracy with rejection %.4f, success %.4f (%.2f s/image)",
        attack.name,
        attack.eps,
        row["robust_accuracy_with_rejection"],
        row["attack_success"],
        row["seconds_per_image"],
    )
    return row


def cached_unit(
    path: Path | None,
    key: dict[str, Any],
    compute: Callable[[], Any],
    *,
    aliases: Sequence[dict[str, Any]] = (),
) -> Any:
    """`compute()`'s result, stored atomically in `path` with `key`; reused when the stored key
    equals `key` or one of `aliases` (older spellings of the same unit). No path: no cache."""
    found = _stored(path, key, aliases)
    if found is not _MISSING:
        return found
    result = compute()
    _store(path, key, result)
    return result


_MISSING = object()


def _stored(path: Path | None, key: dict[str, Any], aliases: Sequence[dict[str, Any]]) -> Any:
    """The result stored in `path` under `key` (or an alias), else `_MISSING`."""
    if path is None or not path.is_file():
        return _MISSING
    known = [json.loads(json.dumps(k)) for k in (key, *aliases)]  # as they read back
    try:
        stored = read_json(path)
    except ArtifactError:
        stored = None
    if isinstance(stored, dict) and stored.get("key") in known:
        log.info("%s: done with the same config, skipped", path)
        return stored["result"]
    log.info("%s: config changed, recomputing", path)
    return _MISSING


def _store(path: Path | None, key: dict[str, Any], result: Any) -> None:
    if path is not None:
        write_json(path, {"key": json.loads(json.dumps(key)), "result": result})


def _eps_name(eps: float) -> str:
    return f"{eps:g}"


class _Units:
    """The units of one sweep: planned first (file, key, computation), then the ones not yet
    stored run on the command's executor (`core.executor`), each stored as soon as it is done.
    Every unit is independent (own seeded generators), so the order does not change results."""

    def __init__(self, out: Path | None, base_key: dict[str, Any]) -> None:
        self.out, self.base_key = out, base_key
        self.planned: dict[str, tuple[dict[str, Any], list[dict[str, Any]], Callable[[], Any]]] = {}
        self.results: dict[str, Any] = {}

    def path(self, name: str) -> Path | None:
        return None if self.out is None else self.out / name

    def plan(
        self, name: str, key: dict[str, Any], compute: Callable[[], Any], aliases: list[Any]
    ) -> str:
        """Add the unit stored as `out/<name>`; returns `name`, its handle in `results`."""
        self.planned[name] = (key, aliases, compute)
        return name

    def plan_attack(
        self, unit: str, attack: AdaptiveAttack, name: str, compute: Callable[[], Any]
    ) -> str:
        """A unit keyed by the attack's parameters (or their old shared form)."""
        who = {"attack": attack.name} if unit == "attack" else {}
        key = {**self.base_key, "unit": unit, **who, "params": attack.params}
        old = legacy_config(attack)
        aliases = [] if old is None else [{**self.base_key, "unit": unit, **who, "config": old}]
        return self.plan(name, key, compute, aliases)

    def run(self) -> dict[str, Any]:
        """Every planned unit's result: stored ones read back, the others computed."""
        todo = []
        for name, (key, aliases, _) in self.planned.items():
            found = _stored(self.path(name), key, aliases)
            if found is _MISSING:
                todo.append(name)
            else:
                self.results[name] = found
        planned = self.planned

        def compute(name: str) -> Any:
            return planned[name][2]()

        def finished(i: int, result: Any) -> None:
            _store(self.path(todo[i]), planned[todo[i]][0], result)
            self.results[todo[i]] = result

        # Resumable sweeps (with a folder) run on the command's executor; others stay here.
        executor = current_executor() if self.out is not None else SerialExecutor()
        executor.map(compute, [(name,) for name in todo], finished, desc="adaptive", unit="unit")
        return self.results


def _configured(name: str, defense: Defense, changes: dict[str, Any]) -> AdaptiveAttack:
    """The attack's defaults, with the `changes` it has a parameter for."""
    attack = make_attack(name, defense)
    return attack.replace(**{k: v for k, v in changes.items() if k in attack.params})


def run_sweep(
    defense: Defense,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[str],
    eps_list: Sequence[float],
    out: Path | None = None,
    *,
    changes: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    checks: bool = True,
    unbounded_eps: float | None = None,
    pool: Pool = None,
) -> dict[str, Any]:
    """All (attack, ε) units, the clean rates and the sanity checks; resumable under `out`.

    `changes` overrides the parameters each attack has of its defaults (e.g. {"steps": 50});
    `source` describes the defense and inputs (it joins every unit's key, so a different defense
    or input set recomputes). Sanity checks (with `checks`): twice the iterations and (PGD
    attacks) twice the restarts at the largest ε, PGD on the bare classifier at the largest ε;
    with `unbounded_eps`, one more run there. Returns a JSON-serialisable summary.
    """
    if not eps_list:
        raise InputError("give at least one ε (eps_list is empty)")
    if not attacks:
        raise InputError("give at least one attack")
    eps_sorted = sorted(float(e) for e in eps_list)
    top, changes = eps_sorted[-1], dict(changes or {})
    t0 = time.perf_counter()
    configured = {name: _configured(name, defense, changes) for name in attacks}
    x, y = next(iter(configured.values())).check_inputs(x, y)
    clf = defense.classifier
    base = {**(source or {}), "classifier": fingerprint(clf), "inputs": fingerprint_tensor(x)}
    units = _Units(None if out is None else Path(out), {**base, "n": len(x)})

    def attack_unit(attack: AdaptiveAttack, file: str) -> str:
        def compute() -> dict[str, Any]:
            return evaluate(attack, defense, x, y, pool=pool)

        return units.plan_attack("attack", attack, f"{attack.name}/{file}", compute)

    clean = units.plan(
        "clean.json", {**units.base_key, "unit": "clean"}, lambda: outcomes(defense, x, y), []
    )
    per_eps = {
        name: [
            attack_unit(configured[name].replace(eps=eps), f"eps-{_eps_name(eps)}.json")
            for eps in eps_sorted
        ]
        for name in attacks
    }
    checked = {
        name: _plan_sanity(configured[name], top, attack_unit, checks, unbounded_eps)
        for name in attacks
    }
    undefended: str | None = None
    if checks:  # PGD on the bare classifier at the largest ε: one unit for all attacks
        bare = _configured("undefended", defense, changes).replace(eps=top)

        def bare_success() -> float:
            return float(bare.run(x, y).success.float().mean())

        file = f"undefended-eps-{_eps_name(top)}.json"
        undefended = units.plan_attack("undefended", bare, file, bare_success)
    done = units.run()
    results = {}
    for name in attacks:
        rows = [done[unit] for unit in per_eps[name]]
        sanity = sanity_checks(
            rows,
            undefended=None if undefended is None else done[undefended],
            **{
                check: None if unit is None else done[unit] for check, unit in checked[name].items()
            },
        )
        results[name] = {"params": configured[name].params, "per_eps": rows, "sanity": sanity}
    summary = {
        "defense": defense.name,
        **(source or {}),
        "n": len(x),
        "eps": eps_sorted,
        "clean": done[clean],
        "attacks": results,
        # the attack units' own compute time, whichever runs made them (a resumed sweep keeps
        # it), and this call's wall time (small when every unit was reused)
        "seconds": sum(
            r["seconds"] for r in done.values() if isinstance(r, dict) and "seconds" in r
        ),
        "wall_seconds": time.perf_counter() - t0,
    }
    if out is not None:
        write_json(Path(out) / SUMMARY_FILE, summary)
    return summary


def _plan_sanity(
    attack: AdaptiveAttack,
    top: float,
    attack_unit: Callable[[AdaptiveAttack, str], str],
    checks: bool,
    unbounded_eps: float | None,
) -> dict[str, str | None]:
    """One attack's sanity units (`sanity_checks` keyword -> unit, None when not run)."""
    units: dict[str, str | None] = {"double_budget": None, "double_restarts": None}
    if checks:
        top_attack = attack.replace(eps=top)
        file = f"double-budget-eps-{_eps_name(top)}.json"
        units["double_budget"] = attack_unit(top_attack.with_budget(2), file)
        if attack.restartable:
            file = f"double-restarts-eps-{_eps_name(top)}.json"
            units["double_restarts"] = attack_unit(top_attack.with_restarts(2), file)
    units["unbounded"] = None
    if unbounded_eps is not None:
        eps_u = float(unbounded_eps)
        file = f"unbounded-eps-{_eps_name(eps_u)}.json"
        units["unbounded"] = attack_unit(attack.replace(eps=eps_u), file)
    return units
