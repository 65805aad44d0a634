"""`fmdefense baselines`: the shipped baselines on a saved adversarial set (real MNIST CLE
images, an FGSM set on the first 6 of them), its numbers equal to the defenses' own verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fmdefense.attacks.runner import load_adversarial_set
from fmdefense.cli import main
from fmdefense.core.errors import InputError
from fmdefense.core.paths import weights_home
from fmdefense.defenses.jobs import load_classifier, load_vae
from fmdefense.defenses.registry import load_defense
from fmdefense.defenses.rule import defended_accuracy
from fmdefense.evaluation.same_sets import BASELINE_DIRS, run_same_sets

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fgsm_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sets") / "fgsm"
    argv = ["attack", "--dataset", "mnist", "--attack", "fgsm", "--limit", "6"]
    assert main([*argv, "--out", str(folder), "--device", "cpu"]) == 0
    return folder


def test_each_baseline_row_is_its_own_verdict_on_the_set(fgsm_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["baselines", "--dataset", "mnist", "--sets", str(fgsm_set), "--out", str(out)]
    assert main([*argv, "--limit", "6", "--defensegan-limit", "2", "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert set(results["defenses"]) == {"default", "fbgan", "magnet", "defensegan"}
    assert results["sets"]["fgsm"]["n"] == 6 and results["sets"]["fgsm"]["attack"] == "fgsm"
    adv = load_adversarial_set(fgsm_set)
    clf, vae = load_classifier("mnist", CPU), load_vae("mnist", CPU)
    for kind, row in results["defenses"].items():
        n = row["limit"]
        defense = load_defense(weights_home() / "mnist" / BASELINE_DIRS[kind], clf, vae)
        expected = defended_accuracy(defense.predict(adv.x_adv[:n]), adv.y_true[:n])
        assert row["table2"]["fgsm"] == pytest.approx(expected)
        flagged = float(defense.detect(adv.x_adv[:n]).float().mean())
        assert row["flagged"]["fgsm"] == pytest.approx(flagged)
        assert f"{100 * expected:.1f} %" in report
        assert (row["val_drop_rate"] is None) == (kind == "default")  # the default: at α
    assert results["defenses"]["defensegan"]["n_per_set"] == 2
    assert results["defenses"]["fbgan"]["n_per_set"] == 6  # --limit: CLE too
    assert "Defense-GAN (first 2)" in report and "| fgsm | 6 |" in report


def test_bad_requests_raise_clear_errors(fgsm_set: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="baselines must be among"):
        run_same_sets("mnist", [fgsm_set], tmp_path, CPU, defenses=["nope"])
    with pytest.raises(InputError, match="at least one"):
        run_same_sets("mnist", [], tmp_path, CPU)
    with pytest.raises(InputError, match="another dataset"):
        run_same_sets("fmnist", [fgsm_set], tmp_path, CPU, defenses=["fbgan"])
