"""CelebA end to end on a generated folder in its published layout: `fmdefense train classifier`,
`fmdefense train vae` and `fmdefense reproduce --dataset celeba --data-dir DIR` through the CLI,
64×64 RGB. The networks are narrowed (registry entries patched) so it runs in seconds; the
code path is the real one. Accuracies are not asserted (the fixture is 6 identities of coloured
shapes; the narrowed classifier learns them in 8 epochs, 100 % on its 12 test images here)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fmdefense.cli import main
from fmdefense.models.classifiers import DATASET_CLASSIFIERS
from fmdefense.models.combo_vae import DATASET_VAES, ComboVAE
from fmdefense.training.loops import TRAIN_CONFIGS
from tests.celeba_fixture import make_celeba_folder


@pytest.fixture
def small_celeba_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Narrow networks and small batches (the fixture has 54 training images; at batch 128
    one step per epoch left the classifier at chance)."""
    monkeypatch.setitem(
        DATASET_CLASSIFIERS, "celeba", dataclasses.replace(DATASET_CLASSIFIERS["celeba"], width=8)
    )
    monkeypatch.setitem(
        DATASET_VAES, "celeba", dataclasses.replace(DATASET_VAES["celeba"], width=8, z_s_dim=4)
    )
    monkeypatch.setitem(
        TRAIN_CONFIGS, "celeba", dataclasses.replace(TRAIN_CONFIGS["celeba"], batch_size=8)
    )


def test_reproduce_runs_end_to_end_on_a_celeba_folder(
    tmp_path: Path,
    data_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    small_celeba_models: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = make_celeba_folder(tmp_path / "celeba", identities=6, per_identity=12)
    weights = tmp_path / "weights"
    monkeypatch.setenv("FMDEFENSE_WEIGHTS", str(weights))
    common = ["--dataset", "celeba", "--data-dir", str(folder), "--device", "cpu"]
    run = tmp_path / "run"
    reproduce = ["reproduce", *common, "--profile", "smoke", "--attacks", "fgsm", "--out", str(run)]
    assert main(reproduce) == 2  # no models yet: a one-line error naming the command to run
    assert "fmdefense train classifier --dataset celeba --data-dir" in capsys.readouterr().err
    clf_dir, vae_dir = weights / "celeba" / "classifier", weights / "celeba" / "combo_vae"
    assert main(["train", "classifier", *common, "--epochs", "8", "--out", str(clf_dir)]) == 0
    train_vae = ["train", "vae", *common, "--epochs-dgmm", "2", "--epochs-vae", "2"]
    train_vae.append("--recalibrate-norms")
    assert main([*train_vae, "--out", str(vae_dir)]) == 0
    assert ComboVAE.load(vae_dir).cfg.in_channels == 3
    vae_metrics = json.loads((vae_dir / "metrics.json").read_text())
    assert vae_metrics["history_vae"][-1]["consistency"] > 0  # RGB through the frozen classifier
    assert vae_metrics["train_config"]["recalibrate_norms"] is True  # the CLI flag reached it
    assert main(reproduce) == 0
    results = json.loads((run / "results.json").read_text())
    report = (run / "report.md").read_text()
    assert results["meta"]["dataset"] == "celeba" and results["meta"]["profile"] == "smoke"
    # 6 identities: one VAL image each, the last two of each the CLE images
    assert results["meta"]["counts"] == {"VAL": 6, "CLE": 12, "fgsm": 12}
    assert set(results["table2"]) == {"clean", "fgsm"}
    assert set(results["default"]["table"]) == {"CLE", "fgsm"}
    assert results["magnet"]["table2"].keys() == {"clean", "fgsm"}
    assert "skipped" in results["defense_gan"]  # no Defense-GAN for faces: said, not hidden
    assert "# FM-Defense on celeba — profile `smoke`" in report
    assert "| fgsm | 12 |" in report
    rows = [line for line in report.splitlines() if line.startswith("| fgsm | 12 |")]
    assert any(r.endswith("| 7.6 % | 99.9 % |") for r in rows)  # the paper's CelebA column
    for name in ("figure1", "figure4", "figure5", "figure6", "roc", "roc_defenses"):
        assert (run / f"{name}.png").is_file()
    adv = json.loads((run / "attacks" / "fgsm" / "config.json").read_text())
    assert adv["config"]["source_key"]["data_dir"] == str(folder.resolve())


def test_the_celeba_combo_vae_takes_64x64_rgb_faces() -> None:
    """The full-size CelebA networks (the fixture test narrows them): shapes of every output."""
    import torch

    vae = ComboVAE(DATASET_VAES["celeba"]).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        z_s, z_u = vae.encode(x)
        assert z_s.shape == (2, 32, 8, 8) and z_u.shape == (2, 16)
        assert vae.reconstruct(x).shape == (2, 3, 64, 64)
        assert vae.decode_codes(vae.codes(x), z_u).shape == (2, 3, 64, 64)
    assert vae.num_codes == 32


def test_reproduce_offers_every_profile() -> None:
    from fmdefense.cli.reproduce import PROFILE_NAMES
    from fmdefense.evaluation.profiles import PROFILES

    assert set(PROFILE_NAMES) == set(PROFILES)
