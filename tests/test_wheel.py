"""The wheel installs and works outside the repository (`make test` runs this; ≈ 1 min).

`python -m build --wheel` on a copy of the sources; a fresh venv (no packages of its own) in a
temporary folder whose only view of other packages is this environment's site-packages (a .pth
line), so torch, pip and the other dependencies are found, not downloaded; `pip install
--no-index` of the wheel into it, which fails if a declared dependency is not there; then,
from a folder outside the repository, the console script's `--help` and
`fmdefense.pretrained("mnist")` with `$FMDEFENSE_WEIGHTS` pointing at the repository's weights
(they are not in the wheel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = """
import torch, fmdefense
print(fmdefense.__file__)
defense = fmdefense.pretrained("mnist", device="cpu")
x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
print(sum(defense.decide(x).counts().values()), "decisions")
"""

pytestmark = pytest.mark.wheel


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh venv outside the repository with the freshly built wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = tmp / "source"  # a copy: the build leaves nothing in the working tree
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp / "dist"
    build = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)]
    _run([*build, str(source)], tmp, env)
    (wheel,) = dist.glob("fmdefense-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fmdefense/cli/__init__.py" in names
    assert not [n for n in names if n.endswith(".safetensors")]  # weights are not packaged
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)  # pip: below
    python = venv / "bin" / "python"
    site = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp, env
    )
    (Path(site.strip()) / "base-env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-index", str(wheel)], tmp, env)
    work = tmp / "elsewhere"
    work.mkdir()
    return venv, env | {"FMDEFENSE_DATA": str(tmp / "data")}


def test_the_installed_cli_answers_help(installed: tuple[Path, dict[str, str]]) -> None:
    venv, env = installed
    out = _run([str(venv / "bin" / "fmdefense"), "--help"], venv.parent / "elsewhere", env)
    assert "usage: fmdefense" in out and "reproduce" in out and "calibrate" in out


def test_pretrained_loads_from_the_installed_wheel(installed: tuple[Path, dict[str, str]]) -> None:
    venv, env = installed
    python, work = str(venv / "bin" / "python"), venv.parent / "elsewhere"
    out = _run([python, "-c", PRETRAINED], work, env | {"FMDEFENSE_WEIGHTS": str(ROOT / "weights")})
    first = out.splitlines()[0]
    assert first.startswith(str(venv)) and "site-packages" in first  # the wheel, not the repo
    assert "4 decisions" in out.splitlines()
    # Without the variable (and no ./weights) the error names it.
    missing = subprocess.run(
        [python, "-c", PRETRAINED], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert missing.returncode != 0 and "set FMDEFENSE_WEIGHTS to" in missing.stderr
