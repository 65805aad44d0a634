"""Settings of combo-VAE training (both stages), one dataclass checked field by field, and the
per-dataset values with the measurements that chose them."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fmdefense.core.config import check_bool, check_choice, check_int, check_range


@dataclass(frozen=True)
class VAETrainConfig:
    """Settings of both stages (recorded in the artifact)."""

    epochs_dgmm: int = 20
    epochs_vae: int = 30
    batch_size: int = 128
    lr_dgmm: float = 1e-3
    lr_vae: float = 1e-3
    lr_tc: float = 1e-4
    gamma: float = 40.0  # TC weight; 0 gives a plain VAE (β = 1)
    gamma_warmup_epochs: int = 5  # γ grows linearly over these epochs
    kl_warmup_epochs: int = 5  # β of L_KL grows 0 → 1 (prevents early collapse of z_s)
    free_bits: float = 0.0  # nats per code (a z_s dim, or a whole channel for faces) the KL
    # term leaves unpenalised (Kingma et al. 2016); keeps codes from collapsing to the prior
    margin: float = 0.1  # L-GM margin α
    dgmm_shift: int = 2  # random ±px shifts while training DGMM (it is a classifier too)
    dgmm_hflip: bool = False  # random horizontal flips while training DGMM (clothes, not digits)
    lambda_lkd: float = 0.1
    # Weight of an optional decoder-only classifier-consistency term, KL(C(x) ‖ C(D(sg(z_s), z_u))):
    # a departure from the paper (its decoder sees L_R alone), used where L_R's blur costs the
    # target classifier too much on reconstructions. The encoder never gets this gradient, so
    # z_s is not pushed to carry the label.
    w_consistency: float = 0.0
    # Which codes the consistency term decodes: "sample" (z = μ + σ·ε, as L_R) or "mean" (μ, what
    # reconstruction, morphs and the defense decode). Where σ stays near 1 (ORL's 64 × 64 maps,
    # σ ≈ 0.98) a decoder trained on samples alone gave C 99 % on sampled but 78 % on μ decodes
    # of its own training faces.
    consistency_codes: str = "sample"
    # After stage 2, re-estimate the decoder's BatchNorm statistics on posterior means of the
    # training images (training.norm_recalibration): off by default, so the shipped models'
    # commands still make them; needed where z_s's posterior stays wide (64 × 64 face maps).
    recalibrate_norms: bool = False
    seed: int = 0
    limit: int | None = None  # use only the first `limit` training images (smoke runs)

    def __post_init__(self) -> None:
        """Every field checked: a bad value fails here, naming the field and what is allowed."""
        check_int("epochs_dgmm", self.epochs_dgmm, low=1, high=100_000)
        check_int("epochs_vae", self.epochs_vae, low=1, high=100_000)
        check_int("batch_size", self.batch_size, low=2, high=1_000_000)  # stage 2 halves it
        for name in ("lr_dgmm", "lr_vae", "lr_tc"):
            check_range(name, getattr(self, name), 0.0, 10.0, low_open=True)
        check_range("gamma", self.gamma, 0.0, 1e4)
        check_int("gamma_warmup_epochs", self.gamma_warmup_epochs, low=0, high=100_000)
        check_int("kl_warmup_epochs", self.kl_warmup_epochs, low=0, high=100_000)
        check_range("free_bits", self.free_bits, 0.0, 1e4)
        check_range("margin", self.margin, 0.0, 100.0)
        check_int("dgmm_shift", self.dgmm_shift, low=0, high=64)
        check_bool("dgmm_hflip", self.dgmm_hflip)
        check_range("lambda_lkd", self.lambda_lkd, 0.0, 1e4)
        check_range("w_consistency", self.w_consistency, 0.0, 1e4)
        check_choice("consistency_codes", self.consistency_codes, ("sample", "mean"))
        check_bool("recalibrate_norms", self.recalibrate_norms)
        check_int("seed", self.seed, low=0, high=2**63 - 1)
        if self.limit is not None:
            check_int("limit", self.limit, low=1)


VAE_TRAIN_CONFIGS: dict[str, VAETrainConfig] = {
    "mnist": VAETrainConfig(),
    # 20 epochs left DGMM under-fitted (train 88.9 %, test 88.3 %): longer, and a wider net.
    # Width 64 and 40 epochs: DGMM 90.4 %, C on reconstructions 80.8 / 82.7 % with L_R alone
    # (below the 85 % target). Two free nats per z_s dim kept every dim active but gave
    # 79.1 / 80.5 %: not used. The decoder-only consistency term at weight 10, fine-tuning that
    # model for 2 epochs, gave 89.7 / 90.1 % at the same MSE (30: no better): used, from scratch.
    "fmnist": VAETrainConfig(epochs_dgmm=40, epochs_vae=40, dgmm_hflip=True, w_consistency=10.0),
    # Without free bits every z_s channel went to the prior (spread 0.00): 280 faces let z_u
    # alone carry the identity, so the KL term had nothing to trade against. With free bits
    # and L_R alone (150 epochs) C recognised 31 % of the test reconstructions; the
    # decoder-only consistency term at weight 10 gives 93.8 / 100 % in 40 epochs (64 / 66 %
    # after 12). Weight 50 (L_R scaled by the pixel count against Fashion-MNIST's) was worse
    # early: 33 / 39 % after 10 epochs, stopped.
    "orl": VAETrainConfig(
        epochs_dgmm=60,
        epochs_vae=40,
        batch_size=32,
        gamma=0.0,
        kl_warmup_epochs=30,
        dgmm_shift=4,
        free_bits=8.0,
        w_consistency=10.0,
    ),
}
# ORL's settings (faces, feature maps, consistency term) with fewer DGMM epochs for ~30 images
# per identity: not measured on the real CelebA here (not reachable offline); run on a
# generated fixture by tests/test_celeba_pipeline.py only
VAE_TRAIN_CONFIGS["celeba"] = replace(
    VAE_TRAIN_CONFIGS["orl"], epochs_dgmm=30, batch_size=64, kl_warmup_epochs=10, dgmm_hflip=True
)
