"""smartfrz_fast.profile (per-unit timing and memory, freezing ceiling, run saving, engine
overhead), the engine's profiler ranges, the plot and the docs/profiling.md example."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from models import SmallCNN
from smartfrz_fast import SmartFreezer
from smartfrz_fast.engine import FreezeEvent, _range
from smartfrz_fast.policy import AutoFreeze, LinearFreeze, SmartFRZ, StaticFreeze
from smartfrz_fast.profile import (
    PrefixRow,
    achieved_saving,
    make_policy,
    profile_model,
    profile_overhead,
    profile_prefixes,
    profile_units,
)

ROOT = Path(__file__).resolve().parents[1]
FWD_S, BWD_S = 0.03, 0.06  # the slow unit's forward and backward sleeps


class _Sleep(torch.autograd.Function):
    """Identity whose forward and backward take a known wall time."""

    @staticmethod
    def forward(ctx, x):
        time.sleep(FWD_S)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(BWD_S)
        return grad


class SlowMiddle(nn.Module):
    """Four linear units; unit 1 is followed by a sleep in forward and backward."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.l0(x))
        x = torch.relu(_Sleep.apply(self.l1(x)))
        x = torch.relu(self.l2(x))
        return self.head(x)


@pytest.fixture
def one_thread():
    """Timing tests on one intra-op thread: on a shared 2-core machine, a second thread's
    barrier waits for a descheduled sibling (tens of ms) and lands on whichever unit runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_unit_times_land_on_the_unit_that_spends_them(fresh_seed, one_thread):
    units, step = profile_units(SlowMiddle(), torch.randn(8, 6), repeats=3, warmup=1)
    assert [u.name for u in units] == ["l0", "l1", "l2", "head"]
    slow = units[1]
    assert slow.forward_ms >= 0.9 * FWD_S * 1e3 and slow.backward_ms >= 0.9 * BWD_S * 1e3
    for u in (units[0], units[2], units[3]):  # microseconds of work each, plus scheduling noise
        assert u.forward_ms < 0.5 * FWD_S * 1e3 and u.backward_ms < 0.5 * BWD_S * 1e3, u
    # the whole step holds both sleeps (phases timed in separate passes are each noisy under load,
    # so their sum may exceed a step's median)
    assert step.backward_ms >= 0.9 * BWD_S * 1e3 and step.step_ms >= 0.9 * (FWD_S + BWD_S) * 1e3


def test_activation_bytes_are_what_autograd_saves():
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(4, 5)
    units, _ = profile_units(m, x, loss_fn=lambda out: out.sum(), repeats=1, warmup=0)
    # unit 0 saves its input (for the weight gradient) and the ReLU output; unit 1 saves only
    # that same ReLU output (counted once) and its weight (a parameter, not an activation)
    assert [u.activation_bytes for u in units] == [4 * 5 * 4 + 4 * 7 * 4, 0]
    assert [u.grad_bytes for u in units] == [(5 * 7 + 7) * 4, (7 * 3 + 3) * 4]
    assert [u.optimizer_state_bytes for u in units] == [(5 * 7 + 7) * 4, (7 * 3 + 3) * 4]  # SGD momentum
    # with unit 0 frozen, autograd saves nothing for it: only unit 1's input remains
    rows = profile_prefixes(m, x, loss_fn=lambda out: out.sum(), repeats=1, warmup=0)
    assert [(r.num_frozen, r.activation_bytes) for r in rows] == [(0, 192), (1, 112)]


def test_profiling_leaves_the_model_untouched():
    model = SmallCNN()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile = profile_model(model, torch.randn(8, 1, 8, 8), repeats=1, warmup=0, policies=("static",),
                            overhead_steps=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    # the JSON has the printed table's computed columns too
    (row,) = profile.to_dict()["overheads"]
    assert row["policy"] == "static" and set(row) >= {"share_of_step", "run_saved", "ceiling_saved"}
    assert row["share_of_step"] > 0 and row["ceiling_saved"] is not None



def test_the_share_of_a_step_is_what_the_run_pays_not_the_median_step():
    # SmartFRZ's predictor runs at one step in several: the median step skipped every one of
    # them (1.83 % of a step printed, 21.7 % paid)
    from smartfrz_fast.profile import OverheadRow, Profile

    row = OverheadRow(policy="smartfrz", steps=4, step_us_median=100.0, step_us_mean=2600.0, step_us_max=10_000.0,
                      hook_us_median=None, train_step_ms=10.0, run_ms=50.0, num_frozen=0)
    profile = Profile(title="t", units=[], breakdown=None, prefixes=[], overheads=[row])
    assert profile.derived(row)["share_of_step"] == pytest.approx(0.26)


class KeywordModel(nn.Module):
    """A forward that takes keyword inputs, as a Hugging Face model's does."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.emb(input_ids) * attention_mask[..., None]).sum(1)


def test_a_batch_dict_of_keyword_inputs_is_profiled_as_the_freezer_takes_it():
    # profile_model passed the dict as the one positional input (BERT: AttributeError: 'dict'
    # object has no attribute 'size'), while SmartFreezer takes it as keyword inputs
    batch = {"input_ids": torch.randn(4, 3, 6), "attention_mask": torch.ones(4, 3)}
    profile = profile_model(KeywordModel(), batch, repeats=1, warmup=0, policies=("static",), overhead_steps=3)
    assert [u.name for u in profile.units] == ["emb", "head"]


def test_profiling_a_model_a_freezer_manages_is_refused():
    # the copy showed only the trainable units, numbered otherwise than the freezer's
    model = SmallCNN()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1, at_step=1),
                           example_inputs=torch.randn(2, 1, 8, 8))
    freezer.freeze_to(2)
    with pytest.raises(ValueError, match="profile it before building the freezer"):
        profile_units(model, torch.randn(8, 1, 8, 8), repeats=1, warmup=0)
    freezer.close()


def test_ceiling_measures_the_freeze_not_a_sum(fresh_seed, one_thread):
    units, step = profile_units(SlowMiddle(), torch.randn(8, 6), repeats=3, warmup=1)
    rows = profile_prefixes(SlowMiddle(), torch.randn(8, 6), units=units, optimizer_ms=step.optimizer_ms,
                            repeats=3, warmup=1)
    assert [r.num_frozen for r in rows] == [0, 1, 2, 3]
    assert [r.last_frozen for r in rows] == ["-", "l0", "l1", "l2"]
    # the sleep's backward disappears once unit 1 is frozen (its input then needs no grad)
    assert abs(rows[1].saved_ms) < 0.5 * BWD_S * 1e3
    for r in rows[2:]:
        assert r.saved_ms > 0.7 * BWD_S * 1e3 and r.estimated_saved_ms > 0.9 * BWD_S * 1e3
        assert r.step_ms > 0.9 * FWD_S * 1e3  # the forward sleep still runs
    # each row's own noise, shown beside it: half the interquartile range of its paired ratios
    assert all(0 <= r.ratio_spread < 0.5 for r in rows)
    from smartfrz_fast.profile import _half_iqr

    assert _half_iqr([0.5, 0.6, 0.7, 0.8, 0.9]) == pytest.approx(0.15) and _half_iqr([0.7]) == 0.0


def test_achieved_saving_is_time_weighted():
    events = [FreezeEvent(10, 1, ("a",), 0.1, 0.1), FreezeEvent(20, 3, ("b", "c"), 0.5, 0.5)]
    r = achieved_saving(events, {0: 10.0, 1: 8.0, 2: 7.0, 3: 5.0}, total_steps=40)
    assert r.steps_by_frozen == {0: 10, 1: 10, 3: 20}
    assert r.full_ms == 400.0 and r.run_ms == 10 * 10 + 10 * 8 + 20 * 5
    assert r.saved_fraction == pytest.approx(0.3)
    # an unmeasured prefix length costs the nearest measured one below it
    assert achieved_saving(events, {0: 10.0, 1: 8.0}, total_steps=40).run_ms == 100 + 80 + 160
    # profile_prefixes rows: each prefix costs its paired ratio times the median unfrozen step
    rows = [PrefixRow(0, "-", 10.0, 10.0, 0.0, 0), PrefixRow(2, "b", 6.0, 12.0, 0.0, 0, ratio=0.5)]
    r = achieved_saving(events[1:], rows, total_steps=30)
    assert r.full_ms == pytest.approx(30 * 11.0) and r.run_ms == pytest.approx(20 * 11.0 + 10 * 5.5)
    assert rows[1].saved_fraction == 0.5 and rows[1].saved_ms == 6.0
    with pytest.raises(ValueError, match="key 0"):
        achieved_saving(events, {1: 8.0}, total_steps=40)
    with pytest.raises(ValueError, match="total_steps"):
        achieved_saving(events, {0: 1.0})


def test_achieved_saving_matches_the_engines_flop_count():
    """With step time proportional to a step's remaining FLOPs, the time-weighted saving of a
    real run is the engine's own training_flops_saved."""
    from models import batch, train_steps

    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=LinearFreeze(freeze_start=0.3), example_inputs=batch(0)[0],
                           total_steps=30)
    train_steps(model, opt, freezer, 30)
    assert freezer.num_frozen > 1
    cost = {n: 1.0 - freezer.frozen_flops_fraction(n) for n in range(len(freezer.units))}
    assert achieved_saving(freezer, cost).saved_fraction == pytest.approx(freezer.training_flops_saved())


@pytest.mark.slow
def test_overhead_per_policy():
    base, rows = profile_overhead(SmallCNN(), torch.randn(8, 1, 8, 8), steps=32, warmup=1)
    assert base.policy == "none" and base.num_frozen == 0
    by = {r.policy: r for r in rows}
    assert sorted(by) == sorted(["freezeout", "autofreeze", "linear", "static", "smartfrz"])
    for r in rows:
        assert 0 < r.step_us_median <= r.step_us_max and r.train_step_ms > 0
    assert by["autofreeze"].hook_us_median > 0  # its grad-norm hook inside optimizer.step()
    assert all(by[p].hook_us_median is None for p in ("freezeout", "linear", "static", "smartfrz"))
    assert by["static"].num_frozen == 1 and by["linear"].num_frozen > 0
    assert by["smartfrz"].num_frozen >= 0 and by["smartfrz"].step_us_max > by["static"].step_us_median


def test_overhead_runs_keep_the_trainable_units_asked_for():
    from smartfrz_fast.units import discover_units

    model, x = SmallCNN(), torch.randn(4, 1, 8, 8)
    units = len(discover_units(SmallCNN(), (x,)).units)
    _, rows = profile_overhead(model, x, policies=("linear", "freezeout"), steps=24, warmup=1, keep_trainable=2)
    assert rows and all(0 < r.num_frozen <= units - 2 for r in rows)


def test_the_run_saved_counts_the_freezers_set_up(monkeypatch):
    # "run saved" timed from after the freezer was built: its set-up (tracing the model, FLOPs,
    # the history) was part of no run (review36)
    import time

    from smartfrz_fast import profile

    class SlowToSetUp(SmartFreezer):
        def __init__(self, *args, **kwargs):
            time.sleep(0.3)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(profile, "SmartFreezer", SlowToSetUp)
    _, rows = profile_overhead(SmallCNN(), torch.randn(4, 1, 8, 8), policies=("static",), steps=2, warmup=0)
    assert rows[0].run_ms >= 300


@pytest.mark.slow
def test_smartfrz_runs_with_the_shipped_predictor_by_default():
    from models import batch, train_steps

    policy = make_policy("smartfrz", 40, 3)
    assert policy.predictor.provenance == SmartFRZ().predictor.provenance  # the shipped weights
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=policy, example_inputs=batch(0)[0], total_steps=40)
    train_steps(model, opt, freezer, 31)
    assert policy.last_probabilities is not None  # the predictor ran once the window was full


def test_engine_ranges_show_in_the_profiler_and_cost_nothing_without_it():
    from models import batch

    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=AutoFreeze(interval=2), example_inputs=batch(0)[0],
                           total_steps=10)
    assert type(_range("x")).__name__ == "nullcontext"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for s in range(3):
            x, y = batch(s)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    names = {e.name for e in prof.events()}
    assert {"smartfrz::decide", "smartfrz::apply", "smartfrz::grad_norms"} <= names
    # a history-keeping policy also shows its snapshot
    policy = make_policy("smartfrz", 10, 3)
    model2 = SmallCNN()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    f2 = SmartFreezer(model2, opt2, policy=policy, example_inputs=batch(0)[0], total_steps=10)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        f2.step()
    assert "smartfrz::snapshot" in {e.name for e in prof.events()}


def test_bad_input_errors():
    with pytest.raises(ValueError, match="repeats"):
        profile_units(SmallCNN(), torch.randn(2, 1, 8, 8), repeats=0)
    with pytest.raises(ValueError, match="unknown policies"):
        profile_overhead(SmallCNN(), torch.randn(2, 1, 8, 8), policies=("smartfzr",))


def _run_cli(args, cwd=ROOT, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "smartfrz_fast.profile", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_cli_builtin_model_no_arguments_quick():
    r = _run_cli(["--quick", "--threads", "1", "--policies", "static"])
    assert r.returncode == 0, r.stderr
    for needle in ("Per unit", "conv1+bn1", "Ceiling", "Engine overhead", "static"):
        assert needle in r.stdout


def test_cli_user_model(tmp_path):
    (tmp_path / "mynet.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 12),\n"
        "                               torch.nn.ReLU(), torch.nn.Linear(12, 4))\n")
    out = tmp_path / "p.json"
    r = _run_cli(["--model", "mynet:make", "--input-shape", "6", "--batch-size", "5", "--repeats", "2",
                  "--warmup", "0", "--policies", "none", "--json", str(out)], cwd=tmp_path,
                 env_extra={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\s+2 4\s", r.stdout, re.M)  # the third Linear is unit 2
    import json

    data = json.loads(out.read_text())
    assert [u["name"] for u in data["units"]] == ["0", "2", "4"] and len(data["prefixes"]) == 3
    assert "NaN" not in out.read_text() and "Infinity" not in out.read_text()  # strict JSON (review88)


def test_the_default_loss_counts_every_output_that_carries_a_gradient():
    """The first output with a gradient was the loss: features with nothing frozen, the logits once
    the body froze, so each prefix was measured with another loss (-176 % saved, review89)."""
    from smartfrz_fast.profile import _one_loss, default_loss

    features, logits = torch.randn(4, 6, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    both = default_loss((features, logits.argmax(1), logits))
    torch.testing.assert_close(both, _one_loss(features) + _one_loss(logits))
    torch.testing.assert_close(default_loss({"f": features.detach(), "l": logits}), _one_loss(logits))


def test_cli_a_model_returning_features_before_its_logits(tmp_path):
    """The default loss took the first tensor of the output: features of a layer that a measured
    prefix freezes carry no gradient, and the backward failed with a traceback (review88; a
    transformers BertModel, a net returning (features, logits) or (argmax, logits))."""
    (tmp_path / "twoheads.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b, self.c = torch.nn.Linear(6, 12), torch.nn.Linear(12, 12), torch.nn.Linear(12, 4)\n"
        "    def forward(self, x):\n"
        "        features = torch.relu(self.a(x))\n"
        "        logits = self.c(torch.relu(self.b(features)))\n"
        "        return features, logits.argmax(1), logits\n"
        "def make():\n"
        "    return Net()\n")
    r = _run_cli(["--model", "twoheads:make", "--input-shape", "6", "--batch-size", "5", "--repeats", "2",
                  "--warmup", "0", "--policies", "none"], cwd=tmp_path, env_extra={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "Ceiling" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "nocolon"], "needs --input-shape"),
    (["--model", "nocolon", "--input-shape", "3"], "package.module:factory"),
    (["--model", "no_such_module_x:f", "--input-shape", "3"], "cannot import"),
    (["--model", "os:getcwd", "--input-shape", "0,3"], "positive integers"),
    (["--model", "os:getcwd", "--input-shape", "3,x"], "positive integers"),  # was read as 3 (review49)
    (["--policies", "bogus"], "unknown"),
    (["--model", "os:getcwd", "--input-shape", "3", "--input-dtype", "int64", "--input-high", "0"],
     "--input-high must be at least 1"),  # (a traceback before, review88)
])
def test_cli_bad_arguments(args, message):
    r = _run_cli(args)
    assert r.returncode == 2 and message in r.stderr


@pytest.mark.parametrize("spec, shape, message", [
    ("usernets:needs_arg", "6", "calling it raised TypeError"),
    ("brokennet:make", "6", "importing 'brokennet' raised NameError"),
    ("usernets:make", "3,8,8", "cannot take a batch of --input-shape 3,8,8"),
    ("usernets:no_parameters", "6", "has no trainable parameters"),  # an optimizer's raw error (review49)
    ("usernets:make", "100000,100000,1000", "cannot be made ("),  # (review88)
])
def test_cli_a_model_that_fails_is_one_error_line(tmp_path, spec, shape, message):
    # a factory needing arguments, a module failing at import, a shape the model cannot take:
    # raw tracebacks before (the last one talking of SmartFreezer's example_inputs)
    (tmp_path / "usernets.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))\n"
        "def needs_arg(width):\n"
        "    return torch.nn.Linear(6, width)\n"
        "def no_parameters():\n"
        "    return torch.nn.ReLU()\n")
    (tmp_path / "brokennet.py").write_text("import torch\nmake = undefined_name\n")
    r = _run_cli(["--model", spec, "--input-shape", shape, "--repeats", "1", "--warmup", "0", "--policies", "none"],
                 cwd=tmp_path, env_extra={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_a_batch_of_one_under_batch_norm_is_one_error_line(tmp_path):
    """BatchNorm refuses a training batch of one sample: a 28-frame traceback, with a note about
    SmartFreezer's example_inputs a CLI user never passed (review88)."""
    (tmp_path / "bnnet.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))\n")
    r = _run_cli(["--model", "bnnet:make", "--input-shape", "6", "--batch-size", "1", "--repeats", "1",
                  "--warmup", "0", "--policies", "none"], cwd=tmp_path, env_extra={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "Pass a larger --batch-size" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from smartfrz_fast.plot import Curve, plot_training

    events = [FreezeEvent(5, 1, ("conv1+bn1",), 0.1, 0.05), FreezeEvent(12, 3, ("conv2+bn2", "conv3+bn3"), 0.4, 0.3)]
    path = plot_training(str(tmp_path / "t.png"), [Curve("full", [10.0] * 20, [(10, 0.5), (20, 0.8)]),
                                                   Curve("frozen", [10.0] * 5 + [8.0] * 7 + [5.0] * 8, [(10, 0.5)])],
                         events, num_units=4, title="test")
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_format_follows_the_extension(tmp_path):
    pytest.importorskip("matplotlib")
    from smartfrz_fast.plot import Curve, plot_training

    curves = [Curve("full", [10.0] * 20, [(10, 0.5), (20, 0.8)])]
    for name, magic in (("t.pdf", b"%PDF"), ("t.svg", b"<?xml"), ("t", b"\x89PNG")):  # was PNG bytes in a .pdf
        path = plot_training(str(tmp_path / name), curves, [], num_units=4)
        assert Path(path).read_bytes().startswith(magic), name
    with pytest.raises(ValueError, match=r"end the path in one of them"):
        plot_training(str(tmp_path / "t.docx"), curves, [], num_units=4)



def test_demo_refuses_a_plot_path_it_cannot_write_before_training(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from smartfrz_fast import demo

    assert demo.main(["--quick", "--no-progress", "--plot", str(tmp_path / "run.docx")]) == 2
    captured = capsys.readouterr()
    assert "--plot: cannot write a plot to" in captured.err and "full training" not in captured.out
    # a folder that does not exist: said before training, not as a traceback after it
    assert demo.main(["--quick", "--no-progress", "--plot", str(tmp_path / "missing" / "run.png")]) == 2
    captured = capsys.readouterr()
    assert "--plot: cannot write into" in captured.err and "full training" not in captured.out


@pytest.mark.slow
def test_demo_plot(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    from smartfrz_fast import demo

    path = tmp_path / "demo.png"
    assert demo.main(["--quick", "--no-progress", "--threads", "1", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _doc_example() -> str:
    text = (ROOT / "docs" / "profiling.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/profiling.md has no python example"
    return blocks[0]


@pytest.mark.slow
def test_docs_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_doc_example())
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert "Ceiling" in r.stdout and "time saved" in r.stdout


class RootOffset(nn.Module):
    """A learned offset held on the model itself, read after a slow unit (timm's ViTs hold
    ``cls_token`` so): the model's pre-hook fires before every unit."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.offset = nn.Parameter(torch.zeros(16))

    def forward(self, x):
        x = torch.relu(_Sleep.apply(self.b(torch.relu(self.a(x)))))
        return self.head(torch.relu(self.c(x + self.offset)))


class Attend(nn.Module):
    """torch's encoder layer: nn.MultiheadAttention never calls its out_proj module."""

    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.layer(self.inp(x)).mean(1))


class QKV(nn.Module):
    """q, k and v read one input: its gradient is complete once all three are done."""

    def __init__(self, d=16):
        super().__init__()
        self.inp, self.q, self.k, self.v = nn.Linear(6, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        scores = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2), -1)
        return self.head((scores @ self.v(h)).mean(1))


def test_units_no_hook_can_time_are_shown_in_a_neighbour(fresh_seed, one_thread):
    # they showed nan (a sum of nan), negative times, or a neighbour's time as their own
    units, step = profile_units(RootOffset(), torch.randn(8, 6), repeats=3, warmup=1)
    assert [u.name for u in units] == ["a", "b", "<root>", "c", "head"]
    assert units[2].forward_in == 1 and units[2].forward_ms == 0.0 and units[2].backward_in == 1
    assert units[1].forward_ms >= 0.9 * FWD_S * 1e3 and units[1].backward_ms >= 0.9 * BWD_S * 1e3
    units, _ = profile_units(Attend(), torch.randn(4, 5, 6), repeats=2, warmup=0)
    out_proj = next(u for u in units if u.name.startswith("layer.self_attn.out_proj"))
    assert out_proj.forward_in == out_proj.index - 1 and out_proj.backward_in == out_proj.index - 1
    units, _ = profile_units(QKV(), torch.randn(4, 5, 6), repeats=2, warmup=0)
    assert [u.name for u in units] == ["inp", "q", "k", "v", "head"]
    assert [u.backward_in for u in units] == [None, 3, 3, None, None]
    for model, x in ((RootOffset(), torch.randn(8, 6)), (Attend(), torch.randn(4, 5, 6)), (QKV(), torch.randn(4, 5, 6))):
        units, _ = profile_units(model, x, repeats=2, warmup=0)
        assert all(u.forward_ms >= 0 and u.backward_ms >= 0 for u in units), units
        table = "\n".join(_format_units(units))
        assert "nan" not in table


def _format_units(units):
    from smartfrz_fast.profile import Profile, StepBreakdown, _format_profile

    return _format_profile(Profile("t", units, StepBreakdown(1.0, 0.5, 0.4, 0.1, 1), [], None, []))


def test_a_tied_embedding_is_freed_where_its_last_reader_freezes():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid = nn.Embedding(40, 8), nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 40)
            self.lm_head.weight = self.emb.weight

        def forward(self, ids):
            return self.lm_head(torch.relu(self.mid(self.emb(ids)))).flatten(0, 1)

    units, _ = profile_units(TiedLM(), torch.randint(0, 40, (4, 6)), repeats=1, warmup=0,
                             optimizer_factory=lambda p: torch.optim.Adam(p))
    emb_bytes = 40 * 8 * 4
    # freezing the embedding's unit frees nothing: the head's read keeps it training
    assert [u.name for u in units] == ["emb", "mid", "lm_head"]
    assert units[0].grad_bytes == 0 and units[0].optimizer_state_bytes == 0
    assert units[2].grad_bytes == emb_bytes + 40 * 4 and units[2].optimizer_state_bytes > 2 * emb_bytes


def test_keep_trainable_below_one_is_refused_before_measuring():
    with pytest.raises(ValueError, match="keep_trainable must be at least 1"):
        profile_model(SlowMiddle(), torch.randn(8, 6), keep_trainable=0)


def test_unit_whose_input_needs_no_grad_is_marked_merged():
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.l0, self.l1, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(torch.relu(self.l1(self.l0(x).detach())))

    units, _ = profile_units(Detached(), torch.randn(3, 4), repeats=2, warmup=0)
    assert [u.backward_merged for u in units] == [False, True, False]
    assert units[1].backward_ms == 0.0  # its backward time is in unit 0's span


def test_profiling_leaves_the_users_random_streams_alone():
    """The timed training steps drew dropout masks from torch's generator: a run profiled first saw
    other draws than the same run unprofiled (review61)."""
    from smartfrz_fast.profile import profile_units

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(8, 8)
    before = torch.get_rng_state()
    profile_units(model, x, repeats=2, warmup=1)
    assert torch.equal(before, torch.get_rng_state())
