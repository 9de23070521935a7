"""The SmartFRZ policy: weights files, refusal without trained weights, decisions in the engine."""

import warnings

import pytest
import torch
from torch import nn

from smartfrz_fast import SmartFreezer, SmartFRZ
from smartfrz_fast.history import SAMPLING
from smartfrz_fast.predictor import AttentionPredictor, PredictorConfig, PredictorWeightsError, save_predictor

from models import SmallCNN, batch, train_steps

CONFIG = PredictorConfig(sample_size=16, window=4, hidden=8, embed=4, head_hidden=4)


def predictor_file(path, freeze_logit=0.0):
    torch.manual_seed(0)
    predictor = AttentionPredictor(CONFIG)
    with torch.no_grad():
        predictor.head[-1].bias.copy_(torch.tensor([0.0, freeze_logit]))
    save_predictor(predictor, path, {"purpose": "test"})
    return path


def test_refuses_to_run_without_trained_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("SMARTFRZ_PREDICTOR", str(tmp_path / "absent.pt"))
    with pytest.raises(PredictorWeightsError, match="never runs with untrained weights"):
        SmartFRZ()
    with pytest.raises(PredictorWeightsError, match="no SmartFRZ predictor weights"):
        SmartFreezer(SmallCNN(), torch.optim.SGD(SmallCNN().parameters(), lr=0.1))


def test_corrupt_foreign_and_tampered_files_are_refused(tmp_path):
    good = predictor_file(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(PredictorWeightsError, match="unreadable"):
        SmartFRZ(settle_ratio=None, weights=truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(PredictorWeightsError, match="not a SmartFRZ predictor file"):
        SmartFRZ(settle_ratio=None, weights=foreign)
    blob = torch.load(good, weights_only=True)
    blob["state_dict"]["query.0.weight"] += 1
    tampered = tmp_path / "tampered.pt"
    torch.save(blob, tampered)
    with pytest.raises(PredictorWeightsError, match="content check"):
        SmartFRZ(settle_ratio=None, weights=tampered)
    blob = torch.load(good, weights_only=True)
    blob["config"]["hidden"] = 9
    mismatched = tmp_path / "mismatched.pt"
    torch.save(blob, mismatched)
    with pytest.raises(PredictorWeightsError, match="does not match the predictor architecture"):
        SmartFRZ(settle_ratio=None, weights=mismatched)


def test_window_mismatch_with_engine_is_refused(tmp_path):
    policy = SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt"))
    model = SmallCNN()
    with pytest.raises(ValueError, match="window=4, sample_size=16"):
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), policy, example_inputs=batch(0)[0])


def run(policy, steps=12, sample_every=2):
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0)[0], window=4, sample_size=16,
                           sample_every=sample_every)
    train_steps(model, opt, freezer, steps)
    return freezer


def test_confident_predictor_freezes_after_the_window_fills(tmp_path):
    freezer = run(SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt", freeze_logit=20.0), evaluate_every=2,
                           patience=1))
    # 4 snapshots, one every 2 steps: the window is full at step 8, decided and applied there
    assert [(e.step, e.num_frozen) for e in freezer.timeline] == [(8, 3)]
    assert freezer.history.rows.tolist() == [3]


@pytest.mark.parametrize("patience, step", [(2, 10), (3, 12)])
def test_patience_waits_for_evaluations_in_a_row(tmp_path, patience, step):
    freezer = run(SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt", freeze_logit=20.0), evaluate_every=2,
                           patience=patience))
    assert [(e.step, e.num_frozen) for e in freezer.timeline] == [(step, 3)]


def test_patience_counts_snapshots_not_steps(tmp_path):
    # evaluate_every=1 with a snapshot every 2 steps scored each snapshot twice: patience 3 was
    # met on two snapshots (a freeze at step 10, not 12)
    path = predictor_file(tmp_path / "p.pt", freeze_logit=20.0)
    every_step = run(SmartFRZ(settle_ratio=None, weights=path, evaluate_every=1, patience=3))
    assert [(e.step, e.num_frozen) for e in every_step.timeline] == [(12, 3)]


def scripted_predict(monkeypatch, probabilities):
    """Make ``ops.predict`` return the next row of ``probabilities`` (per active unit) each call."""
    from smartfrz_fast import ops

    script = iter(probabilities)

    def predict(history, cursor, rows, valid, weights, threshold, input_gain=1.0, sort_by_newest=False):
        prob = torch.tensor(next(script), dtype=torch.float32)[: rows.numel()]
        return prob, torch.cumprod((prob >= threshold).long(), 0).sum()

    monkeypatch.setattr(ops, "predict", predict)
    monkeypatch.setattr(SmartFRZ, "score_every_unit", True)  # one call per evaluation, as scripted


def test_a_miss_resets_the_streak_and_the_prefix_waits_for_its_slowest_unit(tmp_path, monkeypatch):
    # evaluations at steps 8, 10, 12, 14, 16 (4 units; the last one, the head, never freezes)
    scripted_predict(monkeypatch, [[0.9, 0.9, 0.1, 0.0], [0.1, 0.9, 0.9, 0.0], [0.9, 0.9, 0.9, 0.0],
                                   [0.9, 0.9, 0.9, 0.0], [0.9, 0.9, 0.9, 0.0]])
    policy = SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt"), evaluate_every=2, patience=2)
    freezer = run(policy, steps=17)
    # unit 0: hit, miss, hit, hit -> ready at step 14; unit 1 ready at 10; unit 2 at 12 (streak 2)
    assert [(e.step, e.num_frozen) for e in freezer.timeline] == [(14, 3)]


def test_streaks_survive_a_checkpoint(tmp_path, monkeypatch):
    rows = [[0.9, 0.9, 0.9, 0.0]] * 6
    path = predictor_file(tmp_path / "p.pt")
    scripted_predict(monkeypatch, rows)
    straight = run(SmartFRZ(settle_ratio=None, weights=path, evaluate_every=2, patience=3), steps=13)
    scripted_predict(monkeypatch, rows)
    first = run(SmartFRZ(settle_ratio=None, weights=path, evaluate_every=2, patience=3), steps=11)  # evaluated at 8 and 10
    assert first.num_frozen == 0 and first.policy.state_dict()["streak"].tolist()[:3] == [2, 2, 2]
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    resumed = SmartFreezer(model, opt, SmartFRZ(settle_ratio=None, weights=path, evaluate_every=2, patience=3),
                           example_inputs=batch(0)[0], window=4, sample_size=16, sample_every=2)
    resumed.load_state_dict(first.state_dict())
    for step in range(resumed.step_count, 13):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        resumed.step()
    assert [(e.step, e.num_frozen) for e in resumed.timeline] == [(e.step, e.num_frozen) for e in straight.timeline] \
        == [(12, 3)]


def test_a_resume_with_other_predictor_weights_warns(tmp_path):
    """Another weights file at resume (weights=, $SMARTFRZ_PREDICTOR, a release that ships new
    weights) went unnoticed: the resumed run froze nothing where the saved one froze (review43)."""
    saved = run(SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "a.pt")), steps=9)
    state = saved.state_dict()
    for weights, warns in ((tmp_path / "a.pt", False), (predictor_file(tmp_path / "b.pt", freeze_logit=20.0), True)):
        model = SmallCNN()
        resumed = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.05),
                               SmartFRZ(settle_ratio=None, weights=weights), example_inputs=batch(0)[0], window=4,
                               sample_size=16, sample_every=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed.load_state_dict(state)
        assert any("other predictor weights" in str(w.message) for w in caught) == warns, caught


def test_doubtful_predictor_never_freezes(tmp_path):
    freezer = run(SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt", freeze_logit=-20.0), evaluate_every=2))
    assert freezer.num_frozen == 0 and freezer.timeline == []
    prob = freezer.policy.last_probabilities
    assert prob[0] < 0.01 and prob[1:].isnan().all()  # the prefix ends at the first unit: nothing after it scored


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5])
def test_bad_threshold(tmp_path, threshold):
    with pytest.raises(ValueError, match="threshold"):
        SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt"), threshold=threshold)


@pytest.mark.parametrize("patience", [0, -1, 1.5, True])
def test_bad_patience(tmp_path, patience):
    with pytest.raises(ValueError, match="patience"):
        SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt"), patience=patience)


def test_resumed_policy_does_not_score_the_same_snapshot_again(tmp_path):
    """With sample_every > 1, SmartFRZ scores each snapshot once; that survives a checkpoint."""
    path = predictor_file(tmp_path / "p.pt", freeze_logit=-20.0)  # never freezes: only the pace

    def run(steps, state=None):
        torch.manual_seed(0)
        model = SmallCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        policy = SmartFRZ(settle_ratio=None, weights=path)
        freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0)[0], total_steps=40,
                               sample_every=3, window=4, sample_size=16)
        if state is not None:
            freezer.load_state_dict(state)
        scored = []
        for step in range(freezer.step_count, steps):
            policy.last_probabilities = None
            freezer.step()
            scored.append(policy.last_probabilities is not None)
        return freezer, scored

    _, straight = run(20)
    first, _ = run(13)  # step 13: the snapshot of step 12 was scored at step 12
    _, resumed = run(20, first.state_dict())
    assert any(straight) and resumed == straight[13:]


def test_nothing_is_scored_once_the_prefix_is_as_long_as_it_may_be(tmp_path):
    # the predictor went on scoring every unit after the last one it may freeze, all run (4.2 ms
    # of a 6.6 ms step on a small fine-tuned transformer, whose attention stop was reached)
    class StemThenAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 16))
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.layer(self.stem(x)).mean(1))

    path = predictor_file(tmp_path / "p.pt", freeze_logit=-20.0)
    model = StemThenAttention()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    policy = SmartFRZ(settle_ratio=None, min_progress=0.0, weights=path)
    freezer = SmartFreezer(model, opt, policy, example_inputs=torch.randn(2, 5, 8), total_steps=40, sample_every=1,
                           window=4, sample_size=16)
    assert policy.attention_stop == 2 < policy.context.max_frozen  # the stem's two layers may freeze
    scored = []
    for step in range(12):
        if step == 6:
            freezer.freeze_to(policy.attention_stop)
        policy.last_probabilities = None
        freezer.step()
        scored.append(policy.last_probabilities is not None)
    assert any(scored[:6]) and not any(scored[6:])



class StemThenAttention(nn.Module):
    """Three plain units, then attention (SmartFRZ stops before it by default), then a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16))
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer(self.stem(x)).mean(1))


class ScoresEveryActiveUnit(SmartFRZ):
    """SmartFRZ as it was: the predictor scores every active unit, the prefix is cut after."""

    def _scored_rows(self):
        return self.context.history.rows


def _scored_run(model, policy, example):
    """60 SGD steps under ``policy`` (a snapshot every step, windows of 4 x 16 weights): the
    freeze timeline, and each evaluation's (scored rows, probabilities)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy, example_inputs=example, total_steps=60, sample_every=1, window=4,
                           sample_size=16)
    scored = []
    for step in range(60):
        if isinstance(model, StemThenAttention):
            loss = model(torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(step))).square().mean()
        else:
            xb, yb = batch(step)
            loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        policy.last_probabilities = None
        freezer.step()
        if policy.last_probabilities is not None:
            scored.append((policy.last_rows.tolist(), policy.last_probabilities.clone()))
    return freezer.timeline, scored


@pytest.mark.parametrize("settings", [dict(settle_ratio=1.0), dict(settle_ratio=None), dict(patience=2, smoothing=3, settle_ratio=1.0)])
@pytest.mark.parametrize("make_model", [StemThenAttention, SmallCNN])
def test_only_the_units_it_may_freeze_are_scored_and_nothing_else_changes(tmp_path, settings, make_model):
    # the units after the last one it may freeze (attention layers, the kept head) were scored
    # too; the predictor reads each unit's window alone, so they changed no decision
    path = predictor_file(tmp_path / "p.pt", freeze_logit=1.0)
    runs = []
    for cls in (SmartFRZ, ScoresEveryActiveUnit):
        torch.manual_seed(0)
        model = make_model()
        policy = cls(weights=path, min_progress=0.2, threshold=0.6, **settings)
        x = torch.randn(4, 5, 8) if make_model is StemThenAttention else batch(0)[0]
        runs.append((*_scored_run(model, policy, x), policy))
    (timeline, scored, policy), (old_timeline, old_scored, _) = runs
    assert timeline == old_timeline and timeline  # the same freezes, at the same steps
    limit = policy.attention_stop if make_model is StemThenAttention else policy.context.max_frozen
    assert len(scored) == len(old_scored) > 0
    for (rows, prob), (old_rows, old_prob) in zip(scored, old_scored):
        assert rows == list(range(rows[0], limit)) and old_rows[-1] == len(policy.context.units) - 1
        torch.testing.assert_close(prob, old_prob[:len(rows)])


def test_a_model_that_can_freeze_nothing_is_neither_scored_nor_snapshotted(tmp_path, monkeypatch):
    # an encoder whose units before its first attention layer are embeddings, and a model whose
    # kept head holds nearly all the FLOPs: SmartFRZ said it would freeze nothing, then scored
    # every unit at every snapshot all run (15 ms of a 22 ms step on a 6-layer encoder)
    from smartfrz_fast import ops

    from test_attention_units import Encoder, tokens

    calls = []
    predict = ops.predict
    monkeypatch.setattr(ops, "predict", lambda *a, **k: calls.append(1) or predict(*a, **k))

    class BigHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 4096)

        def forward(self, x):
            return self.head(self.body(x))

    path = predictor_file(tmp_path / "p.pt", freeze_logit=20.0)
    for model, x, said in ((Encoder(), tokens(), r"it stops before .*'layers.0.self_attn'.*0.0% of the FLOPs"),
                           (BigHead(), torch.randn(2, 4), r"the 1 unit\(s\) it may freeze .* hold 0.1% of the FLOPs "
                                                          r".*min_flops_share=0.02.*min_flops_share=0")):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with pytest.warns(UserWarning, match="SmartFRZ will freeze nothing on this model: " + said):
            freezer = SmartFreezer(model, opt, SmartFRZ(weights=path, min_progress=0.0), example_inputs=x,
                                   total_steps=40, sample_every=1, window=4, sample_size=16)
        for _ in range(12):
            model(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
        assert calls == [] and freezer.history.count == 0 and freezer.num_frozen == 0
    # with min_flops_share=0 the big-headed model's body may freeze, and does
    model = BigHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, SmartFRZ(weights=path, min_progress=0.0, settle_ratio=None, min_flops_share=0.0),
                           example_inputs=torch.randn(2, 4), total_steps=40, sample_every=1, window=4, sample_size=16)
    for _ in range(6):
        model(torch.randn(2, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert calls and freezer.num_frozen == 1



@pytest.mark.parametrize("min_flops_share", [0.02, 0.0])
def test_a_model_with_nothing_it_may_freeze_builds_with_the_engines_warning_alone(tmp_path, min_flops_share):
    # keep_trainable covering every unit (linear probing): the "freeze nothing" warning blamed
    # min_flops_share, and SmartFRZ(min_flops_share=0), as it advised, raised TypeError
    model = SmallCNN()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               SmartFRZ(weights=predictor_file(tmp_path / "p.pt"), min_flops_share=min_flops_share),
                               example_inputs=batch(0)[0], total_steps=100, keep_trainable=4, window=4, sample_size=16)
    said = [str(w.message) for w in caught]
    assert freezer.max_frozen == 0 and any("keep_trainable=4 keeps all 4" in m for m in said)
    assert not any("SmartFRZ will freeze nothing" in m for m in said)


def test_without_total_steps_it_warns_and_says_what_to_pass(tmp_path):
    path = predictor_file(tmp_path / "p.pt")
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(UserWarning, match=r"no total_steps.*Pass total_steps="):
        freezer = SmartFreezer(model, opt, SmartFRZ(settle_ratio=None, weights=path), example_inputs=batch(0)[0], window=4,
                               sample_size=16)
    assert freezer.sample_every == 1 and freezer.policy.first_decision_step == 0
    import warnings

    for kwargs in ({"total_steps": 300}, {"sample_every": 3}):  # paced: nothing to warn about
        model = SmallCNN()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.05), SmartFRZ(settle_ratio=None, weights=path),
                         example_inputs=batch(0)[0], window=4, sample_size=16, **kwargs)


@pytest.mark.parametrize("total", [40, 97, 239, 300])
def test_first_decision_comes_at_a_quarter_of_the_run_or_later(tmp_path, total):
    """total_steps // 120 rounds down (300 steps: a snapshot every 2, the window of 30 full at
    step 60, 20 %): the guard holds the first decision back to ceil(total / 4) exactly."""
    policy = SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt", freeze_logit=20.0))
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0)[0], window=4, sample_size=16,
                           total_steps=total)
    every = max(1, total // 120)
    quarter = -(-total // 4)
    expected = next(s for s in range(quarter, total + 1) if s % every == 0)  # the first snapshot there
    train_steps(model, opt, freezer, expected + 2)
    assert policy.first_decision_step == quarter
    assert [(e.step, e.num_frozen) for e in freezer.timeline] == [(expected, 3)]
    assert 4 * freezer.timeline[0].step >= total


def test_min_progress_zero_decides_when_the_window_fills(tmp_path):
    policy = SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt", freeze_logit=20.0), min_progress=0.0)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0)[0], window=4, sample_size=16,
                           total_steps=300)  # a snapshot every 2 steps: the window is full at step 8
    train_steps(model, opt, freezer, 10)
    assert [(e.step, e.num_frozen) for e in freezer.timeline] == [(8, 3)]


def test_smoothing_ignores_a_probability_that_flips_around_the_threshold(tmp_path, monkeypatch):
    # evaluations at steps 8, 10, ..., 24; unit 0 flips 0.7 / 0.4 (mean 0.55 but noisy), unit 1
    # and 2 are confidently freezable from the start
    flips = [[0.7 if i % 2 == 0 else 0.4, 0.95, 0.95, 0.0] for i in range(9)]
    scripted_predict(monkeypatch, flips)
    raw = run(SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt"), evaluate_every=2), steps=25)
    assert [(e.step, e.num_frozen) for e in raw.timeline] == [(8, 3)]  # the first 0.7 froze everything
    scripted_predict(monkeypatch, flips)
    smooth = run(SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt"), evaluate_every=2, smoothing=5), steps=25)
    # alpha = 1/3 from 0: unit 0's average climbs 0.23, 0.29, 0.43, 0.42, 0.51 -> frozen at step 16
    assert [(e.step, e.num_frozen) for e in smooth.timeline] == [(16, 3)]
    assert smooth.policy.last_smoothed is not None


def test_smoothing_lets_a_steady_probability_through_and_survives_a_checkpoint(tmp_path, monkeypatch):
    rows = [[0.95, 0.95, 0.95, 0.0]] * 6  # average 0.32 after one evaluation, 0.53 after two
    path = predictor_file(tmp_path / "p.pt")
    scripted_predict(monkeypatch, rows)
    straight = run(SmartFRZ(settle_ratio=None, weights=path, evaluate_every=2, smoothing=5), steps=13)
    assert [(e.step, e.num_frozen) for e in straight.timeline] == [(10, 3)]
    scripted_predict(monkeypatch, rows)
    first = run(SmartFRZ(settle_ratio=None, weights=path, evaluate_every=2, smoothing=5), steps=9)  # evaluated at 8
    saved = first.state_dict()
    assert saved["policy_state"]["average"][:3].tolist() == pytest.approx([0.95 / 3] * 3)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    resumed = SmartFreezer(model, opt, SmartFRZ(settle_ratio=None, weights=path, evaluate_every=2, smoothing=5),
                           example_inputs=batch(0)[0], window=4, sample_size=16, sample_every=2)
    resumed.load_state_dict(saved)
    train_steps(model, opt, resumed, 13 - resumed.step_count, start=resumed.step_count)
    assert [(e.step, e.num_frozen) for e in resumed.timeline] == [(10, 3)]


@pytest.mark.parametrize("kwargs", [{"smoothing": 0}, {"smoothing": 2.5}, {"smoothing": True},
                                    {"min_progress": 1.0}, {"min_progress": -0.1}, {"min_progress": "a"}])
def test_bad_smoothing_and_min_progress(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt"), **kwargs)


def _moving_run(policy, speed, steps=40):
    """A model whose weights are moved by hand: unit i drifts by ``speed(i, step)`` times a fixed
    direction each step (the optimizer steps on zero gradients, so that the freezer sees the
    units train), so that each window's movement is known."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(3, 4)
    freezer = SmartFreezer(model, opt, policy, example_inputs=x, window=4, sample_size=16, sample_every=1,
                           total_steps=steps)
    directions = [torch.randn_like(layer.weight) for layer in model]
    for step in range(steps):
        model(x).sum().backward()
        opt.zero_grad(set_to_none=False)
        opt.step()
        with torch.no_grad():
            for i, layer in enumerate(model):
                if layer.weight.requires_grad:
                    layer.weight.add_(speed(i, step) * directions[i])
        freezer.step()
    return freezer


def test_settle_ratio_holds_a_unit_that_keeps_moving_as_at_its_start(tmp_path):
    """A confident predictor freezes every unit; with settle_ratio a unit still moving as far
    per window as in its first window (a fine-tuned weight drifting steadily) is held back,
    and front to back, so is everything after it; units whose movement died down freeze."""
    path = predictor_file(tmp_path / "p.pt", freeze_logit=20.0)
    steady = lambda i, step: 1e-3  # noqa: E731
    settling = lambda i, step: 1e-3 * 0.7 ** step  # noqa: E731
    first_steady = lambda i, step: steady(i, step) if i == 0 else settling(i, step)  # noqa: E731
    assert run_frozen(SmartFRZ(settle_ratio=None, weights=path), steady) == 2
    assert run_frozen(SmartFRZ(weights=path, settle_ratio=0.5), steady) == 0
    assert run_frozen(SmartFRZ(weights=path, settle_ratio=0.5), first_steady) == 0
    assert run_frozen(SmartFRZ(weights=path, settle_ratio=0.5), settling) == 2


def test_settle_ratio_compares_with_the_first_window_that_starts_moving(tmp_path):
    """A unit that did not move at first (the user's code held it frozen) compares with the
    first window that starts with it moving: its first window's movement of 0, or of the few
    steps since the hold, held it back for good (review38). One that never moves (no gradient
    reaches it; an lr of 0 is a hold, test_misuse.py) is settled: with every window's reference taken from whole windows only, nothing after it
    froze (review39)."""
    path = predictor_file(tmp_path / "p.pt", freeze_logit=20.0)
    held_then_settling = lambda i, step: 0.0 if step < 6 else 1e-3 * 0.7 ** (step - 6)  # noqa: E731
    held_then_steady = lambda i, step: 0.0 if step < 6 else 1e-3  # noqa: E731
    assert run_frozen(SmartFRZ(weights=path, settle_ratio=0.5), held_then_settling) == 2
    assert run_frozen(SmartFRZ(weights=path, settle_ratio=0.5), held_then_steady) == 0
    # the reference is a whole window of movement, as without the hold
    held, steady = SmartFRZ(weights=path, settle_ratio=0.5), SmartFRZ(weights=path, settle_ratio=0.5)
    _moving_run(held, held_then_steady)
    _moving_run(steady, lambda i, step: 1e-3)
    torch.testing.assert_close(held.state_dict()["first_move"], steady.state_dict()["first_move"], equal_nan=True)
    # the first unit never moves: it and the rest settle as they would
    first_still = lambda i, step: 0.0 if i == 0 else 1e-3 * 0.7 ** step  # noqa: E731
    assert run_frozen(SmartFRZ(weights=path, settle_ratio=0.5), first_still) == 2


def run_frozen(policy, speed):
    freezer = _moving_run(policy, speed)
    assert "settle_ratio" in policy.describe()
    return freezer.num_frozen


def test_settle_ratio_state_survives_a_checkpoint_and_is_checked(tmp_path):
    path = predictor_file(tmp_path / "p.pt", freeze_logit=20.0)
    policy = SmartFRZ(weights=path, settle_ratio=0.5)
    _moving_run(policy, lambda i, step: 1e-3, steps=12)
    state = policy.state_dict()
    first = state["first_move"]
    assert first.shape == (3,) and bool((first[:2] > 0).all())  # recorded at the first full window
    assert first[2].isnan()  # the kept head is never scored
    again = SmartFRZ(weights=path, settle_ratio=0.5)
    again.load_state_dict(state)
    torch.testing.assert_close(again.state_dict()["first_move"], first, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="first_move"):
        again.load_state_dict({**state, "first_move": torch.full((3,), -1.0)})


@pytest.mark.parametrize("ratio", [0.0, 1.5, -1, True, "a"])
def test_bad_settle_ratio(tmp_path, ratio):
    with pytest.raises(ValueError, match="settle_ratio"):
        SmartFRZ(weights=predictor_file(tmp_path / "p.pt"), settle_ratio=ratio)


def test_settle_ratio_is_on_by_default():
    """Measured in use (docs/predictor.md, "Settling"): 0.5 by default."""
    assert SmartFRZ().settle_ratio == 0.5
    assert SmartFRZ(settle_ratio=None).settle_ratio is None


@pytest.mark.parametrize("min_share, timeline", [(0.0, [(8, 1), (12, 2)]), (0.1, [(12, 2)])])
def test_a_prefix_of_little_compute_waits_for_the_units_after_it(tmp_path, monkeypatch, min_share, timeline):
    # the first conv (1 input channel) holds a few % of SmallCNN's FLOPs, the first two over half
    from smartfrz_fast import ops

    script = iter([[0.9, 0.1, 0.1, 0.1], [0.9, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]] + [[0.9, 0.9, 0.1, 0.1]] * 9)

    def predict(history, cursor, rows, valid, weights, threshold, input_gain=1.0, sort_by_newest=False):
        prob = torch.tensor(next(script))[rows]  # per unit, whichever units are still active
        return prob, torch.cumprod((prob >= threshold).long(), 0).sum()

    monkeypatch.setattr(ops, "predict", predict)
    monkeypatch.setattr(SmartFRZ, "score_every_unit", True)  # one call per evaluation, as scripted
    freezer = run(SmartFRZ(settle_ratio=None, min_flops_share=min_share, weights=predictor_file(tmp_path / "p.pt"),
                           evaluate_every=2), steps=13)
    flops = [u.forward_flops for u in freezer.units]
    assert flops[0] / sum(flops) < 0.1 <= sum(flops[:2]) / sum(flops)
    assert [(e.step, e.num_frozen) for e in freezer.timeline] == timeline
    assert "min_flops_share" in freezer.policy.describe()


def test_min_flops_share_counts_only_what_can_freeze(tmp_path, monkeypatch):
    # every unit ready at once, the kept head included: the share was looked up for all units
    # (1.0), so a prefix the engine then cut to max_frozen passed whatever its own share
    from smartfrz_fast import ops

    def predict(history, cursor, rows, valid, weights, threshold, input_gain=1.0, sort_by_newest=False):
        prob = torch.full((rows.numel(),), 0.9)
        return prob, torch.cumprod((prob >= threshold).long(), 0).sum()

    monkeypatch.setattr(ops, "predict", predict)
    freezer = run(SmartFRZ(settle_ratio=None, min_flops_share=0.999, weights=predictor_file(tmp_path / "p.pt"),
                           evaluate_every=2), steps=13)
    flops = [u.forward_flops for u in freezer.units]
    assert sum(flops[:-1]) / sum(flops) < 0.999
    assert freezer.timeline == []


@pytest.mark.parametrize("share", [-0.1, 1.0, True, "a"])
def test_bad_min_flops_share(tmp_path, share):
    with pytest.raises(ValueError, match="min_flops_share"):
        SmartFRZ(weights=predictor_file(tmp_path / "p.pt"), min_flops_share=share)


def test_weights_trained_on_another_history_sampling_warn(tmp_path):
    torch.manual_seed(0)
    save_predictor(AttentionPredictor(CONFIG), tmp_path / "other.pt", {"history_sampling": "weight-tensors"})
    with pytest.warns(UserWarning, match=f"sampled as 'weight-tensors'; the engine samples '{SAMPLING}'.*Retrain"):
        SmartFRZ(weights=tmp_path / "other.pt")
    with warnings.catch_warnings():  # a file that says nothing predates the field: the sampling of then
        warnings.simplefilter("error")
        SmartFRZ(weights=predictor_file(tmp_path / "unsaid.pt"))
        save_predictor(AttentionPredictor(CONFIG), tmp_path / "now.pt", {"history_sampling": SAMPLING})
        SmartFRZ(weights=tmp_path / "now.pt")


class _WithPReLUs(nn.Module):
    """Layers of one weight (PReLU slopes) between convolutions: units the predictor cannot read."""

    def __init__(self):
        super().__init__()
        self.act0 = nn.PReLU()
        self.conv1, self.act1 = nn.Conv2d(1, 8, 3, padding=1), nn.PReLU()
        self.conv2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.PReLU()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(self.act0(x)))))
        return self.head(x.mean((2, 3)))


def _prelu_run(policy, steps=12, **history):
    torch.manual_seed(0)
    model = _WithPReLUs()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0)[0],
                           **(history or {"window": 4, "sample_size": 16, "sample_every": 2}))
    train_steps(model, opt, freezer, steps)
    return freezer


def test_a_unit_too_small_to_read_takes_the_vote_of_its_neighbour(tmp_path, monkeypatch):
    """A PReLU's one weight reads as zeros (each snapshot is standardised over the unit): the
    shipped weights said 0.52 at every evaluation whatever it did, and a threshold above that
    stopped every prefix there (review38). It votes as the unit before it now (the first unit,
    as the one after it)."""
    # units: act0 (1 weight), conv1, act1, conv2, act2, head
    scripted_predict(monkeypatch, [[0.3, 0.9, 0.3, 0.9, 0.3, 0.0]] * 4)
    freezer = _prelu_run(SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt"), evaluate_every=2,
                                  min_flops_share=0.0, threshold=0.5))
    assert [u.name for u in freezer.units] == ["act0", "conv1", "act1", "conv2", "act2", "head"]
    assert freezer.num_frozen == 5  # before: 0 (act0's 0.3 stopped it)
    assert freezer.policy.last_probabilities.tolist() == pytest.approx([0.9] * 5)
    # the real predictor: the slopes vote as their convolutions
    policy = SmartFRZ(settle_ratio=None, min_flops_share=0.0, min_progress=0.0, threshold=0.99)
    monkeypatch.undo()
    policy.score_every_unit = True
    _prelu_run(policy, steps=31, sample_every=1)
    prob = policy.last_probabilities.tolist()
    assert prob[0] == prob[1] and prob[2] == prob[1] and prob[4] == prob[3]


def test_a_backbone_held_at_a_learning_rate_of_0_trains_once_released(tmp_path):
    """A warm-up of the head with the backbone's parameter group at lr 0: its weights stand still,
    which the predictor and the settle check read as done. SmartFRZ froze it for good at its first
    decision (step 8), so it never trained after the warm-up. Now a learning rate of 0 holds the
    unit as requires_grad=False does: no freeze until it has trained for a window."""
    policy = SmartFRZ(settle_ratio=None, weights=predictor_file(tmp_path / "p.pt", freeze_logit=20.0),
                      min_progress=0.0)
    model = SmallCNN()
    backbone = list(model.conv1.parameters()) + list(model.bn1.parameters())  # the first unit
    opt = torch.optim.SGD([{"params": backbone, "lr": 0.0}, {"params": list(model.parameters())[4:]}], lr=0.05)
    freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0)[0], window=4, sample_size=16,
                           total_steps=300)  # a snapshot every 2 steps: a window is 8 steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(model, opt, freezer, 20)
    assert freezer.num_frozen == 0, freezer.report()
    assert any("learning rate of 0" in str(w.message) for w in caught)
    released = backbone[0].detach().clone()
    opt.param_groups[0]["lr"] = 0.05
    train_steps(model, opt, freezer, 40, start=20)
    assert not torch.equal(backbone[0], released)
    assert freezer.timeline and freezer.timeline[0].step >= 28, freezer.report()


def test_report_says_when_nothing_may_freeze_or_the_prefix_is_as_long_as_it_may_grow(tmp_path):
    # a run that could never freeze (its freezable units held under min_flops_share) reported "its
    # window holds 0 of the 30 snapshots" and pointed at sample_every; one frozen as far as it may
    # reported its next unit "scored at most 0.00", a score never taken (review99)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.warns(UserWarning, match="SmartFRZ will freeze nothing"):
        freezer = SmartFreezer(model, opt, SmartFRZ(min_flops_share=0.999), example_inputs=batch(0)[0],
                               total_steps=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_steps(model, opt, freezer, 12)
    said = freezer.report()
    assert "SmartFRZ freezes nothing on this model: the " in said and "min_flops_share=0.999" in said, said
    assert "evaluated nothing yet" not in said

    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    policy = SmartFRZ(min_progress=0.0, min_flops_share=0.0, settle_ratio=None,
                      weights=predictor_file(tmp_path / "p.pt", freeze_logit=20.0))
    freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0)[0], window=4, sample_size=16,
                           sample_every=1, total_steps=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_steps(model, opt, freezer, 12)
    assert freezer.num_frozen == len(freezer.units) - 1
    line = next(line for line in freezer.report().splitlines() if line.startswith("SmartFRZ: "))
    assert f"the frozen prefix ({freezer.num_frozen} unit(s)) is as long as SmartFRZ lets it grow" in line, line
    assert "kept trainable" in line and "scored at most" not in line
    model = SmallCNN()  # every unit frozen by hand (keep_trainable=0): report() raised IndexError (review100)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, SmartFRZ(min_flops_share=0.0), example_inputs=batch(0)[0], keep_trainable=0,
                           total_steps=40)
    freezer.freeze_to(len(freezer.units))
    assert "every unit is frozen" in freezer.report()


@pytest.mark.parametrize("freeze_logit, settle_ratio, says", [
    (-20.0, None, r"the next unit, 'conv1\+bn1', scored at most 0\.00 in the evaluations that scored it \(threshold 0\.5\)$"),
    (20.0, 1e-9, r"scored at most 1\.00 in the evaluations that scored it \(threshold 0\.5\), but never while settled \(settle_ratio=1e-09"),
])
def test_report_says_why_nothing_froze(tmp_path, freeze_logit, settle_ratio, says):
    """A run that froze nothing reported "(nothing frozen yet)" and no reason: whether the
    predictor ran, what it scored against the threshold, or what held it back (review88)."""
    import re

    policy = SmartFRZ(settle_ratio=settle_ratio, min_progress=0.0, min_flops_share=0.0,
                      weights=predictor_file(tmp_path / "p.pt", freeze_logit=freeze_logit))
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0)[0], window=4, sample_size=16,
                           sample_every=1, total_steps=40)
    assert "evaluated nothing yet since the freezer was built or resumed: its window holds 0 of the 4" in freezer.report()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_steps(model, opt, freezer, 12)
    assert freezer.num_frozen == 0
    line = next(line for line in freezer.report().splitlines() if line.startswith("SmartFRZ: "))
    assert re.search(says, line), line


def _deep_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), *[m for _ in range(5) for m in (nn.ReLU(), nn.Linear(32, 32))],
                         nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize("settings", [dict(settle_ratio=1.0), dict(settle_ratio=0.5), dict(settle_ratio=None)])
@pytest.mark.parametrize("make_model", [_deep_mlp, SmallCNN, _WithPReLUs])
def test_on_the_cpu_units_are_scored_only_as_far_as_the_prefix_goes(tmp_path, monkeypatch, settings, make_model):
    # review104: on the CPU each unit scored costs about 0.75 ms, every unit was scored at every
    # evaluation, and a 6-layer MLP with 4 ms steps ran 2.2x as long as without SmartFRZ. The
    # prefix ends at the first unit below the threshold or not settled: the units after it are
    # not scored (NaN), and the freezes are those of scoring every unit. The op here answers a
    # probability drawn from each unit's window, so that prefixes of every length come up
    from smartfrz_fast import ops

    scored_units, threshold = [], 0.75

    def predict(history, cursor, rows, valid, weights, threshold, input_gain=1.0, sort_by_newest=False):
        scored_units.append(rows.numel())
        prob = torch.stack([torch.rand((), generator=torch.Generator().manual_seed(
            int(history[r].double().abs().sum() * 1e6) % 2 ** 31)) for r in rows.tolist()])
        return prob, torch.cumprod((prob >= threshold).long(), 0).sum()

    monkeypatch.setattr(ops, "predict", predict)
    runs = []
    for every_unit in (False, True):
        torch.manual_seed(0)
        model = make_model()
        policy = SmartFRZ(weights=predictor_file(tmp_path / "p.pt"), min_progress=0.2, threshold=threshold,
                          min_flops_share=0.0, **settings)
        policy.score_every_unit = every_unit
        scored_units[:] = []
        timeline, scored = _scored_run(model, policy, batch(0)[0])
        runs.append((timeline, [prob for _, prob in scored], sum(scored_units)))
    (timeline, scored, units), (all_timeline, all_scored, all_units) = runs
    assert timeline == all_timeline  # the same freezes, at the same steps
    assert timeline or settings["settle_ratio"] == 0.5  # (which holds some models back all run)
    assert len(scored) == len(all_scored) > 0 and units < all_units
    stopped = 0
    for prob, every in zip(scored, all_scored):
        known = ~prob.isnan()
        assert not every.isnan().any() and known[0]  # the first unit always scored
        torch.testing.assert_close(prob[known], every[known], rtol=0, atol=0)
        stopped += not known.all()
    assert stopped > 0
