"""Sizes of one reproduction: `paper` follows the paper (IV.A), `quick` is the same, smaller."""

from __future__ import annotations

from dataclasses import dataclass


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
    compile: bool = False  # torch.compile the morph decode + classify (FMDefenseConfig.compile)
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
    # FM-Defense's resistance on only the first N images of these sets (its 2,000 morphs per
    # input are the pipeline's dominant cost); every other defense sees whole sets
    fm_limits: tuple[tuple[str, int], ...] = ()
    fm_limit: int | None = None  # FM-Defense on the first N of every set, CLE included
    default_alpha: float = 0.01  # the default defense's clean false-positive rate on VAL
    default_adaptive_limit: int | None = None  # its adaptive stage's images (None: adaptive_limit)
    n_tuning: int = 500  # first N VAL images attacked: the default's tuning set
    vae: str | None = None  # combo-VAE folder (None: the dataset's shipped one)
    codes: str | tuple[int, ...] = "all"  # FM-Defense's manipulated codes (FMDefenseConfig)
    seed: int = 0


ATTACKS = (
    ("fgsm", "default"),
    ("deepfool_linf", "default"),
    ("cw_l2", "fast"),
    # high confidence (issue 15): they walk past the decision boundary
    ("cw_l2", "kappa20"),
    ("pgd_linf", "eps0.3"),
    ("pgd_linf", "eps0.1"),
)
PROFILES: dict[str, Profile] = {
    # bf16 where it is native, so that 44 M morphs fit a few hours on 2 cores (guide: mean |Δr|
    # 0.0003 vs fp32); "auto" keeps fp32 on an AVX2-only CPU, where bf16 autocast decoded ORL's
    # 64 × 64 maps 28× slower than fp32 (the earlier "bf16" here ignored that).
    "paper": Profile(
        "paper",
        None,
        None,
        100,
        ATTACKS,
        precision="auto",
        adaptive_limit=500,
        adaptive_fm_rho=0.95,
        fm_limits=(("cw_l2-kappa20", 500), ("pgd_linf-eps0.3", 500), ("pgd_linf-eps0.1", 500)),
        n_tuning=300,
        default_adaptive_limit=500,
    ),
    # 300 VAL images cannot support ρ = 0.999 (it allows 0.3 flagged images per code).
    "quick": Profile(
        "quick",
        300,
        200,
        20,
        ATTACKS,
        rho=0.99,
        magnet_epochs=3,
        defensegan_limit=50,
        n_tuning=100,
    ),
    # The same pipeline at the smallest sizes: proves it runs end to end (the CelebA fixture
    # test); its figures measure nothing.
    "smoke": Profile(
        "smoke",
        None,
        None,
        4,
        ATTACKS,
        rho=0.9,
        magnet_epochs=1,
        magnet_limit=256,
        defensegan_limit=4,
        n_tuning=8,
    ),
}
BASELINES = ("recon", "magnet", "defensegan", "fbgan")
