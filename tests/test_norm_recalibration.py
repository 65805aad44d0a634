"""Decoder BatchNorm re-estimation: the statistics of posterior-mean codes, the decoder alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from fmdefense.core.errors import InputError
from fmdefense.models.combo_vae import DATASET_VAES, ComboVAE
from fmdefense.training.norm_recalibration import recalibrate_decoder_norms
from fmdefense.training.vae import stage_key
from fmdefense.training.vae_config import VAETrainConfig

CPU = torch.device("cpu")


def small_face_vae() -> ComboVAE:
    torch.manual_seed(0)
    cfg = dataclasses.replace(DATASET_VAES["orl"], width=4, z_s_dim=2, map_size=16)
    return ComboVAE(cfg)


def buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.named_buffers()}


def test_the_decoder_gets_the_statistics_of_posterior_means_and_nothing_else_changes() -> None:
    """After poisoning the decoder's running statistics, one pass sets the first BatchNorm's
    running mean and variance to those of its input under D(μ ⊕ z_u) on the given images; the
    encoder's and DGMM's buffers and every weight are untouched, and the model is left in eval."""
    vae = small_face_vae()
    for m in vae.decoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(5.0)
            m.running_var.fill_(9.0)
    x = torch.rand(12, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    before_enc, before_dgmm = buffers(vae.encoder), buffers(vae.dgmm)
    weights = {k: v.clone() for k, v in vae.named_parameters()}
    first_bn = next(m for m in vae.decoder.modules() if isinstance(m, nn.BatchNorm2d))
    seen: list[torch.Tensor] = []
    hook = first_bn.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
    with torch.no_grad():
        vae.eval().decoder(*vae.encode(x))  # the first BN's input depends on no BN statistics
    hook.remove()
    assert recalibrate_decoder_norms(vae, x, CPU, batch_size=12) == 4
    h = seen[0]  # (12, 2w, n, n)
    assert torch.allclose(first_bn.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(first_bn.running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert all(torch.equal(v, before_enc[k]) for k, v in vae.encoder.named_buffers())
    assert all(torch.equal(v, before_dgmm[k]) for k, v in vae.dgmm.named_buffers())
    assert all(torch.equal(v, weights[k]) for k, v in vae.named_parameters())
    assert not any(m.training for m in vae.modules())


def test_recalibration_undoes_a_train_inference_mismatch() -> None:
    """Poisoned statistics move eval-mode reconstructions away from the batch-statistics ones;
    after re-estimation on the same images they agree twenty times more closely."""
    vae = small_face_vae()
    x = torch.rand(16, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z_s, z_u = vae.eval().encode(x)
        vae.decoder.train()
        batch_stats = vae.decoder(z_s, z_u)
        for m in vae.decoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(3.0)
        poisoned = vae.eval().decoder(z_s, z_u)
        recalibrate_decoder_norms(vae, x, CPU, batch_size=16)
        fixed = vae.decoder(z_s, z_u)
    off, back = (poisoned - batch_stats).abs().max(), (fixed - batch_stats).abs().max()
    assert back < off / 20, (float(off), float(back))


def test_the_vector_variant_has_nothing_to_recalibrate() -> None:
    vae = ComboVAE(DATASET_VAES["mnist"])
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    assert recalibrate_decoder_norms(vae, torch.rand(4, 1, 28, 28), CPU) == 0
    assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())


def test_bad_inputs_and_settings_are_refused() -> None:
    vae = small_face_vae()
    with pytest.raises(InputError):
        recalibrate_decoder_norms(vae, torch.rand(4, 1, 28, 28), CPU)
    with pytest.raises(InputError, match="batch_size"):
        recalibrate_decoder_norms(vae, torch.rand(4, 1, 64, 64), CPU, batch_size=1)
    with pytest.raises(InputError, match="recalibrate_norms"):
        VAETrainConfig(recalibrate_norms="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("stage", [1, 2])
def test_turning_recalibration_on_keeps_both_stages_resumable(stage: int) -> None:
    """It runs after both stages, so neither stage's resume key reads it."""
    off = dataclasses.asdict(VAETrainConfig())
    on = dataclasses.asdict(VAETrainConfig(recalibrate_norms=True))
    assert stage_key(on, stage) == stage_key(off, stage)
