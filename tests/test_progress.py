"""Progress lines when stderr is not a terminal, and the one logging setup (issue 21)."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fmdefense.core.chunks import chunked
from fmdefense.core.logs import setup_logging
from fmdefense.core.progress import Progress, progress
from fmdefense.models.classifiers import Classifier, ClassifierConfig
from fmdefense.training.loops import TrainConfig, train_classifier

PROGRESS = "fmdefense.progress"


def test_without_a_terminal_each_interval_gets_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=PROGRESS):
        bar = progress(range(3), desc="stage", unit="chunk", interval=0)
        for i in bar:
            bar.set_postfix(loss=f"{i / 10:.2f}")
    lines = [r.getMessage() for r in caplog.records if r.name == PROGRESS]
    assert lines[0].startswith("stage: 1/3 chunk (33%)") and "s left" in lines[0]
    assert lines[2].startswith("stage: 3/3 chunk (100%)") and lines[2].endswith("loss=0.20")


def test_a_slow_step_still_gets_a_heartbeat(caplog: pytest.LogCaptureFixture) -> None:
    def slow() -> Iterator[int]:
        yield 1
        time.sleep(0.4)  # one long step: the timer must speak during it
        yield 2

    with caplog.at_level(logging.INFO, logger=PROGRESS):
        assert list(progress(slow(), desc="slow", interval=0.1)) == [1, 2]
    lines = [r.getMessage() for r in caplog.records if r.name == PROGRESS]
    assert any(line.startswith("slow: 1 it,") for line in lines)  # no total: a count
    assert lines[-1].startswith("slow: done, 2 it in")


def test_on_a_terminal_tqdm_draws_and_nothing_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=PROGRESS):
        bar = Progress(range(4), desc="tty", interval=0, tty=True)
        assert list(bar) == [0, 1, 2, 3]
        bar.set_postfix(a=1)
    assert not [r for r in caplog.records if r.name == PROGRESS]


def test_chunked_and_training_report_progress_in_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FMDEFENSE_PROGRESS_INTERVAL", "0")

    def compute(start: int, stop: int) -> dict[str, torch.Tensor]:
        return {"i": torch.arange(start, stop)}

    with caplog.at_level(logging.INFO, logger=PROGRESS):
        chunked(4, 2, None, compute, config={}, desc="VAL resistance")
        torch.manual_seed(0)
        model = Classifier(ClassifierConfig("small_resnet", image_size=(16, 16), width=2))
        x, y = torch.rand(8, 1, 16, 16), torch.arange(8) % 10
        cfg = TrainConfig(epochs=1, batch_size=4, shift=0)
        train_classifier(model, (x, y), (x, y), cfg, tmp_path, torch.device("cpu"))
    lines = [r.getMessage() for r in caplog.records if r.name == PROGRESS]
    assert any(line.startswith("VAL resistance: 2/2 chunk") for line in lines)
    assert any(line.startswith("epoch 1/1: 2/2 batch") and "loss=" in line for line in lines)


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root")
def test_setup_logging_drops_deepfool_noise_and_replaces_itself() -> None:
    stream = io.StringIO()
    setup_logging(False, stream=stream)
    handler = setup_logging(False, stream=stream)  # a second call replaces the first handler
    assert sum(getattr(h, "_fmdefense", False) for h in logging.getLogger().handlers) == 1
    logging.info("Only testing the top-10 classes")  # Foolbox's DeepFool, on the root logger
    logging.getLogger("fmdefense.attacks").info("DeepFool: 10 of 10 inputs")
    logging.getLogger("fmdefense").debug("hidden without --verbose")
    handler.flush()
    text = stream.getvalue()
    assert "Only testing" not in text and "DeepFool: 10 of 10 inputs" in text
    assert "hidden" not in text
    setup_logging(True, stream=stream)
    logging.getLogger("fmdefense").debug("shown with --verbose")
    logging.getLogger("matplotlib").debug("font cache chatter")
    assert "shown with --verbose" in stream.getvalue() and "chatter" not in stream.getvalue()
