"""What a trained combo-VAE is measured by (guide §8's collapse watch, the paper's class-shared
property of z_s, held-out quality) and its traversal figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from fmdefense.core.config import check_int, check_range
from fmdefense.core.errors import InputError
from fmdefense.core.validation import check_images, check_labels
from fmdefense.models.classifiers import Classifier
from fmdefense.models.combo_vae import ComboVAE
from fmdefense.models.losses import kl_normal


@torch.inference_mode()
def code_statistics(vae: ComboVAE, x: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Per-dimension spread (std of E_s's means) and KL, the collapse watch of guide §8."""
    vae.encoder.eval()
    mu, logvar = vae.encoder(x.to(device))
    mu, logvar = mu.flatten(2).mean(-1) if mu.dim() == 4 else mu, logvar
    kl = kl_normal(mu, logvar.flatten(2).mean(-1) if logvar.dim() == 4 else logvar).mean(0)
    vae.encoder.train()
    return {"z_s_spread": mu.std(0).tolist(), "z_s_kl": kl.tolist()}


@torch.inference_mode()
def disentanglement(vae: ComboVAE, x: torch.Tensor, threshold: float = 0.5) -> dict[str, Any]:
    """Active z_s dimensions (spread of E_s's means > threshold) and the Gaussian total
    correlation of those means, −½ log det R (R their correlation matrix): 0 when the active
    codes are uncorrelated, growing as they share information — the quantity the TC term
    penalises, measured without a discriminator."""
    check_range("threshold", threshold, 0.0, 1e6)
    vae.eval()
    device = next(vae.parameters()).device
    mu = torch.cat([vae.encoder(x[i : i + 512].to(device))[0].cpu() for i in range(0, len(x), 512)])
    mu = mu.flatten(2).mean(-1) if mu.dim() == 4 else mu
    active = mu.std(0) > threshold
    tc = 0.0
    if int(active.sum()) > 1:
        corr = torch.corrcoef(mu[:, active].T.double())
        tc = float(-0.5 * torch.logdet(corr))
    return {
        "active_dims": int(active.sum()),
        "gaussian_tc_active": tc,
        "spread": mu.std(0).tolist(),
    }


def _ranges(codes: torch.Tensor, min_width: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """1–99 % quantile range of each code's value, at least `min_width` wide: the rule of
    `defenses.fm.ranges.normal_ranges`, restated here because training sits below defenses.
    (n, M[, h, w]) -> lo, hi (M,)"""
    values = (codes if codes.dim() == 2 else codes.flatten(2).mean(-1)).double()
    lo, hi = torch.quantile(values, 0.01, dim=0), torch.quantile(values, 0.99, dim=0)
    centre, half = (lo + hi) / 2, torch.clamp((hi - lo) / 2, min=min_width / 2)
    return (centre - half).float(), (centre + half).float()


def _traversal_ranges(
    name: str, vae: ComboVAE, x: torch.Tensor, x_ref: torch.Tensor, batch_size: int
) -> tuple[torch.device, torch.Tensor, torch.Tensor]:
    """The checks both traversal measures share, then (device, lo, hi) of each code on x_ref."""
    check_int("batch_size", batch_size, low=1)
    if len(x) == 0 or len(x_ref) < 2:
        raise InputError(f"{name} needs images x and at least 2 in x_ref")
    vae.eval()
    device = next(vae.parameters()).device
    return (device, *_ranges(vae.codes(x_ref.to(device)).float()))


def _set_code(codes: torch.Tensor, i: int, value: float) -> torch.Tensor:
    """A copy of `codes` with code i's value set to `value`; a feature map moves as a whole
    (its mean becomes `value`).  (B, M[, n, n]) -> same"""
    moved = codes.clone()
    if codes.dim() == 4:  # (B, n, n) += (B, 1, 1)
        moved[:, i] += value - moved[:, i].mean((-2, -1), keepdim=True)
    else:
        moved[:, i] = value
    return moved


@torch.inference_mode()
def traversal_pixel_change(
    vae: ComboVAE, x: torch.Tensor, x_ref: torch.Tensor, batch_size: int = 256
) -> dict[str, Any]:
    """How much each z_s code's traversal changes the image: per code, the mean and the 99th
    percentile of |D(code at its 1 % value) − D(code at its 99 % value)| over the pixels of each
    image (range on x_ref, z_u kept), averaged over images; what a traversal figure shows."""
    device, lo, hi = _traversal_ranges("traversal_pixel_change", vae, x, x_ref, batch_size)
    d_s = vae.cfg.z_s_dim
    mean, p99 = torch.zeros(d_s), torch.zeros(d_s)
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        codes, z_u = vae.codes(xb), vae.encode(xb)[1]  # (B, M[, n, n]), (B, K)
        for i in range(d_s):
            a = vae.decode_codes(_set_code(codes, i, float(lo[i])), z_u)
            b = vae.decode_codes(_set_code(codes, i, float(hi[i])), z_u)
            diff = (a - b).abs().flatten(1).float().cpu()  # (B, pixels)
            mean[i] += float(diff.mean(1).sum())
            p99[i] += float(torch.quantile(diff, 0.99, dim=1).sum())
    return {
        "per_code_mean": (mean / len(x)).tolist(),
        "per_code_p99": (p99 / len(x)).tolist(),
        "images": len(x),
    }


@torch.inference_mode()
def traversal_label_stability(
    vae: ComboVAE,
    classifier: torch.nn.Module,
    x: torch.Tensor,
    x_ref: torch.Tensor,
    steps: int = 9,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Share of single-code z_s traversals (each code set to `steps` values across its 1–99 %
    range on x_ref, z_u kept) whose decode C labels like the plain reconstruction: 1 when z_s
    carries no class information, the property FM-Defense asks of its class-shared codes."""
    check_int("steps", steps, low=1, high=10_000)
    device, lo, hi = _traversal_ranges("traversal_label_stability", vae, x, x_ref, batch_size)
    d_s = vae.cfg.z_s_dim
    grid = lo[:, None].cpu() + (hi - lo)[:, None].cpu() * torch.linspace(0, 1, steps)  # (M, steps)
    kept = torch.zeros(d_s)
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        codes, z_u = vae.codes(xb), vae.encode(xb)[1]  # (B, M[, n, n]), (B, K)
        ref = classifier(vae.decode_codes(codes, z_u)).argmax(1)  # (B,)
        for i in range(d_s):
            for v in grid[i].tolist():
                label = classifier(vae.decode_codes(_set_code(codes, i, v), z_u)).argmax(1)
                kept[i] += float((label == ref).sum())
    per_code = (kept / (len(x) * steps)).tolist()
    return {"per_code": per_code, "mean": sum(per_code) / d_s, "steps": steps, "images": len(x)}


@torch.inference_mode()
def held_out_measures(
    vae: ComboVAE,
    x: torch.Tensor,
    y: torch.Tensor,
    classifier: Classifier | None,
    device: torch.device,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Reconstruction MSE per pixel, DGMM accuracy and C's accuracy on reconstructions."""
    x = check_images(x, channels=vae.cfg.in_channels, size=vae.cfg.image_size)
    y = check_labels(y, len(x), vae.cfg.num_classes)
    check_int("batch_size", batch_size, low=1)
    vae.eval()
    sse, dgmm_ok = 0.0, 0
    clf_ok = {"feature": 0, "class_mean": 0}
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        z_u = vae.dgmm(xb)
        dgmm_ok += int((vae.dgmm.logits(z_u).argmax(1) == yb).sum())
        for mode in clf_ok:
            recon = vae.reconstruct(xb, z_u_mode=mode)
            if mode == "feature":
                sse += float((recon - xb).pow(2).sum())
            if classifier is not None:
                clf_ok[mode] += int((classifier(recon).argmax(1) == yb).sum())
    out: dict[str, Any] = {
        "test_images": len(x),
        "recon_mse_per_pixel": sse / x[0].numel() / len(x),
        "dgmm_test_accuracy": dgmm_ok / len(x),
    }
    if classifier is not None:
        out["classifier_accuracy_on_reconstructions"] = {k: v / len(x) for k, v in clf_ok.items()}
    return out


@torch.inference_mode()
def traversal_image(
    vae: ComboVAE, x: torch.Tensor, x_ref: torch.Tensor, path: Path, steps: int = 9
) -> None:
    """Rows = codes, columns = values from the 1 % to the 99 % quantile of each code on x_ref."""
    check_int("steps", steps, low=2, high=100)
    vae.eval()
    device = next(vae.parameters()).device
    ref = vae.codes(x_ref.to(device)).float()
    values = ref.flatten(2).mean(-1) if ref.dim() == 4 else ref  # (n, M)
    lo, hi = torch.quantile(values, 0.01, dim=0), torch.quantile(values, 0.99, dim=0)
    codes = vae.codes(x[:1].to(device))
    z_u = vae.encode(x[:1].to(device))[1]
    m = vae.num_codes
    fig, axes = plt.subplots(m, steps, figsize=(steps * 0.7, m * 0.7), squeeze=False)
    for i in range(m):
        grid = torch.linspace(float(lo[i]), float(hi[i]), steps)
        batch = codes.repeat(steps, *([1] * (codes.dim() - 1)))
        shift = grid - (codes[0, i].mean() if codes.dim() == 4 else codes[0, i])
        if codes.dim() == 4:
            batch[:, i] += shift.view(-1, 1, 1).to(device)
        else:
            batch[:, i] += shift.to(device)
        imgs = vae.decode_codes(batch, z_u.repeat(steps, 1)).cpu()
        for j in range(steps):
            if imgs.shape[1] == 3:  # RGB faces (CelebA): (3, H, W) -> (H, W, 3)
                axes[i, j].imshow(imgs[j].permute(1, 2, 0).numpy(), vmin=0, vmax=1)
            else:
                axes[i, j].imshow(imgs[j, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(f"f{i}", rotation=0, fontsize=7, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
