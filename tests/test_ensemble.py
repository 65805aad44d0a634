"""The combo-VAE ensemble: a keyed random member per input or all members, their calibration,
save/load through recorded folders, and `ensemble_joint`'s EOT loss over the members."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch

from fmdefense.attacks.adaptive import make_attack
from fmdefense.attacks.adaptive.ensemble_joint import EnsembleJointPGD
from fmdefense.attacks.defended import outcomes
from fmdefense.core.errors import ArtifactError, InputError
from fmdefense.defenses.base import REJECT
from fmdefense.defenses.default import DefaultConfig
from fmdefense.defenses.ensemble import (
    EnsembleConfig,
    EnsembleDefense,
    draw_members,
    union_alpha,
)
from fmdefense.defenses.registry import load_defense
from fmdefense.models.magnet import autoencoder_i, autoencoder_ii
from tests.test_adaptive import PATTERN, toy_inputs
from tests.toys import ToyClassifier, ToyComboVAE, images

BIASES = (0.0, 0.06, -0.06)


def toy_vaes() -> list[ToyComboVAE]:
    vaes = [ToyComboVAE() for _ in BIASES]
    with torch.no_grad():
        for vae, b in zip(vaes, BIASES, strict=True):
            vae.bias.fill_(b)
    return vaes


def x_val() -> torch.Tensor:
    means = [0.05 * i for i in range(1, 20) if i != 10] * 2
    amplitude = torch.linspace(0, 2, len(means)).view(-1, 1, 1, 1)
    return (images(means) + amplitude * PATTERN).clamp(0, 1)


def toy_ensemble(mode: str = "random", seed: int = 0, alpha: float = 0.2) -> EnsembleDefense:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        aes = (autoencoder_i(1), autoencoder_ii(1))
    cfg = EnsembleConfig(mode=mode, seed=seed, member=DefaultConfig(alpha=alpha))
    return EnsembleDefense(ToyClassifier(), toy_vaes(), aes, cfg).fit(x_val())


def probe() -> torch.Tensor:
    x, _ = toy_inputs()
    return torch.cat([x, (x + 0.3 * PATTERN).clamp(0, 1), x_val()])  # (n, 1, 4, 4)


def test_the_draw_is_keyed_deterministic_and_batch_independent() -> None:
    x = probe()
    draw = draw_members(x, 3, seed=0)
    assert torch.equal(draw, draw_members(x, 3, seed=0))
    assert torch.equal(draw[5:9], draw_members(x[5:9], 3, seed=0))
    assert set(draw.tolist()) == {0, 1, 2}  # every member is drawn on these inputs
    assert not torch.equal(draw, draw_members(x, 3, seed=1))  # the key changes the draw


def test_random_mode_gives_the_drawn_members_verdict() -> None:
    ens, x = toy_ensemble("random"), probe()
    dec = ens.decide(x)
    draw = draw_members(x, 3, 0)
    singles = [m.decide(x) for m in ens.members_]
    for i in range(len(x)):
        assert int(dec.action[i]) == int(singles[int(draw[i])].action[i])
    flags = dec.details["member_flags"]  # (n, K): every member's own verdict
    assert flags.shape == (len(x), 3)
    assert torch.equal(flags, torch.stack([s.flagged for s in singles], 1))
    assert ens.member_config.alpha == pytest.approx(0.2)


def test_all_mode_members_take_the_largest_common_rate_whose_union_stays_at_alpha() -> None:
    ens = toy_ensemble("all")
    rate, n_cal = ens.member_config.alpha, len(ens.members_[0].calibration_)
    assert 0 < rate <= 0.2 and ens.val_fpr_ <= 0.2 + 1e-9
    a = round(rate * n_cal)
    looser = [m.with_config(alpha=(a + 1) / n_cal) for m in ens.members_]
    union = torch.stack([m.statistic(m.calibration_) > m.threshold_ for m in looser], 1).any(1)
    assert float(union.float().mean()) > 0.2  # one more flag per member would pass α
    assert union_alpha(ens.members_, 0.2) == pytest.approx(rate)


def test_all_mode_rejects_what_any_member_flags() -> None:
    ens, x = toy_ensemble("all"), probe()
    dec = ens.decide(x)
    flags = dec.details["member_flags"]
    assert flags.any(1).any() and not flags.all(1).all()  # the members disagree somewhere
    assert torch.equal(dec.action == REJECT, flags.any(1))
    assert torch.equal(dec.scores["fused"] > 0, flags.any(1))
    assert ens.val_fpr_ <= 0.2 + 1e-9


def test_outcomes_count_what_each_member_alone_would_accept_wrong() -> None:
    ens, x = toy_ensemble("random"), probe()
    y = torch.ones(len(x), dtype=torch.long)  # every input whose C(x) is 0 is "wrong"
    row = outcomes(ens, x, y)
    dec = ens.decide(x)
    wrong = dec.input_label != y
    want = [int((~dec.details["member_flags"][:, k] & wrong).sum()) for k in range(3)]
    assert row["member_accepted_wrong"] == want
    some = (~dec.details["member_flags"] & wrong.view(-1, 1)).any(1)
    assert row["any_member_accepted_wrong"] == int(some.sum()) >= max(want)
    assert "member_flags" not in row  # a (n, K) detail is not counted as one flag


def test_save_records_the_members_folders_and_load_finds_them(tmp_path: Path) -> None:
    ens, x = toy_ensemble("all"), probe()
    dirs = [tmp_path / f"vae-{k}" for k in range(len(ens.vaes))]  # folders beside it
    ens.vae_dirs = dirs
    ens.save(tmp_path / "ens")
    back = EnsembleDefense.load(tmp_path / "ens", ens.classifier, vaes=ens.vaes)
    assert back.config == ens.config
    assert torch.equal(back.decide(x).action, ens.decide(x).action)
    assert back.val_fpr_ == pytest.approx(ens.val_fpr_)
    other = toy_vaes()
    with torch.no_grad():
        other[1].bias.fill_(0.3)
    with pytest.raises(ArtifactError, match="member 1"):
        EnsembleDefense.load(tmp_path / "ens", ens.classifier, vaes=other)
    with pytest.raises(InputError, match="3 members"):
        EnsembleDefense.load(tmp_path / "ens", ens.classifier, vaes=other[:2])


def test_saving_without_the_vae_folders_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="vae_dirs"):
        toy_ensemble().save(tmp_path / "ens")


def test_bad_configs_are_refused() -> None:
    with pytest.raises(InputError, match="mode"):
        EnsembleConfig(mode="any")
    with pytest.raises(InputError, match="purify"):
        EnsembleConfig(member=DefaultConfig(purify="paper"))
    with pytest.raises(InputError, match="at least one"):
        EnsembleDefense(ToyClassifier(), [], None, EnsembleConfig())


def test_ensemble_joint_is_the_mean_of_the_members_default_joint_losses() -> None:
    ens = toy_ensemble("random")
    x, y = toy_inputs()
    attack = cast(EnsembleJointPGD, make_attack("ensemble_joint", ens, eps=0.3, steps=10))
    members = [make_attack("default_joint", m, eps=0.3, steps=10) for m in ens.members_]
    idx, gen = torch.arange(len(x)), torch.Generator().manual_seed(0)
    attack.prepare(x, y, None)
    for m in members:
        m.prepare(x, y, None)
    for t in (0, attack.lock_step):  # phase 1, then phase 2
        attack.begin_step(t, x, y, idx)
        for m in members:
            m.begin_step(t, x, y, idx)
        want = torch.stack([m.loss(x, y, idx, gen) for m in members]).mean(0)  # type: ignore[attr-defined]
        assert torch.allclose(attack.loss(x, y, idx, gen), want)
    result = attack.run(x, y)
    assert float((result.x_adv - x).abs().max()) <= 0.3 + 1e-6
    with pytest.raises(InputError, match="EnsembleDefense"):
        make_attack("ensemble_joint", ens.members_[0])


def test_load_defense_opens_an_ensemble_folder_through_the_registry(tmp_path: Path) -> None:
    ens = toy_ensemble()
    ens.vae_dirs = [tmp_path / "missing"] * 3
    ens.save(tmp_path / "ens")
    with pytest.raises(ArtifactError, match="missing"):  # the recorded folders do not exist
        load_defense(tmp_path / "ens", ens.classifier)


@pytest.mark.parametrize("mode", ["random", "all"])
def test_the_shipped_mnist_ensembles_load_and_reproduce_their_stored_scores(mode: str) -> None:
    """End to end on the committed weights: the recorded combo-VAE folders resolve, every
    member's weights match its fingerprints, and the last member's stored VAL reference scores
    come out of today's pass; the VAL FPR equals the one recorded at calibration."""
    import json

    from fmdefense.core.paths import model_dir
    from fmdefense.data import load_raw, split_tensors
    from fmdefense.defenses import fusion
    from fmdefense.defenses.jobs import load_classifier

    folder = model_dir("mnist", "ensemble") / mode
    ens = EnsembleDefense.load(folder, load_classifier("mnist", torch.device("cpu")))
    assert len(ens.members_) == 5 and ens.config.mode == mode
    recorded = json.loads((folder / "metrics.json").read_text())
    assert ens.val_fpr_ == pytest.approx(recorded["val_fpr_held_out"])
    assert ens.val_fpr_ <= ens.config.member.alpha + 1e-9
    x_val = split_tensors(load_raw("mnist"), "val")[0]
    member = ens.members_[-1]
    ref_idx = fusion.split_indices(len(x_val), member.config.seed)[0][:32]
    s = member._score_matrix(x_val[ref_idx], member.names_)
    assert torch.allclose(s, member.reference_[:32], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("vaes", None, "combo-VAEs are not recorded"),
        ("vaes", "abc", "combo-VAEs are not recorded"),
        ("in_channels", "one", "in_channels"),
        ("ensemble", {"mode": "random"}, "'member'"),
    ],
)
def test_a_damaged_ensemble_config_is_an_artifact_error(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    import json

    ens = toy_ensemble()
    ens.vae_dirs = [tmp_path / f"vae-{k}" for k in range(3)]
    ens.save(tmp_path / "ens")
    path = tmp_path / "ens" / "config.json"
    meta = json.loads(path.read_text())
    meta["config"][key] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=message):
        EnsembleDefense.load(tmp_path / "ens", ens.classifier, vaes=ens.vaes)
