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
from tqdm.auto import tqdm

from fmdefense.attacks.adaptive.base import AdaptiveAttack, Pool
from fmdefense.attacks.adaptive.legacy import legacy_config
from fmdefense.attacks.adaptive.registry import make_attack
from fmdefense.attacks.adaptive.sanity import sanity_checks
from fmdefense.attacks.defended import outcomes
from fmdefense.core.artifacts import read_json, write_json
from fmdefense.core.errors import ArtifactError, InputError
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
    if path is None:
        return compute()
    known = [json.loads(json.dumps(k)) for k in (key, *aliases)]  # as they read back
    if path.is_file():
        try:
            stored = read_json(path)
        except ArtifactError:
            stored = None
        if isinstance(stored, dict) and stored.get("key") in known:
            log.info("%s: done with the same config, skipped", path)
            return stored["result"]
        log.info("%s: config changed, recomputing", path)
    result = compute()
    write_json(path, {"key": known[0], "result": result})
    return result


def _eps_name(eps: float) -> str:
    return f"{eps:g}"


class _Units:
    """The unit files of one sweep: where each goes and the key it is stored under."""

    def __init__(self, out: Path | None, base_key: dict[str, Any]) -> None:
        self.out, self.base_key = out, base_key

    def path(self, *parts: str) -> Path | None:
        return None if self.out is None else self.out.joinpath(*parts)

    def run(
        self, unit: str, attack: AdaptiveAttack, path: Path | None, compute: Callable[[], Any]
    ) -> Any:
        """The unit's result, keyed by the attack's parameters (or their old shared form)."""
        who = {"attack": attack.name} if unit == "attack" else {}
        key = {**self.base_key, "unit": unit, **who, "params": attack.params}
        old = legacy_config(attack)
        aliases = [] if old is None else [{**self.base_key, "unit": unit, **who, "config": old}]
        return cached_unit(path, key, compute, aliases=aliases)


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

    def attack_unit(attack: AdaptiveAttack, file: str) -> dict[str, Any]:
        path = units.path(attack.name, file)
        return units.run("attack", attack, path, lambda: evaluate(attack, defense, x, y, pool=pool))

    clean_key = {**units.base_key, "unit": "clean"}
    clean = cached_unit(units.path("clean.json"), clean_key, lambda: outcomes(defense, x, y))
    per_eps: dict[str, list[dict[str, Any]]] = {name: [] for name in attacks}
    jobs = [(name, eps) for name in attacks for eps in eps_sorted]
    for name, eps in tqdm(jobs, desc="adaptive", disable=None):
        attack = configured[name].replace(eps=eps)
        per_eps[name].append(attack_unit(attack, f"eps-{_eps_name(eps)}.json"))
    undefended: float | None = None
    if checks:  # PGD on the bare classifier at the largest ε: one unit for all attacks
        bare = _configured("undefended", defense, changes).replace(eps=top)

        def bare_success() -> float:
            return float(bare.run(x, y).success.float().mean())

        path = units.path(f"undefended-eps-{_eps_name(top)}.json")
        undefended = units.run("undefended", bare, path, bare_success)
    results = {
        name: _with_sanity(
            configured[name],
            per_eps[name],
            top,
            attack_unit,
            undefended,
            checks=checks,
            unbounded_eps=unbounded_eps,
        )
        for name in attacks
    }
    summary = {
        "defense": defense.name,
        **(source or {}),
        "n": len(x),
        "eps": eps_sorted,
        "clean": clean,
        "attacks": results,
        "seconds": time.perf_counter() - t0,
    }
    if out is not None:
        write_json(Path(out) / SUMMARY_FILE, summary)
    return summary


def _with_sanity(
    attack: AdaptiveAttack,
    per_eps: list[dict[str, Any]],
    top: float,
    attack_unit: Callable[[AdaptiveAttack, str], dict[str, Any]],
    undefended: float | None,
    *,
    checks: bool,
    unbounded_eps: float | None,
) -> dict[str, Any]:
    """One attack's rows with its sanity checks (the doublings run as units of their own)."""
    double = restarts = unbounded = None
    if checks:
        top_attack = attack.replace(eps=top)
        double = attack_unit(top_attack.with_budget(2), f"double-budget-eps-{_eps_name(top)}.json")
        if attack.restartable:
            file = f"double-restarts-eps-{_eps_name(top)}.json"
            restarts = attack_unit(top_attack.with_restarts(2), file)
    if unbounded_eps is not None:
        eps_u = float(unbounded_eps)
        unbounded = attack_unit(attack.replace(eps=eps_u), f"unbounded-eps-{_eps_name(eps_u)}.json")
    sanity = sanity_checks(
        per_eps,
        double_budget=double,
        double_restarts=restarts,
        undefended=undefended,
        unbounded=unbounded,
    )
    return {"params": attack.params, "per_eps": per_eps, "sanity": sanity}
