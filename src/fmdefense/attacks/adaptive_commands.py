"""`fmdefense adaptive`: defense-aware attacks on FM-Defense, MagNet or Defense-GAN (issue 7).

Attacks the first N CLE images of a dataset with one or more adaptive attacks over a sweep of
ε, and judges every defense by the same rule on its hard decisions (`attacks.defended`).
Resumable: the clean rates, each (attack, ε) result and each sanity check are written atomically
as their own JSON under --out, with the config they were computed for (defense artifact digest,
classifier weights, inputs, attack settings); a later run with the same config skips them. A
final `summary.json` collects them.

    fmdefense adaptive --dataset mnist --defense magnet --defense-dir runs/mnist/magnet \\
        --eps 0.05 0.1 0.2 0.3 --limit 500
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fmdefense.attacks.adaptive import (
    ADAPTIVE_ATTACKS,
    DEFAULT_ATTACK,
    AdaptiveConfig,
    AnyDefense,
    attacks_for,
    default_config,
    evaluate_eps,
    more_restarts_apply,
    sanity_checks,
    undefended_success,
)
from fmdefense.attacks.defended import DEFENSE_KINDS, outcome_rates
from fmdefense.core.artifacts import CONFIG_FILE, WEIGHTS_FILE, read_json, write_json
from fmdefense.core.errors import ArtifactError, InputError

log = logging.getLogger(__name__)
DATASETS = ("mnist", "fmnist")
DEFAULT_EPS = (0.05, 0.1, 0.2, 0.3)
# Default artifact folder of each defense under runs/<dataset>/
DEFAULT_DIRS = {"fm": "defense", "magnet": "magnet", "defensegan": "defense_gan"}
SUMMARY_FILE = "summary.json"


def default_out(dataset: str, defense: str) -> Path:
    """runs/<dataset>/adaptive/<defense>."""
    return Path("runs") / dataset / "adaptive" / defense


def artifact_digest(folder: Path) -> str:
    """SHA-256 of an artifact's config.json and model.safetensors (identifies a defense)."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = Path(folder) / name
        if not path.is_file():
            raise ArtifactError(f"{folder} is not an artifact folder: missing {name}")
        h.update(name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def load_target(
    kind: str,
    folder: Path,
    dataset: str,
    device: torch.device,
    classifier: Path | None = None,
    vae: Path | None = None,
) -> tuple[AnyDefense, nn.Module]:
    """The fitted defense in `folder` and the classifier it protects, on `device`."""
    from fmdefense.core.paths import classifier_dir
    from fmdefense.defenses.defense_gan import DefenseGAN
    from fmdefense.defenses.jobs import load_defense
    from fmdefense.defenses.magnet import MagNet
    from fmdefense.models.classifiers import Classifier

    if kind == "fm":
        fm = load_defense(folder, dataset, device, classifier, vae)
        return fm, fm.classifier
    clf = Classifier.load(classifier_dir(dataset, classifier), device).eval()
    if kind == "magnet":
        return MagNet.load(folder, device).eval(), clf
    if kind == "defensegan":
        return DefenseGAN.load(folder, device).eval(), clf
    raise InputError(f"unknown defense {kind!r}; choose one of {', '.join(DEFENSE_KINDS)}")


def load_inputs(
    dataset: str, limit: int | None, data_dir: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` CLE images and labels (all when None)."""
    from fmdefense.data import load_raw, split_tensors

    x, y = split_tensors(load_raw(dataset, data_dir=data_dir), "cle")
    return x[:limit], y[:limit]


def cached_unit(path: Path, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """`compute()`'s result, stored atomically in `path` with `key`; reused when the key matches."""
    key = json.loads(json.dumps(key))  # as it reads back (tuples -> lists)
    if path.is_file():
        try:
            stored = read_json(path)
        except ArtifactError:
            stored = None
        if isinstance(stored, dict) and stored.get("key") == key:
            log.info("%s: done with the same config, skipped", path)
            return stored["result"]
        log.info("%s: config changed, recomputing", path)
    result = compute()
    write_json(path, {"key": key, "result": result})
    return result


def _eps_name(eps: float) -> str:
    return f"{eps:g}"


def run_sweep(
    defense: AnyDefense,
    classifier: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[str],
    eps_list: Sequence[float],
    out: Path,
    *,
    changes: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    checks: bool = True,
    unbounded_eps: float | None = None,
) -> dict[str, Any]:
    """All (attack, ε) units, the clean rates and the sanity checks, resumable under `out`.

    `changes` overrides fields of each attack's `default_config`; `source` describes the defense
    and inputs (it joins every unit's key, so a different defense or input set recomputes).
    Sanity checks (with `checks`): twice the steps and (PGD attacks) twice the restarts at the
    largest ε, undefended PGD on the bare classifier at the largest ε; with `unbounded_eps`, one
    more run there. See `sanity_checks` for how each is judged.
    """
    from fmdefense.core.fingerprints import fingerprint, fingerprint_tensor

    if not eps_list:
        raise InputError("give at least one ε (--eps)")
    if not attacks:
        raise InputError("give at least one attack (--attack)")
    eps_sorted = sorted(float(e) for e in eps_list)
    top = eps_sorted[-1]
    out = Path(out)
    t0 = time.perf_counter()
    base_key = {
        **(source or {}),
        "classifier": fingerprint(classifier),
        "inputs": fingerprint_tensor(x),
        "n": len(x),
    }
    clean = cached_unit(
        out / "clean.json",
        {**base_key, "unit": "clean"},
        lambda: outcome_rates(defense, x, y, classifier=classifier),
    )
    configs = {name: default_config(name, **(changes or {})) for name in attacks}

    def attack_unit(name: str, eps: float, cfg: AdaptiveConfig, file: str) -> dict[str, Any]:
        cfg = dataclasses.replace(cfg, eps=eps)
        key = {**base_key, "unit": "attack", "attack": name, "config": dataclasses.asdict(cfg)}
        return cached_unit(
            out / name / file,
            key,
            lambda: evaluate_eps(defense, x, y, name, eps, config=cfg, classifier=classifier),
        )

    jobs = [(name, eps) for name in attacks for eps in eps_sorted]
    results: dict[str, Any] = {}
    per_eps: dict[str, list[dict[str, Any]]] = {name: [] for name in attacks}
    for name, eps in tqdm(jobs, desc="adaptive", disable=None):
        per_eps[name].append(attack_unit(name, eps, configs[name], f"eps-{_eps_name(eps)}.json"))
    undefended: float | None = None
    if checks:  # PGD on the bare classifier at the largest ε: one unit for all attacks
        und_cfg = dataclasses.replace(default_config("undefended", **(changes or {})), eps=top)

        def bare() -> float:
            return undefended_success(classifier, x, y, top, und_cfg)

        key = {**base_key, "unit": "undefended", "config": dataclasses.asdict(und_cfg)}
        undefended = cached_unit(out / f"undefended-eps-{_eps_name(top)}.json", key, bare)
    for name in attacks:
        cfg = configs[name]
        double: dict[str, Any] | None = None
        restarts: dict[str, Any] | None = None
        unbounded: dict[str, Any] | None = None
        if checks:
            file = f"double-budget-eps-{_eps_name(top)}.json"
            double = attack_unit(name, top, cfg.with_budget(2), file)
            if more_restarts_apply(name):
                file = f"double-restarts-eps-{_eps_name(top)}.json"
                restarts = attack_unit(name, top, cfg.with_restarts(2), file)
        if unbounded_eps is not None:
            eps_u = float(unbounded_eps)
            unbounded = attack_unit(name, eps_u, cfg, f"unbounded-eps-{_eps_name(eps_u)}.json")
        results[name] = {
            "config": dataclasses.asdict(cfg),
            "per_eps": per_eps[name],
            "sanity": sanity_checks(
                per_eps[name],
                double_budget=double,
                double_restarts=restarts,
                undefended=undefended,
                unbounded=unbounded,
            ),
        }
    summary = {
        **(source or {}),
        "n": len(x),
        "eps": eps_sorted,
        "clean": clean,
        "attacks": results,
        "seconds": time.perf_counter() - t0,
    }
    write_json(out / SUMMARY_FILE, summary)
    return summary


def run_command(args: argparse.Namespace) -> None:
    """Load the defense, its classifier and the CLE images; sweep; print one line."""
    from fmdefense.core.device import resolve_device

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be a positive number of images, got {args.limit}")
    kind = args.defense
    attacks = args.attack or [DEFAULT_ATTACK[kind]]
    allowed = attacks_for(kind)
    for name in attacks:
        if name not in allowed:
            raise InputError(
                f"attack {name!r} does not apply to {kind}; choose among {', '.join(allowed)}"
            )
    folder = args.defense_dir or Path("runs") / args.dataset / DEFAULT_DIRS[kind]
    device = resolve_device(args.device)
    defense, clf = load_target(kind, folder, args.dataset, device, args.classifier, args.vae)
    x, y = load_inputs(args.dataset, args.limit, args.data_dir)
    changes = {
        k: v
        for k, v in {
            "steps": args.steps,
            "restarts": args.restarts,
            "batch_size": args.batch_size,
        }.items()
        if v is not None
    }
    source = {
        "dataset": args.dataset,
        "split": "cle",
        "limit": args.limit,
        "defense": kind,
        "defense_dir": str(folder),
        "defense_digest": artifact_digest(folder),
    }
    out = args.out or default_out(args.dataset, kind)
    summary = run_sweep(
        defense,
        clf,
        x,
        y,
        attacks,
        args.eps,
        out,
        changes=changes,
        source=source,
        checks=not args.no_checks,
        unbounded_eps=args.unbounded_eps,
    )
    parts = []
    for name, res in summary["attacks"].items():
        robust = " ".join(
            f"{row['eps']:g}:{row['robust_accuracy_with_rejection']:.3f}" for row in res["per_eps"]
        )
        parts.append(f"{name} [{robust}]")
    print(
        f"{kind} on {summary['n']} {args.dataset} CLE images, robust accuracy with rejection "
        f"by ε: {'; '.join(parts)}; clean accept rate {summary['clean']['accept_rate']:.4f} "
        f"-> {out / SUMMARY_FILE}"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `adaptive` subcommand to the top-level subparsers of `fmdefense`."""
    p = sub.add_parser(
        "adaptive",
        help="defense-aware attacks on FM-Defense, MagNet or Defense-GAN (resumable)",
    )
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--defense", choices=DEFENSE_KINDS, required=True)
    p.add_argument(
        "--defense-dir",
        type=Path,
        default=None,
        help="fm: a calibrated FMDefense folder (fmdefense calibrate, or RUN/defense); "
        "magnet: a MagNet folder (RUN/magnet); defensegan: a DefenseGAN folder "
        "(default runs/D/defense, runs/D/magnet, runs/D/defense_gan)",
    )
    p.add_argument(
        "--attack",
        nargs="+",
        choices=tuple(ADAPTIVE_ATTACKS),
        default=None,
        help="fm: joint (default), latent, cw_transfer, square; magnet: magnet_joint (default), "
        "cw_transfer; defensegan: defensegan_bpda (default), cw_transfer; all: undefended",
    )
    p.add_argument("--eps", nargs="+", type=float, default=list(DEFAULT_EPS))
    p.add_argument("--limit", type=int, default=None, help="attack only the first N CLE images")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="PGD steps per restart (default 100; defensegan_bpda 40: a search per step)",
    )
    p.add_argument(
        "--restarts", type=int, default=None, help="PGD restarts (default 1; magnet_joint 4)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="inputs attacked together (64)")
    p.add_argument(
        "--no-checks",
        action="store_true",
        help="skip the sanity checks (twice the budget and undefended PGD at the largest ε)",
    )
    p.add_argument(
        "--unbounded-eps",
        type=float,
        default=None,
        help="also attack at this ε (e.g. 1.0): success should reach ~100 %%",
    )
    p.add_argument("--out", type=Path, default=None, help="results (runs/D/adaptive/DEFENSE)")
    p.add_argument("--classifier", type=Path, default=None, help="classifier artifact folder")
    p.add_argument("--vae", type=Path, default=None, help="combo-VAE artifact folder (fm)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with the dataset's files")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    p.set_defaults(func=run_command)
