"""The ART adapter: every registered defense as an ART EvasionDetector, and one ART attack."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from art.attacks.evasion import FastGradientMethod
from art.defences.detector.evasion import EvasionDetector
from art.estimators.classification import PyTorchClassifier

from fmdefense.core.errors import InputError
from fmdefense.defenses.base import ACTIONS
from fmdefense.defenses.registry import DEFENSES
from fmdefense.integrations.art import ARTDetector
from tests.test_contract import BUILDERS, X_VAL, X


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_every_defense_fits_and_detects_through_art(name: str) -> None:
    defense, _ = BUILDERS[name]()
    detector = ARTDetector(defense)
    assert isinstance(detector, EvasionDetector) and detector.get_params() == {"defense": defense}
    assert detector.fit(X_VAL.numpy(), None) is None  # ART's fit returns nothing
    report, flagged = detector.detect(X.numpy())
    n = len(X)
    assert flagged.dtype == np.bool_ and flagged.shape == (n,)
    assert report["action"].shape == (n,) and set(report["action"]) <= set(ACTIONS)
    assert np.array_equal(flagged, report["action"] != "accept")
    assert report["label"].dtype == np.int64 and report["input_label"].shape == (n,)
    assert np.array_equal(report["label"] == -1, report["action"] == "reject")
    assert report["scores"] and all(v.shape == (n,) for v in report["scores"].values())
    assert np.array_equal(flagged, defense.detect(X).numpy())  # the same verdicts
    _, in_twos = detector.detect(X.numpy().astype(np.float64), batch_size=2)
    assert np.array_equal(flagged, in_twos)


def test_labels_may_be_one_hot_and_bad_inputs_are_input_errors() -> None:
    defense, _ = BUILDERS["default"]()
    detector = ARTDetector(defense)
    y = (X_VAL.flatten(1).mean(1) > 0.5).long().numpy()
    detector.fit(X_VAL.numpy(), np.eye(2, dtype=np.float32)[y])
    bad = [
        (X.numpy().transpose(0, 2, 3, 1), "NHWC"),  # (n, 4, 4, 1)
        (X, "numpy array"),
        (X.numpy()[0], "shape"),
        ((X.numpy() * 255).astype(np.uint8), "floats"),
        (X.numpy() + 2, "[0, 1]"),
    ]
    for x, message in bad:
        with pytest.raises(InputError, match=message.replace("[", r"\[")):
            detector.detect(x)
    with pytest.raises(InputError, match="batch_size"):
        detector.detect(X.numpy(), batch_size=0)
    with pytest.raises(InputError, match="integer labels"):
        detector.fit(X_VAL.numpy(), y[:3])
    with pytest.raises(InputError, match="wraps an fmdefense Defense"):
        ARTDetector(object())  # type: ignore[arg-type]


def test_art_fgsm_examples_are_flagged_more_than_clean_ones() -> None:
    """FGSM (ε = 0.3) from ART on the shipped MNIST classifier, 16 CLE images; the detector
    wraps a default defense (shipped classifier and combo-VAE, random-init MagNet autoencoders)
    fitted through ART on 200 clean VAL images."""
    from fmdefense.data import load_raw, split_tensors
    from fmdefense.defenses.default import DefaultConfig, DefaultDefense
    from fmdefense.defenses.jobs import load_models
    from fmdefense.models.magnet import MagNetAutoencoders, MagNetConfig

    clf, vae = load_models("mnist", torch.device("cpu"))
    aes = MagNetAutoencoders(MagNetConfig()).eval()
    detector = ARTDetector(DefaultDefense(clf, vae, (aes.ae1, aes.ae2), DefaultConfig(alpha=0.05)))
    ds = load_raw("mnist")
    detector.fit(split_tensors(ds, "val")[0][:200].numpy())
    x, y = split_tensors(ds, "cle")
    x, y = x[:16].numpy(), y[:16].numpy()

    estimator = PyTorchClassifier(
        model=clf,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(1, 28, 28),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    x_adv = FastGradientMethod(estimator, norm=np.inf, eps=0.3).generate(x, y=y)
    assert x_adv.shape == x.shape and float(np.abs(x_adv - x).max()) <= 0.3 + 1e-6
    assert (estimator.predict(x_adv).argmax(1) != y).mean() > 0.5  # the attack works
    _, clean = detector.detect(x)
    report_adv, adv = detector.detect(x_adv.astype(np.float32))
    assert clean.shape == adv.shape == (16,) and report_adv["label"].shape == (16,)
    assert adv.mean() > clean.mean(), (adv.mean(), clean.mean())
    assert adv.mean() >= 0.75
