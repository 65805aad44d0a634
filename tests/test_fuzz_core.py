"""Fuzz of the public boundary of core, data, models and training (issue 21).

Each test feeds random, mostly hostile values and accepts exactly two outcomes: an FMDefenseError
subclass with a one-line message, or a correct result judged by an oracle written independently
of the code under test. Any other exception (TypeError, RuntimeError, AssertionError, ...) is a
traceback a user would have seen, and fails the test.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmdefense.core.chunks import chunked
from fmdefense.core.device import resolve_device
from fmdefense.core.errors import FMDefenseError
from fmdefense.core.validation import check_images, check_labels
from fmdefense.data.raw import RawDataset
from fmdefense.data.splits import SplitConfig
from fmdefense.models.classifiers import Classifier, ClassifierConfig
from fmdefense.models.combo_vae import ComboVAE, ComboVAEConfig
from fmdefense.training.loops import TrainConfig
from fmdefense.training.vae import VAETrainConfig

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OTHER_DTYPES = [torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool, torch.complex64]
SPECIAL = [0.0, 1.0, 0.5, -0.0, 1 + 1e-6, -1e-6, 1 + 1e-12, 2.0, -3.0, 255.0, 1e30]
SPECIAL += [math.nan, math.inf, -math.inf]

# JSON-ish values a hostile config file or caller might hand over
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 3, 8, 16, 28, 64, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(SPECIAL),
    st.text(max_size=12),
    st.sampled_from(["adam", "sgd", "vector", "maps", "cw_mnist", "small_vgg", ""]),
    st.lists(st.integers(-5, 64), max_size=3),
    st.tuples(st.integers(-5, 70), st.integers(-5, 70)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def one_line_error(call: Callable[[], Any]) -> tuple[bool, Any]:
    """(True, result) or (False, error) for an FMDefenseError with a one-line message."""
    try:
        return True, call()
    except FMDefenseError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not one line: {message!r}"
        return False, exc


# ----------------------------------------------------------------------------- images


@st.composite
def image_like(draw: st.DrawFn, channels: int | None, size: tuple[int, int] | None) -> object:
    """Mostly near-misses of a valid batch for (channels, size): one thing off at a time."""
    kind = draw(st.sampled_from(["tensor"] * 12 + ["list", "none", "numpy"]))
    if kind == "list":
        return [[0.5]]
    if kind == "none":
        return None
    c = channels if channels is not None else draw(st.integers(1, 3))
    h, w = size if size is not None else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    shape = [draw(st.integers(1, 3)), c, h, w]
    if draw(st.integers(0, 3)) == 0:  # a wrong shape: random rank and sizes
        shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=5))
    if kind == "numpy":
        return np.zeros(shape, np.float32)
    dtype = draw(st.sampled_from(FLOAT_DTYPES * 3 + OTHER_DTYPES))
    n = int(np.prod(shape)) if shape else 1
    special = draw(st.integers(0, 2)) == 0  # else plain values in [0, 1]
    element = st.one_of(st.floats(0, 1), st.sampled_from(SPECIAL)) if special else st.floats(0, 1)
    values = draw(st.lists(element, min_size=n, max_size=n))
    base = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if dtype.is_floating_point or dtype.is_complex:
        return base.to(dtype)
    return base.nan_to_num(0.0, 0.0, 0.0).clamp(-100, 100).to(dtype)


def images_are_valid(x: object, channels: int | None, size: tuple[int, int] | None) -> bool:
    """The oracle: what check_images must accept."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        return False
    if x.numel() == 0 or (channels is not None and x.shape[1] != channels):
        return False
    if size is not None and tuple(x.shape[2:]) != size:
        return False
    v = x.double()
    return bool(torch.isfinite(v).all()) and float(v.min()) >= 0 and float(v.max()) <= 1


@FUZZ
@given(
    channels=st.one_of(st.none(), st.integers(0, 4)),
    size=st.one_of(st.none(), st.tuples(st.integers(0, 4), st.integers(0, 4))),
    data=st.data(),
)
def test_check_images_refuses_or_returns_float32_images(
    channels: int | None, size: tuple[int, int] | None, data: st.DataObject
) -> None:
    x = data.draw(image_like(channels, size))
    ok, out = one_line_error(lambda: check_images(x, channels=channels, size=size))
    assert ok == images_are_valid(x, channels, size)
    if ok:
        assert isinstance(x, torch.Tensor)
        assert out.dtype == torch.float32 and out.shape == x.shape
        assert torch.equal(out, x.float())
    elif isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point() and x.numel():
        # a range message never shows an out-of-range value rounded into [0, 1]
        message = str(out)
        if "got values in [" in message:
            lo, hi = message.split("got values in [")[1].rstrip("]").split(", ")
            assert float(lo) < 0 or float(hi) > 1


# ----------------------------------------------------------------------------- labels


@st.composite
def label_like(draw: st.DrawFn, n: object, classes: object) -> object:
    """Mostly near-misses of a valid label vector of length n within [0, classes)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([None, [0, 1], np.arange(3)]))
    length = n if type(n) is int and n >= 0 else draw(st.integers(0, 4))
    shape = [length]
    if draw(st.integers(0, 3)) == 0:  # 2-D (one-hot), scalar, or another length
        shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    dtype = draw(
        st.sampled_from(
            [torch.int64, torch.int32, torch.uint8, torch.int8] * 2
            + [torch.bool, torch.float32, torch.complex64]
        )
    )
    top = classes if type(classes) is int and classes > 0 else 3
    count = int(np.prod(shape)) if shape else 1
    element = st.integers(0, top - 1) if draw(st.booleans()) else st.integers(-3, 12)
    values = draw(st.lists(element, min_size=count, max_size=count))
    base = torch.tensor(values, dtype=torch.int64).reshape(shape)
    return base.abs().to(dtype) if dtype == torch.uint8 else base.to(dtype)


@FUZZ
@given(
    n=st.one_of(st.integers(0, 5), st.integers(0, 5), st.sampled_from([-1, True, 2.0, None])),
    classes=st.one_of(st.integers(1, 12), st.sampled_from([-1, 0, False, 3.5])),
    data=st.data(),
)
def test_check_labels_refuses_or_returns_int64_labels(
    n: Any, classes: Any, data: st.DataObject
) -> None:
    y = data.draw(label_like(n, classes))
    ok, out = one_line_error(lambda: check_labels(y, n, classes))
    valid = (
        type(n) is int
        and n >= 0
        and type(classes) is int
        and classes >= 1
        and isinstance(y, torch.Tensor)
        and y.dim() == 1
        and len(y) == n
        and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
        and (n == 0 or (int(y.min()) >= 0 and int(y.max()) < classes))
    )
    assert ok == valid
    if ok:
        assert out.dtype == torch.int64 and torch.equal(out, y.long())  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- configs


POSITIVE = {"epochs", "epochs_dgmm", "epochs_vae", "batch_size", "vae_train", "val", "cle"}
POSITIVE |= {"limit", "in_channels", "num_classes", "width", "z_s_dim", "z_u_dim", "map_size"}
POSITIVE |= {"tc_hidden", "lr", "lr_dgmm", "lr_vae", "lr_tc", "adv_eps", "adv_step", "adv_steps"}
CHOICES = {
    "optimizer": {"adam", "sgd"},
    "variant": {"vector", "maps"},
    "arch": {"cw_mnist", "small_resnet", "small_vgg"},
    "adversarial": {"none", "fgsm_rs", "pgd"},
}


def well_typed(cfg: Any) -> None:
    """The oracle for an accepted config: every field holds a value of its annotated type;
    sizes, counts and learning rates are > 0, other numbers >= 0, names are known choices."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), str(f.type)
        if type(value) in (int, float):
            assert value > 0 if f.name in POSITIVE else value >= 0, f.name
        if f.name in CHOICES:
            assert value in CHOICES[f.name], f.name
        if kind == "int | None":
            assert value is None or (type(value) is int), f.name
        elif kind == "float | None":
            assert value is None or (type(value) in (int, float) and math.isfinite(value)), f.name
        elif kind == "int":
            assert type(value) is int, f.name
        elif kind == "float":
            assert type(value) in (int, float) and math.isfinite(value), f.name
        elif kind == "bool":
            assert type(value) is bool, f.name
        elif kind == "str":
            assert type(value) is str, f.name
        elif kind.startswith("tuple"):
            assert type(value) is tuple and all(type(v) is int and v > 0 for v in value), f.name


CONFIGS = [SplitConfig, ClassifierConfig, ComboVAEConfig, TrainConfig, VAETrainConfig]
REQUIRED = {ClassifierConfig: {"arch": "small_resnet"}}


@st.composite
def config_fields(draw: st.DrawFn, cls: type) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=3))
    values = dict(REQUIRED.get(cls, {}))
    values |= {name: draw(ANY_VALUE) for name in chosen}
    return values


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_config_dataclasses_refuse_bad_fields_or_hold_well_typed_values(cls: type) -> None:
    @FUZZ
    @given(fields=config_fields(cls))
    def run(fields: dict[str, Any]) -> None:
        ok, cfg = one_line_error(lambda: cls(**fields))
        if ok:
            well_typed(cfg)
        else:
            # the message names the field it refused
            assert any(name in str(cfg) for name in fields), str(cfg)

    run()


BOUNDARY = [0, -1, 1, 0.0, -1e-9, 2.5, None, True, "", "1", math.nan, math.inf, 2**70, [], {}]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_at_its_boundaries(cls: type) -> None:
    """Each field alone set to each boundary value: refused naming it, or well typed."""
    for f in dataclasses.fields(cls):
        for value in BOUNDARY:
            fields = {**REQUIRED.get(cls, {}), f.name: value}
            ok, cfg = one_line_error(lambda fields=fields: cls(**fields))
            if ok:
                well_typed(cfg)
            else:
                assert f.name in str(cfg), str(cfg)


def tiny(cfg: Any) -> bool:
    """Small enough to build and run in the fuzz budget."""
    side = max(cfg.image_size)
    return cfg.width <= 8 and side <= 64 and cfg.num_classes <= 50 and cfg.in_channels <= 3


@FUZZ
@given(
    arch=st.sampled_from(["cw_mnist", "small_resnet", "small_vgg"]),
    side=st.integers(14, 40),
    channels=st.integers(0, 3),
    width=st.integers(0, 4),
    classes=st.integers(1, 5),
)
def test_accepted_classifier_configs_build_working_networks(
    arch: str, side: int, channels: int, width: int, classes: int
) -> None:
    raw = {"arch": arch, "image_size": [side, side], "in_channels": channels, "width": width}
    raw["num_classes"] = classes
    ok, cfg = one_line_error(lambda: ClassifierConfig.from_dict(json.loads(json.dumps(raw))))
    if ok and tiny(cfg):
        model = Classifier(cfg).eval()
        logits = model.logits(torch.rand(2, channels, side, side))
        assert logits.shape == (2, classes)


@FUZZ
@given(
    variant=st.sampled_from(["vector", "maps"]),
    side=st.sampled_from([8, 16, 28, 32]),
    map_size=st.integers(0, 4),
    width=st.integers(0, 4),
    z=st.integers(0, 3),
)
def test_accepted_combo_vae_configs_build_working_networks(
    variant: str, side: int, map_size: int, width: int, z: int
) -> None:
    raw = {"variant": variant, "image_size": [side, side], "map_size": map_size, "width": width}
    raw |= {"z_s_dim": z, "z_u_dim": z, "num_classes": 2, "tc_hidden": 4}
    ok, cfg = one_line_error(lambda: ComboVAEConfig.from_dict(raw))
    if ok:
        vae = ComboVAE(cfg).eval()
        x = torch.rand(2, 1, side, side)
        assert vae.reconstruct(x).shape == x.shape
        assert vae.decode_codes(vae.codes(x), vae.encode(x)[1]).shape == x.shape


@FUZZ
@given(
    raw=st.one_of(
        ANY_VALUE, st.dictionaries(st.sampled_from(["arch", "width", "zzz"]), ANY_VALUE, max_size=3)
    )
)
def test_config_from_json_refuses_non_objects_and_bad_keys(raw: Any) -> None:
    ok, cfg = one_line_error(lambda: ClassifierConfig.from_dict(raw))
    if ok:
        assert isinstance(raw, dict) and set(raw) <= {"arch", "width"} and "arch" in raw
        well_typed(cfg)


# ----------------------------------------------------------------------------- devices

DEVICE_NAMES = ["auto", "cpu", "cpu:0", "cpu:3", "cuda", "cuda:0", "cuda:7", "xpu", "meta"]
DEVICE_NAMES += ["mps", "hpu:0", "CPU", " cpu", "", "cuda:-1", "cpu:", "privateuseone", "fpga"]


@FUZZ
@given(name=st.one_of(st.sampled_from(DEVICE_NAMES), st.text(max_size=10), ANY_VALUE))
def test_resolve_device_refuses_or_returns_a_usable_device(name: Any) -> None:
    ok, device = one_line_error(lambda: resolve_device(name))
    if ok:
        assert isinstance(device, torch.device)
        assert torch.zeros(2, device=device).sum().item() == 0  # it really runs here
    else:
        assert "corrupt" not in str(device)


def test_resolve_device_names_each_unusable_device() -> None:
    for name in ["xpu", "meta", "cpu:3", "mps", "fpga"]:
        with pytest.raises(FMDefenseError, match=rf"{name!r}.*use --device"):
            resolve_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(FMDefenseError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu:0") == torch.device("cpu")


# ----------------------------------------------------------------------------- data, chunks


@FUZZ
@given(
    shape=st.lists(st.integers(0, 3), min_size=1, max_size=5),
    dtype=st.sampled_from([np.uint8, np.uint8, np.float32, np.int64]),
    labels=st.lists(st.integers(-2, 3), min_size=0, max_size=4),
)
def test_raw_dataset_refuses_or_holds_uint8_images(
    shape: list[int], dtype: type, labels: list[int]
) -> None:
    x, y = np.zeros(shape, dtype), np.asarray(labels, dtype=np.int64)
    ok, _ = one_line_error(lambda: RawDataset("fuzz", x, y, x, y))
    valid = len(shape) == 4 and dtype is np.uint8 and min(shape[1:]) > 0
    valid = valid and len(labels) == shape[0] > 0 and min(labels) >= 0
    assert ok == valid


SMALL_OR_NOT_INT = ANY_VALUE.filter(lambda v: not (type(v) is int and v > 12))  # no 2**70 loops


@FUZZ
@given(
    n=st.one_of(st.integers(-2, 12), SMALL_OR_NOT_INT),
    size=st.one_of(st.integers(-1, 5), ANY_VALUE),
)
def test_chunked_refuses_bad_sizes_or_concatenates_every_chunk(n: Any, size: Any) -> None:
    def compute(start: int, stop: int) -> dict[str, torch.Tensor]:
        return {"i": torch.arange(start, stop)}

    ok, out = one_line_error(lambda: chunked(n, size, None, compute, config={}))
    assert ok == (type(n) is int and n >= 0 and type(size) is int and size >= 1)
    if ok and n:
        assert torch.equal(out["i"], torch.arange(n))
