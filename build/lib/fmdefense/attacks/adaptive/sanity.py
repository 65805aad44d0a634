"""The adaptive-attack literature's sanity checks on one ε sweep (Carlini et al. 2019,
Tramèr et al. 2020): success rises with ε, more budget does not lower it, PGD on the bare
classifier and an unbounded ε reach ~100 %."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any


def sanity_checks(
    per_eps: Sequence[dict[str, Any]],
    *,
    double_budget: dict[str, Any] | None = None,
    double_restarts: dict[str, Any] | None = None,
    undefended: float | None = None,
    unbounded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checks from the sweep's rows (sorted by ε).

    `double_budget`: the top-ε row with twice the iterations — another trajectory (the
    step-size schedule stretches), so it is judged within two binomial standard errors
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
