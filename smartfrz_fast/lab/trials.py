"""Labels from freezing trials, and the hindsight oracle.

For a zoo run (fixed seed, fixed batch order) and a prefix of k units: branch the run, freeze
the prefix at snapshot j (after ``(j + 1) * sample_every`` optimizer steps) with the engine
(``SmartFreezer.freeze_to``), the shorter prefixes at their own earliest safe points found
before (``before``: freezing is front to back), train to the end on the same batches, and
compare the final test metric with the unbranched run's. ``(k, j | before)`` is *safe* when it
stays within the tolerance (``labels.Tolerance``: accuracy points, or relative for a loss).

Freezing prefix k alone, each prefix's earliest safe point taken together lost more than the
tolerance (``cnn-d6-w16``: -0.88 points at 0.3, all prefixes frozen early at once); conditioned
on the earlier answers, the last safe branch *is* the hindsight oracle, within the tolerance by
construction.

Monotonicity in time (safe at j => safe later) lets ``search_earliest`` find each prefix's
earliest safe point with an exponential search from the previous prefix's answer, then a binary
search over the candidate snapshots: a handful of branches per prefix instead of a grid; the
first prefix never safe ends the search (no longer prefix can freeze before it).

Resumable: every finished branch is appended as one JSON line to ``<out>/<run>.jsonl`` (first
line: the unbranched run); a restart reads them back and runs only the branches still needed.
The unbranched run is retrained only when a branch is missing: it is deterministic, and its
final metric is checked against the file's. It is the very run ``collect.record_run`` records
(the recording is written beside the trials when missing).

    python -m smartfrz_fast.lab.trials --out lab_runs [--runs NAME,...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..engine import SmartFreezer
from ..policy.static import StaticFreeze
from ..policy.smartfrz import snapshot_interval
from .collect import record_run, save_recording
from .labels import SEARCH, Tolerance, TrialResultsError, infer_safe, load_recording, read_trials, trial_safety
from .zoo import RunSpec, Session, zoo_specs

# Branch points: every DEFAULT_STRIDE-th snapshot (120 per run: 19 candidates, one per ~5 % of
# the run). Finer costs a branch or so per prefix more; coarser loses savings between points.
DEFAULT_STRIDE = 6


class OutOfTime(Exception):
    """The time budget ran out before the next branch (everything finished is saved)."""


def candidate_snapshots(snapshots: int, stride: int = DEFAULT_STRIDE) -> List[int]:
    """Every ``stride``-th snapshot, the last excluded (freezing when training ends saves nothing)."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"trial stride is a number of snapshots >= 1, got {stride!r}")
    return list(range(stride - 1, snapshots - 1, stride))


def search_earliest(num_prefixes: int, candidates: Sequence[int],
                    is_safe: Callable[[int, int, Tuple[int, ...]], bool]) -> List[Optional[int]]:
    """Earliest candidate snapshot at which each prefix k = 1 .. ``num_prefixes`` is safe (None:
    at none), asking ``is_safe(k, snapshot, before)`` (``before``: the earlier prefixes'
    answers) as few times as monotonicity in time allows: for each prefix an exponential search
    (lo, lo + 1, lo + 3, lo + 7, ...) from the previous prefix's answer lo (freezing is front to
    back), then a binary search between the last unsafe and the first safe probe."""
    n = len(candidates)
    out: List[Optional[int]] = []
    lo = 0
    for k in range(1, num_prefixes + 1):
        before = tuple(out)
        unsafe, safe, i = lo - 1, None, 0
        while lo < n:
            probe = min(lo + (1 << i) - 1, n - 1)
            if is_safe(k, candidates[probe], before):
                safe = probe
                break
            unsafe = probe
            if probe == n - 1:
                break
            i += 1
        if safe is None:  # never safe: no longer prefix can freeze either (front to back)
            return out + [None] * (num_prefixes - k + 1)
        a, b = unsafe + 1, safe
        while a < b:
            mid = (a + b) // 2
            if is_safe(k, candidates[mid], before):
                b = mid
            else:
                a = mid + 1
        out.append(candidates[a])
        lo = a
    return out


def grid_earliest(num_prefixes: int, candidates: Sequence[int],
                  is_safe: Callable[[int, int, Tuple[int, ...]], bool]) -> List[Optional[int]]:
    """The same answer by brute force (each prefix at every candidate from the previous prefix's
    answer on): for tests."""
    out: List[Optional[int]] = []
    for k in range(1, num_prefixes + 1):
        if out and out[-1] is None:
            out.append(None)
            continue
        lo = candidates.index(out[-1]) if out else 0
        out.append(next((j for j in candidates[lo:] if is_safe(k, j, tuple(out))), None))
    return out


def continue_run(spec: RunSpec, state: Dict[str, Any], schedule: Sequence[Tuple[int, int]]) -> Dict[str, Any]:
    """Continue a run from ``state`` (``Session.checkpoint``) to its end, freezing the first k
    units once ``step`` optimizer steps are done for each ``(step, k)`` of ``schedule``, with the
    engine's freeze action. Returns the final test metrics, the units frozen, and the share of
    the run's training FLOPs saved (steps before ``state`` saved nothing)."""
    session = Session.restore(spec, state)
    # the decisions come from `schedule`, applied below with the engine's freeze_to
    freezer = SmartFreezer(session.model, session.optimizer, policy=StaticFreeze(0), total_steps=spec.steps,
                           example_inputs=session.example_inputs())
    pending = sorted(schedule)
    saved = 0.0
    while True:
        while pending and pending[0][0] <= session.step:
            freezer.freeze_to(pending.pop(0)[1], step=session.step)
        if session.step >= spec.steps:
            break
        session.train_step()
        saved += freezer.frozen_flops_fraction()
    result = {**session.task.evaluate(session.model), "frozen": freezer.num_frozen,
              "flops_saved": saved / spec.steps}
    freezer.close()
    return result


def append_line(path: Path, row: Dict[str, Any]) -> None:
    """Append one JSON line, on disk before it returns."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def drop_torn_tail(path: Path) -> None:
    """A job killed while appending leaves a partial last line: cut it, so the next append
    starts on a line of its own (that branch is simply run again)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


# A finished run re-recorded on another CPU (a fresh checkout has the trial results, not the
# recordings) differs as a run nudged by rounding does: the zoo's runs nudged by 1e-6 or 1e-3
# moved by at most 1.07 points (bench/results/noise_floor.md); their losses near 0 move by a
# quarter. Further off than this, it is not the same run (other code or another zoo).
RERECORD_ACCURACY_POINTS = 1.5
RERECORD_LOSS_RELATIVE = 0.3


def _same_run_elsewhere(row: Dict[str, Any], reference: Dict[str, Any], metric: str) -> bool:
    if metric == "accuracy":
        return abs(row["accuracy"] - reference["accuracy"]) * 100 <= RERECORD_ACCURACY_POINTS
    return abs(row["loss"] - reference["loss"]) <= RERECORD_LOSS_RELATIVE * abs(reference["loss"])


class Trials:
    """The freezing trials of one zoo run, resumable through ``path`` (JSON lines).

    ``recording``: where the run's recording (``collect.record_run``) lives; written from the
    unbranched run when missing. ``deadline``: a ``time.time()`` after which no new branch
    starts (``OutOfTime``)."""

    def __init__(self, spec: RunSpec, path: Path, tolerance: Tolerance = Tolerance(), stride: int = DEFAULT_STRIDE,
                 recording: Optional[Path] = None, deadline: Optional[float] = None, log=print) -> None:
        self.spec, self.path, self.tolerance, self.stride = spec, Path(path), tolerance, stride
        self.recording, self.deadline, self.log = recording, deadline, log
        self.every = snapshot_interval(spec.steps)
        self.snapshots = spec.steps // self.every
        self.candidates = candidate_snapshots(self.snapshots, stride)
        self._checkpoints: Optional[Dict[int, Dict[str, Any]]] = None
        self.branches_run = 0

    # -------------------------------------------------------------- the unbranched run
    def _unbranched(self, reference: Optional[Dict[str, Any]], exact: bool = True) -> Dict[str, Any]:
        """Train the unbranched run (= the recording), keeping a checkpoint at every branch point;
        returns its reference row (checked against ``reference`` when the file has one: equal, or
        with ``exact=False`` as close as ``_same_run_elsewhere`` asks: another CPU's rounding grows
        over a run like a nudge of the initial weights)."""
        wanted = {(j + 1) * self.every for j in self.candidates}
        checkpoints: Dict[int, Dict[str, Any]] = {}

        def on_step(session: Session) -> None:
            if session.step in wanted:
                checkpoints[session.step] = session.checkpoint()

        self.log(f"{self.spec.name}: training the unbranched run ({self.spec.steps} steps)")
        cpu = time.process_time()
        run = record_run(self.spec, on_step=on_step)
        row = {"kind": "reference", "name": self.spec.name, "spec": self.spec.as_dict(),
               "accuracy": run["test_accuracy"], "loss": run["test_loss"], "units": len(run["units"]),
               "unit_names": run["units"], "forward_flops": run["forward_flops"], "snapshots": self.snapshots,
               "sample_every": self.every, "threads": torch.get_num_threads(), "seconds": round(run["seconds"], 1),
               "cpu_seconds": round(time.process_time() - cpu, 1)}
        if reference is not None and (reference["accuracy"], reference["loss"]) != (row["accuracy"], row["loss"]):
            if exact or not _same_run_elsewhere(row, reference, self.tolerance.metric):
                raise TrialResultsError(
                    f"{self.path}: the unbranched run {self.spec.name} did not reproduce (accuracy {row['accuracy']} "
                    f"loss {row['loss']}; the file has {reference['accuracy']} / {reference['loss']}, made with "
                    f"{reference.get('threads')} threads, now {row['threads']}). Resume with the same thread count, "
                    "torch build and CPU kind, or delete the file to redo this run's trials.")
            self.log(f"{self.spec.name}: the unbranched run reproduced closely, not bit for bit "
                     f"(accuracy {row['accuracy']} / loss {row['loss']}, the file's {reference['accuracy']} / "
                     f"{reference['loss']}: another CPU's rounding); recording it")
        if self.recording is not None:
            if self.recording.exists():
                recorded = load_recording(self.recording)["test_accuracy"]
                if recorded != row["accuracy"]:
                    raise TrialResultsError(
                        f"{self.recording} (accuracy {recorded}) is not the run the trials branch from (accuracy "
                        f"{row['accuracy']}): it was recorded by other code or threads. Delete it; the trials "
                        "record it again.")
            else:
                self.recording.parent.mkdir(parents=True, exist_ok=True)
                save_recording(run, self.recording)
        self._checkpoints = checkpoints
        return row

    # -------------------------------------------------------------- branches
    def schedule(self, k: int, j: int, before: Sequence[int]) -> List[Tuple[int, int]]:
        """``(step, units)`` freezes of branch (k, j | before): prefix i + 1 at ``before[i]``,
        prefix k at snapshot j (a snapshot is taken after ``(j + 1) * sample_every`` steps)."""
        return [((b + 1) * self.every, i + 1) for i, b in enumerate(before)] + [((j + 1) * self.every, k)]

    def _check_time(self, what: str) -> None:
        """No new training run (a branch, the unbranched run) starts after the deadline."""
        if self.deadline is not None and time.time() > self.deadline:
            raise OutOfTime(f"{self.spec.name}: time budget spent before {what}")

    def _branch(self, k: int, j: int, before: Tuple[int, ...], reference: Dict[str, Any]) -> Dict[str, Any]:
        self._check_time(f"branch (k={k}, snapshot {j})")
        if self._checkpoints is None:
            self._unbranched(reference)
        schedule = self.schedule(k, j, before)
        t0, cpu = time.perf_counter(), time.process_time()
        # from the first freeze on: the unbranched run's checkpoint there
        result = continue_run(self.spec, self._checkpoints[schedule[0][0]], schedule)
        # wall time depends on the machine's load; CPU time (1 thread) is what a rerun costs
        row = {"kind": "branch", "k": k, "snapshot": j, "step": schedule[-1][0], "before": list(before), **result,
               "seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - cpu, 2)}
        append_line(self.path, row)
        self.branches_run += 1
        ok = self.tolerance.safe(row, reference)
        self.log(f"{self.spec.name}: prefix {k} at step {row['step']}/{self.spec.steps}: accuracy "
                 f"{100 * row['accuracy']:.2f} vs {100 * reference['accuracy']:.2f} -> {'safe' if ok else 'unsafe'} "
                 f"({row['seconds']:.1f} s)")
        return row

    def run(self) -> Dict[str, Any]:
        """Search every prefix's earliest safe step, measure the oracle schedule, and return the
        ``search-done`` row (also appended). Already finished work is read back, not redone."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(self.path)
        reference, branches, other = read_trials(self.path)
        if reference is not None and reference.get("spec") != self.spec.as_dict():
            raise TrialResultsError(f"{self.path} holds the trials of {reference.get('spec')}, not of "
                                    f"{self.spec.as_dict()}: point --out elsewhere or delete the file")
        settings = {"tolerance": {"metric": self.tolerance.metric, "value": self.tolerance.value},
                    "stride": self.stride, "search": SEARCH}
        for row in other:
            if row.get("kind") == "search-done" and all(row.get(k) == v for k, v in settings.items()):
                if self.recording is not None and not self.recording.exists():
                    # a fresh checkout has the results, not the recordings; the histories only need
                    # the same run, which another CPU's rounding reproduces closely, not bit for bit
                    self._check_time("recording the unbranched run again")
                    self._unbranched(reference, exact=False)
                return row
        t0 = time.perf_counter()
        if reference is None:
            self._check_time("the unbranched run")
            reference = self._unbranched(None)
            append_line(self.path, reference)
        known = trial_safety(branches, reference, self.tolerance)
        rows = dict(branches)

        def is_safe(k: int, j: int, before: Tuple[int, ...]) -> bool:
            inferred = infer_safe(known, k, j, before)
            if inferred is None:
                row = self._branch(k, j, before, reference)
                rows[(k, j, before)] = row
                known[(k, j, before)] = inferred = self.tolerance.safe(row, reference)
            return inferred

        prefixes = reference["units"] - 1  # the head stays trainable (the engine's keep_trainable=1)
        earliest = search_earliest(prefixes, self.candidates, is_safe)
        found = [j for j in earliest if j is not None]
        if found:  # the hindsight oracle is the last safe branch: every found prefix at its point
            key = (len(found), found[-1], tuple(found[:-1]))
            if key not in rows:  # its safety was inferred from an earlier safe point: run it
                rows[key] = self._branch(*key, reference)
            oracle = {**rows[key], "schedule": [list(s) for s in self.schedule(*key)]}
        else:
            oracle = {"accuracy": reference["accuracy"], "loss": reference["loss"], "frozen": 0,
                      "flops_saved": 0.0, "schedule": []}
        append_line(self.path, {**oracle, "kind": "oracle"})
        done = {"kind": "search-done", **settings, "earliest": earliest, "candidates": self.candidates,
                "branches": len(read_trials(self.path)[1]),
                "oracle_accuracy_change_points": round(100 * (oracle["accuracy"] - reference["accuracy"]), 3),
                "oracle_flops_saved": oracle["flops_saved"], "seconds": round(time.perf_counter() - t0, 1)}
        append_line(self.path, done)
        self.log(f"{self.spec.name}: earliest safe snapshots {earliest}; oracle "
                 f"{done['oracle_accuracy_change_points']:+.2f} points, {100 * oracle['flops_saved']:.1f} % FLOPs saved "
                 f"({self.branches_run} new branches, {done['branches']} in all)")
        return done


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smartfrz_fast.lab.trials",
                                description="Freezing trials of zoo runs (resumable): labels and the hindsight oracle.")
    p.add_argument("--out", type=Path, default=Path("lab_runs"),
                   help="lab folder: trials in OUT/trials/<run>.jsonl, recordings in OUT/zoo/<run>.pt")
    p.add_argument("--runs", default=None, help="comma-separated zoo run names (default: the whole zoo)")
    p.add_argument("--quick", action="store_true", help="the tiny CI zoo")
    p.add_argument("--tolerance", type=float, default=Tolerance().value)
    p.add_argument("--metric", choices=("accuracy", "loss"), default=Tolerance().metric)
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help="snapshots between branch points")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=None, help="start no branch after this long")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = {s.name: s for s in zoo_specs(args.quick)}
    names = args.runs.split(",") if args.runs else list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        p.error(f"not zoo runs: {unknown}; the zoo has {sorted(specs)}")
    deadline = None if args.max_minutes is None else time.time() + 60 * args.max_minutes
    log = lambda m: print(m, flush=True)  # noqa: E731
    try:
        for name in names:
            Trials(specs[name], args.out / "trials" / f"{name}.jsonl", Tolerance(args.metric, args.tolerance),
                   args.stride, recording=args.out / "zoo" / f"{name}.pt", deadline=deadline, log=log).run()
    except OutOfTime as exc:
        log(f"stopped: {exc}; run the same command again to resume")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
