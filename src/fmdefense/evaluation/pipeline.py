"""`fmdefense reproduce`: data → models → attacks → calibration → defense → experiments → report.

Every stage writes an artifact under the run folder and is skipped on a re-run when its artifact
exists with the same config (a killed run resumes; the log says which stages were reused).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fmdefense.attacks.runner import AdversarialSet
from fmdefense.core.artifacts import (
    atomic_write_bytes,
    write_json,
)
from fmdefense.core.errors import InputError
from fmdefense.core.paths import classifier_dir, vae_dir, weights_home
from fmdefense.data import load_raw, split_tensors
from fmdefense.defenses.default import DefaultConfig, DefaultDefense
from fmdefense.defenses.fbgan import FBGANDefense
from fmdefense.defenses.fm.config import FMDefenseConfig
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.jobs import load_models
from fmdefense.evaluation import experiments as ex
from fmdefense.evaluation.baselines import (
    contract_baseline,
    defensegan_baseline,
    fbgan_figure,
    magnet_baseline,
    recon_baseline,
    stage_adaptive,
    stage_magnet,
)
from fmdefense.evaluation.default_stage import stage_default
from fmdefense.evaluation.fm_stage import (
    experiments,
    stage_attacks,
    stage_calibrate,
    stage_set_outputs,
)
from fmdefense.evaluation.profiles import BASELINES, PROFILES, Profile
from fmdefense.evaluation.report import render

log = logging.getLogger(__name__)


def run_reproduce(
    dataset: str,
    profile_name: str,
    run: Path,
    device: torch.device,
    *,
    attacks: tuple[tuple[str, str], ...] | None = None,
    overrides: dict[str, Any] | None = None,
    baselines: tuple[str, ...] = BASELINES,
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """The whole evaluation of one dataset at one profile; returns results.json's content.
    FM-Defense always runs (the figures are its); `baselines` picks the others. `data_dir`:
    the dataset's own files (CelebA's folder; as `fmdefense.data.load_raw`)."""
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise InputError(f"unknown baselines {sorted(unknown)}; choose from {BASELINES}")
    t0 = time.perf_counter()
    profile = PROFILES[profile_name]
    if attacks is not None:
        profile = dataclasses.replace(profile, attacks=attacks)
    if overrides:
        profile = dataclasses.replace(profile, **overrides)
    if profile.n_cle is not None and profile.adaptive_limit > profile.n_cle:
        raise InputError(
            f"adaptive_limit {profile.adaptive_limit} exceeds the {profile.n_cle} CLE images: "
            "lower --adaptive-limit or raise --n-cle"
        )
    _require_models(dataset, data_dir)
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "profile.json", asdict(profile))
    ds = load_raw(dataset, data_dir=data_dir)
    x_val, y_val = split_tensors(ds, "val")
    x_cle, y_cle = split_tensors(ds, "cle")
    x_val, y_val = x_val[: profile.n_val], y_val[: profile.n_val]
    x_cle, y_cle = x_cle[: profile.n_cle], y_cle[: profile.n_cle]
    clf, vae = load_models(dataset, device, vae=None if profile.vae is None else Path(profile.vae))
    source: dict[str, Any] = {"dataset": dataset, "split": "cle", "n": len(y_cle)}
    if data_dir is not None:  # another folder's images are other attack inputs
        source["data_dir"] = str(Path(data_dir).resolve())
    adv_sets = stage_attacks(run, profile, clf, x_cle, y_cle, source)
    cfg = FMDefenseConfig(
        codes=profile.codes,
        n_morphs=profile.n_morphs,
        rho=profile.rho,
        precision=profile.precision,
        compile=profile.compile,
        seed=profile.seed,
    )
    defense = stage_calibrate(run, clf, vae, cfg, x_val, y_val)
    n_cle = _fm_limit(profile, "CLE")
    raw = {"CLE": stage_set_outputs(run, "CLE", defense, x_cle[:n_cle], y_cle[:n_cle])}
    for name, adv in adv_sets.items():
        n = _fm_limit(profile, name)
        raw[name] = stage_set_outputs(run, name, defense, adv.x_adv[:n], adv.y_true[:n])
    results = experiments(run, dataset, profile, defense, raw, x_cle, adv_sets)
    fm = {"CLE": ex.suspicion(raw["CLE"]["resistance"])}
    fm |= {k: ex.suspicion(v["resistance"]) for k, v in raw.items() if k != "CLE"}
    scores = {"FM-Defense": fm}
    if "recon" in baselines:
        results["recon_check"], scores["recon check"] = recon_baseline(
            run, clf, vae, x_val, x_cle, y_cle, adv_sets
        )
    if "magnet" in baselines:
        results["magnet"], scores["MagNet"] = magnet_baseline(
            run, dataset, profile, clf, x_cle, y_cle, adv_sets, device, data_dir
        )
    fbgan_dir = weights_home() / dataset / "fbgan"
    if "fbgan" in baselines and (fbgan_dir / "config.json").is_file():
        fbgan = FBGANDefense.load(fbgan_dir, clf)
        results["fbgan"], scores["FBGAN"] = contract_baseline(
            run, "fbgan", fbgan, fbgan_dir, x_cle, y_cle, adv_sets
        )
        fbgan_figure(fbgan, x_cle, adv_sets, run / "fbgan_samples.png")
    if "defensegan" in baselines:
        results["defense_gan"], scores["Defense-GAN"] = defensegan_baseline(
            run, dataset, profile, clf, x_cle, y_cle, adv_sets, device
        )
    results["default"], scores["Default"] = _default(
        run,
        dataset,
        profile,
        clf,
        vae,
        (x_val, y_val),
        (x_cle, y_cle),
        adv_sets,
        raw,
        device,
        data_dir,
    )
    results["roc_defenses"] = ex.roc_by_defense(scores, run / "roc_defenses.png")
    results["meta"]["seconds"] = time.perf_counter() - t0
    _write_report(run, results)
    if profile.adaptive_limit > 0:  # long: the report above already holds everything else
        default_dir = run / "default" / "defense"
        results["adaptive"] = stage_adaptive(
            run,
            dataset,
            profile,
            clf,
            defense,
            baselines,
            x_cle,
            y_cle,
            device,
            default=(DefaultDefense.load(default_dir, clf, vae), default_dir),
        )
        results["meta"]["seconds"] = time.perf_counter() - t0
        _write_report(run, results)
    log.info("report: %s", run / "report.md")
    return results


def _fm_limit(profile: Profile, name: str) -> int | None:
    """How many images of a set FM-Defense's morphs run on (None: all)."""
    caps = [n for n in (dict(profile.fm_limits).get(name), profile.fm_limit) if n is not None]
    return min(caps) if caps else None


def _default(
    run: Path,
    dataset: str,
    profile: Profile,
    clf: torch.nn.Module,
    vae: Any,
    val: tuple[torch.Tensor, torch.Tensor],
    cle: tuple[torch.Tensor, torch.Tensor],
    adv_sets: dict[str, AdversarialSet],
    raw: dict[str, dict[str, torch.Tensor]],
    device: torch.device,
    data_dir: Path | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The default defense: tuning attacks on the first `n_tuning` VAL images, then the stage."""
    x_tune, y_tune = val[0][: profile.n_tuning], val[1][: profile.n_tuning]
    source: dict[str, Any] = {"dataset": dataset, "split": "val", "n": len(y_tune)}
    if data_dir is not None:
        source["data_dir"] = str(Path(data_dir).resolve())
    tuning = stage_attacks(run / "tuning", profile, clf, x_tune, y_tune, source)
    aes = stage_magnet(run, dataset, profile, clf, device, data_dir).autoencoders
    config = DefaultConfig(alpha=profile.default_alpha, seed=profile.seed)
    defense = DefaultDefense(clf, vae, (aes.ae1, aes.ae2), config)
    sets = {"CLE": cle, **{k: (a.x_adv, a.y_true) for k, a in adv_sets.items()}}
    resistance = {k: v["resistance"] for k, v in raw.items()}
    fm_val = FMDefense.load(run / "defense", clf, vae).val_resistance_
    return stage_default(
        run,
        defense,
        val,
        sets,
        {k: (a.x_adv, a.y_true) for k, a in tuning.items()},
        resistance,
        fm_val if len(fm_val) == len(val[0]) else None,
    )


def _require_models(dataset: str, data_dir: Path | None) -> None:
    """The classifier and combo-VAE reproduce protects and manipulates must exist (shipped for
    MNIST, Fashion-MNIST and ORL; trained by the user for CelebA): else say how to train them."""
    given = f" --data-dir {data_dir}" if data_dir is not None else ""
    for kind, folder in (("classifier", classifier_dir(dataset)), ("vae", vae_dir(dataset))):
        if not (folder / "config.json").is_file():
            raise InputError(
                f"no {dataset} {kind} in {folder}: train it first with `fmdefense train {kind} "
                f"--dataset {dataset}{given} --out {folder}` (the classifier before the vae), "
                "or point $FMDEFENSE_WEIGHTS at a folder holding it"
            )


def _write_report(run: Path, results: dict[str, Any]) -> None:
    write_json(run / "results.json", results)
    atomic_write_bytes(run / "report.md", render(results).encode())
