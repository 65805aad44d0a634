"""Where fmdefense keeps downloads, caches, shipped weights and run outputs.

In a source checkout everything defaults to folders of the repository (`<repo>/data`,
`<repo>/weights`, `<repo>/runs`). An installed wheel does not carry the 24 MB of weights: it
finds them through `$FMDEFENSE_WEIGHTS` (the repository's `weights/` folder, or a copy of it),
else in `./weights` of the working directory; its data cache defaults to
`$XDG_CACHE_HOME/fmdefense` (`~/.cache/fmdefense`) and its runs to `./runs`.
"""

from __future__ import annotations

import os
from pathlib import Path

from fmdefense.core.errors import ArtifactError

REPO_ROOT = Path(__file__).resolve().parents[3]  # the checkout, when running from one
WEIGHTS_VARIABLE = "FMDEFENSE_WEIGHTS"


def in_checkout() -> bool:
    """Whether this package is imported from a source checkout (src/ layout beside pyproject)."""
    return (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "src" / "fmdefense").is_dir()


def data_home() -> Path:
    """Root for downloaded sources and decoded caches: `$FMDEFENSE_DATA`, else `<repo>/data` in
    a checkout, else `$XDG_CACHE_HOME/fmdefense` (default `~/.cache/fmdefense`)."""
    if "FMDEFENSE_DATA" in os.environ:
        return Path(os.environ["FMDEFENSE_DATA"])
    if in_checkout():
        return REPO_ROOT / "data"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "fmdefense"


def weights_home() -> Path:
    """Root of the shipped weights: `$FMDEFENSE_WEIGHTS`, else `<repo>/weights` in a checkout,
    else `./weights`; an ArtifactError naming the variable when none of them exists."""
    if WEIGHTS_VARIABLE in os.environ:
        return Path(os.environ[WEIGHTS_VARIABLE])
    candidates = [REPO_ROOT / "weights"] if in_checkout() else []
    candidates.append(Path.cwd() / "weights")
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise ArtifactError(
        f"the shipped weights were not found (looked in {', '.join(map(str, candidates))}); "
        f"set {WEIGHTS_VARIABLE} to the fmdefense repository's weights/ folder "
        f"(for example {WEIGHTS_VARIABLE}=/path/to/fmdefense/weights), or run from the "
        "folder that holds weights/"
    )


def runs_home() -> Path:
    """Root for run outputs: `$FMDEFENSE_RUNS`, else `<repo>/runs` in a checkout, else ./runs."""
    if "FMDEFENSE_RUNS" in os.environ:
        return Path(os.environ["FMDEFENSE_RUNS"])
    return REPO_ROOT / "runs" if in_checkout() else Path("runs")


def classifier_dir(dataset: str, weights: Path | None = None) -> Path:
    """Folder of a dataset's classifier artifact (shipped weights by default)."""
    return Path(weights) if weights is not None else weights_home() / dataset / "classifier"


def vae_dir(dataset: str, weights: Path | None = None) -> Path:
    """Folder of a dataset's combo-VAE artifact (shipped weights by default)."""
    return Path(weights) if weights is not None else weights_home() / dataset / "combo_vae"


def model_dir(dataset: str, kind: str) -> Path:
    """Folder of any shipped artifact of a dataset (weights/<dataset>/<kind>)."""
    return weights_home() / dataset / kind
