"""The paper's experiments on synthetic resistances: data, PNGs and Table II consistency."""

from __future__ import annotations

from pathlib import Path

import torch

from fmdefense.evaluation.experiments import (
    SetOutputs,
    breakdown,
    code_agreement,
    figure1,
    figure4,
    figure5,
    figure6,
    final_labels,
    resistance_histograms,
    roc,
    table2,
)


def _outputs(n: int, m: int, low: float, seed: int) -> SetOutputs:
    gen = torch.Generator().manual_seed(seed)
    r = (low + (1 - low) * torch.rand(n, m, generator=gen)).mul(20).round().div(20)
    truth = torch.randint(0, 10, (n,), generator=gen)
    wrong = (truth + 1) % 10
    input_label = truth if low > 0.5 else wrong  # clean sets correct, adversarial ones fooled
    return SetOutputs(r, input_label, truth.clone(), truth)


def test_experiments_write_pngs_and_consistent_table(tmp_path: Path) -> None:
    cle, val = _outputs(200, 6, 0.8, 0), _outputs(300, 6, 0.8, 1)
    adv = {"fgsm": _outputs(150, 6, 0.0, 2), "cw": _outputs(100, 6, 0.3, 3)}
    f1 = figure1(cle, adv, list(range(6)), tmp_path / "f1.png")
    assert f1["CLE"][0] > f1["fgsm"][0]
    h = resistance_histograms(cle, adv, tmp_path / "hist.png", bins=10)
    assert abs(sum(h["min"]["fgsm"]) - 1) < 1e-6 and len(h["edges"]) == 11
    assert sum(h["mean"]["CLE"][8:]) > sum(h["mean"]["fgsm"][8:])  # clean sits near 1
    f4 = figure4(
        cle, adv, val.resistance, {"first3": [0, 1, 2], "all": list(range(6))}, tmp_path / "f4.png"
    )
    assert f4["unified"]["fgsm"][0]["clean"] >= f4["unified"]["fgsm"][-1]["clean"]
    f5 = figure5(cle, adv["cw"], val.resistance, tmp_path / "f5.png")
    assert len(f5["theta_0.6"]) == len(f5["etas"])
    theta = torch.full((6,), 0.85)
    t2 = table2(cle, adv, theta, 0.5)
    labels, _ = final_labels(adv["fgsm"], theta, 0.5)
    defended = float(((labels == adv["fgsm"].truth) | (labels == -1)).float().mean())
    assert t2["fgsm"]["fm_defense"] == defended and t2["fgsm"]["no_defense"] == 0.0
    assert t2["clean"]["no_defense"] == 1.0
    r = roc(cle, adv, tmp_path / "roc.png")
    assert r["fgsm"]["auc"] > 0.9 and 0 <= r["cw"]["tpr_at_fpr_0.01"] <= 1
    b = breakdown({"CLE": cle, **adv}, theta, 0.5)
    assert abs(sum(b["CLE"].values()) - 1) < 1e-6
    figure6(
        {"clean": torch.rand(8, 1, 28, 28), "adv": torch.rand(8, 1, 28, 28)}, tmp_path / "f6.png"
    )
    for name in ("f1", "hist", "f4", "f5", "roc", "f6"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_table2_against_hand_computed_numbers() -> None:
    """Four CLE and four ADV inputs, two codes, θ = (0.5, 0.5), θ_d = 0.2, all by hand."""
    r = torch.tensor([[0.9, 0.9], [0.45, 0.9], [0.1, 0.1], [0.8, 0.7]])
    truth = torch.tensor([0, 1, 2, 3])
    # rows: accept (label 0 right) / purify (Dis 0.05, purified 1 right) / reject (Dis 0.8) /
    # accept (input label 9 wrong)
    cle = SetOutputs(r, torch.tensor([0, 5, 2, 9]), torch.tensor([0, 1, 7, 3]), truth)
    adv = SetOutputs(r, torch.tensor([4, 5, 6, 3]), torch.tensor([4, 7, 6, 3]), truth)
    t2 = table2(cle, {"a": adv}, torch.tensor([0.5, 0.5]), 0.2)
    assert t2["clean"]["no_defense"] == 0.5  # labels 0 and 2 right of 0, 5, 2, 9
    assert t2["clean"]["fm_defense"] == 0.5  # 0 right, purified 1 right, rejected, 9 wrong
    assert t2["a"]["no_defense"] == 0.25  # only the last (3) right
    assert t2["a"]["fm_defense"] == 0.5  # accepted 4 wrong, purified 7 wrong, rejected, 3 right
    assert t2["a"]["fm_defense_plain"] == 0.25


def test_code_agreement_tells_codes_that_say_one_thing_from_codes_that_differ() -> None:
    truth = torch.zeros(4, dtype=torch.long)
    # CLE: every code keeps the label (r = 1); ADV: code 0 loses it on all, code 1 on half
    cle = SetOutputs(torch.ones(4, 2), truth, truth, truth)
    adv_r = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    val = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    out = code_agreement(val, cle, {"a": SetOutputs(adv_r, truth, truth, truth)})
    assert out["VAL"] == {"binary": 1.0, "codes_agree": 1.0, "all_zero": 0.5}
    assert out["CLE"] == {"binary": 1.0, "codes_agree": 1.0, "all_zero": 0.0}
    assert out["a"]["binary"] == 1.0 and out["a"]["codes_agree"] == 0.5
    assert out["a"]["all_zero"] == 0.5
    assert out["a"]["auc_one_code"] == (0.75, 0.875, 1.0)  # code 1: 2 of 4 tied with CLE
    assert out["a"]["auc_all_codes"] == 1.0
    spread = SetOutputs(torch.tensor([[0.5, 0.52], [0.3, 0.9]]), truth[:2], truth[:2], truth[:2])
    agreement = code_agreement(spread.resistance, spread, {})["CLE"]
    assert agreement == {"binary": 0.0, "codes_agree": 0.5, "all_zero": 0.0}


def test_one_manipulated_code_runs_every_figure(tmp_path: Path) -> None:
    """The paper's face reading (one feature map as the only code): no empty code subset reaches
    Figure 4, and Figures 1, 4 and 5, Table II and the ROC run on (n, 1) resistances."""
    from fmdefense.evaluation.fm_stage import code_selections

    cle, val = _outputs(60, 1, 0.8, 0), _outputs(40, 1, 0.8, 1)
    adv = {"fgsm": _outputs(50, 1, 0.0, 2)}
    selections = code_selections(val.resistance)
    assert selections == {"all": [0], "second half": [0], "lowest VAL resistance": [0]}
    assert code_selections(torch.rand(5, 4))["first half"] == [0, 1]
    f4 = figure4(cle, adv, val.resistance, selections, tmp_path / "f4.png")
    assert set(f4["selection"]["fgsm"]) == set(selections)
    figure1(cle, adv, [2], tmp_path / "f1.png")
    figure5(cle, adv["fgsm"], val.resistance, tmp_path / "f5.png")
    assert table2(cle, adv, torch.full((1,), 0.85), 0.5)["fgsm"]["no_defense"] == 0.0
    assert roc(cle, adv, tmp_path / "roc.png")["fgsm"]["auc"] > 0.9
