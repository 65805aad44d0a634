"""`fmdefense reproduce` on a tiny profile with the shipped MNIST models: report = results,
and a re-run after a kill reuses every finished stage."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import fmdefense.evaluation.baselines as baselines
import fmdefense.evaluation.fm_stage as fm_stage
import fmdefense.evaluation.pipeline as pipeline
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.evaluation.report import (
    adaptive_markdown,
    sanity_markdown,
    side_by_side_markdown,
    table2_markdown,
)

TINY = {
    "n_val": 24,
    "n_cle": 12,
    "n_morphs": 4,
    "magnet_epochs": 1,
    "magnet_limit": 256,
    "defensegan_limit": 6,
    "adaptive_limit": 3,
    "adaptive_eps": (0.3,),
    "adaptive_steps": 2,
    "adaptive_fm_rho": 0.9,
}
ATTACKS = (("fgsm", "default"),)


def _run(run: Path) -> dict:
    return pipeline.run_reproduce(
        "mnist", "quick", run, torch.device("cpu"), attacks=ATTACKS, overrides=TINY
    )


def test_report_table_equals_results_and_a_rerun_reuses_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _run(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    report = (tmp_path / "run" / "report.md").read_text()
    assert table2_markdown(saved["table2"], "mnist") in report
    assert side_by_side_markdown(saved, "mnist") in report
    split = saved["table2_joint_fpr_5pct"]["breakdown"]["CLE"]  # accept/purify/reject, joint
    assert abs(sum(split.values()) - 1) < 1e-6 and "reject (joint)" in report
    assert set(saved["roc_defenses"]) >= {"FM-Defense", "recon check", "MagNet"}
    assert set(saved["adaptive"]) >= {"default", "fm", "magnet", "fbgan"}  # shipped FBGAN
    assert "fbgan_joint" in saved["adaptive"]["fbgan"]["attacks"]
    assert "![fbgan_samples](fbgan_samples.png)" in report and "| paper: FBGAN |" in report
    assert "default_joint" in saved["adaptive"]["default"]["attacks"]
    assert adaptive_markdown(saved["adaptive"]) in report
    assert sanity_markdown(saved["adaptive"]) in report
    fm_sanity = saved["adaptive"]["fm"]["attacks"]["joint"]["sanity"]
    assert {"passed", "success_double_restarts", "success_unbounded"} <= set(fm_sanity)
    assert saved["adaptive"]["fm"]["operating_point"].startswith("joint thresholds")
    assert "Operating points: default: " in report and "; fm: joint thresholds" in report
    assert report.index("| default | default_joint |") < report.index("| fm | joint |")
    assert saved["table2"]["fgsm"]["n"] == 12 and saved["meta"]["counts"]["VAL"] == 24
    figures = ("figure1", "resistance_histograms", "figure4", "figure5", "figure6")
    for name in (*figures, "roc", "roc_defenses", "fbgan_samples"):
        assert (tmp_path / "run" / f"{name}.png").is_file()

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished stage was recomputed")

    monkeypatch.setattr(fm_stage, "attack_set", must_not_run)
    monkeypatch.setattr(FMDefense, "fit", must_not_run)
    monkeypatch.setattr(FMDefense, "resistance", must_not_run)
    monkeypatch.setattr(baselines, "run_train_magnet", must_not_run)
    again = _run(tmp_path / "run")
    assert again["table2"] == first["table2"]


def test_calibration_after_retraining_the_vae_gets_fresh_val_chunks(tmp_path: Path) -> None:
    """The VAL chunk folder is keyed by the models: a retrained combo-VAE does not collide with
    the chunks of the old one (it used to stop with 'holds chunks of another run')."""
    from fmdefense.defenses.fm.config import FMDefenseConfig
    from tests.toys import ToyClassifier, ToyVAE, images

    x_val = images([0.05 * i for i in range(1, 20) if i != 10])
    y_val = (x_val.flatten(1).mean(1) > 0.5).long()
    cfg = FMDefenseConfig(n_morphs=8, rho=0.9, eta=0.5, channels_last=False)
    clf, old, new = ToyClassifier(), ToyVAE(), ToyVAE()
    with torch.no_grad():
        new.bias.fill_(0.01)  # "retrained": other weights
    pipeline.stage_calibrate(tmp_path, clf, old, cfg, x_val, y_val)
    pipeline.stage_calibrate(tmp_path, clf, new, cfg, x_val, y_val)
    assert len(list((tmp_path / "cache").glob("val-*"))) == 2
    assert FMDefense.load(tmp_path / "defense", clf, new).config == replace(cfg, precision="fp32")


@pytest.mark.parametrize("native", [True, False])
def test_calibration_runs_at_the_resolved_precision_and_reuses_either_spelling(
    native: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "auto" is calibrated (and saved) as what it resolves to here, so a run saved with the
    concrete precision — the committed paper runs say "bf16" — is reused by "auto" where auto
    picks it, and one saved as "auto" is reused too; elsewhere VAL is morphed again."""
    from fmdefense.core import precision
    from fmdefense.defenses.fm.config import FMDefenseConfig
    from tests.toys import ToyClassifier, ToyVAE, images

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    x_val = images([0.05 * i for i in range(1, 20) if i != 10])
    y_val = (x_val.flatten(1).mean(1) > 0.5).long()
    auto = FMDefenseConfig(n_morphs=8, rho=0.9, eta=0.5, channels_last=False)
    clf, vae, plain, fits = ToyClassifier(), ToyVAE(), FMDefense.fit, []

    def counted(*args: Any, **kwargs: Any) -> FMDefense:
        fits.append(1)
        return plain(*args, **kwargs)

    for saved in ("bf16", "auto"):
        run = tmp_path / saved
        pipeline.stage_calibrate(run, clf, vae, replace(auto, precision=saved), x_val, y_val)
        fits.clear()
        monkeypatch.setattr(FMDefense, "fit", counted)
        again = pipeline.stage_calibrate(run, clf, vae, auto, x_val, y_val)
        monkeypatch.setattr(FMDefense, "fit", plain)
        assert fits == ([] if saved == "auto" or native else [1])
        assert again.config.precision == ("bf16" if native else "fp32")
