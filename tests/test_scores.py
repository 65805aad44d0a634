"""The default defense's batched scoring against a plain per-network reference.

`DefaultDefense._pass` runs every network once per batch through channels_last inference copies
(the classifier once over x, both reconstructions and the squeezed images stacked); the
reference below calls each network separately on the original modules, as the scores are
defined. Real MNIST architectures (random weights), so the convolutions' layouts are exercised.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fmdefense.core.inference import inference_copy
from fmdefense.defenses.default import DefaultConfig, DefaultDefense
from fmdefense.defenses.scores import SQUEEZERS
from fmdefense.models.classifiers import build_classifier
from fmdefense.models.combo_vae import ComboVAE, ComboVAEConfig
from fmdefense.models.magnet import autoencoder_i, autoencoder_ii


def _models() -> tuple[nn.Module, ComboVAE, tuple[nn.Module, nn.Module]]:
    torch.manual_seed(0)
    clf = build_classifier("mnist").eval()
    return clf, ComboVAE(ComboVAEConfig()).eval(), (autoencoder_i(1), autoencoder_ii(1))


def _reference(
    clf: nn.Module, vae: ComboVAE, aes: tuple[nn.Module, nn.Module], x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each score from its own network calls, on the original modules."""
    logits = clf(x)
    label = logits.argmax(1)
    z_s, z_u = vae.encode(x)
    dgmm = vae.dgmm.logits(z_u)

    def doubt(lg: torch.Tensor) -> torch.Tensor:
        return 1 - lg.softmax(1)[torch.arange(len(x)), label]

    s = {}
    for mode, zu in (("feature", z_u), ("class_mean", vae.dgmm.means[dgmm.argmax(1)])):
        x_hat = vae.decode(z_s, zu)
        s[f"pixel_error_{mode}"] = ((x - x_hat) ** 2).sum((1, 2, 3))
        s[f"recon_check_{mode}"] = doubt(clf(x_hat))
    s["dgmm_doubt"] = doubt(dgmm)
    top = logits.sort(1, descending=True).values
    s["margin"] = top[:, 1] - top[:, 0]
    s["magnet_ae_i"] = ((aes[0](x) - x) ** 2).mean((1, 2, 3))
    s["magnet_ae_ii"] = (aes[1](x) - x).abs().mean((1, 2, 3))
    for name in ("bits1", "median2"):
        s[f"squeeze_{name}"] = (clf(SQUEEZERS[name](x)).softmax(1) - logits.softmax(1)).abs().sum(1)
    return s


def test_batched_scores_equal_a_per_network_reference() -> None:
    clf, vae, aes = _models()
    x = torch.rand(37, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    d = DefaultDefense(clf, vae, aes, DefaultConfig(batch_size=16))  # 3 batches, the last short
    with torch.no_grad():
        ref = _reference(clf, vae, aes, x)
        raw = d.raw_scores(x)  # the differentiable path, on the original modules
    names = list(ref)
    assert list(raw) == names  # the defense's fixed order
    s, label, recon_label, dgmm_label, recon = d._pass(x, names)
    assert not s.is_inference() and not recon.is_inference()
    for i, k in enumerate(names):
        assert torch.allclose(s[:, i], ref[k], rtol=1e-5, atol=1e-5), k
        assert torch.allclose(raw[k], ref[k], rtol=1e-5, atol=1e-5), k
    with torch.no_grad():
        z_s, z_u = vae.encode(x)
        mean = vae.dgmm.class_means(z_u)
        assert torch.equal(label, clf(x).argmax(1))
        assert torch.equal(dgmm_label, vae.dgmm.logits(z_u).argmax(1))
        assert torch.allclose(recon, vae.decode(z_s, mean), atol=1e-5)
        assert torch.equal(recon_label, clf(vae.decode(z_s, mean)).argmax(1))


def test_inference_copy_is_channels_last_and_follows_weight_changes() -> None:
    clf = _models()[0]
    twin = inference_copy(clf)
    assert twin is not clf and inference_copy(clf) is twin  # cached
    conv = next(m for m in twin.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.requires_grad for p in twin.parameters())
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(twin(x), clf(x), atol=1e-5)
        next(clf.parameters()).mul_(2)  # an in-place change: the copy is rebuilt
        fresh = inference_copy(clf)
        assert fresh is not twin and torch.allclose(fresh(x), clf(x), atol=1e-5)
    clf.train()  # a mode change too
    assert inference_copy(clf) is not fresh


def test_inference_copy_of_a_module_built_in_inference_mode() -> None:
    with torch.inference_mode():
        net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    x = torch.rand(2, 1, 5, 5)
    with torch.inference_mode():
        assert torch.allclose(inference_copy(net)(x), net(x), atol=1e-6)


@pytest.mark.parametrize("dataset", ["mnist", "orl"])
def test_the_shipped_default_reproduces_its_stored_reference_scores(dataset: str) -> None:
    """End to end on real weights: the VAL reference scores stored in weights/D/default
    (computed by the per-network code it was calibrated with) from today's batched pass."""
    from fmdefense.core.paths import model_dir
    from fmdefense.data import load_raw, split_tensors
    from fmdefense.defenses import fusion
    from fmdefense.defenses.jobs import load_models

    clf, vae = load_models(dataset, torch.device("cpu"))
    d = DefaultDefense.load(model_dir(dataset, "default"), clf, vae)
    x_val = split_tensors(load_raw(dataset), "val")[0]
    ref_idx = fusion.split_indices(len(x_val), d.config.seed)[0][:64]
    s = d._score_matrix(x_val[ref_idx], d.names_)
    assert torch.allclose(s, d.reference_[:64], rtol=1e-5, atol=1e-6)


def test_pretrained_orl_defends_the_test_faces_as_the_readme_reports() -> None:
    """weights/orl/default (the ORL paper run's choice) through `fmdefense.pretrained("orl")`:
    on the 80 CLE faces it flags 5 (README, Faces: 93.8 % clean accuracy, 6.2 % flagged)."""
    import fmdefense
    from fmdefense.data import load_raw, split_tensors

    d = fmdefense.pretrained("orl", device="cpu")
    x, y = split_tensors(load_raw("orl"), "cle")
    dec = d.decide(x)
    assert x.shape == (80, 1, 64, 64)
    assert int(dec.flagged.sum()) == 5
    assert (dec.label == y).float().mean().item() == pytest.approx(0.9375)


def test_saved_autoencoders_load_onto_the_classifier_device() -> None:
    """A default (or ensemble) loaded around a classifier on another device gets MagNet's
    autoencoders there too (the meta device stands in for CUDA on this CPU-only machine)."""
    from fmdefense.defenses.default import _autoencoders

    state = {f"ae_i.{k}": v for k, v in autoencoder_i(1).state_dict().items()}
    state |= {f"ae_ii.{k}": v for k, v in autoencoder_ii(1).state_dict().items()}
    for device in (torch.device("cpu"), torch.device("meta")):
        pair = _autoencoders(state, 1, device)
        assert {p.device for ae in pair for p in ae.parameters()} == {device}
        assert not any(ae.training for ae in pair)
    from fmdefense.defenses.jobs import load_models

    clf, vae = load_models("mnist", torch.device("cpu"))
    folder = Path(__file__).resolve().parents[1] / "weights" / "mnist" / "default"
    # a classifier on the meta device cannot be fingerprinted: strict=False skips that check
    loaded = DefaultDefense.load(folder, clf.to("meta"), vae, strict=False)
    assert loaded.autoencoders is not None
    assert {p.device.type for ae in loaded.autoencoders for p in ae.parameters()} == {"meta"}
