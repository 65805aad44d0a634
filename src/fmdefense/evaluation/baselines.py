"""The baselines of `fmdefense reproduce` on the same sets, and every defense under its own
defense-aware attack."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fmdefense.attacks.runner import AdversarialSet
from fmdefense.core.artifacts import (
    load_tensors,
    save_tensors,
)
from fmdefense.core.chunks import config_hash
from fmdefense.core.errors import ArtifactError
from fmdefense.core.files import read_json, write_json
from fmdefense.core.fingerprints import fingerprint, fingerprint_tensor
from fmdefense.core.paths import weights_home
from fmdefense.defenses.base import Decision, Defense
from fmdefense.defenses.default import DefaultDefense
from fmdefense.defenses.defense_gan import DefenseGAN
from fmdefense.defenses.fbgan import FBGANDefense
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.fm.purifier import Z_U_MODES
from fmdefense.defenses.magnet import MagNet, run_train_magnet
from fmdefense.defenses.recon_check import ReconCheckConfig, ReconstructionCheck
from fmdefense.defenses.rule import accuracy, defended_accuracy
from fmdefense.evaluation import experiments as ex
from fmdefense.evaluation.profiles import Profile

log = logging.getLogger(__name__)


def recon_baseline(
    run: Path,
    clf: torch.nn.Module,
    vae: Any,
    x_val: torch.Tensor,
    x_cle: torch.Tensor,
    y_cle: torch.Tensor,
    adv_sets: dict[str, AdversarialSet],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`recon_rows`, stored under run/recon_check keyed by the models and every input set, so a
    resumed run does not decode every set again."""
    key = config_hash(
        {
            "models": [fingerprint(clf), fingerprint(vae)],
            "sets": [fingerprint_tensor(x) for x in (x_val, x_cle, y_cle)]
            + [
                [k, fingerprint_tensor(a.x_adv), fingerprint_tensor(a.y_true)]
                for k, a in adv_sets.items()
            ],
        }
    )
    folder = run / "recon_check"
    json_path, tensor_path = folder / f"{key}.json", folder / f"{key}.safetensors"
    if json_path.is_file() and tensor_path.is_file():
        log.info("reusing finished stage %s", json_path)
        return read_json(json_path), load_tensors(tensor_path)
    out, scores = recon_rows(clf, vae, x_val, x_cle, y_cle, adv_sets)
    save_tensors(tensor_path, scores)
    write_json(json_path, out)
    return out, scores


def recon_rows(
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
        row: dict[str, Any] = {}
        for rho in (0.99, 0.95):
            check = ReconstructionCheck(clf, vae, ReconCheckConfig(rho=rho, z_u_mode=z_u_mode))
            check.fit(x_val)
            dec = {"CLE": check.decide(x_cle)} | {
                k: check.decide(a.x_adv) for k, a in adv_sets.items()
            }
            table: dict[str, float] = {
                "clean": accuracy(dec["CLE"].label, y_cle),
                "val_fpr": check.val_fpr_,
            }
            for name, a in adv_sets.items():
                table[name] = defended_accuracy(dec[name].label, a.y_true)
            row[f"table2_rho_{rho}"] = table
        s_all = {k: d.scores["recon_check"] for k, d in dec.items()}
        s_cle = s_all.pop("CLE")
        row["detection"] = ex.score_detection(s_cle, s_all)
        if z_u_mode == "feature":
            scores = {"CLE": s_cle, **s_all}
        out[z_u_mode] = row
    return out, scores


def stage_magnet(
    run: Path,
    dataset: str,
    profile: Profile,
    clf: torch.nn.Module,
    device: torch.device,
    data_dir: Path | None = None,
) -> MagNet:
    """MagNet around `clf` for this run folder: trained once (on `data_dir`'s files when
    given), then reused."""
    folder = run / "magnet"
    try:
        magnet = MagNet.load(folder, clf)
        log.info("reusing finished stage %s", folder)
    except ArtifactError:
        run_train_magnet(
            dataset,
            folder,
            device,
            epochs=profile.magnet_epochs,
            limit=profile.magnet_limit,
            data_dir=data_dir,
        )
        magnet = MagNet.load(folder, clf)
    return magnet


def magnet_baseline(
    run: Path,
    dataset: str,
    profile: Profile,
    clf: torch.nn.Module,
    x_cle: torch.Tensor,
    y_cle: torch.Tensor,
    adv_sets: dict[str, AdversarialSet],
    device: torch.device,
    data_dir: Path | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """MagNet on the same sets (its autoencoders trained once per run folder, then reused)."""
    magnet = stage_magnet(run, dataset, profile, clf, device, data_dir)
    dec = {"CLE": magnet.decide(x_cle)} | {k: magnet.decide(a.x_adv) for k, a in adv_sets.items()}
    s_all = {k: torch.maximum(d.scores["ae_i"], d.scores["ae_ii"]) for k, d in dec.items()}
    s_cle = s_all.pop("CLE")  # either detector's error over its threshold: > 1 flagged
    s_adv = s_all
    table: dict[str, float] = {"clean": accuracy(dec["CLE"].label, y_cle)}
    for name, a in adv_sets.items():
        table[name] = defended_accuracy(dec[name].label, a.y_true)
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
        key = config_hash(
            {
                "input": fingerprint_tensor(x),
                "model": model_key,
                "cfg": gan.config,
                "starts": "shared",  # every image from the same starts (batch-independent)
            }
        )
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


def fbgan_dir(dataset: str) -> Path:
    """Shipped, VAL-calibrated FBGAN of a dataset (trained by `fmdefense train fbgan`)."""
    return weights_home() / dataset / "fbgan"


@torch.no_grad()
def fbgan_figure(
    fbgan: FBGANDefense,
    x_cle: torch.Tensor,
    adv_sets: dict[str, AdversarialSet],
    path: Path,
    *,
    n: int = 10,
    seed: int = 0,
) -> None:
    """FBGAN's samples G(z) (z ~ N(0, I), seeded) and reconstructions G(E(x)) of the first n
    CLE images and of the first n images of each adversarial set, one row each."""
    model = fbgan.model.eval()
    z = torch.randn((n, model.cfg.z_dim), generator=torch.Generator().manual_seed(seed))
    rows = {"G(z), z ~ N(0, I)": model.generate(z.to(fbgan.device))}
    sets = {"CLE": x_cle[:n]} | {k: a.x_adv[:n] for k, a in adv_sets.items()}
    for name, x in sets.items():
        rows[name] = x
        rows[f"G(E({name}))"] = model.reconstruct(x.to(fbgan.device))
    ex.figure6(rows, path, n=min(n, len(x_cle)))


def default_operating_point(defense: DefaultDefense) -> str:
    """How the default defense decides, in words (the adaptive report's operating point)."""
    cfg = defense.config
    return (
        f"{cfg.combine} fusion of {len(defense.names_)} scores, VAL false positives ≤ "
        f"{cfg.alpha:.0%}, policy {cfg.purify}"
    )


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
    *,
    default: tuple[DefaultDefense, Path] | None = None,
) -> dict[str, Any]:
    """Each defense under its own defense-aware attack on the first `adaptive_limit` CLE
    images, judged on its hard decisions (resumable per attack and ε). `default`: the fitted
    default defense and the folder it is saved in (whose digest keys its results)."""
    from fmdefense.attacks.adaptive import DEFAULT_ATTACK, run_sweep
    from fmdefense.attacks.adaptive.jobs import artifact_digest

    fm, point = defense, f"per-code thresholds, ρ = {defense.config.rho}"
    if profile.adaptive_fm_rho is not None:
        rho = profile.adaptive_fm_rho
        fm = defense.with_config(threshold_mode="joint", rho=rho)
        point = f"joint thresholds, VAL false positives ≤ {1 - rho:.0%}"
    targets: dict[str, tuple[Defense, Path, str]] = {}
    if default is not None:
        targets["default"] = (default[0], default[1], default_operating_point(default[0]))
    targets["fm"] = (fm, run / "defense", point)
    if "magnet" in baselines:
        magnet = MagNet.load(run / "magnet", clf)
        rate = f"two detectors, VAL drop rate {magnet.config.drop_rate} each"
        targets["magnet"] = (magnet, run / "magnet", rate)
    if "defensegan" in baselines and (defensegan_dir(dataset) / "config.json").is_file():
        gan = DefenseGAN.load(defensegan_dir(dataset), clf)
        rate = f"VAL drop rate {gan.config.drop_rate}"
        targets["defensegan"] = (gan, defensegan_dir(dataset), rate)
    if "fbgan" in baselines and (fbgan_dir(dataset) / "config.json").is_file():
        fbgan = FBGANDefense.load(fbgan_dir(dataset), clf)
        rate = f"VAL drop rate {fbgan.config.drop_rate}"
        targets["fbgan"] = (fbgan, fbgan_dir(dataset), rate)
    x, y = x_cle[: profile.adaptive_limit], y_cle[: profile.adaptive_limit]
    changes = {} if profile.adaptive_steps is None else {"steps": profile.adaptive_steps}
    out: dict[str, Any] = {}
    n_default = profile.default_adaptive_limit or profile.adaptive_limit
    for kind, (target, folder, operating_point) in targets.items():
        n = n_default if kind == "default" else len(x)
        # the digest of the saved defense joins every unit's key: a refit defense recomputes
        source = {
            "dataset": dataset,
            "defense": kind,
            "defense_digest": artifact_digest(folder),
            "operating_point": operating_point,
        }
        out[kind] = run_sweep(
            target,
            x[:n].to(device),
            y[:n].to(device),
            [DEFAULT_ATTACK[kind]],
            profile.adaptive_eps,
            run / "adaptive" / kind,
            changes=changes,
            source=source,
            unbounded_eps=profile.adaptive_unbounded_eps,
        )
    return out


def first_score(dec: Decision) -> torch.Tensor:
    """A decision's first named score (n,): the detection score of one-score defenses."""
    return next(iter(dec.scores.values()))


def contract_baseline(
    run: Path,
    tag: str,
    defense: Defense,
    folder: Path,
    x_cle: torch.Tensor,
    y_cle: torch.Tensor,
    adv_sets: dict[str, AdversarialSet],
    limit: int | None = None,
    score: Callable[[Decision], torch.Tensor] = first_score,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Any fitted defense on the contract, on the first `limit` images of each set: Table II
    and detection by `score` (default: its first named score); each set's decisions cached
    under the artifact's digest."""
    from fmdefense.attacks.adaptive.jobs import artifact_digest

    digest = artifact_digest(folder)
    sets = {"CLE": (x_cle[:limit], y_cle[:limit])}
    sets |= {k: (a.x_adv[:limit], a.y_true[:limit]) for k, a in adv_sets.items()}
    scores, table, flagged = {}, {}, {}
    for name, (x, y) in sets.items():
        key = config_hash({"input": fingerprint_tensor(x), "defense": digest})
        path = run / tag / f"{name}-{key}.safetensors"
        if path.is_file():
            out = load_tensors(path)
        else:
            dec = defense.decide(x)
            out = {
                "label": dec.label,
                "score": score(dec),
                "flagged": dec.flagged,
            }
            save_tensors(path, out)
        scores[name] = out["score"]
        flagged["clean" if name == "CLE" else name] = float(out["flagged"].float().mean())
        table[name] = (
            accuracy(out["label"], y) if name == "CLE" else defended_accuracy(out["label"], y)
        )
    table["clean"] = table.pop("CLE")
    s_cle = scores.pop("CLE")
    result = {
        "detection": ex.score_detection(s_cle, scores),
        "table2": table,
        "flagged": flagged,  # share of each set the defense rejected or purified
        "n_per_set": len(sets["CLE"][1]),
    }
    return result, {"CLE": s_cle, **scores}
