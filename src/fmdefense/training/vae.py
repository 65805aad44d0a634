"""Two-stage combo-VAE training (paper III.D), each stage resumable per epoch.

Stage 1 trains DGMM alone with L_GM on labelled clean data. Stage 2 freezes DGMM and trains
E_s, the decoder and D_tc. One update order keeps the FactorVAE pitfalls out:
  1. VAE loss L_R + L_KL + γ·TC on half a batch; backward (D_tc's grads from it are discarded);
  2. D_tc loss on *detached* codes of both halves (second half permuted); backward;
  3. only then both optimiser steps.
So no discriminator gradient reaches the encoder, and no step precedes a backward that needs the
old weights. The decoder only sees L_R (KL and TC do not depend on it), as in the paper, unless
the optional classifier-consistency term is on (`VAETrainConfig.w_consistency`; decoder only).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fmdefense.core.artifacts import GeneratorState, load_resume_state, save_resume_state
from fmdefense.core.config import check_choice, replace_fields
from fmdefense.core.errors import InputError
from fmdefense.core.paths import classifier_dir
from fmdefense.core.progress import progress
from fmdefense.core.provenance import provenance
from fmdefense.core.validation import check_images, check_labels
from fmdefense.data import load_raw, split_tensors
from fmdefense.models.classifiers import Classifier
from fmdefense.models.combo_vae import DATASET_VAES, ComboVAE, TCDiscriminator
from fmdefense.models.losses import (
    bernoulli_nll,
    consistency_loss,
    discriminator_loss,
    kl_normal,
    lgm_loss,
    permute_dims,
    tc_estimate,
)
from fmdefense.training.loops import augment
from fmdefense.training.norm_recalibration import recalibrate_decoder_norms
from fmdefense.training.vae_config import VAE_TRAIN_CONFIGS, VAETrainConfig
from fmdefense.training.vae_measures import (
    code_statistics,
    disentanglement,
    held_out_measures,
    traversal_image,
    traversal_label_stability,
)

__all__ = [
    "VAE_TRAIN_CONFIGS",
    "VAETrainConfig",
    "code_statistics",
    "consistency_loss",
    "disentanglement",
    "held_out_measures",
    "kl_term",
    "run_train_vae",
    "train_dgmm",
    "train_stage2",
    "traversal_image",
    "traversal_label_stability",
    "vae_step",
]

log = logging.getLogger(__name__)


def _batches(n: int, size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + size] for i in range(0, n, size)]


# Settings stage 1 (DGMM alone) never reads: changing them keeps its finished epochs.
STAGE2_FIELDS = frozenset(
    {
        "epochs_vae",
        "lr_vae",
        "lr_tc",
        "gamma",
        "gamma_warmup_epochs",
        "kl_warmup_epochs",
        "free_bits",
        "w_consistency",
        "consistency_codes",
        "recalibrate_norms",
    }
)
AFTER_FIELDS = frozenset({"recalibrate_norms"})  # read after both stages: no epoch depends on it


def stage_key(config: dict[str, Any], stage: int) -> dict[str, Any]:
    """The training settings a stage's resume state must match: those stage 1 reads for
    stage 1; for stage 2 (trained on stage 1's DGMM) all but `epochs_vae`: no schedule of
    stage 2 depends on its length, so a run with more epochs continues a shorter one exactly
    (its first epochs are the shorter run's)."""
    drop = STAGE2_FIELDS if stage == 1 else {"epochs_vae", *AFTER_FIELDS}
    return {k: v for k, v in config.items() if k not in drop}


def _resume(
    folder: Path, cfg: VAETrainConfig, modules: dict[str, Any], stage: int
) -> tuple[int, list]:
    state = load_resume_state(folder)
    if state is None:
        return 0, []
    saved = state.get("train_config")
    if not isinstance(saved, dict) or stage_key(saved, stage) != stage_key(asdict(cfg), stage):
        return 0, []
    if stage == 2 and int(state["epoch"]) > cfg.epochs_vae:  # a longer run: cannot shorten it
        return 0, []
    for name, module in modules.items():
        if name == "torch_rng" and name not in state:  # saved before it was kept
            log.warning("%s: no saved global RNG state; the resumed noise differs", folder.name)
            continue
        module.load_state_dict(state[name])
    log.info("resuming %s from epoch %d", folder.name, state["epoch"])
    return int(state["epoch"]), list(state["history"])


def _save(
    folder: Path, cfg: VAETrainConfig, modules: dict[str, Any], epoch: int, hist: list
) -> None:
    state = {name: m.state_dict() for name, m in modules.items()}
    save_resume_state(
        folder, {**state, "epoch": epoch, "history": hist, "train_config": asdict(cfg)}
    )


def train_dgmm(
    vae: ComboVAE,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: VAETrainConfig,
    folder: Path,
    device: torch.device,
) -> list[dict[str, float]]:
    """Stage 1: DGMM alone with L_GM = L_cls + λ_lkd·L_lkd."""
    x = _check_images(vae, x)
    y = check_labels(y, len(x), vae.cfg.num_classes, "training labels")
    dgmm = vae.dgmm.to(device)
    opt = torch.optim.Adam(dgmm.parameters(), lr=cfg.lr_dgmm)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs_dgmm, 1))
    gen = torch.Generator().manual_seed(cfg.seed)
    modules = {"dgmm": dgmm, "opt": opt, "sched": sched, "gen": GeneratorState(gen)}
    start, history = _resume(folder, cfg, modules, stage=1)
    for epoch in range(start, cfg.epochs_dgmm):
        dgmm.train()
        t0, sums, n = time.perf_counter(), [0.0, 0.0, 0.0], 0
        for idx in progress(
            _batches(len(x), cfg.batch_size, gen),
            desc=f"DGMM epoch {epoch + 1}/{cfg.epochs_dgmm}",
            unit="batch",
            leave=False,
        ):
            xb = augment(x[idx], cfg.dgmm_shift, cfg.dgmm_hflip, gen).to(device)
            yb = y[idx].to(device)
            z = dgmm(xb)
            loss, _, l_lkd = lgm_loss(
                z, yb, dgmm.means, dgmm.log_vars, margin=cfg.margin, lambda_lkd=cfg.lambda_lkd
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct = int((dgmm.logits(z).argmax(1) == yb).sum())
            sums = [
                sums[0] + loss.item() * len(idx),
                sums[1] + l_lkd.item() * len(idx),
                sums[2] + correct,
            ]
            n += len(idx)
        row = {
            "epoch": epoch + 1,
            "loss": sums[0] / n,
            "l_lkd": sums[1] / n,
            "train_acc": sums[2] / n,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        log.info(
            "DGMM epoch %d: loss %.4f acc %.4f (%.0f s)",
            epoch + 1,
            row["loss"],
            row["train_acc"],
            row["seconds"],
        )
        _save(folder, cfg, modules, epoch + 1, history)
    return history


def kl_term(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float = 0.0) -> torch.Tensor:
    """Σ over codes of max(KL of the code averaged over the batch, free_bits); a code is a
    z_s dimension (B, d) or a whole channel of the maps (B, C, n, n)."""
    per_code = kl_normal(mu, logvar).flatten(2).sum(-1) if mu.dim() == 4 else kl_normal(mu, logvar)
    return per_code.mean(0).clamp(min=free_bits).sum()  # (B, codes) -> ()


def vae_step(
    vae: ComboVAE,
    disc: TCDiscriminator | None,
    xb: torch.Tensor,
    gamma: float,
    beta: float,
    opt_vae: torch.optim.Optimizer,
    opt_tc: torch.optim.Optimizer | None,
    gen: torch.Generator,
    free_bits: float = 0.0,
    classifier: torch.nn.Module | None = None,
    w_consistency: float = 0.0,
    consistency_codes: str = "sample",
) -> dict[str, float]:
    """One stage-2 update in the safe order (see module docstring); with `classifier` and
    `w_consistency` > 0, plus the decoder-only consistency term (see VAETrainConfig)."""
    # a last batch of one image cannot be halved: it updates the VAE alone (no empty half)
    check_choice("consistency_codes", consistency_codes, ("sample", "mean"))
    half = len(xb) // 2 if disc is not None and len(xb) > 1 else len(xb)
    x1, x2 = xb[:half], xb[half:]
    with torch.no_grad():
        z_u = vae.dgmm(x1)  # frozen DGMM
    mu, logvar = vae.encoder(x1)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    recon = vae.decoder(z, z_u)
    l_r = bernoulli_nll(recon, x1)
    kl = kl_normal(mu, logvar).flatten(1).sum(1).mean()  # logged: the true KL
    penalised = kl_term(mu, logvar, free_bits) if free_bits > 0 else kl
    tc = tc_estimate(disc(z)) if disc is not None else torch.zeros(())
    loss = l_r + beta * penalised + gamma * tc
    consistency = torch.zeros(())
    if classifier is not None and w_consistency > 0:
        z_c = mu.detach() if consistency_codes == "mean" else z.detach()  # see VAETrainConfig
        consistency = consistency_loss(classifier, x1, vae.decoder(z_c, z_u))
        loss = loss + w_consistency * consistency
    opt_vae.zero_grad(set_to_none=True)
    loss.backward()
    d_loss = torch.zeros(())
    if disc is not None and opt_tc is not None and len(x2) > 1:
        with torch.no_grad():
            mu2, logvar2 = vae.encoder(x2)
            z2 = mu2 + torch.randn_like(mu2) * torch.exp(0.5 * logvar2)
        opt_tc.zero_grad(set_to_none=True)  # drops D_tc grads left by the VAE loss
        n = min(len(z), len(z2))
        d_loss = discriminator_loss(disc(z.detach()[:n]), disc(permute_dims(z2[:n], gen)))
        d_loss.backward()
    opt_vae.step()
    if opt_tc is not None and disc is not None:
        opt_tc.step()
    return {
        "loss": loss.item(),
        "l_r": l_r.item(),
        "kl": kl.item(),
        "tc": tc.item(),
        "d_loss": d_loss.item(),
        "consistency": consistency.item(),
    }


def _check_images(vae: ComboVAE, x: object) -> torch.Tensor:
    c = vae.cfg
    return check_images(x, channels=c.in_channels, size=c.image_size, name="training images")


def _check_consistency(cfg: VAETrainConfig, classifier: torch.nn.Module | None) -> None:
    if not isinstance(cfg, VAETrainConfig):
        raise InputError(f"cfg must be a VAETrainConfig, got {type(cfg).__name__}")
    if cfg.w_consistency > 0 and classifier is None:
        raise InputError("w_consistency > 0 needs the target classifier (train it first)")


def train_stage2(
    vae: ComboVAE,
    x: torch.Tensor,
    cfg: VAETrainConfig,
    folder: Path,
    device: torch.device,
    classifier: torch.nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Stage 2: E_s and decoder (and D_tc when γ > 0) with DGMM frozen; `classifier` is
    required when cfg.w_consistency > 0."""
    _check_consistency(cfg, classifier)
    x = _check_images(vae, x)
    if classifier is not None:
        classifier = classifier.to(device).eval().requires_grad_(False)
    vae.to(device)
    vae.dgmm.requires_grad_(False).eval()
    params = [*vae.encoder.parameters(), *vae.decoder.parameters()]
    opt_vae = torch.optim.Adam(params, lr=cfg.lr_vae)
    use_tc = cfg.gamma > 0 and vae.cfg.variant == "vector"
    disc = TCDiscriminator(vae.cfg.z_s_dim, vae.cfg.tc_hidden).to(device) if use_tc else None
    opt_tc = torch.optim.Adam(disc.parameters(), lr=cfg.lr_tc, betas=(0.5, 0.9)) if disc else None
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    modules: dict[str, Any] = {
        "encoder": vae.encoder,
        "decoder": vae.decoder,
        "opt_vae": opt_vae,
        "gen": GeneratorState(gen),
        # the reparameterisation noise comes from the global generator: kept, so a resumed
        # run draws what an uninterrupted one would
        "torch_rng": GeneratorState(torch.default_generator),
    }
    if disc is not None and opt_tc is not None:
        modules |= {"disc": disc, "opt_tc": opt_tc}
    start, history = _resume(folder, cfg, modules, stage=2)
    for epoch in range(start, cfg.epochs_vae):
        vae.encoder.train()
        vae.decoder.train()
        gamma = cfg.gamma * min(1.0, (epoch + 1) / max(cfg.gamma_warmup_epochs, 1))
        beta = min(1.0, (epoch + 1) / max(cfg.kl_warmup_epochs, 1))
        t0, rows = time.perf_counter(), []
        for idx in progress(
            _batches(len(x), cfg.batch_size, gen),
            desc=f"VAE epoch {epoch + 1}/{cfg.epochs_vae}",
            unit="batch",
            leave=False,
        ):
            xb = x[idx].to(device)
            rows.append(
                vae_step(
                    vae,
                    disc,
                    xb,
                    gamma,
                    beta,
                    opt_vae,
                    opt_tc,
                    gen,
                    cfg.free_bits,
                    classifier,
                    cfg.w_consistency,
                    cfg.consistency_codes,
                )
            )
        row: dict[str, Any] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        row |= {
            "epoch": epoch + 1,
            "gamma": gamma,
            "seconds": time.perf_counter() - t0,
            **code_statistics(vae, x[:2000], device),
        }
        history.append(row)
        log.info(
            "VAE epoch %d: L_R %.2f KL %.2f TC %.3f; z_s spread %s (%.0f s)",
            epoch + 1,
            row["l_r"],
            row["kl"],
            row["tc"],
            [round(s, 2) for s in row["z_s_spread"]],
            row["seconds"],
        )
        _save(folder, cfg, modules, epoch + 1, history)
    return history


def run_train_vae(
    dataset: str,
    out_dir: Path,
    device: torch.device,
    *,
    overrides: dict[str, Any] | None = None,
    architecture: dict[str, Any] | None = None,
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """Both stages on `vae_train`, measured on `test`, saved; `architecture`: ComboVAE fields."""
    if dataset not in VAE_TRAIN_CONFIGS:
        raise InputError(f"no combo-VAE settings for {dataset!r}; known: {list(VAE_TRAIN_CONFIGS)}")
    cfg = replace_fields(VAE_TRAIN_CONFIGS[dataset], overrides, "VAE training config")
    arch = replace_fields(DATASET_VAES[dataset], architecture, "combo-VAE config")
    torch.manual_seed(cfg.seed)
    ds = load_raw(dataset, data_dir=data_dir)
    x, y = split_tensors(ds, "vae_train")
    if cfg.limit is not None:
        x, y = x[: cfg.limit], y[: cfg.limit]
    vae, t0 = ComboVAE(arch), time.perf_counter()
    clf_path = classifier_dir(dataset)
    clf = Classifier.load(clf_path, device) if (clf_path / "config.json").is_file() else None
    _check_consistency(cfg, clf)  # before stage 1, not after it
    h1 = train_dgmm(vae, x, y, cfg, out_dir / "stage1-dgmm", device)
    h2 = train_stage2(vae, x, cfg, out_dir / "stage2-vae", device, clf)
    if cfg.recalibrate_norms:
        recalibrate_decoder_norms(vae, x, device)
    seconds = time.perf_counter() - t0
    if clf is None:
        log.info("no classifier at %s: accuracy on reconstructions not measured", clf_path)
    x_test, y_test = split_tensors(ds, "test")
    metrics = {
        "dataset": dataset,
        "train_images": len(x),
        "train_seconds": seconds,
        **held_out_measures(vae, x_test, y_test, clf, device),
        "history_dgmm": h1,
        "history_vae": h2,
        "train_config": asdict(cfg),
        **provenance(),
    }
    vae.cpu().save(out_dir, metrics)
    x_val, _ = split_tensors(ds, "val")
    traversal_image(vae, x_test[:1], x_val, out_dir / "traversal.png")
    return metrics
