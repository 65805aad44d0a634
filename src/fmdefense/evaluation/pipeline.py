"""`fmdefense reproduce`: data → models → attacks → calibration → defense → experiments → report.

Every stage writes an artifact under the run folder and is skipped on a re-run when its artifact
exists with the same config (a killed run resumes; the log says which stages were reused).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fmdefense.attacks.runner import AdversarialSet, attack_set, load_adversarial_set
from fmdefense.core.artifacts import (
    atomic_write_bytes,
    load_tensors,
    save_tensors,
    write_json,
)
from fmdefense.core.chunks import config_hash
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.core.fingerprints import fingerprint, fingerprint_tensor
from fmdefense.core.paths import weights_home
from fmdefense.core.provenance import provenance
from fmdefense.data import load_raw, split_tensors
from fmdefense.defenses.defense_gan import DefenseGAN
from fmdefense.defenses.fm.config import FMDefenseConfig
from fmdefense.defenses.fm.detector import INPUT_LABELS, FMDefense
from fmdefense.defenses.fm.purifier import Z_U_MODES
from fmdefense.defenses.fm.thresholds import distance_threshold, thresholds
from fmdefense.defenses.jobs import load_models
from fmdefense.defenses.magnet import MagNet, run_train_magnet
from fmdefense.defenses.recon_check import ReconCheckConfig, ReconstructionCheck
from fmdefense.defenses.rule import accuracy, defended_accuracy
from fmdefense.evaluation import experiments as ex
from fmdefense.evaluation.report import render

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    """Sizes of one reproduction; `paper` follows IV.A, `quick` is the same pipeline, smaller."""

    name: str
    n_val: int | None  # None: the whole VAL split (2,000)
    n_cle: int | None  # None: the whole CLE split (5,000)
    n_morphs: int
    attacks: tuple[tuple[str, str], ...]  # (attack, setting)
    rho: float = 0.999  # per-code clean pass rate on VAL
    magnet_epochs: int = 10
    magnet_limit: int | None = None  # MagNet trains on the first N combo-VAE training images
    precision: str = "fp32"  # morph decode+classify: fp32, or bf16 autocast (1.6x faster here)
    defensegan_limit: int | None = 500  # first N images of each set (its search: ~0.2 s/image)
    adaptive_limit: int = 0  # defense-aware attacks on the first N CLE images (0: skipped)
    adaptive_eps: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    adaptive_steps: int | None = None  # PGD steps (None: each attack's default)
    # FM-Defense's operating point under adaptive attack: None = the fitted per-code rule, or
    # joint thresholds at this clean pass rate (the per-code rule at ρ = 0.999 flags nothing
    # at N = 100, which would make the attack one on the bare classifier)
    adaptive_fm_rho: float | None = None
    # one more ε where success should reach ~100 % (the "unbounded" sanity check); None: skipped
    adaptive_unbounded_eps: float | None = 1.0
    seed: int = 0


ATTACKS = (("fgsm", "default"), ("deepfool_linf", "default"), ("cw_l2", "fast"))
PROFILES: dict[str, Profile] = {
    # bf16 so that 44 M morphs fit a few hours on 2 cores (guide: mean |Δr| 0.0003 vs fp32).
    "paper": Profile(
        "paper",
        None,
        None,
        100,
        ATTACKS,
        precision="bf16",
        adaptive_limit=500,
        adaptive_fm_rho=0.95,
    ),
    # 300 VAL images cannot support ρ = 0.999 (it allows 0.3 flagged images per code).
    "quick": Profile(
        "quick", 300, 200, 20, ATTACKS, rho=0.99, magnet_epochs=3, defensegan_limit=50
    ),
}
BASELINES = ("recon", "magnet", "defensegan")


def _attack_name(attack: str, setting: str) -> str:
    return attack if setting == "default" else f"{attack}-{setting}"


def stage_attacks(
    run: Path,
    profile: Profile,
    clf: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    source: dict[str, Any],
) -> dict[str, AdversarialSet]:
    """Each attack's adversarial set of the CLE images (resumable in chunks)."""
    sets = {}
    for attack, setting in profile.attacks:
        name = _attack_name(attack, setting)
        folder = run / "attacks" / name
        config = {"attack": attack, "setting": setting}
        try:
            found = load_adversarial_set(folder)
            if found.config.get("source_key") == source and len(found.y_true) == len(y):
                log.info("reusing finished stage %s", folder)
                sets[name] = found
                continue
        except ArtifactError:
            pass
        sets[name] = attack_set(
            attack, setting, clf, x, y, folder, source={**config, "source_key": source}
        )
    return sets


def stage_calibrate(
    run: Path,
    clf: torch.nn.Module,
    vae: Any,
    cfg: FMDefenseConfig,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
) -> FMDefense:
    """FM-Defense fitted on VAL (resumable through its VAL morph chunks)."""
    folder = run / "defense"
    try:
        defense = FMDefense.load(folder, clf, vae)
        if defense.config == cfg and defense.input_labels_ == INPUT_LABELS:
            log.info("reusing finished stage %s", folder)
            return defense
    except (ArtifactError, KeyError):
        pass
    # the models join the key: a retrained combo-VAE or classifier gets fresh VAL chunks
    models = [fingerprint(clf), fingerprint(vae)]
    key = config_hash({"cfg": asdict(cfg), "val": fingerprint_tensor(x_val), "models": models})
    defense = FMDefense(clf, vae, cfg).fit(x_val, y_val, cache_dir=run / "cache" / f"val-{key}")
    defense.save(folder)
    return defense


def stage_set_outputs(
    run: Path, name: str, defense: FMDefense, x: torch.Tensor, truth: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Resistance, C(x) and both purified labels of one input set, stored under a key of
    everything the resistance depends on (inputs, models, normal ranges, codes, morph config)."""
    depends = {
        "input": fingerprint_tensor(x),
        "models": defense.fingerprints_,
        "lo": defense.lo_.tolist(),
        "hi": defense.hi_.tolist(),
        "codes": defense.code_idx_.tolist(),
        "morph": asdict(defense.config.morph),
        "precision": defense.config.precision,
    }
    key = config_hash(depends)  # the morph cache (its chunks upgrade themselves)
    path = run / "sets" / f"{name}-{config_hash({**depends, 'labels': INPUT_LABELS})}.safetensors"
    if path.is_file():
        log.info("reusing finished stage %s", path)
        return load_tensors(path)
    out = {
        "resistance": defense.resistance(x, cache_dir=run / "cache" / f"{name}-{key}"),
        "input_label": defense.classify(x),
        "truth": truth,
    }
    for mode in Z_U_MODES:
        out[f"purified_{mode}"] = defense.purify(x, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, out)
    return out


def _outputs(t: dict[str, torch.Tensor], mode: str) -> ex.SetOutputs:
    return ex.SetOutputs(
        t["resistance"], t["input_label"].long(), t[f"purified_{mode}"].long(), t["truth"].long()
    )


def _table2_at(
    cle: ex.SetOutputs,
    adv: dict[str, ex.SetOutputs],
    val_r: torch.Tensor,
    rho: float,
    eta: float,
) -> dict[str, Any]:
    """Table II at a second operating point: joint thresholds with VAL false positives ≤ 1 − ρ."""
    theta = thresholds(val_r, rho, "joint")
    theta_d = distance_threshold(val_r, theta, eta)
    rows = ex.table2(cle, adv, theta, theta_d)
    rows["thresholds"] = {"mode": "joint", "rho": rho, "theta": theta.tolist(), "theta_d": theta_d}
    rows["breakdown"] = ex.breakdown({"CLE": cle, **adv}, theta, theta_d)
    return rows


def recon_baseline(
    clf: torch.nn.Module,
    vae: Any,
    x_val: torch.Tensor,
    x_cle: torch.Tensor,
    y_cle: torch.Tensor,
    adv_sets: dict[str, AdversarialSet],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The one-decode reconstruction check on the same sets: detection, Table II at two ρ;
    and the scores of its z_u = feature reading (the better detector so far)."""
    out: dict[str, Any] = {}
    scores: dict[str, torch.Tensor] = {}
    for z_u_mode in Z_U_MODES:
        check = ReconstructionCheck(clf, vae, ReconCheckConfig(z_u_mode=z_u_mode))
        s_cle = check.score(x_cle)
        s_adv = {name: check.score(a.x_adv) for name, a in adv_sets.items()}
        if z_u_mode == "feature":
            scores = {"CLE": s_cle, **s_adv}
        row: dict[str, Any] = {"detection": ex.score_detection(s_cle, s_adv)}
        for rho in (0.99, 0.95):
            check.config = ReconCheckConfig(rho=rho, z_u_mode=z_u_mode)
            check.fit(x_val)
            table: dict[str, float] = {
                "clean": accuracy(check.predict(x_cle), y_cle),
                "val_fpr": check.val_fpr_,
            }
            for name, a in adv_sets.items():
                table[name] = defended_accuracy(check.predict(a.x_adv), a.y_true)
            row[f"table2_rho_{rho}"] = table
        out[z_u_mode] = row
    return out, scores


def magnet_baseline(
    run: Path,
    dataset: str,
    profile: Profile,
    clf: torch.nn.Module,
    x_cle: torch.Tensor,
    y_cle: torch.Tensor,
    adv_sets: dict[str, AdversarialSet],
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """MagNet on the same sets (its autoencoders trained once per run folder, then reused)."""
    folder = run / "magnet"
    try:
        magnet = MagNet.load(folder, clf)
        log.info("reusing finished stage %s", folder)
    except ArtifactError:
        run_train_magnet(
            dataset, folder, device, epochs=profile.magnet_epochs, limit=profile.magnet_limit
        )
        magnet = MagNet.load(folder, clf)

    def larger(x: torch.Tensor) -> torch.Tensor:  # either detector's error over its threshold
        return torch.stack(list(magnet.score(x).values())).amax(0)

    s_cle = larger(x_cle)
    s_adv = {k: larger(a.x_adv) for k, a in adv_sets.items()}
    table: dict[str, float] = {"clean": accuracy(magnet.predict(x_cle), y_cle)}
    for name, a in adv_sets.items():
        table[name] = defended_accuracy(magnet.predict(a.x_adv), a.y_true)
    result = {
        "detection": ex.score_detection(s_cle, s_adv),
        "table2": table,
        "clean_flagged": float((s_cle > 1).float().mean()),
    }
    return result, {"CLE": s_cle, **s_adv}


def defensegan_dir(dataset: str) -> Path:
    """Shipped Defense-GAN weights of a dataset (trained by `fmdefense train defensegan`)."""
    return weights_home() / dataset / "defense_gan"


def defensegan_baseline(
    run: Path,
    dataset: str,
    profile: Profile,
    clf: torch.nn.Module,
    x_cle: torch.Tensor,
    y_cle: torch.Tensor,
    adv_sets: dict[str, AdversarialSet],
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Defense-GAN (shipped generator) on the first `defensegan_limit` images of each set;
    each set's scores and labels are cached, so a killed run keeps finished sets."""
    folder = defensegan_dir(dataset)
    try:
        gan = DefenseGAN.load(folder, clf)
    except ArtifactError as exc:
        log.warning("Defense-GAN skipped: %s", exc)
        fix = f"fmdefense train defensegan --dataset {dataset} --out {folder}"
        return {"skipped": f"no weights in {folder}: {fix}"}, {}
    n = profile.defensegan_limit
    sets = {"CLE": (x_cle[:n], y_cle[:n])}
    sets |= {k: (a.x_adv[:n], a.y_true[:n]) for k, a in adv_sets.items()}
    scores, table = {}, {}
    model_key = fingerprint(gan)
    for name, (x, y) in sets.items():
        key = config_hash({"input": fingerprint_tensor(x), "model": model_key, "cfg": gan.config})
        path = run / "defense_gan" / f"{name}-{key}.safetensors"
        if path.is_file():
            out = load_tensors(path)
        else:
            dec = gan.decide(x)  # one search: score and labels
            out = {"score": dec.scores["reconstruction_error"], "labels": dec.label}
            save_tensors(path, out)
        scores[name] = out["score"] / gan.threshold_  # > 1: flagged
        table[name] = (
            accuracy(out["labels"], y) if name == "CLE" else defended_accuracy(out["labels"], y)
        )
    table["clean"] = table.pop("CLE")
    result = {
        "detection": ex.score_detection(
            scores["CLE"], {k: v for k, v in scores.items() if k != "CLE"}
        ),
        "table2": table,
        "clean_flagged": float((scores["CLE"] > 1).float().mean()),
        "n_per_set": len(sets["CLE"][1]),
        "search": {"restarts": gan.config.restarts, "steps": gan.config.search_steps},
    }
    return result, scores


def stage_adaptive(
    run: Path,
    dataset: str,
    profile: Profile,
    clf: torch.nn.Module,
    defense: FMDefense,
    baselines: tuple[str, ...],
    x_cle: torch.Tensor,
    y_cle: torch.Tensor,
    device: torch.device,
) -> dict[str, Any]:
    """Each defense under its own defense-aware attack on the first `adaptive_limit` CLE
    images, judged on its hard decisions (resumable per attack and ε)."""
    from fmdefense.attacks.adaptive import DEFAULT_ATTACK, run_sweep
    from fmdefense.attacks.adaptive.jobs import artifact_digest

    fm, point = defense, f"per-code thresholds, ρ = {defense.config.rho}"
    if profile.adaptive_fm_rho is not None:
        rho = profile.adaptive_fm_rho
        fm = defense.with_config(threshold_mode="joint", rho=rho)
        point = f"joint thresholds, VAL false positives ≤ {1 - rho:.0%}"
    targets: dict[str, tuple[Any, Path, str]] = {"fm": (fm, run / "defense", point)}
    if "magnet" in baselines:
        magnet = MagNet.load(run / "magnet", clf)
        rate = f"two detectors, VAL drop rate {magnet.config.drop_rate} each"
        targets["magnet"] = (magnet, run / "magnet", rate)
    if "defensegan" in baselines and (defensegan_dir(dataset) / "config.json").is_file():
        gan = DefenseGAN.load(defensegan_dir(dataset), clf)
        rate = f"VAL drop rate {gan.config.drop_rate}"
        targets["defensegan"] = (gan, defensegan_dir(dataset), rate)
    x, y = x_cle[: profile.adaptive_limit], y_cle[: profile.adaptive_limit]
    changes = {} if profile.adaptive_steps is None else {"steps": profile.adaptive_steps}
    out: dict[str, Any] = {}
    for kind, (target, folder, operating_point) in targets.items():
        # the digest of the saved defense joins every unit's key: a refit defense recomputes
        source = {
            "dataset": dataset,
            "defense": kind,
            "defense_digest": artifact_digest(folder),
            "operating_point": operating_point,
        }
        out[kind] = run_sweep(
            target,
            x.to(device),
            y.to(device),
            [DEFAULT_ATTACK[kind]],
            profile.adaptive_eps,
            run / "adaptive" / kind,
            changes=changes,
            source=source,
            unbounded_eps=profile.adaptive_unbounded_eps,
        )
    return out


def run_reproduce(
    dataset: str,
    profile_name: str,
    run: Path,
    device: torch.device,
    *,
    attacks: tuple[tuple[str, str], ...] | None = None,
    overrides: dict[str, Any] | None = None,
    baselines: tuple[str, ...] = BASELINES,
) -> dict[str, Any]:
    """The whole evaluation of one dataset at one profile; returns results.json's content.
    FM-Defense always runs (the figures are its); `baselines` picks the others."""
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
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "profile.json", asdict(profile))
    ds = load_raw(dataset)
    x_val, y_val = split_tensors(ds, "val")
    x_cle, y_cle = split_tensors(ds, "cle")
    x_val, y_val = x_val[: profile.n_val], y_val[: profile.n_val]
    x_cle, y_cle = x_cle[: profile.n_cle], y_cle[: profile.n_cle]
    clf, vae = load_models(dataset, device)
    source = {"dataset": dataset, "split": "cle", "n": len(y_cle)}
    adv_sets = stage_attacks(run, profile, clf, x_cle, y_cle, source)
    cfg = FMDefenseConfig(
        n_morphs=profile.n_morphs, rho=profile.rho, precision=profile.precision, seed=profile.seed
    )
    defense = stage_calibrate(run, clf, vae, cfg, x_val, y_val)
    raw = {"CLE": stage_set_outputs(run, "CLE", defense, x_cle, y_cle)}
    for name, adv in adv_sets.items():
        raw[name] = stage_set_outputs(run, name, defense, adv.x_adv, adv.y_true)
    results = experiments(run, dataset, profile, defense, raw, x_cle, adv_sets)
    fm = {"CLE": ex.suspicion(raw["CLE"]["resistance"])}
    fm |= {k: ex.suspicion(v["resistance"]) for k, v in raw.items() if k != "CLE"}
    scores = {"FM-Defense": fm}
    if "recon" in baselines:
        results["recon_check"], scores["recon check"] = recon_baseline(
            clf, vae, x_val, x_cle, y_cle, adv_sets
        )
    if "magnet" in baselines:
        results["magnet"], scores["MagNet"] = magnet_baseline(
            run, dataset, profile, clf, x_cle, y_cle, adv_sets, device
        )
    if "defensegan" in baselines:
        results["defense_gan"], scores["Defense-GAN"] = defensegan_baseline(
            run, dataset, profile, clf, x_cle, y_cle, adv_sets, device
        )
    results["roc_defenses"] = ex.roc_by_defense(scores, run / "roc_defenses.png")
    results["meta"]["seconds"] = time.perf_counter() - t0
    _write_report(run, results)
    if profile.adaptive_limit > 0:  # long: the report above already holds everything else
        results["adaptive"] = stage_adaptive(
            run, dataset, profile, clf, defense, baselines, x_cle, y_cle, device
        )
        results["meta"]["seconds"] = time.perf_counter() - t0
        _write_report(run, results)
    log.info("report: %s", run / "report.md")
    return results


def _write_report(run: Path, results: dict[str, Any]) -> None:
    write_json(run / "results.json", results)
    atomic_write_bytes(run / "report.md", render(results).encode())


def experiments(
    run: Path,
    dataset: str,
    profile: Profile,
    defense: FMDefense,
    raw: dict[str, dict[str, torch.Tensor]],
    x_cle: torch.Tensor,
    adv_sets: dict[str, AdversarialSet],
) -> dict[str, Any]:
    """All figures and tables from the stored set outputs."""
    mode = defense.z_u_mode_
    cle = _outputs(raw["CLE"], mode)
    adv = {k: _outputs(v, mode) for k, v in raw.items() if k != "CLE"}
    val_r = defense.val_resistance_
    codes = defense.code_idx_.tolist()
    m = len(codes)
    selections = {
        "all": list(range(m)),
        "first half": list(range(m // 2)),
        "second half": list(range(m // 2, m)),
        "lowest VAL resistance": sorted(torch.argsort(val_r.mean(0))[: max(1, m // 2)].tolist()),
    }
    results: dict[str, Any] = {
        "figure1": ex.figure1(cle, adv, codes, run / "figure1.png"),
        "resistance_histograms": ex.resistance_histograms(
            cle, adv, run / "resistance_histograms.png"
        ),
        "figure4": ex.figure4(cle, adv, val_r, selections, run / "figure4.png"),
        "table2": ex.table2(cle, adv, defense.theta_, defense.theta_d_),
        "table2_joint_fpr_5pct": _table2_at(cle, adv, val_r, 0.95, defense.config.eta),
        "roc": ex.roc(cle, adv, run / "roc.png"),
        "breakdown": ex.breakdown({"CLE": cle, **adv}, defense.theta_, defense.theta_d_),
    }
    target = "cw_l2-fast" if "cw_l2-fast" in adv else next(iter(adv))
    results["figure5"] = ex.figure5(cle, adv[target], val_r, run / "figure5.png")
    results["figure5"]["attack"] = target
    results["purification_by_z_u_mode"] = {
        name: {z: float((t[f"purified_{z}"] == t["truth"]).float().mean()) for z in Z_U_MODES}
        for name, t in raw.items()
    }
    results["joint_val_fpr"] = defense.val_fpr_
    results["per_code_val_fpr_max"] = float((val_r <= defense.theta_).float().mean(0).max())
    results["unified_theta_at_rho"] = float(thresholds(val_r, defense.config.rho, "unified")[0])
    first = next(iter(adv_sets.values()))
    vae: Any = defense.vae  # the combo-VAE itself (decode, dgmm), beyond the defense protocol
    with torch.inference_mode():
        x8, a8 = x_cle[:8].to(defense.device), first.x_adv[:8].to(defense.device)
        z_s, z_u = vae.encode(a8)
        plain = z_u.new_zeros(z_u.shape) + vae.dgmm.means.mean(0)  # class-agnostic z_u
        rows = {
            "clean": x8,
            f"adversarial ({next(iter(adv_sets))})": a8,
            "purified (ours)": vae.reconstruct(a8, mode),
            "without z_u (FactorVAE-style)": vae.decode(z_s, plain),
        }
    ex.figure6(rows, run / "figure6.png")
    results["meta"] = {
        "dataset": dataset,
        "profile": profile.name,
        "command": provenance()["command"],
        "seeds": {"splits": 0, "morphs": profile.seed},
        "versions": {
            k: v for k, v in provenance().items() if k in ("torch", "foolbox", "numpy", "python")
        },
        "fgsm_epsilon": 0.3,
        "counts": {
            "VAL": len(val_r),
            "CLE": len(cle.truth),
            **{k: len(v.truth) for k, v in adv.items()},
        },
        "defense": {
            "codes": codes,
            "n_morphs": defense.config.n_morphs,
            "rho": defense.config.rho,
            "threshold_mode": defense.config.threshold_mode,
            "eta": defense.config.eta,
            "theta_d": defense.theta_d_,
            "z_u_mode": mode,
        },
    }
    return results
