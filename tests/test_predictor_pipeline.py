"""The SmartFRZ predictor's offline pipeline: CKA, labels, all-window scoring, quick end-to-end
run, the shipped weights and the pace SmartFRZ asks the engine for."""

import json
import subprocess
import sys
import time

import pytest
import torch

from smartfrz_fast import SmartFreezer, SmartFRZ
from smartfrz_fast.history import SAMPLING
from smartfrz_fast.ops.reference import amplify_deviation, predict_ref, sort_by_newest
from smartfrz_fast.policy.smartfrz import SNAPSHOTS_PER_RUN, snapshot_interval
from smartfrz_fast.predictor import DEFAULT_WEIGHTS, AttentionPredictor, PredictorConfig, load_predictor, save_predictor
from smartfrz_fast.lab.cka import centered_gram, cka_from_grams, linear_cka
from smartfrz_fast.lab.labels import LabelSchedule, freeze_index
from smartfrz_fast.lab.scoring import window_logits

from models import SmallCNN, batch, train_steps


def test_linear_cka_properties(fresh_seed):
    x = torch.randn(57, 13, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(13, 13, dtype=torch.float64))
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-6)
    # invariant to rotation, isotropic scale and a shift of the features
    assert float(linear_cka(x, 3.0 * x @ q + 5.0)) == pytest.approx(1.0, abs=1e-5)
    y = torch.randn(57, 7, dtype=torch.float64)
    # the Gram form equals the feature form ||Y^T X||^2 / (||X^T X|| ||Y^T Y||) on centred data
    xc, yc = x - x.mean(0), y - y.mean(0)
    direct = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert float(linear_cka(x, y)) == pytest.approx(float(direct), rel=1e-4)
    assert 0.0 <= float(linear_cka(x, y)) < 1.0
    zero = centered_gram(torch.ones(57, 3))
    assert float(cka_from_grams(zero, centered_gram(x))) == 0.0  # constant representation
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(x, y[:5])


def test_freeze_index_needs_the_similarity_to_stay_above_threshold():
    cka = torch.tensor([[0.5, 0.995, 0.98, 0.995, 0.999, 1.0],  # dips after first reaching it
                        [0.999, 0.999, 0.999, 0.999, 0.999, 1.0],  # freezable from the start
                        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])  # never (the last snapshot is not >= .99)
    assert freeze_index(cka, 0.99).tolist() == [3, 0, 6]
    assert freeze_index(cka, 0.97).tolist() == [1, 0, 6]


def test_training_windows_equal_what_smartfrz_computes_in_use(fresh_seed):
    """The pipeline's window scoring == SmartFRZ's path: sort by and amplify around the newest
    slot of the ring buffer, then the ``smartfrz::predict`` reference (odd sizes, masked units)."""
    config = PredictorConfig(sample_size=37, window=5, hidden=11, embed=6, head_hidden=5)
    model = AttentionPredictor(config)
    raw = torch.randn(3, 13, 37).cumsum(1)  # weights drifting over 13 snapshots
    valid = torch.tensor([37, 20, 5])
    raw[1, :, 20:] = 0.0  # masked positions hold 0, as the engine's history does
    raw[2, :, 5:] = 0.0
    ends = torch.tensor([4, 9, 12])
    fast = torch.softmax(window_logits(model, raw, valid, ends, gain=7.0), -1)[..., 1]
    for j, end in enumerate(ends.tolist()):
        ring = raw[:, end - 4:end + 1].clone()  # slot 0 oldest ...
        cursor = torch.tensor(5)  # ... so the newest sits in slot (cursor - 1) % T
        newest = ring.index_select(1, (cursor - 1) % 5)
        ring = sort_by_newest(ring, newest, valid)
        newest = ring.index_select(1, (cursor - 1) % 5)
        prob, _ = predict_ref(amplify_deviation(ring, newest, 7.0), cursor, torch.arange(3), valid,
                              model.flat_weights(), 0.5)
        torch.testing.assert_close(fast[:, j], prob, rtol=1e-5, atol=1e-6)


def test_sort_by_newest_orders_valid_positions_and_keeps_masked_last():
    h = torch.randn(2, 4, 6)
    h[1, :, 3:] = 0.0
    out = sort_by_newest(h, h[:, -1:], torch.tensor([6, 3]))
    assert torch.all(out[:, -1, 1:3] >= out[:, -1, 0:2])  # newest ascending over valid ones
    assert torch.all(out[0, -1].diff() >= 0)
    assert torch.equal(out[1, :, 3:], torch.zeros(4, 3))
    # every snapshot moved by the same permutation
    perm = torch.argsort(h[0, -1])
    assert torch.equal(out[0], h[0][:, perm])


def test_amplify_deviation_keeps_the_newest_and_is_scale_free():
    h = torch.randn(2, 6, 16)
    newest = h[:, -1:]
    out = amplify_deviation(h, newest, 10.0)
    torch.testing.assert_close(out[:, -1], h[:, -1])
    torch.testing.assert_close(amplify_deviation(3.0 * h, 3.0 * newest, 10.0), 3.0 * out)


def test_smartfrz_sets_the_engines_snapshot_pace(tmp_path):
    assert snapshot_interval(1200) == 1200 // SNAPSHOTS_PER_RUN
    assert snapshot_interval(50) == 1
    assert SmartFRZ.sample_every_for(None) == 1
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, SmartFRZ(), example_inputs=batch(0)[0], total_steps=2400)
    assert freezer.sample_every == 20
    explicit = SmartFreezer(SmallCNN(), torch.optim.SGD(SmallCNN().parameters(), lr=0.1), SmartFRZ(),
                            total_steps=2400, sample_every=3)
    assert explicit.sample_every == 3


def test_shipped_weights_load_by_default_with_provenance():
    assert DEFAULT_WEIGHTS.exists(), "the package ships trained predictor weights"
    predictor = load_predictor()
    prov = predictor.provenance
    for key in ("data", "label_rule", "label_threshold", "commit", "metrics"):
        assert key in prov, key
    assert prov["quick"] is False
    assert set(prov["data"]["held_out_families"]).isdisjoint(prov["data"]["train_families"])
    policy = SmartFRZ()  # default weights, no error
    assert policy.predictor.config == PredictorConfig()


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path):
    out = tmp_path / "predictor.pt"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "smartfrz_fast.lab.train", "--quick", "--threads", "1",
         "--zoo", str(tmp_path / "zoo"), "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "zoo").glob("*.pt"))) == 3
    prov = load_predictor(out).provenance
    assert prov["quick"] is True
    from smartfrz_fast.lab.zoo import FAMILIES

    assert prov["data"]["train_families"] == list(FAMILIES)  # ships trained on all
    # leave-one-family-out on the recorded quick zoo: the vit predictor never sees a vit
    lofo = tmp_path / "lofo"
    proc = subprocess.run(
        [sys.executable, "-m", "smartfrz_fast.lab.train", "--quick", "--threads", "1",
         "--zoo", str(tmp_path / "zoo"), "--leave-one-out", str(lofo), "--train-families", "vit"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    unseen = load_predictor(lofo / "without-vit.pt").provenance
    assert unseen["data"]["held_out_families"] == ["vit"]
    assert "vit" not in unseen["data"]["train_families"]
    assert "balanced_accuracy" in unseen["metrics"]["held_out"]["vit"]
    assert "| vit |" in proc.stdout
    # the policy-settings sweep replays that predictor on the left-out recordings
    proc = subprocess.run(
        [sys.executable, "-m", "smartfrz_fast.lab.evaluate", "--sweep-policy-settings", "--threads", "1",
         "--unseen-dir", str(lofo), "--zoo", str(tmp_path / "zoo")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 0.5 | 1 |" in proc.stdout and "selected (threshold, patience):" in proc.stdout
    # the quick predictor runs in the engine
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, SmartFRZ(weights=out), example_inputs=batch(0)[0], total_steps=40)
    train_steps(model, opt, freezer, 40)
    assert freezer.policy.last_probabilities is not None
    print(f"quick pipeline: {seconds:.1f} s")


@pytest.mark.parametrize("fits, kept", [((0.5, 0.81), 1), ((0.5, 0.55, 0.52), 1), ((0.74,), 0)])
def test_a_predictor_training_stuck_near_chance_is_trained_again_with_another_seed(monkeypatch, fits, kept):
    """A training that never took off (balanced accuracy 0.50 on three families of its own training
    runs, seen once in research) was saved like any other, and its predictor froze nothing. Each
    seed's fit here is the lowest balanced accuracy over the families with both labels; a family
    whose labels say only "not yet" (trial labels of a run never safe to freeze) is not judged."""
    from types import SimpleNamespace

    from smartfrz_fast.lab import train as lab_train

    both, never = torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2)
    runs = [SimpleNamespace(family="cnn", labels=lambda window: both),
            SimpleNamespace(family="rnn", labels=lambda window: never)]
    seeds = []

    def fake_train(train_runs, seed, **kwargs):
        seeds.append(seed)
        return seed

    def fake_metrics(model, train_runs, gain=None):  # the model is the seed it was trained with
        return {"cnn": {"balanced_accuracy": fits[model]}, "rnn": {"balanced_accuracy": 0.5}}
    monkeypatch.setattr(lab_train, "train_predictor", fake_train)
    monkeypatch.setattr(lab_train, "offline_metrics", fake_metrics)
    logged = []
    model, metrics, attempts = lab_train._train_until_it_learns(runs, False, logged.append, epochs=1)
    assert seeds == list(range(len(fits))) and model == kept and metrics["cnn"]["balanced_accuracy"] == fits[kept]
    assert [a["kept"] for a in attempts] == [i == kept for i in range(len(fits))]
    assert [a["lowest_train_balanced_accuracy"] for a in attempts] == list(fits)
    assert sum("never took off" in line for line in logged) == sum(f < 0.6 for f in fits)
    assert any("WARNING" in line for line in logged) == (len(fits) == 3)
    seeds.clear()
    assert lab_train._train_until_it_learns(runs, True, logged.append, epochs=1)[0] == 0 and seeds == [0]


def fake_recording(path, cka, sample_every=5, k=8, **extra):
    """A file shaped like ``collect.record_run``'s output, with the given CKA curves."""
    u, s = cka.shape
    run = {"name": path.stem, "spec": {"family": "mlp"}, "units": [f"u{i}" for i in range(u)],
           "forward_flops": [100] * u, "num_params": [10] * u, "valid": torch.full((u,), k),
           "history": torch.randn(u, s, k), "cka": cka, "sample_every": sample_every, "final_loss": 1.0,
           "test_accuracy": 0.9, "seconds": 0.1, "sampling": SAMPLING}
    run.update(extra)
    torch.save(run, path)


def test_label_schedule_freezes_each_prefix_when_its_slowest_label_turns(tmp_path):
    # 4 units (the last is the head: no label), 6 snapshots, one every 5 steps
    cka = torch.tensor([[0.5, 0.999, 0.999, 0.999, 0.999, 1.0],   # freezable from snapshot 1
                        [0.5, 0.5, 0.5, 0.999, 0.999, 1.0],       # from 3
                        [0.999, 0.999, 0.999, 0.999, 0.999, 1.0],  # from 0, but its prefix waits for 3
                        [0.1, 0.1, 0.1, 0.1, 0.1, 1.0]])
    fake_recording(tmp_path / "run.pt", cka, sample_every=5)
    policy = LabelSchedule.from_recording(tmp_path / "run.pt", 0.998, window=1)
    assert policy.freeze_steps == [10, 20, 20]  # (snapshot + 1) * 5
    assert [policy.decide(s, 0) for s in (9, 10, 20)] == [None, 1, 3]
    assert policy.decide(25, 3) is None
    # never before the first full window (3 snapshots: snapshot 2), as SmartFRZ itself
    assert LabelSchedule.from_recording(tmp_path / "run.pt", 0.998, window=3).freeze_steps == [15, 20, 20]
    late = LabelSchedule.from_recording(tmp_path / "run.pt", 0.9999, window=1)  # only the last snapshot (CKA 1)
    assert late.freeze_steps == [30, 30, 30]


def test_lab_imports_form_no_circle_and_stay_off_the_engine_path():
    """The offline lab imports only downwards (a DAG), and neither ``import smartfrz_fast`` nor
    the runtime predictor imports it."""
    import ast
    from pathlib import Path

    import smartfrz_fast.lab as lab

    root = Path(lab.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update(a.name for a in node.names)
        graph[path.stem] = deps & {p.stem for p in root.glob("*.py")}
    assert {"zoo", "collect", "labels", "scoring", "trials", "train", "evaluate", "rebuild"} <= set(graph)
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import circle: {' -> '.join(trail + [node])}"
        state[node] = "open"
        for dep in graph[node]:
            visit(dep, trail + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])
    code = ("import sys, smartfrz_fast, smartfrz_fast.predictor; from smartfrz_fast import SmartFRZ; "
            "print(sorted(m for m in sys.modules if m.startswith('smartfrz_fast.lab')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_recordings_load_without_unpickling_code_and_are_checked(tmp_path):
    from smartfrz_fast.lab.labels import RecordingError, load_recording, load_runs

    cka = torch.rand(3, 6)
    fake_recording(tmp_path / "ok.pt", cka)
    assert load_recording(tmp_path / "ok.pt")["cka"].shape == (3, 6)
    assert [r.name for r in load_runs([tmp_path / "ok.pt"])] == ["ok"]
    fake_recording(tmp_path / "code.pt", cka, spec=torch.optim.SGD)  # a pickled class: refused, not run
    with pytest.raises(RecordingError, match="not a readable recorded run"):
        load_recording(tmp_path / "code.pt")
    fake_recording(tmp_path / "shape.pt", cka, history=torch.randn(2, 6, 8))
    with pytest.raises(RecordingError, match="history"):
        load_recording(tmp_path / "shape.pt")
    fake_recording(tmp_path / "key.pt", cka, sample_every="5")
    with pytest.raises(RecordingError, match="sample_every"):
        load_recording(tmp_path / "key.pt")
    fake_recording(tmp_path / "other.pt", cka, sampling="weight-tensors")  # another history sampling: re-record
    with pytest.raises(RecordingError, match="delete and re-record it"):
        load_recording(tmp_path / "other.pt")
    (tmp_path / "torn.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:100])
    with pytest.raises(RecordingError, match="record it again"):
        load_recording(tmp_path / "torn.pt")


# ----------------------------------------------------------------------------- freezing trials
TRIAL_SPEC_ARGS = dict(family="mlp", depth=3, width=32, optimizer="sgd", seed=0, steps=120, batch=32)


@pytest.fixture(scope="module")
def finished_trials(tmp_path_factory):
    """The freezing trials of a tiny run (seconds), searched at 0.5 points, 5 branch points."""
    from smartfrz_fast.lab.labels import Tolerance
    from smartfrz_fast.lab.trials import Trials
    from smartfrz_fast.lab.zoo import RunSpec

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lab")
    spec = RunSpec(**TRIAL_SPEC_ARGS)
    trials = Trials(spec, out / "trials" / f"{spec.name}.jsonl", Tolerance("accuracy", 0.5), stride=20,
                    recording=out / "zoo" / f"{spec.name}.pt", log=lambda m: None)
    done = trials.run()
    return out, spec, trials, done


def test_search_finds_the_grids_earliest_safe_steps_with_fewer_questions(fresh_seed):
    from smartfrz_fast.lab.trials import grid_earliest, search_earliest

    g = torch.Generator().manual_seed(fresh_seed)
    for _ in range(50):
        prefixes = int(torch.randint(1, 12, (1,), generator=g))
        candidates = sorted(torch.randperm(200, generator=g)[:int(torch.randint(1, 25, (1,), generator=g))].tolist())
        # a monotone truth: earliest safe index non-decreasing in k, some prefixes never safe
        truth = torch.randint(0, len(candidates) + 2, (prefixes,), generator=g).sort().values.tolist()
        asked = []

        def is_safe(k, j, before):
            asked.append((k, j))
            assert len(before) == k - 1  # the earlier prefixes' answers
            return candidates.index(j) >= truth[k - 1]

        found = search_earliest(prefixes, candidates, is_safe)
        grid = grid_earliest(prefixes, candidates, lambda k, j, before: candidates.index(j) >= truth[k - 1])
        assert found == grid
        assert found == [candidates[t] if t < len(candidates) else None for t in truth]
        assert len(asked) == len(set(asked))  # never the same question twice
        assert len(asked) <= prefixes * len(candidates)


def test_trials_agree_with_an_exhaustive_grid_on_a_tiny_run(finished_trials):
    from smartfrz_fast.lab.labels import Tolerance, read_trials
    from smartfrz_fast.lab.trials import continue_run, grid_earliest

    out, spec, trials, done = finished_trials
    reference, branches, _ = read_trials(trials.path)
    assert reference["units"] == 4 and done["candidates"] == [19, 39, 59, 79, 99]
    tol = Tolerance("accuracy", 0.5)
    grid = {}

    def is_safe(k, j, before):  # every branch point, from the same checkpoints
        key = (k, j, tuple(before))
        if key not in grid:
            schedule = trials.schedule(k, j, before)
            grid[key] = tol.safe(continue_run(spec, trials._checkpoints[schedule[0][0]], schedule), reference)
        return grid[key]

    assert done["earliest"] == grid_earliest(3, done["candidates"], is_safe)
    for k in (1, 2, 3):  # the whole grid the brute force stands for
        before = tuple(done["earliest"][:k - 1])
        if None not in before:
            for j in done["candidates"][done["candidates"].index(before[-1]) if before else 0:]:
                is_safe(k, j, before)
    assert done["branches"] < len(grid)  # the search ran fewer branches than the grid
    for key, row in branches.items():  # and each branch it ran is the grid's outcome
        assert tol.safe(row, reference) == grid[key]
    # the oracle: each prefix at its earliest safe step, within the tolerance by construction
    oracle = next(r for r in read_trials(trials.path)[2] if r["kind"] == "oracle")
    assert oracle["schedule"] == [[(j + 1) * trials.every, k + 1] for k, j in enumerate(done["earliest"])
                                  if j is not None]
    assert (oracle["flops_saved"] > 0) == bool(oracle["schedule"])
    assert tol.safe(oracle, reference)


def test_trials_resume_without_recomputing(finished_trials, tmp_path):
    from smartfrz_fast.lab.labels import Tolerance, read_trials
    from smartfrz_fast.lab.trials import Trials

    out, spec, trials, done = finished_trials
    lines = trials.path.read_text().splitlines()
    # finished: a second run reads the result back and trains nothing
    again = Trials(spec, trials.path, Tolerance("accuracy", 0.5), stride=20, log=lambda m: None)
    assert again.run() == done and again.branches_run == 0 and again._checkpoints is None
    # results without their recording (a fresh checkout): the recording is made again, no branch
    recording = tmp_path / "zoo" / f"{spec.name}.pt"
    remade = Trials(spec, trials.path, Tolerance("accuracy", 0.5), stride=20, recording=recording, log=lambda m: None)
    assert remade.run() == done and remade.branches_run == 0 and recording.exists()
    # results made on another CPU (its rounding grows over the run: a final loss 30 % off, the
    # accuracy 1 point) are still re-recorded, saying so; 2 points off is not the same run
    for field, change, accepted in (("loss", 1.3, True), ("accuracy", 1.0 / 100, True), ("accuracy", 2.0 / 100, False)):
        rows = [json.loads(line) for line in lines]
        rows[0][field] = rows[0][field] * change if field == "loss" else rows[0][field] + change
        accepted_name = f"{field}-{change}"
        elsewhere = tmp_path / f"elsewhere-{accepted_name}.jsonl"
        elsewhere.write_text("".join(json.dumps(r) + "\n" for r in rows))
        said = []
        rerecord = Trials(spec, elsewhere, Tolerance("accuracy", 0.5), stride=20,
                          recording=tmp_path / f"zoo-{accepted_name}" / f"{spec.name}.pt", log=said.append)
        if accepted:
            assert rerecord.run()["earliest"] == done["earliest"] and rerecord.branches_run == 0
            assert any("not bit for bit" in m for m in said)
        else:
            with pytest.raises(ValueError, match="did not reproduce"):
                rerecord.run()
    # killed after two branches, in the middle of writing the third
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    resumed = Trials(spec, partial, Tolerance("accuracy", 0.5), stride=20, log=lambda m: None)
    result = resumed.run()
    assert result["earliest"] == done["earliest"]
    assert resumed.branches_run == done["branches"] - 2  # the two finished branches were not redone
    assert read_trials(partial)[1].keys() == read_trials(trials.path)[1].keys()
    # another run's file is refused, not mixed in
    other = Trials(spec.__class__(**{**TRIAL_SPEC_ARGS, "seed": 1}), partial, log=lambda m: None)
    with pytest.raises(ValueError, match="not of"):
        other.run()


def test_trial_labels_feed_training_like_cka_labels(finished_trials):
    from smartfrz_fast.lab.labels import LabelSource, Tolerance, TrialResultsError, load_runs
    from smartfrz_fast.lab.train import train_predictor

    out, spec, trials, done = finished_trials
    recording = out / "zoo" / f"{spec.name}.pt"
    source = LabelSource("trials", trials_dir=out / "trials", tolerance=Tolerance("accuracy", 0.5))
    (run,) = load_runs([recording], source, min_accuracy=0.0)
    (cka_run,) = load_runs([recording], LabelSource("cka"), min_accuracy=0.0)
    s = run.snapshots
    assert run.first_freezable.tolist() == [s if j is None else j for j in done["earliest"]]
    for r in (run, cka_run):
        labels = r.labels(30)
        assert labels.shape == (3, s - 29) and set(labels.unique().tolist()) <= {0.0, 1.0}
    # a window is labelled 1 from the earliest safe snapshot on
    for u, first in enumerate(run.first_freezable.tolist()):
        assert run.labels(30)[u].tolist() == [float(e >= first) for e in range(29, s)]
    # both: settled (CKA) and safe (trials), whichever comes later
    both = LabelSource("cka+trials", trials_dir=out / "trials", tolerance=Tolerance("accuracy", 0.5))
    (both_run,) = load_runs([recording], both, min_accuracy=0.0)
    assert both_run.first_freezable.tolist() == torch.maximum(run.first_freezable, cka_run.first_freezable).tolist()
    assert "CKA" in both.describe() and "trials" in both.describe()
    model = train_predictor([run], epochs=1, log=lambda m: None)
    assert model.config.window == 30
    skipped = []
    other = LabelSource("trials", trials_dir=out / "trials", tolerance=Tolerance("accuracy", 0.1))
    assert load_runs([recording], other, min_accuracy=0.0, skipped=skipped) == []
    assert "no finished search" in skipped[0]


def test_rebuild_redoes_smartfrz_rows_made_with_other_settings_or_weights(tmp_path):
    from smartfrz_fast.lab.evaluate import build_policy, policy_settings
    from smartfrz_fast.lab.rebuild import Rebuild
    from smartfrz_fast.predictor import load_predictor

    rebuild = Rebuild(tmp_path, quick=True, log=lambda m: None)
    now, digest = policy_settings(build_policy("smartfrz")), load_predictor().prediction_digest[:16]
    assert f"weights {digest}" in now and "settle_ratio=0.5" in now
    assert not rebuild._stale({"policy_settings": now}, "smartfrz", None)
    assert rebuild._stale({"policy_settings": now.replace("settle_ratio=0.5", "settle_ratio=None")}, "smartfrz", None)
    assert rebuild._stale({"policy_settings": now.replace(digest, "other weights")}, "smartfrz", None)
    assert rebuild._stale({}, "smartfrz-unseen-cka", None)  # a row from before rows recorded them
    assert not rebuild._stale({}, "freezeout", None)  # baselines: rows stand


def test_a_retraining_that_ends_in_the_same_weights_keeps_the_evaluation_rows(tmp_path):
    # the digest that names the weights in a row covered the provenance's wall times, so a
    # predictor retrained bit for bit after a damaged file made every row with it stale (review95 F2)
    from smartfrz_fast.predictor.model import (AttentionPredictor, PredictorConfig, load_predictor,
                                               save_predictor)

    torch.manual_seed(0)
    model = AttentionPredictor(PredictorConfig())
    base = {"input_gain": 2.0, "history_sampling": "every parameter", "commit": "abc"}
    save_predictor(model, tmp_path / "a.pt", {**base, "seconds": {"train": 0.6}})
    save_predictor(model, tmp_path / "b.pt", {**base, "seconds": {"train": 0.8}, "commit": "def"})
    save_predictor(model, tmp_path / "c.pt", {**base, "input_gain": 1.0, "seconds": {"train": 0.6}})
    a, b, c = (load_predictor(tmp_path / f"{n}.pt") for n in "abc")
    assert a.digest != b.digest  # the files differ
    assert a.prediction_digest == b.prediction_digest  # their answers do not
    assert c.prediction_digest != a.prediction_digest  # another input gain answers otherwise
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    save_predictor(model, tmp_path / "d.pt", {**base, "seconds": {"train": 0.6}})
    assert load_predictor(tmp_path / "d.pt").prediction_digest != a.prediction_digest


def test_a_row_redone_in_another_shard_s_file_is_the_one_that_counts(tmp_path):
    # a rebuild run with one shard after two wrote its redone rows to eval-0.jsonl, and the old,
    # stale rows of shard 1's networks in eval-1.jsonl, read last, kept counting: those networks
    # were redone at every run and left out of the table
    import json

    from smartfrz_fast.lab.evaluate import latest_rows

    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    old = {"network": "b", "policy": "smartfrz", "accuracy": 0.1}
    write("eval-0.jsonl", [{"network": "a", "policy": "full", "accuracy": 0.5},
                           {"network": "b", "policy": "smartfrz", "accuracy": 0.2, "finished": 20.0}])
    write("eval-1.jsonl", [old, {"network": "a", "policy": "full", "accuracy": 0.6}])
    rows = latest_rows(sorted(tmp_path.glob("eval*.jsonl")))
    assert rows[("b", "smartfrz")]["accuracy"] == 0.2
    assert rows[("a", "full")]["accuracy"] == 0.6  # rows without a time: the last line read
    write("eval-1.jsonl", [old, {"network": "b", "policy": "smartfrz", "accuracy": 0.3, "finished": 30.0}])
    assert latest_rows(sorted(tmp_path.glob("eval*.jsonl")))[("b", "smartfrz")]["accuracy"] == 0.3


def test_rebuild_redoes_recordings_and_predictors_of_another_history_sampling(finished_trials, tmp_path):
    import shutil

    from smartfrz_fast.lab.rebuild import Rebuild

    lab, spec, trials, _ = finished_trials
    out = tmp_path / "lab"
    shutil.copytree(lab, out)
    rebuild = Rebuild(out, quick=True, tolerance=trials.tolerance, stride=trials.stride, log=lambda m: None)
    recording = out / "zoo" / f"{spec.name}.pt"
    assert rebuild._recording_current(spec)
    old = torch.load(recording, weights_only=True)
    old["sampling"] = "weight-tensors"
    torch.save(old, recording)
    assert not rebuild._recording_current(spec)
    rebuild.trial_specs = [spec]
    results = out / "trials" / f"{spec.name}.jsonl"
    before = results.read_text()
    rebuild.trials()  # re-recorded from the unbranched run, no branch redone
    assert rebuild._recording_current(spec) and rebuild._trials_done()
    assert results.read_text() == before
    new = torch.load(recording, weights_only=True)
    assert new["test_accuracy"] == old["test_accuracy"] and new["sampling"] == SAMPLING
    config = PredictorConfig(sample_size=8, window=3, hidden=8, embed=4, head_hidden=4)
    save_predictor(AttentionPredictor(config), tmp_path / "other.pt", {"history_sampling": "weight-tensors"})
    save_predictor(AttentionPredictor(config), tmp_path / "now.pt", {"history_sampling": SAMPLING})
    save_predictor(AttentionPredictor(config), tmp_path / "unsaid.pt", {"purpose": "from before it was recorded"})
    assert not rebuild._predictor_current(tmp_path / "other.pt")
    assert rebuild._predictor_current(tmp_path / "now.pt") and rebuild._predictor_current(tmp_path / "unsaid.pt")
    assert not rebuild._predictor_current(tmp_path / "missing.pt")


def test_rebuild_stops_on_its_time_budget_and_says_how_to_resume(tmp_path):
    out = tmp_path / "lab"
    proc = subprocess.run([sys.executable, "-m", "smartfrz_fast.lab.rebuild", "--quick", "--out", str(out),
                           "--stages", "trials", "--max-hours", "1e-9"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Run the same command again to continue" in proc.stdout
    progress = (out / "progress.md").read_text()
    assert "trials: 0/3 runs finished" in progress
    assert (out / ".gitignore").read_text().startswith("zoo/")
    # no training run started past the budget, not even the first unbranched one (review37: it
    # trained one, and on a fresh checkout re-recorded every run before it looked at the clock)
    assert not any(path.read_text() for path in (out / "trials").glob("*.jsonl"))
    assert not list(out.glob("zoo/*.pt"))


def test_rebuild_that_waits_for_another_shard_exits_3_and_refuses_a_zero_budget(tmp_path):
    # a shard that stopped to wait for the other exited 0, so a loop "run it again until it
    # succeeds" stopped after one round; --max-hours 0 started nothing and asked to be run again,
    # forever (review95 F5, F7)
    from smartfrz_fast.lab.rebuild import Rebuild, main

    said = []
    rebuild = Rebuild(tmp_path / "lab", quick=True, log=said.append, shard=(1, 2))
    assert rebuild.run(["predictors"]) == 3
    assert any("waiting for the trials stage" in m for m in said) and "run the same command again" in said[-1]
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--out", str(tmp_path / "lab"), "--max-hours", "0"])
    assert exc.value.code == 2


def test_rebuild_says_why_it_records_a_run_again(finished_trials, tmp_path):
    # a recording cut short was "recorded with other history sampling or code" (review95 F4)
    import shutil

    from smartfrz_fast.lab.rebuild import Rebuild

    lab, spec, trials, _ = finished_trials
    out = tmp_path / "lab"
    shutil.copytree(lab, out)
    recording = out / "zoo" / f"{spec.name}.pt"
    recording.write_bytes(recording.read_bytes()[:1000])
    said = []
    rebuild = Rebuild(out, quick=True, tolerance=trials.tolerance, stride=trials.stride, log=said.append)
    rebuild.trial_specs = [spec]
    rebuild.trials()
    (line,) = [m for m in said if m.startswith("recording ")]
    assert "not a readable recorded run" in line and "sampling" not in line
    assert rebuild._recording_current(spec)


def test_rebuild_stops_on_a_damaged_trials_file_with_what_to_do(finished_trials, tmp_path):
    # a line damaged in the middle of a trials file: two chained tracebacks, and the advice to
    # delete the line did not redo its branch (review95 F3)
    import shutil

    from smartfrz_fast.lab.rebuild import Rebuild

    lab, spec, trials, _ = finished_trials
    out = tmp_path / "lab"
    shutil.copytree(lab, out)
    results = out / "trials" / f"{spec.name}.jsonl"
    lines = results.read_text().splitlines()
    lines[2] = lines[2][:20]
    results.write_text("\n".join(lines) + "\n")
    said = []
    rebuild = Rebuild(out, quick=True, tolerance=trials.tolerance, stride=trials.stride, log=said.append)
    rebuild.trial_specs = [spec]
    assert rebuild.run(["trials"]) == 1
    assert f"{results}:3 is not JSON" in said[-1] and "Delete the file" in said[-1]


def test_a_predictor_file_that_cannot_be_written_names_the_file(tmp_path):
    # torch.save's "unexpected pos" on a full disk named no file (review95 F8)
    from smartfrz_fast.predictor.model import write_atomically

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2763776 vs 2763664")

    (tmp_path / "p.pt").write_bytes(b"old")
    with pytest.raises(OSError, match=r"could not write .*p\.pt .*disk full.*unchanged"):
        write_atomically(tmp_path / "p.pt", fail)
    assert (tmp_path / "p.pt").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["p.pt"]


def test_compare_labels_sets_the_cka_points_against_the_trials(finished_trials):
    from smartfrz_fast.lab.labels import Tolerance, load_recording, prefix_freeze_points
    from smartfrz_fast.lab.rebuild import Rebuild

    out, spec, trials, done = finished_trials
    rebuild = Rebuild(out, quick=True, tolerance=Tolerance("accuracy", 0.5), stride=20, log=lambda m: None)
    rebuild.trial_specs = [spec]
    header, rule, row = rebuild.compare_labels()
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == spec.name and cells[1] == "3"
    assert cells[2] == f"{done['oracle_accuracy_change_points']:+.2f}"
    cka = prefix_freeze_points(load_recording(out / "zoo" / f"{spec.name}.pt")["cka"][:-1].float(), 0.998)
    safe = torch.tensor([trials.snapshots if j is None else j for j in done["earliest"]])
    assert (int(cells[4]), int(cells[5])) == (int((cka < safe).sum()), int((cka > safe).sum()))


def test_replay_sets_leave_one_family_out_predictors_against_the_trial_oracle(finished_trials, tmp_path):
    """`rebuild --replay`: a predictor that never calls a unit freezable saves nothing and is
    never early; one that always does freezes every prefix at the first decision SmartFRZ allows
    (a quarter of the run), early exactly for the prefixes whose safe point comes later."""
    import math

    from smartfrz_fast.lab.labels import Tolerance, load_runs
    from smartfrz_fast.lab.rebuild import Rebuild
    from smartfrz_fast.policy.smartfrz import DEFAULT_MIN_PROGRESS

    out, spec, trials, done = finished_trials
    rebuild = Rebuild(out, quick=True, tolerance=Tolerance("accuracy", 0.5), stride=20, log=lambda m: None)
    rebuild.zoo = [spec]
    folders = {}
    for name, logit in (("never", -20.0), ("always", 20.0)):
        predictor = AttentionPredictor(PredictorConfig())
        with torch.no_grad():
            predictor.head[-1].bias.copy_(torch.tensor([0.0, logit]))
        folders[name] = tmp_path / name
        folders[name].mkdir()
        save_predictor(predictor, folders[name] / f"without-{spec.family}.pt",
                       {"input_gain": 30.0, "sort_by_newest": True, "purpose": "test"})
    lines = rebuild.replay_lines(folders)
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == spec.name and cells[2] == "0.0 %, 0 early"
    (run,) = load_runs([out / "zoo" / f"{spec.name}.pt"], rebuild.sources["trials"])
    first = max(math.ceil(DEFAULT_MIN_PROGRESS * run.snapshots), PredictorConfig().window - 1)
    early = int((run.prefix_points(1) > first).sum())
    assert cells[3].split(", ")[1].startswith(f"{early} early"), cells
    assert lines[-1].startswith("| **all runs** |")


@pytest.mark.parametrize("family", ["mlp", "cnn", "resnet", "vit", "lm", "mixer", "sepcnn", "rnn", "textenc"])
def test_every_zoo_family_records_and_branches(family, tmp_path):
    """A few steps of each family through the recording and one freezing branch (fine-tuned for
    the text encoder: its checkpoint is made in-house, nothing downloads)."""
    from smartfrz_fast.lab.collect import record_run
    from smartfrz_fast.lab.trials import continue_run
    from smartfrz_fast.lab.zoo import FAMILIES, RunSpec

    assert family in FAMILIES
    torch.set_num_threads(1)
    spec = RunSpec(family, 1 if family == "resnet" else 2, 16, "adamw" if family in ("rnn", "textenc") else "sgd",
                   seed=3, steps=12, batch=8,
                   finetune=family == "textenc")
    states = {}
    run = record_run(spec, on_step=lambda s: states.setdefault(s.step, s.checkpoint()) if s.step == 6 else None)
    u = len(run["units"])
    assert u >= 3 and run["history"].shape[:2] == (u, 12) and torch.isfinite(run["cka"]).all()
    assert 0.0 <= run["test_accuracy"] <= 1.0 and run["test_loss"] > 0
    branch = continue_run(spec, states[6], [(6, u - 1)])
    assert branch["frozen"] == u - 1 and 0 < branch["flops_saved"] < 1


def _fake_evaluation(monkeypatch):
    """Rebuild's evaluate and table stages without training: every run's row made up at once."""
    import smartfrz_fast.lab.rebuild as rebuild_module

    monkeypatch.setattr(rebuild_module, "train_with_policy", lambda spec, policy, weights: {
        "network": spec.name, "policy": policy, "accuracy": 0.5, "flops_saved": 0.1, "seconds": 1.0})
    monkeypatch.setattr(rebuild_module.Rebuild, "_predictor_current", staticmethod(lambda path: True))
    monkeypatch.setattr(rebuild_module.Rebuild, "_stale", lambda self, row, policy, weights: False)
    return rebuild_module.Rebuild


def test_rebuild_cuts_a_torn_evaluation_line_before_it_appends(tmp_path, monkeypatch):
    """A row cut short (a disk that filled up) was continued by the next row on the same line:
    both unreadable, the table short of a row, exit code 0 (review37)."""
    Rebuild = _fake_evaluation(monkeypatch)
    rebuild = Rebuild(tmp_path, quick=True, log=lambda m: None)
    first = rebuild._runs_to_evaluate()[0]
    whole = json.dumps({"network": first[0].name, "policy": first[1], "accuracy": 0.5, "flops_saved": 0.1})
    (tmp_path / "eval-0.jsonl").write_text(whole + "\n" + whole[:25])
    assert rebuild.evaluate() and rebuild.table()
    lines = (tmp_path / "eval-0.jsonl").read_text().splitlines()
    assert len(lines) == len(rebuild._runs_to_evaluate()) and all(json.loads(line) for line in lines)


def test_the_table_waits_for_every_shard_s_rows(tmp_path, monkeypatch):
    """Shard 0 done first wrote a table without shard 1's networks and exited 0; shard 1 never
    rewrote it (review37). Now whichever shard finishes last writes the whole table."""
    Rebuild = _fake_evaluation(monkeypatch)
    first, second = (Rebuild(tmp_path, quick=True, log=lambda m: None, shard=(i, 2)) for i in range(2))
    assert first.evaluate() and not first.table()
    assert not (tmp_path / "policy_comparison.md").exists()
    assert "table: not yet" in (tmp_path / "progress.md").read_text()
    assert second.evaluate() and second.table()
    table = (tmp_path / "policy_comparison.md").read_text()
    assert all(spec.name in table for spec in first.networks)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_predictor_file_cut_short_is_trained_again_and_never_left_torn(tmp_path, monkeypatch):
    """A rebuild killed while it wrote all.pt left a torn file that every resume refused, with
    advice for users of SmartFRZ(weights=...) (review37): the write is atomic now, and the
    rebuild trains again a file of its own that does not load."""
    from pathlib import Path

    from smartfrz_fast.lab.rebuild import Rebuild

    config = PredictorConfig(sample_size=8, window=3, hidden=8, embed=4, head_hidden=4)
    path = tmp_path / "all.pt"
    save_predictor(AttentionPredictor(config), path, {"history_sampling": SAMPLING})
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 3])
    assert not Rebuild._predictor_current(path)
    path.write_bytes(whole)

    def dies_half_way(obj, target):
        Path(target).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        save_predictor(AttentionPredictor(config), path, {"history_sampling": SAMPLING})
    assert path.read_bytes() == whole and sorted(p.name for p in tmp_path.iterdir()) == ["all.pt"]


@pytest.mark.parametrize("hours", ["nan", "-1", "inf"])
def test_rebuild_refuses_a_time_budget_that_is_no_number_of_hours(tmp_path, hours, capsys):
    from smartfrz_fast.lab import rebuild

    with pytest.raises(SystemExit) as exit_info:  # nan meant no limit at all (review37)
        rebuild.main(["--quick", "--out", str(tmp_path), "--max-hours", hours])
    assert exit_info.value.code == 2 and "--max-hours" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_second_copy_of_one_rebuild_on_its_folder_is_refused(tmp_path):
    """Two copies of the same command on one folder did every piece twice and wrote every trials
    and evaluation line twice, both exiting 0 (review95); another shard runs beside it."""
    from smartfrz_fast.lab.rebuild import Rebuild

    said = []
    running = Rebuild(tmp_path, quick=True, log=said.append)
    held = running._lock()
    try:
        assert Rebuild(tmp_path, quick=True, log=said.append).run(stages=[]) == 4
        assert "another rebuild with --shard 0/1 is running" in said[-1]
        assert Rebuild(tmp_path, quick=True, log=said.append, shard=(1, 2)).run(stages=[]) == 0
    finally:
        import os

        os.close(held)
    assert Rebuild(tmp_path, quick=True, log=said.append).run(stages=[]) == 0


def test_evaluation_rows_of_another_thread_count_are_not_mixed_in(tmp_path, monkeypatch):
    """Resumed with --threads 2 after one thread, the table mixed both kinds of row, silently
    (review95: Egeria, which froze nothing, at -0.5 points)."""
    from smartfrz_fast.lab.rebuild import Rebuild

    rebuild = Rebuild(tmp_path, quick=True, log=lambda m: None)
    monkeypatch.setattr(Rebuild, "_predictor_current", staticmethod(lambda path: True))
    monkeypatch.setattr(Rebuild, "_eval_rows", lambda self: {("run", "full"): {"threads": torch.get_num_threads() + 1}})
    with pytest.raises(ValueError, match=r"made with \[\d+\] thread\(s\), this run has \d+. Resume with the same"):
        rebuild.evaluate()
