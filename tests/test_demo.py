"""The demo and the console script, in their --quick form (a few seconds)."""

import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install scikit-learn)")
pytest.importorskip("tqdm", reason="the demo needs tqdm")

from smartfrz_fast import cli, demo  # noqa: E402


def _run_quick(capsys, *extra):
    code = demo.main(["--quick", "--no-progress", "--threads", "1", *extra])
    out = capsys.readouterr().out
    return code, out


def test_quick_demo_runs_smartfrz_by_default(capsys):
    code, out = _run_quick(capsys)
    assert code == 0
    assert re.search(r"^\s+with smartfrz\s+[\d.]+%\s+[\d.]+ s", out, re.M), out
    assert "policy: SmartFRZ(" in out and "Freeze timeline" in out


def test_quick_demo_reports_accuracy_time_and_timeline(capsys):
    code, out = _run_quick(capsys, "--policy", "freezeout")
    assert code == 0
    # both runs' accuracy and wall time
    rows = re.findall(r"^\s+(full training|with freezeout)\s+([\d.]+)%\s+([\d.]+) s", out, re.M)
    assert [r[0] for r in rows] == ["full training", "with freezeout"], out
    for _, acc, seconds in rows:
        assert 0.0 <= float(acc) <= 100.0
        assert float(seconds) > 0.0
    assert re.search(r"time saved: -?[\d.]+ s \(-?[\d.]+% ", out), out
    assert re.search(r"training FLOPs saved \(engine's count\): [\d.]+%", out), out
    # the freeze timeline from freezer.report(): at least the first unit froze at some step
    assert "Freeze timeline" in out
    assert "policy: FreezeOut(" in out
    events = re.findall(r"^\s+(\d+)\s+(\d+)\s+[\d.]+%\s+[\d.]+%\s+(\S.*)$", out, re.M)
    assert events, out
    assert events[0][1] == "1" and events[0][2].startswith("conv1")
    steps = [int(e[0]) for e in events]
    assert steps == sorted(steps)


@pytest.mark.parametrize("policy", [p for p in demo.POLICIES if p != demo.DEFAULT_POLICY])
def test_quick_demo_other_policies(capsys, policy):
    code, out = _run_quick(capsys, "--policy", policy)
    assert code == 0
    assert f"with {policy}" in out
    assert "Freeze timeline" in out


def test_quick_demo_with_the_activation_cache(capsys):
    # static freezes half the units halfway (step 24 of 48): the rest of epoch 2 fills rows and
    # epoch 3 hits them.
    code, out = _run_quick(capsys, "--policy", "static", "--cache", "--epochs", "3")
    assert code == 0
    rows = dict((name, (acc, loss)) for name, acc, loss in re.findall(
        r"^\s+(with static(?:\+cache)?)\s+([\d.]+)%\s+[\d.]+ s\s+([\d.]+)$", out, re.M))
    assert rows.keys() == {"with static", "with static+cache"}, out
    assert rows["with static"] == rows["with static+cache"]  # fp32 rows: the same training
    assert re.search(r"time saved with the activation cache too: -?[\d.]+ s", out), out
    described = re.search(r"activation cache on: .*hits (\d+), misses (\d+)", out)
    assert described and int(described.group(1)) > 0, out


def test_smartfrz_without_weights_exits_with_code_2(capsys, monkeypatch):
    def unavailable(name, total_steps, num_freezable, model, probe):
        if name == "smartfrz":
            raise FileNotFoundError("no trained SmartFRZ predictor weights are installed")
        raise AssertionError(name)

    monkeypatch.setattr(demo, "build_policy", unavailable)
    code = demo.main(["--quick", "--no-progress", "--policy", "smartfrz"])
    captured = capsys.readouterr()
    assert code == 2
    assert "no trained SmartFRZ predictor weights" in captured.err
    assert "Results" not in captured.out  # nothing was trained


def test_bad_arguments_exit_with_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--policy", "nope"])
    assert info.value.code == 2
    for bad in (["--epochs", "0"], ["--image-size", "3"], ["--lr", "-1"], ["--lr", "nan"]):
        with pytest.raises(SystemExit) as info:
            demo.main(bad)
        assert info.value.code == 2, bad
    from smartfrz_fast import info as info_module

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as info:
            info_module.main(["--check", "--device", "cuda"])
        assert info.value.code == 2 and "no CUDA GPU is visible" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # was torch's RuntimeError, exit code 1 (an op failed)
        info_module.main(["--check", "--device", "bogus"])
    assert info.value.code == 2 and "--device bogus: not a device" in capsys.readouterr().err


def test_cli_forwards_to_the_demo(monkeypatch):
    seen = {}

    def fake_demo_main(argv, prog):
        seen["argv"], seen["prog"] = argv, prog
        return 0

    monkeypatch.setattr(demo, "main", fake_demo_main)
    assert cli.main(["demo", "--quick", "--policy", "linear"]) == 0
    assert seen == {"argv": ["--quick", "--policy", "linear"], "prog": "smartfrz-fast demo"}


def test_cli_forwards_to_the_profiler(monkeypatch):
    profile = pytest.importorskip("smartfrz_fast.profile")
    seen = {}
    monkeypatch.setattr(profile, "main", lambda argv, prog: seen.setdefault("argv", argv) and 0)
    assert cli.main(["profile", "--quick", "--threads", "1"]) == 0
    assert seen["argv"] == ["--quick", "--threads", "1"]


def test_cli_info_runs_with_its_own_options(capsys):
    # the real info.main, with what follows "info" (a stub here once hid that it re-read sys.argv)
    assert cli.main(["info"]) == 0
    assert "fallbacks" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["info", "--help"])
    assert exit_.value.code == 0 and "usage: smartfrz-fast info [-h] [--check]" in capsys.readouterr().out


def test_cli_without_command_prints_usage(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_module_entry_point_quick():
    proc = subprocess.run(
        [sys.executable, "-m", "smartfrz_fast.demo", "--quick", "--no-progress", "--threads", "1",
         "--policy", "linear"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "time saved" in proc.stdout
    assert "Freeze timeline" in proc.stdout
