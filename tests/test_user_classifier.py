"""Your own classifier from a spec: folder, TorchScript file, or module:factory + safetensors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fmdefense.core.errors import InputError
from fmdefense.models.classifiers import Classifier, build_classifier
from fmdefense.models.user import UserClassifier, load_user_classifier
from tests.user_model import small_mnist

X = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_factory_with_safetensors_weights_loads_strictly(tmp_path: Path) -> None:
    trained = small_mnist()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # weights the factory would not produce
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    clf = load_user_classifier("tests.user_model:small_mnist", tmp_path / "w.safetensors")
    assert isinstance(clf, UserClassifier) and clf.cfg.in_channels == 1
    assert clf.cfg.image_size == (28, 28) and clf.cfg.num_classes == 10 and not clf.training
    assert torch.allclose(clf(X), trained(X))


def test_weights_that_do_not_fit_are_an_input_error(tmp_path: Path) -> None:
    state = small_mnist().state_dict()
    state.pop("3.bias")
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(InputError, match="does not fit the model"):
        load_user_classifier("tests.user_model:small_mnist", tmp_path / "w.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(InputError, match=r"not a readable \.safetensors"):
        load_user_classifier("tests.user_model:small_mnist", tmp_path / "junk.safetensors")
    with pytest.raises(InputError, match="do not exist"):
        load_user_classifier("tests.user_model:small_mnist", tmp_path / "none.safetensors")


def test_torchscript_file_round_trips(tmp_path: Path) -> None:
    model = small_mnist().eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "m.pt"))
    clf = load_user_classifier(tmp_path / "m.pt")
    assert isinstance(clf, UserClassifier)
    assert torch.allclose(clf(X), model(X))
    with pytest.raises(InputError, match="holds its own weights"):
        load_user_classifier(tmp_path / "m.pt", tmp_path / "w.safetensors")


def test_a_non_torchscript_pt_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pickle.pt").write_bytes(b"PK\x03\x04 not really a TorchScript archive")
    with pytest.raises(InputError, match="not a TorchScript file"):
        load_user_classifier(tmp_path / "pickle.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_user_classifier(tmp_path / "missing.pt")


def test_classifier_folder_is_an_fmdefense_artifact(tmp_path: Path) -> None:
    build_classifier("mnist").save(tmp_path / "clf")
    clf = load_user_classifier(tmp_path / "clf")
    assert isinstance(clf, Classifier) and clf(X).shape == (3, 10)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("not a spec", "is not an fmdefense classifier folder"),
        ("no_such_module_xyz:f", "cannot import"),
        ("tests.user_model:missing", "has no callable 'missing'"),
        ("tests.user_model:not_a_module", "not a torch.nn.Module"),
        ("tests.user_model:five_classes", "must return logits (n, 10)"),
        ("tests.user_model:broken", "fails on images shaped (2, 1, 28, 28)"),
    ],
)
def test_bad_specs_are_input_errors(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        load_user_classifier(spec)


def test_other_input_shapes_are_stated_by_the_caller() -> None:
    clf = load_user_classifier(
        "tests.user_model:rgb_32", in_channels=3, image_size=(32, 32), num_classes=4
    )
    assert clf.cfg.in_channels == 3 and clf(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(InputError, match="fails on images shaped"):
        load_user_classifier("tests.user_model:rgb_32")  # MNIST-shaped by default
