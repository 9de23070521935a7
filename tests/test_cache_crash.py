"""Crash consistency of the mmap activation cache: a real training process (tests/cache_crash_worker.py)
is killed with SIGKILL inside row writes, inside the move of the rows to a deeper boundary, just
after that move, inside checkpoint writes and at random moments, then resumed from its last
checkpoint, as often as it takes to finish. Every finished run must end with the weights of the
uninterrupted run, bit for bit (fp32 cache, deterministic CPU run)."""

import multiprocessing
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from tests import cache_crash_worker as worker

_ctx = multiprocessing.get_context("forkserver")
_ctx.set_forkserver_preload(["torch", "smartfrz_fast.cache", "tests.cache_crash_worker"])  # one import for all runs


def _start(out: Path, crash=None):
    proc = _ctx.Process(target=worker.run, args=(str(out), crash))
    proc.start()
    return proc


def _finish(out: Path, crash=None, timeout=120) -> int:
    """Run (and resume) until the run finishes; returns how many times it was killed."""
    kills = 0
    while not (out / "final.pt").exists():
        proc = _start(out, crash if kills == 0 else None)
        proc.join(timeout)
        assert proc.exitcode is not None, "the worker hung"
        if proc.exitcode == -signal.SIGKILL:
            kills += 1
        else:
            assert proc.exitcode == 0, f"the worker failed (exit code {proc.exitcode})"
    return kills


def _events(out: Path, kind: str) -> int:
    return sum(1 for line in open(out / "events") if line.strip() == kind)


def _assert_same(out: Path, reference: dict) -> None:
    final = torch.load(out / "final.pt", weights_only=True)
    for name, p in reference["model"].items():
        assert torch.equal(p, final["model"][name]), f"{name} differs from the uninterrupted run ({out.name})"
    assert final["active"] and final["boundary"] == reference["boundary"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert _finish(out) == 0
    final = torch.load(out / "final.pt", weights_only=True)
    final["events"] = {kind: _events(out, kind) for kind in ("write", "save", "commit")}
    # The run stores rows at its first boundary, moves them at the deeper freeze, stores more.
    assert final["events"]["write"] >= 6 and final["events"]["commit"] == 2 and final["stats"]["migrated"] > 0
    return final


def test_killed_inside_row_writes_migrations_and_checkpoints(reference, tmp_path):
    events = reference["events"]
    rng = random.Random()
    seed = rng.randrange(2**31)
    rng.seed(seed)
    cases = [{"write": k} for k in rng.sample(range(1, events["write"] + 1), min(6, events["write"]))]
    cases += [{"commit": k} for k in range(1, events["commit"] + 1)]  # the file made, then moved deeper
    cases += [{"save": k} for k in rng.sample(range(1, events["save"] + 1), 2)]
    for i, crash in enumerate(cases):
        out = tmp_path / f"case{i}"
        out.mkdir()
        assert _finish(out, crash) == 1, crash
        _assert_same(out, reference)
        leftovers = [p.name for p in out.iterdir() if ".smartfrz-tmp-" in p.name]
        assert leftovers == [], leftovers  # an interrupted move's file is cleared by the next file made
    print(f"seed {seed}: {len(cases)} kills, every resume bit-identical")


def test_killed_at_random_moments_again_and_again(reference, tmp_path):
    # Writes are slowed down (a sleep halfway through each) so that many kills land inside one;
    # a run is killed up to 5 times, each resume from the last checkpoint.
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    out = tmp_path / "random"
    out.mkdir()
    kills = 0
    while not (out / "final.pt").exists() and kills < 5:
        proc = _start(out, {"slow": 0.05})
        time.sleep(rng.uniform(0.05, 1.5))
        proc.kill()
        proc.join(60)
        kills += proc.exitcode == -signal.SIGKILL
    _finish(out)
    _assert_same(out, reference)
    print(f"seed {seed}: killed {kills} times")
