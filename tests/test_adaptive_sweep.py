"""The committed adaptive results (results/mnist/reproduce-paper/adaptive/) are still found and
reused by the one sweep: their unit files were keyed by the old shared attack config, which
`attacks.adaptive.legacy` rebuilds from each attack's own parameters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import fmdefense.attacks.adaptive.sweep as sweep
from fmdefense.attacks.adaptive import DEFAULT_ATTACK, PGDAttack, make_attack, run_sweep
from fmdefense.attacks.adaptive.cw_transfer import CWTransfer
from fmdefense.attacks.adaptive.jobs import artifact_digest, load_inputs
from fmdefense.attacks.adaptive.legacy import LEGACY_DEFAULTS, legacy_config
from fmdefense.core.paths import REPO_ROOT, classifier_dir, vae_dir
from fmdefense.defenses.base import Defense
from fmdefense.defenses.defense_gan import DefenseGAN
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.magnet import MagNet
from fmdefense.models.classifiers import Classifier

RUN = REPO_ROOT / "results" / "mnist" / "reproduce-paper"
CPU = torch.device("cpu")
EPS = (0.05, 0.1, 0.2, 0.3)


def _clf() -> torch.nn.Module:
    return Classifier.load(classifier_dir("mnist"), CPU)


def _fm() -> tuple[Defense, Path]:
    from fmdefense.models.combo_vae import ComboVAE

    fm = FMDefense.load(RUN / "defense", _clf(), ComboVAE.load(vae_dir("mnist"), CPU))
    return fm.with_config(threshold_mode="joint", rho=0.95), RUN / "defense"


def _magnet() -> tuple[Defense, Path]:
    return MagNet.load(RUN / "magnet", _clf()), RUN / "magnet"


def _defensegan() -> tuple[Defense, Path]:
    folder = REPO_ROOT / "weights" / "mnist" / "defense_gan"
    return DefenseGAN.load(folder, _clf()), folder


@pytest.mark.parametrize(
    ("kind", "load"), [("fm", _fm), ("magnet", _magnet), ("defensegan", _defensegan)]
)
def test_the_committed_units_are_reused_as_they_are(
    kind: str, load: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed = RUN / "adaptive" / kind
    clean_key = json.loads((committed / "clean.json").read_text())["key"]
    source = {k: v for k, v in clean_key.items() if k not in ("classifier", "inputs", "n", "unit")}
    defense, folder = load()
    assert artifact_digest(folder) == source["defense_digest"]  # the same artifact bytes
    x, y = load_inputs("mnist", clean_key["n"])
    out = tmp_path / kind
    shutil.copytree(committed, out)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed a committed unit")

    monkeypatch.setattr(PGDAttack, "_run", boom)
    monkeypatch.setattr(sweep, "outcomes", boom)
    attack = DEFAULT_ATTACK[kind]
    summary = run_sweep(defense, x, y, [attack], EPS, out, source=source, unbounded_eps=1.0)
    old = json.loads((committed / "summary.json").read_text())["attacks"][attack]
    new = summary["attacks"][attack]
    assert new["per_eps"] == old["per_eps"] and new["sanity"] == old["sanity"]
    # a resumed sweep reports the units' compute time, not its own (near-zero) wall time
    assert (
        summary["seconds"]
        >= sum(row["seconds"] for row in new["per_eps"])
        > 10 * summary["wall_seconds"]
    )
    for unit in out.rglob("*.json"):  # reused in place, not rewritten under new keys
        if unit.name != "summary.json":
            assert unit.read_bytes() == (committed / unit.relative_to(out)).read_bytes()


def test_legacy_keys_spell_every_parameter_under_its_old_name(tmp_path: Path) -> None:
    magnet, _ = _magnet()
    cw = make_attack("cw_transfer", magnet, steps=50)
    old = legacy_config(cw.with_budget(2))
    assert old is not None and set(old) == set(LEGACY_DEFAULTS)
    assert old["cw_steps"] == 100 and old["steps"] == 200 and old["square_queries"] == 400
    assert all(CWTransfer.legacy_names.get(k, k) in LEGACY_DEFAULTS for k in cw.params)
    joint = make_attack("magnet_joint", magnet, restarts=2)
    assert legacy_config(joint) == {**LEGACY_DEFAULTS, "restarts": 2}
