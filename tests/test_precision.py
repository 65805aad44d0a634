"""Precision "auto" and an explicit bf16 where bf16 is not native (core/precision.py)."""

from __future__ import annotations

import pytest
import torch

from fmdefense.core import precision
from fmdefense.core.errors import InputError

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_bf16_only_where_native_and_logs_it(
    native: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    with caplog.at_level("INFO", logger="fmdefense.core.precision"):
        chosen = precision.resolve_precision("auto", CPU)
    assert chosen == ("bf16" if native else "fp32")
    assert f"precision auto on cpu: {chosen}" in caplog.text


@pytest.mark.parametrize("native", [True, False])
def test_explicit_bf16_is_kept_and_warned_about_only_where_not_native(
    native: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A defense saved with precision bf16 on a bf16 machine and loaded on an AVX2-only CPU
    still runs bf16 (its caches are keyed on it), but the user is told why it is slow."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    with caplog.at_level("WARNING", logger="fmdefense.core.precision"):
        assert precision.resolve_precision("bf16", CPU) == "bf16"
        assert precision.resolve_precision("fp32", CPU) == "fp32"
    assert ("not native" in caplog.text) is not native


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(InputError, match="precision must be one of"):
        precision.resolve_precision("fp16", CPU)
