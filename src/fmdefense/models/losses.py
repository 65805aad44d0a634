"""Loss terms of the combo-VAE (paper eq. 6–12).

- `kl_normal`: KL(q(z|x) ‖ N(0, I)) per dimension.
- `lgm_logits` / `lgm_loss`: the large-margin Gaussian-mixture loss of Wan et al. (CVPR 2018)
  behind DGMM: L_GM = L_cls + λ_lkd · L_lkd with diagonal covariances and a uniform class prior.
  The margin α enlarges the true class's Mahalanobis distance inside the classification logits
  (d_y → (1 + α) d_y), as in Wan et al.; prediction uses the plain logits.
- `permute_dims`, `tc_estimate`, `discriminator_loss`: FactorVAE's density-ratio trick (eq. 7).
- `consistency_loss`: the optional decoder-only classifier-consistency term (not in the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmdefense.core.config import check_range
from fmdefense.core.errors import InputError


def _same_shape(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    """Refuse shapes that would broadcast into a silently wrong loss."""
    if a.shape != b.shape:
        raise InputError(
            f"{names} must have the same shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) ‖ N(0, 1)) per element, same shape as `mu`."""
    _same_shape(mu, logvar, "mu and logvar")
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def mahalanobis(z: torch.Tensor, means: torch.Tensor, log_vars: torch.Tensor) -> torch.Tensor:
    """Half squared Mahalanobis distance of each z to each class.  (B, K), (C, K) -> (B, C)."""
    if z.dim() != 2 or means.dim() != 2 or z.shape[1] != means.shape[1]:
        raise InputError(
            f"z (B, K) and means (C, K) do not fit: {tuple(z.shape)}, {tuple(means.shape)}"
        )
    _same_shape(means, log_vars, "means and log_vars")
    diff = z.unsqueeze(1) - means.unsqueeze(0)  # (B, C, K)
    return 0.5 * (diff.pow(2) * torch.exp(-log_vars).unsqueeze(0)).sum(-1)


def lgm_logits(
    z: torch.Tensor,
    means: torch.Tensor,
    log_vars: torch.Tensor,
    y: torch.Tensor | None = None,
    margin: float = 0.0,
) -> torch.Tensor:
    """Log N(z; μ_c, Σ_c) + const per class (B, C); with labels, the true class gets the margin."""
    d = mahalanobis(z, means, log_vars)  # (B, C)
    if y is not None and margin > 0:
        d = d + margin * d * F.one_hot(y, d.shape[1]).to(d.dtype)
    return -d - 0.5 * log_vars.sum(-1).unsqueeze(0)


def lgm_loss(
    z: torch.Tensor,
    y: torch.Tensor,
    means: torch.Tensor,
    log_vars: torch.Tensor,
    *,
    margin: float = 0.1,
    lambda_lkd: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_GM, L_cls, L_lkd), batch means. L_lkd = −log N(z; μ_y, Σ_y) up to a constant."""
    check_range("margin", margin, 0.0, 100.0)
    check_range("lambda_lkd", lambda_lkd, 0.0, 1e4)
    if y.dim() != 1 or len(y) != len(z) or y.is_floating_point():
        raise InputError(f"y must be integer labels ({len(z)},), got {y.dtype} {tuple(y.shape)}")
    logits = lgm_logits(z, means, log_vars, y, margin)
    l_cls = F.cross_entropy(logits, y)
    d_true = mahalanobis(z, means, log_vars).gather(1, y.view(-1, 1)).squeeze(1)
    l_lkd = (d_true + 0.5 * log_vars[y].sum(-1)).mean()
    return l_cls + lambda_lkd * l_lkd, l_cls, l_lkd


def permute_dims(z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each dimension permuted independently across the batch: samples of ∏_j q(z_j)."""
    B, D = z.shape
    idx = torch.stack([torch.randperm(B, generator=generator) for _ in range(D)], 1)
    return z.gather(0, idx.to(z.device))


def tc_estimate(d_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 7: E[log D(z) / (1 − D(z))] from the discriminator's two logits (joint, product)."""
    return (d_logits[:, 0] - d_logits[:, 1]).mean()


def discriminator_loss(d_joint: torch.Tensor, d_product: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of D_tc: class 0 for samples of q(z), class 1 for permuted samples."""
    zeros = torch.zeros(len(d_joint), dtype=torch.long, device=d_joint.device)
    ones = torch.ones(len(d_product), dtype=torch.long, device=d_product.device)
    return 0.5 * (F.cross_entropy(d_joint, zeros) + F.cross_entropy(d_product, ones))


def bernoulli_nll(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L_R: binary cross-entropy summed over pixels, mean over the batch (recon in (0, 1))."""
    _same_shape(recon, x, "recon and x")
    eps = 1e-6
    r = recon.clamp(eps, 1 - eps)
    return -(x * torch.log(r) + (1 - x) * torch.log(1 - r)).flatten(1).sum(1).mean()


def consistency_loss(
    classifier: torch.nn.Module, x: torch.Tensor, recon: torch.Tensor
) -> torch.Tensor:
    """KL(C(x) ‖ C(recon)) averaged over the batch: the classifier should read a reconstruction
    as it reads the input. C is frozen (eval, no parameter grads); the gradient reaches `recon`."""
    with torch.no_grad():
        target = torch.log_softmax(classifier(x).float(), 1)  # (B, classes)
    pred = torch.log_softmax(classifier(recon).float(), 1)  # (B, classes)
    return torch.nn.functional.kl_div(pred, target, reduction="batchmean", log_target=True)
