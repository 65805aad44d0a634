"""FM-Defense's stages of `fmdefense reproduce`: attacks, calibration on VAL, resistance of each
set (cached), and the paper's figures and tables from the stored outputs."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from fmdefense.attacks.runner import AdversarialSet, attack_set, load_adversarial_set
from fmdefense.core.artifacts import (
    load_tensors,
    save_tensors,
)
from fmdefense.core.chunks import config_hash
from fmdefense.core.device import module_device
from fmdefense.core.errors import ArtifactError
from fmdefense.core.fingerprints import fingerprint, fingerprint_tensor
from fmdefense.core.precision import resolve_precision
from fmdefense.core.provenance import provenance
from fmdefense.defenses.fm.config import FMDefenseConfig
from fmdefense.defenses.fm.detector import INPUT_LABELS, FMDefense
from fmdefense.defenses.fm.purifier import Z_U_MODES
from fmdefense.defenses.fm.thresholds import distance_threshold, thresholds
from fmdefense.evaluation import experiments as ex
from fmdefense.evaluation.profiles import Profile

log = logging.getLogger(__name__)


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
    """FM-Defense fitted on VAL (resumable through its VAL morph chunks), at the precision
    `cfg`'s resolves to on the classifier's device, as the sets' outputs are keyed: a run made
    with "bf16" where bf16 is native is reused by the "auto" that picks bf16 there."""
    folder = run / "defense"
    resolved = replace(cfg, precision=resolve_precision(cfg.precision, module_device(clf)))
    try:
        defense = FMDefense.load(folder, clf, vae)
        if defense.config in (cfg, resolved) and defense.input_labels_ == INPUT_LABELS:
            log.info("reusing finished stage %s", folder)
            return defense
    except (ArtifactError, KeyError):
        pass
    # the models join the key: a retrained combo-VAE or classifier gets fresh VAL chunks
    models = [fingerprint(clf), fingerprint(vae)]
    settings = asdict(resolved)
    if not cfg.compile:  # the key of runs from before the setting existed
        del settings["compile"]
    key = config_hash({"cfg": settings, "val": fingerprint_tensor(x_val), "models": models})
    defense = FMDefense(clf, vae, resolved).fit(
        x_val, y_val, cache_dir=run / "cache" / f"val-{key}"
    )
    defense.save(folder)
    return defense


def stage_set_outputs(
    run: Path, name: str, defense: FMDefense, x: torch.Tensor, truth: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Resistance, C(x) and both purified labels of one input set, stored under a key of
    everything the resistance depends on (inputs, models, normal ranges, codes, morph config)."""
    depends: dict[str, Any] = {
        "input": fingerprint_tensor(x),
        "models": defense.fingerprints_,
        "lo": defense.lo_.tolist(),
        "hi": defense.hi_.tolist(),
        "codes": defense.code_idx_.tolist(),
        "morph": asdict(defense.config.morph),
        "precision": defense.engine.precision,  # resolved: "auto" keys as what it ran
    }
    if defense.config.compile:  # compiled morphs round differently (older keys stay valid)
        depends["compile"] = True
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


def code_selections(val_r: torch.Tensor) -> dict[str, list[int]]:
    """Figure 4's code subsets (positions among the m selected codes), empty ones left out (a
    single code has no halves).  val_r: (n, m)"""
    m = val_r.shape[1]
    selections = {
        "all": list(range(m)),
        "first half": list(range(m // 2)),
        "second half": list(range(m // 2, m)),
        "lowest VAL resistance": sorted(torch.argsort(val_r.mean(0))[: max(1, m // 2)].tolist()),
    }
    return {k: v for k, v in selections.items() if v}


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
    selections = code_selections(val_r)
    results: dict[str, Any] = {
        "figure1": ex.figure1(cle, adv, codes, run / "figure1.png"),
        "resistance_histograms": ex.resistance_histograms(
            cle, adv, run / "resistance_histograms.png"
        ),
        "figure4": ex.figure4(cle, adv, val_r, selections, run / "figure4.png"),
        "table2": ex.table2(cle, adv, defense.theta_, defense.theta_d_),
        "table2_joint_fpr_5pct": _table2_at(cle, adv, val_r, 0.95, defense.config.eta),
        "roc": ex.roc(cle, adv, run / "roc.png"),
        "code_agreement": ex.code_agreement(val_r, cle, adv),
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
