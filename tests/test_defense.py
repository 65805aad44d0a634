"""FM-Defense engine: morph range rule, resistance, thresholds, eq. 5, the detector object."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fmdefense.core.artifacts import load_tensors, save_tensors
from fmdefense.core.errors import ArtifactError, InputError, NotFittedError
from fmdefense.defenses.base import ACCEPT, PURIFY, REJECT, REJECT_LABEL
from fmdefense.defenses.fm.config import FMDefenseConfig
from fmdefense.defenses.fm.detector import FMDefense
from fmdefense.defenses.fm.engine import static_pieces
from fmdefense.defenses.fm.morphs import (
    MorphConfig,
    draw_table,
    morph_codes,
    morph_rows,
    natural_deltas,
)
from fmdefense.defenses.fm.ranges import normal_ranges
from fmdefense.defenses.fm.thresholds import (
    NEVER,
    distance,
    distance_threshold,
    flags,
    joint_thresholds,
    per_code_thresholds,
    thresholds,
    unified_threshold,
)
from tests.toys import ToyClassifier, ToyVAE, images

CFG = MorphConfig(n_morphs=50, draws_per_iter=7, step_frac=0.05, max_iters=400, seed=3)


def _deltas(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return natural_deltas(values, lo, hi, draw_table(CFG, values.shape[1]), CFG)


def test_morphs_stay_in_the_normal_range_and_fill_n() -> None:
    values = torch.tensor([[0.0, 5.0], [0.9, -3.0], [-1.0, 0.0]])  # some start outside
    lo, hi = torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0])
    d = _deltas(values, lo, hi)
    assert d.shape == (3, 2, 50)
    v = values.unsqueeze(-1) + d
    assert bool(((v >= lo.view(1, -1, 1) - 1e-6) & (v <= hi.view(1, -1, 1) + 1e-6)).all())


def test_morph_search_widens_from_small_perturbations() -> None:
    values, lo, hi = torch.zeros(1, 1), torch.tensor([-10.0]), torch.tensor([10.0])
    d = _deltas(values, lo, hi)[0, 0]  # every draw is in range: iterations 1..ceil(50/7)
    step = 20.0 * CFG.step_frac
    for k in range(50):
        assert abs(float(d[k])) <= step * (k // CFG.draws_per_iter + 1) + 1e-6


def test_morphs_are_seeded_and_independent_of_the_batch() -> None:
    lo, hi = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    batch = torch.tensor([[0.1, 0.2], [0.5, -0.7], [-0.9, 0.0]])
    alone = _deltas(batch[1:2], lo, hi)
    together = _deltas(batch, lo, hi)
    assert torch.equal(alone[0], together[1])
    other = natural_deltas(batch, lo, hi, draw_table(MorphConfig(seed=4), 2), CFG)
    assert not torch.equal(other, together)


def test_morph_codes_shift_one_code_or_one_whole_channel() -> None:
    codes = torch.zeros(2, 3)
    out = morph_codes(codes, torch.tensor([2]), torch.ones(2, 1, 4))
    assert out.shape == (2, 1, 4, 3) and bool((out[..., 2] == 1).all())
    assert bool((out[..., :2] == 0).all())
    maps = torch.zeros(2, 3, 2, 2)  # face variant: a code is a channel
    out = morph_codes(maps, torch.tensor([1]), torch.full((2, 1, 4), 0.5))
    assert bool((out[:, :, :, 1] == 0.5).all()) and float(out[:, :, :, [0, 2]].abs().sum()) == 0


@pytest.mark.parametrize("rest", [(5,), (5, 3, 3)])
def test_morph_rows_are_the_same_rows_of_all_morphs_built_alone(rest: tuple[int, ...]) -> None:
    """The resistance loop builds one batch of morphs at a time: any slice equals that slice of
    the full (n, m, N, ...) morph tensor, with the input each row belongs to."""
    gen = torch.Generator().manual_seed(0)
    codes, deltas = torch.randn(3, *rest, generator=gen), torch.randn(3, 2, 4, generator=gen)
    code_idx = torch.tensor([4, 1])
    full = morph_codes(codes, code_idx, deltas).flatten(0, 2)  # (24, 5[, 3, 3])
    owners = torch.arange(3).repeat_interleave(8)
    for start, stop in [(0, 24), (0, 5), (5, 13), (23, 24), (7, 7)]:
        rows, owner = morph_rows(codes, code_idx, deltas, start, stop)
        assert torch.equal(rows, full[start:stop]) and torch.equal(owner, owners[start:stop])


def test_normal_range_is_a_central_quantile_interval() -> None:
    val = torch.arange(101, dtype=torch.float).view(-1, 1).repeat(1, 2)
    lo, hi = normal_ranges(val, (0.1, 0.9))
    assert torch.allclose(lo, torch.tensor([10.0, 10.0])) and torch.allclose(hi, torch.tensor(90.0))
    lo, hi = normal_ranges(torch.zeros(10, 1), (0.1, 0.9), min_width=0.2)  # constant code
    assert float(hi - lo) == pytest.approx(0.2)


def test_resistance_matches_the_closed_form_of_the_toy() -> None:
    clf, vae = ToyClassifier(), ToyVAE()
    x_val = images([0.1 * i for i in range(1, 10)])
    defense = FMDefense(clf, vae, FMDefenseConfig(n_morphs=40, rho=0.9)).fit(x_val)
    x = images([0.45, 0.9, 0.52])
    r = defense.resistance(x)
    codes = vae.codes(x)
    table = draw_table(defense.config.morph, 3)
    d = natural_deltas(codes, defense.lo_, defense.hi_, table, defense.config.morph)
    expected0 = (((codes[:, :1] + d[:, 0]) > 0.5) == (codes[:, :1] > 0.5)).float().mean(1)
    assert torch.allclose(r[:, 0], expected0)
    assert bool((r[:, 1:] == 1).all())  # codes that do not touch the decoded image
    assert float(r[1, 0]) == 1.0 and float(r[0, 0]) < 1.0


def test_per_code_thresholds_meet_the_val_target_with_ties() -> None:
    r = torch.ones(100, 2)
    r[:5, 0] = 0.9  # 5 % tied at 0.9 on code 0
    r[5:7, 1] = 0.5  # 2 % at 0.5 on code 1
    theta = per_code_thresholds(r, rho=0.99)
    assert theta.tolist() == [NEVER, NEVER]  # flagging the tie would exceed 1 %
    theta = per_code_thresholds(r, rho=0.95)
    assert theta.tolist() == pytest.approx([0.9, 0.5])  # ties flagged: exactly 5 % and 2 %
    assert int((r[:, 0] <= theta[0]).sum()) == 5
    assert int(flags(r, theta).sum()) == 7  # the joint FPR grows with the number of codes


@pytest.mark.parametrize("mode", ["per_code", "unified", "joint"])
def test_val_false_positive_rate_meets_the_target(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    r = (torch.rand(2000, 20, generator=gen) * 4).clamp(max=1).mul(100).round().div(100)
    theta = thresholds(r, rho=0.95, mode=mode)
    joint = int(flags(r, theta).sum())  # flagged VAL instances; the target allows 100
    assert bool(((r <= theta).sum(0) <= 100).all())
    if mode != "per_code":
        assert joint <= 100
    else:
        assert joint > 100  # the paper's rule: joint FPR grows with m (reported, not hidden)


def test_joint_thresholds_are_no_looser_than_unified_at_equal_fpr() -> None:
    gen = torch.Generator().manual_seed(1)
    r = (torch.rand(500, 5, generator=gen) * 3).clamp(max=1).mul(50).round().div(50)
    assert int(flags(r, joint_thresholds(r, 0.9)).sum()) <= 50
    assert unified_threshold(r, 0.9).unique().numel() == 1


def test_distance_is_equation_5() -> None:
    r = torch.tensor([[0.2, 0.9, 0.5], [1.0, 1.0, 1.0]])
    theta = torch.tensor([0.5, 0.5, 0.5])
    assert distance(r, theta).tolist() == pytest.approx([0.3, 0.0])
    assert flags(r, theta).tolist() == [True, False]  # 0.5 ≤ 0.5: tie is suspicious, Dis 0


def test_distance_threshold_is_the_eta_fractile_of_suspicious_val() -> None:
    theta = torch.tensor([0.5])
    r = torch.tensor([[0.4], [0.3], [0.1], [0.9], [1.0]])
    assert distance_threshold(r, theta, 0.5) == pytest.approx(0.2)  # median of 0.1, 0.2, 0.4
    assert distance_threshold(torch.ones(5, 1), theta, 0.9) == 0.0  # none suspicious


def test_decisions_accept_purify_reject() -> None:
    clf, vae = ToyClassifier(), ToyVAE()
    x_val = images([0.05 * i for i in range(1, 20) if i != 10])
    cfg = FMDefenseConfig(n_morphs=40, rho=0.9, eta=0.5, z_u_mode="class_mean")
    defense = FMDefense(clf, vae, cfg).fit(x_val)
    x = images([0.95, 0.51, 0.49, 0.3])
    dec = defense.decide(x)
    assert dec.action.shape == (4,) and dec[0].action == "accept" and dec[0].label == 1
    for i in range(4):
        a = int(dec.action[i])
        if a == REJECT:
            assert int(dec.label[i]) == REJECT_LABEL
        elif a == PURIFY:
            assert int(dec.label[i]) == int(defense.purify(x[i : i + 1])[0])
        else:
            assert a == ACCEPT and int(dec.label[i]) == int(dec.input_label[i])
    assert sum(dec.counts().values()) == 4
    assert torch.equal(defense.predict(x), dec.label)
    # force all three actions through decide_from_resistance with known thresholds
    m = len(defense.code_idx_)
    defense.theta_, defense.theta_d_ = torch.full((m,), 0.5), 0.2
    r = torch.full((4, m), 0.9)
    r[1, 0] = 0.45  # just below on one code: Dis 0.05 <= θ_d, purified
    r[2] = 0.1  # far below on every code: Dis 0.4 m > θ_d, rejected
    forced = defense.decide_from_resistance(x, r)
    assert forced.action.tolist() == [ACCEPT, PURIFY, REJECT, ACCEPT]
    assert int(forced.label[2]) == REJECT_LABEL
    assert int(forced.label[1]) == int(defense.purify(x[1:2])[0])
    assert forced.label[[0, 3]].tolist() == forced.input_label[[0, 3]].tolist()


def test_save_load_reproduces_decisions_exactly(tmp_path: Path) -> None:
    clf, vae = ToyClassifier(), ToyVAE()
    x_val = images([0.05 * i for i in range(1, 20)])
    defense = FMDefense(clf, vae, FMDefenseConfig(n_morphs=30, rho=0.9, codes=(0, 1))).fit(x_val)
    defense.save(tmp_path / "d")
    back = FMDefense.load(tmp_path / "d", clf, vae)
    x = images([0.48, 0.52, 0.7, 0.1])
    a, b = defense.decide(x), back.decide(x)
    assert torch.equal(a.details["resistance"], b.details["resistance"])
    assert torch.equal(a.label, b.label)
    assert torch.equal(a.action, b.action) and back.z_u_mode_ == defense.z_u_mode_
    other = ToyClassifier()
    with torch.no_grad():
        other.scale.fill_(3.0)
    with pytest.raises(ArtifactError, match="another classifier"):
        FMDefense.load(tmp_path / "d", other, vae)


def test_fit_with_given_codes_morphs_only_those_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """codes=(i, ...) makes calibration decode only those codes' morphs (a 16-map face model
    with one code spent 13 of the run's 33 minutes on the other 15), with the same VAL r."""
    vae, decoded = ToyVAE(), []
    plain = vae.decode_codes
    monkeypatch.setattr(vae, "decode_codes", lambda c, z=None: decoded.append(len(c)) or plain(c))
    x_val = images([0.05 * i for i in range(1, 20)])
    given = FMDefense(ToyClassifier(), vae, FMDefenseConfig(n_morphs=30, codes=(0,))).fit(x_val)
    morphs = sum(decoded)
    assert morphs <= 19 * 30 + 19 * 2  # VAL's morphs of one code, and the z_u-reading decodes
    everything = FMDefense(ToyClassifier(), ToyVAE(), FMDefenseConfig(n_morphs=30)).fit(x_val)
    assert given.code_idx_.tolist() == [0]
    assert torch.equal(given.val_resistance_, everything.val_resistance_[:, :1])
    assert torch.equal(given.theta_, everything.theta_[:1])


def test_detect_before_fit_and_bad_inputs_raise() -> None:
    defense = FMDefense(ToyClassifier(), ToyVAE(), FMDefenseConfig(n_morphs=10))
    with pytest.raises(NotFittedError, match="fit"):
        defense.detect(images([0.5]))
    defense.fit(images([0.2, 0.4, 0.6, 0.8]))
    with pytest.raises(InputError, match="NaN"):
        defense.detect(images([float("nan")]))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        defense.detect(images([2.0]))
    with pytest.raises(InputError, match="4x4"):
        defense.detect(torch.rand(2, 1, 5, 5))
    with pytest.raises(InputError, match="threshold_mode"):
        FMDefenseConfig(threshold_mode="median")
    with pytest.raises(InputError, match="code indices"):
        FMDefense(ToyClassifier(), ToyVAE(), FMDefenseConfig(codes=(7,))).fit(images([0.2]))


def test_auto_code_selection_uses_val_only_and_skips_inert_codes() -> None:
    x_val = images([0.05 * i for i in range(1, 20)])
    cfg = FMDefenseConfig(n_morphs=30, codes="auto", n_auto_codes=1, rho=0.9)
    defense = FMDefense(ToyClassifier(), ToyVAE(), cfg).fit(x_val)
    assert defense.code_idx_.tolist() == [0]  # the only code that changes anything


def test_resistance_resumes_from_finished_chunks(tmp_path: Path) -> None:
    clf, vae = ToyClassifier(), ToyVAE()
    cfg = FMDefenseConfig(n_morphs=20, rho=0.9, chunk_size=2)
    defense = FMDefense(clf, vae, cfg).fit(images([0.1, 0.3, 0.6, 0.9]))
    x = images([0.45, 0.9, 0.52, 0.2, 0.55])
    full = defense.resistance(x, cache_dir=tmp_path / "r")
    chunks = sorted((tmp_path / "r").glob("chunk-*.safetensors"))
    assert len(chunks) == 3
    chunks[1].unlink()  # as if killed while computing the second chunk
    calls = {"n": 0}
    original = defense.engine.chunk_resistance

    def counting(*args: object) -> torch.Tensor:
        calls["n"] += 1
        return original(*args)  # type: ignore[arg-type]

    defense.engine.chunk_resistance = counting  # type: ignore[method-assign]
    again = defense.resistance(x, cache_dir=tmp_path / "r")
    assert calls["n"] == 1 and torch.equal(full, again)
    with pytest.raises(ArtifactError, match="another run"):
        defense.resistance(x[:3], cache_dir=tmp_path / "r")


class _NearTie(torch.nn.Module):
    """Two logits 1e-3 apart: float32 tells them apart, bf16 rounds them equal (argmax 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 2)
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.copy_(torch.tensor([1.0, 1.001]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mean((1, 2, 3)).unsqueeze(1))


def test_input_labels_are_float32_even_when_morphs_run_in_bf16() -> None:
    x = images([0.3, 0.7])
    defense = FMDefense(_NearTie(), ToyVAE(), FMDefenseConfig(precision="bf16"))
    assert defense._morph_labels(x).tolist() == [0, 0]  # bf16 loses the 1e-3 gap
    assert defense.classify(x).tolist() == [1, 1]  # C(x) is the float32 answer
    assert defense._purified(x, "feature").tolist() == [1, 1]  # so is the purified label
    # every bf16 morph says 0 while the fp32 C(x) says 1: resistance 0, not 1
    idx, lo, hi = torch.tensor([0, 1]), torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    r = defense._resistance(x, idx, lo, hi)
    assert r.shape == (2, 2) and float(r.max()) == 0.0


def test_chunks_from_before_fp32_labels_are_relabelled_row_by_row(tmp_path: Path) -> None:
    clf, vae = ToyClassifier(), ToyVAE()
    cfg = FMDefenseConfig(n_morphs=20, rho=0.9, chunk_size=2)
    defense = FMDefense(clf, vae, cfg).fit(images([0.1, 0.3, 0.6, 0.9]))
    x = images([0.45, 0.9, 0.52, 0.2])
    full = defense.resistance(x, cache_dir=tmp_path / "r")
    chunk = tmp_path / "r" / "chunk-0000002.safetensors"
    stale = {"r": torch.zeros(2, len(defense.code_idx_))}  # an old chunk: no "label" tensor
    save_tensors(chunk, stale)
    engine = defense.engine
    real_morph_labels = engine.morph_labels
    # pretend the old (bf16) labelling disagreed with float32 on the chunk's second input only
    engine.morph_labels = lambda imgs: (  # type: ignore[method-assign]
        real_morph_labels(imgs) if len(imgs) != 2 else engine.labels(imgs) + torch.tensor([0, 1])
    )
    rows: list[int] = []
    original = defense.engine.chunk_resistance

    def counting(xs: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        rows.append(len(xs))
        return original(xs, *args)

    defense.engine.chunk_resistance = counting  # type: ignore[method-assign]
    again = defense.resistance(x, cache_dir=tmp_path / "r")
    assert rows == [1]  # only the input whose label changed is redone
    assert torch.equal(again[3], full[3]) and torch.equal(again[2], torch.zeros_like(full[2]))
    assert "label" in load_tensors(chunk)  # upgraded in place: the next run reuses it as is
    rows.clear()
    defense.resistance(x, cache_dir=tmp_path / "r")
    assert rows == []


@pytest.mark.parametrize("rho", [0.6, 0.8, 0.95])
def test_exact_early_stopping_gives_identical_decisions_with_fewer_morphs(rho: float) -> None:
    from fmdefense.defenses.fm.sequential import SequentialConfig

    clf, vae = ToyClassifier(), ToyVAE()
    x_val = images([0.05 * i for i in range(1, 20)])
    cfg = FMDefenseConfig(n_morphs=40, rho=rho, threshold_mode="joint", eta=0.5)
    defense = FMDefense(clf, vae, cfg).fit(x_val)
    x = images([0.45, 0.9, 0.52, 0.2, 0.55, 0.48, 0.7, 0.51])
    full = defense.decide(x)
    fast = defense.decide_sequential(x, SequentialConfig(mode="exact", round_size=5))
    assert torch.equal(fast.action, full.action) and torch.equal(fast.label, full.label)
    used = fast.details["morphs"]
    assert int(used.max()) <= 40 * len(defense.code_idx_)
    assert int(used.sum()) < 40 * len(defense.code_idx_) * len(x)  # something was saved
    test = defense.decide_sequential(x, SequentialConfig(mode="confidence", round_size=5))
    assert len(test) == len(x)
    assert bool((test.details["morphs"] <= 40 * len(defense.code_idx_)).all())
    assert int(test.details["morphs"].sum()) == 0 or bool((defense.theta_ >= 0).any())


def test_static_pieces_have_one_shape_and_cut_back_to_the_batch() -> None:
    seen: list[tuple[int, ...]] = []

    def record(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(a.shape))
        return a.sum(1) + b

    a, b = torch.randn(23, 3), torch.randn(23)
    out = static_pieces(record, 8, a, b)
    assert set(seen) == {(8, 3)} and len(seen) == 3
    assert torch.allclose(out, a.sum(1) + b)
    strides: set[tuple[int, ...]] = set()

    def layout(x: torch.Tensor) -> torch.Tensor:
        strides.add(x.stride())
        return x

    images3 = torch.rand(10, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    assert torch.equal(static_pieces(layout, 4, images3), images3)
    assert len(strides) == 1  # the padded piece keeps channels_last: one static input
    assert static_pieces(record, 8, a[:0], b[:0]).shape == (0,)


def test_compiled_morphs_give_the_eager_resistance() -> None:
    clf, vae = ToyClassifier(), ToyVAE()
    x_val, x = images([0.1 * i for i in range(1, 10)]), images([0.45, 0.9, 0.52])
    cfg = FMDefenseConfig(n_morphs=40, rho=0.9, precision="fp32", batch_size=37)
    eager = FMDefense(clf, vae, cfg).fit(x_val).resistance(x)
    compiled = FMDefense(clf, vae, dataclasses.replace(cfg, compile=True)).fit(x_val)
    assert torch.equal(compiled.resistance(x), eager)
    # the frozen compiled code follows an in-place change of the weights
    x4 = images([0.3, 0.6, 0.9])
    before = compiled.engine.morph_labels(x4)
    with torch.no_grad():
        for p in clf.parameters():
            p.neg_()
    after = compiled.engine.morph_labels(x4)
    assert torch.equal(after, clf(x4).argmax(1)) and not torch.equal(after, before)
    with pytest.raises(InputError, match="compile must be true or false"):
        FMDefenseConfig(compile="yes")  # type: ignore[arg-type]
