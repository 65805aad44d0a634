"""Training FBGAN: the BiGAN game plus the MI term, seeded and resumable per epoch.

Per batch of real images x (B) and prior codes z ~ N(0, I) (B):
  D step   : BCE(D(x, E(x)), 1) + BCE(D(G(z), z), 0)          (E, G fixed)
  E, G step: BCE(D(x, E(x)), 0) + BCE(D(G(z), z), 1)          (labels swapped: the
             non-saturating form of BiGAN's min-max, as in its and ALI's code)
             + mi_weight · ½‖E(G(z)) − z‖²                     (InfoGAN-style MI bound)
             + recon_weight · ‖G(E(x)) − x‖²                   (default 1; not in the paper)
(squared norms per sample, averaged over the batch)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fmdefense.core.artifacts import (
    RESUME_FILE,
    GeneratorState,
    load_resume_state,
    save_resume_state,
)
from fmdefense.models.fbgan import (
    FBGAN,
    FBGANConfig,
    build_discriminator,
    save_fbgan,
    seeded,
    threshold_at_drop_rate,
)

log = logging.getLogger(__name__)
RESUME_KIND = "fbgan_training"
PROBE = 256  # training images whose reconstruction MSE is logged every epoch


def _train_key(cfg: FBGANConfig) -> dict[str, Any]:
    """What must match for a resume state to continue (the epoch budget may grow)."""
    return {k: v for k, v in asdict(cfg).items() if k != "epochs"}


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _step(
    model: FBGAN,
    disc: nn.Module,
    opts: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    x: torch.Tensor,
    z: torch.Tensor,
) -> dict[str, float]:
    """One D step and one (E, G) step on real x (B, C, H, W) and prior z (B, z_dim)."""
    cfg, (opt_d, opt_eg) = model.cfg, opts
    z_hat = model.encode(x)  # (B, z_dim)
    x_fake = model.generate(z)  # (B, C, H, W)
    d_real, d_fake = disc(x, z_hat.detach()), disc(x_fake.detach(), z)
    loss_d = _bce(d_real, 1.0) + _bce(d_fake, 0.0)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    disc.requires_grad_(False)
    adv = _bce(disc(x, z_hat), 0.0) + _bce(disc(x_fake, z), 1.0)
    mi = 0.5 * (model.encode(x_fake) - z).pow(2).sum(1).mean()  # −log N(z; E(G(z)), I) + c
    loss = adv + cfg.mi_weight * mi
    recon = torch.zeros(())
    if cfg.recon_weight > 0:
        recon = (model.generate(z_hat) - x).pow(2).flatten(1).sum(1).mean()
        loss = loss + cfg.recon_weight * recon
    opt_eg.zero_grad(set_to_none=True)
    loss.backward()
    opt_eg.step()
    disc.requires_grad_(True)
    return {
        "d_loss": loss_d.item(),
        "eg_adv": adv.item(),
        "mi": mi.item(),
        "recon_term": recon.item(),
        "d_real_acc": float((d_real > 0).float().mean()),
        "d_fake_acc": float((d_fake < 0).float().mean()),
    }


@torch.no_grad()
def probe_stats(model: FBGAN, x: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """Eval-mode pixel MSE of G(E(x)) and the mean per-dimension std of E(x) over x (n, ...)."""
    was_training = model.training
    model.eval()
    try:
        z = torch.cat([model.encode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        mse = torch.cat(
            [
                (model.generate(z[i : i + batch_size]) - x[i : i + batch_size])
                .pow(2)
                .mean((1, 2, 3))
                for i in range(0, len(x), batch_size)
            ]
        )
    finally:
        model.train(was_training)
    return {"probe_recon_mse": float(mse.mean()), "code_std": float(z.std(0).mean())}


def _resume(folder: Path | None, cfg: FBGANConfig, parts: dict[str, Any]) -> tuple[int, list]:
    """Load a matching resume state into `parts`; (start epoch, history)."""
    state = load_resume_state(folder) if folder is not None else None
    if state is None:
        return 0, []
    if state.get("kind") != RESUME_KIND or state.get("train_key") != _train_key(cfg):
        log.warning("FBGAN: %s is for other settings; training starts over", Path(folder or "."))
        return 0, []
    for name, part in parts.items():
        part.load_state_dict(state[name])
    start = int(state["epoch"])
    log.info("FBGAN: resuming from epoch %d (%s)", start, Path(folder or ".") / RESUME_FILE)
    return start, list(state["history"])


def _epoch(
    model: FBGAN,
    disc: nn.Module,
    opts: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    x: torch.Tensor,
    gen: torch.Generator,
    device: torch.device,
    desc: str,
) -> dict[str, float]:
    """One pass over x in a seeded order; mean of every per-step statistic."""
    cfg = model.cfg
    perm = torch.randperm(len(x), generator=gen)
    dropout_seed = int(torch.randint(2**62, (1,), generator=gen))
    sums: dict[str, float] = {}
    steps = 0
    with seeded(dropout_seed):  # D's dropout: seeded per epoch, global RNG left untouched
        for i in tqdm(range(0, len(x), cfg.batch_size), desc=desc, leave=False, disable=None):
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            z = torch.randn((len(idx), cfg.z_dim), generator=gen)
            stats = _step(model, disc, opts, x[idx].to(device), z.to(device))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
    return {k: v / max(steps, 1) for k, v in sums.items()} | {"steps": steps}


def train_fbgan(
    model: FBGAN, x: torch.Tensor, device: torch.device, folder: Path | None = None
) -> list[dict[str, float]]:
    """Train E, G (and a fresh D) on clean images x (n, C, H, W); per-epoch history.

    With `folder`, `resume.safetensors` is written after each epoch and a later call with the
    same settings continues from it (`epochs` may grow, so a run can go in chunks).
    """
    cfg = model.cfg
    x = model.check(x, "x_train")
    disc = build_discriminator(cfg)
    model.to(device).train()
    disc.to(device).train()
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_eg = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    gen = torch.Generator().manual_seed(cfg.seed)
    parts: dict[str, Any] = {
        "model": model,
        "disc": disc,
        "opt_d": opt_d,
        "opt_eg": opt_eg,
        "gen": GeneratorState(gen),
    }
    start, history = _resume(folder, cfg, parts)
    probe = x[:PROBE].to(device)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        row = _epoch(model, disc, (opt_d, opt_eg), x, gen, device, f"FBGAN {epoch + 1}")
        row |= probe_stats(model, probe) | {"epoch": epoch + 1}
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        log.info(
            "FBGAN epoch %d/%d: D %.3f (real acc %.2f, fake acc %.2f) EG adv %.3f MI %.4f "
            "probe MSE %.4f code std %.3f (%.0f s)",
            epoch + 1, cfg.epochs, row["d_loss"], row["d_real_acc"], row["d_fake_acc"],
            row["eg_adv"], row["mi"], row["probe_recon_mse"], row["code_std"], row["seconds"],
        )  # fmt: skip
        if folder is not None:
            state = {name: part.state_dict() for name, part in parts.items()}
            save_resume_state(
                folder,
                state
                | {
                    "kind": RESUME_KIND,
                    "train_key": _train_key(cfg),
                    "epoch": epoch + 1,
                    "history": history,
                },
            )
    model.eval()
    return history


@torch.no_grad()
def _errors(model: FBGAN, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """‖x − G(E(x))‖² per image (n,), eval mode, batched."""
    return torch.cat(
        [model.reconstruction_error(x[i : i + 256].to(device)).cpu() for i in range(0, len(x), 256)]
    )


@torch.no_grad()
def measure_reconstruction(
    model: FBGAN, classifier: nn.Module | None, x: torch.Tensor, y: torch.Tensor
) -> dict[str, Any]:
    """Pixel MSE of G(E(x)) and, with a classifier, its accuracy on x and on G(E(x))."""
    device = next(model.parameters()).device
    recon = torch.cat(
        [model.reconstruct(x[i : i + 256].to(device)).cpu() for i in range(0, len(x), 256)]
    )
    out: dict[str, Any] = {"images": len(x), "recon_mse": float((recon - x).pow(2).mean())}
    if classifier is not None:
        clf_dev = next(classifier.parameters()).device

        def acc(images: torch.Tensor) -> float:
            pred = torch.cat(
                [
                    classifier(images[i : i + 256].to(clf_dev)).argmax(1).cpu()
                    for i in range(0, len(images), 256)
                ]
            )
            return float((pred == y).float().mean())

        out |= {"classifier_accuracy_x": acc(x), "classifier_accuracy_recon": acc(recon)}
    return out


def run_train_fbgan(
    dataset: str,
    out_dir: Path,
    device: torch.device,
    *,
    epochs: int = 30,
    limit: int | None = None,
    val_limit: int | None = None,
    drop_rate: float = 0.001,
    keep_resume: bool = False,
    cfg: FBGANConfig | None = None,
) -> dict[str, Any]:
    """Train on the dataset's combo-VAE split (20,000 clean images), calibrate on VAL, save.

    The threshold flags ‖x − G(E(x))‖² above the VAL drop rate (what `FBGANDefense.fit` does);
    metrics hold the history, VAL FPR, times and, when the dataset has a shipped classifier,
    its accuracy on G(E(x)) for the first 1,000 CLE images. `keep_resume` keeps the resume state
    so a later call with more epochs continues (runs in chunks).
    """
    from fmdefense.core.errors import ArtifactError
    from fmdefense.core.paths import classifier_dir
    from fmdefense.core.provenance import provenance
    from fmdefense.data import load_raw, split_tensors
    from fmdefense.models.classifiers import Classifier

    ds = load_raw(dataset)
    x = split_tensors(ds, "vae_train")[0][:limit]
    x_val = split_tensors(ds, "val")[0][:val_limit]
    x_cle, y_cle = (t[:1000] for t in split_tensors(ds, "cle"))
    c, h, w = ds.image_shape
    base = cfg or FBGANConfig(in_channels=c, image_size=(h, w))
    model = FBGAN(dataclasses.replace(base, epochs=epochs))
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    history = train_fbgan(model, x, device, out_dir)
    errors = _errors(model, x_val, device)
    threshold = threshold_at_drop_rate(errors, drop_rate)
    try:
        clf: nn.Module | None = Classifier.load(classifier_dir(dataset), device)
    except ArtifactError as exc:
        log.warning("FBGAN: no classifier to measure reconstructions with (%s)", exc)
        clf = None
    metrics = {
        "dataset": dataset,
        "loss_history": history,
        "train_seconds": sum(r["seconds"] for r in history),
        "session_seconds": time.perf_counter() - t0,
        "train_images": len(x),
        "val_images": len(x_val),
        "val_fpr": float((errors > threshold).float().mean()),
        "threshold": threshold,
        "drop_rate": drop_rate,
        "cle_first_1000": measure_reconstruction(model, clf, x_cle, y_cle),
        **provenance(),
    }
    save_fbgan(out_dir, model.cpu(), {"drop_rate": drop_rate, "threshold": threshold}, metrics)
    if not keep_resume:
        (out_dir / RESUME_FILE).unlink(missing_ok=True)
    log.info("FBGAN: VAL FPR %.4f, threshold %.3f -> %s", metrics["val_fpr"], threshold, out_dir)
    return metrics
