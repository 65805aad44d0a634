"""The Ray executor on a local 2-worker Ray: same results as serial, nothing lost when a worker
dies, a rerun resumes from the chunk files; and the errors when Ray is missing or misused."""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from fmdefense.attacks.adaptive import run_sweep
from fmdefense.attacks.runner import attack_set
from fmdefense.cli import main
from fmdefense.core.chunks import chunked
from fmdefense.core.errors import InputError
from fmdefense.core.executor import (
    ExecutorError,
    RayExecutor,
    SerialExecutor,
    make_executor,
    using_executor,
)
from tests.test_adaptive import toy_default, toy_inputs
from tests.test_attacks import toy_model

Compute = Callable[[int, int], dict[str, torch.Tensor]]
ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(50, 7, generator=torch.Generator().manual_seed(3))  # (n, d)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray with 2 worker CPUs for the whole module; its workers import `tests`."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {"env_vars": {"PYTHONPATH": path}}
    ray.init(
        "local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=env,
        _node_ip_address="127.0.0.1",  # loopback only
    )
    yield
    ray.shutdown()


def toy_compute(marks: Path, *, kill_at: int | None = None) -> Compute:
    """A chunk computation that records each call in `marks/calls/`; with `kill_at` the worker
    running that chunk kills its own process the first time (a marker file says it did)."""
    driver = os.getpid()

    def compute(start: int, stop: int) -> dict[str, torch.Tensor]:
        (marks / "calls").mkdir(parents=True, exist_ok=True)
        (marks / "calls" / f"{start}-{uuid.uuid4().hex}").touch()
        killed = marks / f"killed-{start}"
        if start == kill_at and not killed.exists():
            if os.getpid() == driver:  # never kill the test process itself
                raise RuntimeError("the chunk ran in the driver, not in a Ray worker")
            killed.touch()
            os._exit(1)
        x = X[start:stop]  # (b, d)
        return {"s": (x.sin() * x.cos()).sum(1), "idx": torch.arange(start, stop)}

    return compute


def calls(marks: Path) -> list[int]:
    return sorted(int(p.name.split("-")[0]) for p in (marks / "calls").iterdir())


def run(folder: Path, compute: Compute) -> dict[str, torch.Tensor]:
    return chunked(len(X), 8, folder, compute, config={"toy": 1}, desc="toy")


def test_ray_gives_the_serial_results_and_the_same_chunk_files(
    local_ray: None, tmp_path: Path
) -> None:
    serial = run(tmp_path / "serial", toy_compute(tmp_path / "m1"))
    with using_executor(RayExecutor()):
        on_ray = run(tmp_path / "ray", toy_compute(tmp_path / "m2"))
    assert calls(tmp_path / "m2") == list(range(0, 50, 8))
    assert serial.keys() == on_ray.keys()
    assert all(torch.equal(serial[k], on_ray[k]) for k in serial)
    files = sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "serial").iterdir())
    # A real long stage: an attack whose chunks run as Ray tasks.
    model, gen = toy_model(), torch.Generator().manual_seed(1)
    x = torch.rand(24, 1, 4, 4, generator=gen)
    y = model(x).argmax(1)
    a = attack_set("fgsm", None, model, x, y, tmp_path / "a-serial", batch_size=10)
    with using_executor(RayExecutor()):
        b = attack_set("fgsm", None, model, x, y, tmp_path / "a-ray", batch_size=10)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    assert len(list((tmp_path / "a-ray" / "chunks").glob("chunk-*"))) == 3


def test_the_adaptive_sweep_on_ray_gives_the_serial_summary(
    local_ray: None, tmp_path: Path
) -> None:
    x, y = toy_inputs()

    def sweep(out: Path) -> dict[str, Any]:
        d = toy_default()
        summary = run_sweep(d, x, y, ["default_joint"], [0.3, 0.05], out, changes={"steps": 5})
        return json.loads(json.dumps(summary, default=str), object_hook=_untimed)

    serial = sweep(tmp_path / "serial")
    with using_executor(RayExecutor()):
        on_ray = sweep(tmp_path / "ray")
    assert on_ray == serial
    assert len(list((tmp_path / "ray").rglob("*.json"))) == 7  # clean, 2 ε, 2 checks, bare, summary


def _untimed(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in row.items() if k not in ("seconds", "seconds_per_image", "wall_seconds")
    }


def test_a_killed_worker_is_retried_and_nothing_is_lost(local_ray: None, tmp_path: Path) -> None:
    reference = run(tmp_path / "serial", toy_compute(tmp_path / "m0"))
    marks = tmp_path / "m"
    with using_executor(RayExecutor(max_retries=2)):
        out = run(tmp_path / "ray", toy_compute(marks, kill_at=16))
    assert (marks / "killed-16").exists()  # the worker did die on that chunk
    assert calls(marks).count(16) == 2  # and Ray ran the chunk again elsewhere
    assert all(torch.equal(reference[k], out[k]) for k in reference)


def test_a_lost_chunk_is_done_by_a_rerun_from_the_chunk_files(
    local_ray: None, tmp_path: Path
) -> None:
    reference = run(tmp_path / "serial", toy_compute(tmp_path / "m0"))
    marks, folder = tmp_path / "m", tmp_path / "ray"
    with (
        using_executor(RayExecutor(max_retries=0)),
        pytest.raises(ExecutorError, match=r"1 of 7 tasks were lost.*run the same command again"),
    ):
        run(folder, toy_compute(marks, kill_at=24))
    saved = sorted(p.name for p in folder.glob("chunk-*"))
    assert len(saved) == 6 and "chunk-0000024.safetensors" not in saved  # only it was lost
    first = calls(marks)
    with using_executor(RayExecutor()):
        out = run(folder, toy_compute(marks, kill_at=24))
    assert calls(marks) == sorted([*first, 24])  # the rerun computed only the lost chunk
    assert all(torch.equal(reference[k], out[k]) for k in reference)


def test_an_error_in_a_task_is_the_same_error_as_in_serial(local_ray: None, tmp_path: Path) -> None:
    def bad(start: int, stop: int) -> dict[str, torch.Tensor]:
        raise InputError(f"chunk {start} is bad")

    with using_executor(RayExecutor()), pytest.raises(InputError, match=r"^chunk \d is bad$"):
        chunked(4, 2, tmp_path / "c", bad, config={})
    assert not list((tmp_path / "c").glob("chunk-*"))


def test_without_ray_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(InputError, match=r"pip install 'fmdefense\[ray\]'"):
        make_executor("ray")
    argv = ["attack", "--dataset", "mnist", "--attack", "fgsm", "--out", str(tmp_path / "a")]
    assert main([*argv, "--executor", "ray"]) == 2
    assert "pip install 'fmdefense[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused before any work


def test_executor_names_and_addresses_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert isinstance(make_executor("serial"), SerialExecutor)
    with pytest.raises(InputError, match="executor must be one of serial, ray"):
        make_executor("dask")
    with pytest.raises(InputError, match="needs the ray executor"):
        make_executor("serial", address="auto")
    argv = ["attack", "--dataset", "mnist", "--attack", "fgsm", "--ray-address", "auto"]
    assert main(argv) == 2
    assert "needs the ray executor (--executor ray)" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["attack", "calibrate", "defend", "adaptive", "reproduce"])
def test_every_long_command_takes_the_executor_flags(command: str) -> None:
    from fmdefense.cli import build_parser

    required = {
        "attack": ["--dataset", "mnist", "--attack", "fgsm"],
        "calibrate": ["--dataset", "mnist"],
        "defend": ["--input", "clean"],
        "adaptive": ["--dataset", "mnist", "--defense", "magnet"],
        "reproduce": [],
    }[command]
    flags = ["--executor", "ray", "--ray-address", "HOST:6379"]
    args = build_parser().parse_args([command, *required, *flags])
    assert (args.executor, args.ray_address) == ("ray", "HOST:6379")
