"""Labels: recorded runs turned into training windows, from either of two label sources.

Both sources give, per unit, the first snapshot from which the unit may be frozen
(``first_freezable [U]``, S when never); a window of T snapshots ending at snapshot s is
labelled 1 when s is at or after that point. The last unit (the head, kept trainable by the
engine) gets no windows.

- ``cka``: a unit is freezable from the first snapshot at which its linear CKA against its own
  representation at the end of training reached ``threshold`` and stayed there. It answers
  "has this layer stopped moving?". Default threshold 0.998 (``docs/predictor.md``).
- ``trials``: freezing trials (``trials.py``): the recorded run was branched at snapshot steps,
  the prefix ending at the unit frozen there (the shorter prefixes at their own earliest safe
  points) and trained to the end on the same batches; the unit is freezable from the earliest
  snapshot where that branch's final metric stayed within a tolerance of the unbranched run's. It answers "can it be frozen now without costing
  accuracy?". The trial results live in ``<trials dir>/<run name>.jsonl``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..history import SAMPLING, UNRECORDED_SAMPLING
from ..policy.base import FreezePolicy

DEFAULT_THRESHOLD = 0.998
# A run whose network did not learn (test accuracy below this) has no meaningful "end of
# training" to label against; it is left out (and listed in the provenance).
MIN_ACCURACY = 0.2
LABEL_SOURCES = ("cka", "trials", "cka+trials")
# The trials' search: each prefix's branches freeze the shorter prefixes at their earliest safe
# points too (a results file of another search is not read as labels).
SEARCH = "sequential"


# ----------------------------------------------------------------------------- CKA rule
def freeze_index(cka: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """``cka [U, S]`` -> ``[U]`` first snapshot from which CKA stays >= threshold (S if never)."""
    ok = cka >= threshold
    # stays ok to the end: reverse cumulative AND
    stays = torch.flip(torch.cumprod(torch.flip(ok, [1]).to(torch.int64), 1), [1]).bool()
    s = cka.shape[1]
    first = torch.where(stays, torch.arange(s).expand_as(stays), torch.full_like(stays, s, dtype=torch.int64))
    return first.min(1).values


def prefix_points(first: Tensor, window: int = 1) -> Tensor:
    """Per-unit first freezable snapshots ``[U]`` -> first snapshot at which the prefix ending at
    each unit may freeze: every unit in it may (a running max), and not before the first full
    window of ``window`` snapshots (the earliest a predictor can decide)."""
    return torch.cummax(first.clamp_min(window - 1), 0).values


def prefix_freeze_points(cka: Tensor, threshold: float, window: int = 1) -> Tensor:
    """``prefix_points`` of the CKA rule."""
    return prefix_points(freeze_index(cka, threshold), window)


# ----------------------------------------------------------------------------- trial rule
@dataclass(frozen=True)
class Tolerance:
    """When a branch counts as safe: its final metric within ``value`` of the unbranched run's.

    ``metric="accuracy"``: ``value`` in accuracy points (0.3 = 0.3 percentage points lost at most).
    ``metric="loss"``: ``value`` relative (0.01 = the test loss at most 1 % higher)."""

    metric: str = "accuracy"
    value: float = 0.3

    def __post_init__(self):
        if self.metric not in ("accuracy", "loss"):
            raise ValueError(f"trial metric is 'accuracy' (points) or 'loss' (relative), got {self.metric!r}")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"trial tolerance must be a finite number >= 0, got {self.value!r}")

    def safe(self, branch: Dict[str, float], reference: Dict[str, float]) -> bool:
        if self.metric == "accuracy":
            return 100.0 * (reference["accuracy"] - branch["accuracy"]) <= self.value + 1e-9
        return branch["loss"] <= reference["loss"] * (1.0 + self.value) + 1e-12

    def describe(self) -> str:
        return (f"final test accuracy at most {self.value:g} points below the unbranched run's"
                if self.metric == "accuracy" else
                f"final test loss at most {100 * self.value:g} % above the unbranched run's")


class TrialResultsError(ValueError):
    """A trial results file is unreadable or belongs to another run."""


BranchKey = Tuple[int, int, Optional[Tuple[int, ...]]]


def branch_key(row: Dict[str, Any]) -> BranchKey:
    """``(k, snapshot, before)``: prefix k frozen at the snapshot, the shorter prefixes at the
    snapshots ``before`` (the search's earlier answers). A row without ``before`` froze only
    prefix k (the first format): the same branch for k = 1, another experiment (None) else."""
    k, j = int(row["k"]), int(row["snapshot"])
    before = tuple(row["before"]) if "before" in row else (() if k == 1 else None)
    return k, j, before


def read_trials(path: Path) -> Tuple[Optional[Dict[str, Any]], Dict[BranchKey, Dict[str, Any]], List[Dict]]:
    """``(reference, branches by branch_key, other lines)`` of a JSON-lines results file.

    A torn last line (a run killed while writing) is ignored: that branch is simply redone."""
    reference, branches, other = None, {}, []
    if not path.exists():
        return reference, branches, other
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            # lines are appended whole and a torn last one is cut, so this is damage from outside;
            # deleting the line alone would not redo its branch (the search's done line stays)
            raise TrialResultsError(f"{path}:{i + 1} is not JSON ({exc}): the file was damaged. Delete the file "
                                    "to redo that run's trials, or put the line back from a copy") from exc
        kind = row.get("kind")
        if kind == "reference":
            reference = row
        elif kind == "branch":
            branches[branch_key(row)] = row
        else:
            other.append(row)
    return reference, branches, other


def trial_safety(branches: Dict[BranchKey, Dict], reference: Dict, tolerance: Tolerance) -> Dict[BranchKey, bool]:
    return {key: tolerance.safe(row, reference) for key, row in branches.items()}


def infer_safe(known: Dict[BranchKey, bool], k: int, j: int, before: Tuple[int, ...]) -> Optional[bool]:
    """What monotonicity in time says about freezing prefix ``k`` at snapshot ``j`` (after the
    shorter prefixes at ``before``) from branches already run: safe if it was safe at or before
    ``j``, unsafe if it was unsafe at or after ``j`` (freezing later is no worse). None: unknown."""
    same = [(j2, ok) for (k2, j2, b2), ok in known.items() if k2 == k and b2 == tuple(before)]
    if any(ok and j2 <= j for j2, ok in same):
        return True
    if any(not ok and j2 >= j for j2, ok in same):
        return False
    return None


def trial_freeze_points(path: Path, num_units: int, snapshots: int, tolerance: Tolerance) -> Tensor:
    """``[num_units]`` first freezable snapshot of each unit (its prefix) from a trial results file:
    the earliest safe branch point its finished search found at ``tolerance``; ``snapshots``
    (never) where none was safe."""
    reference, _, other = read_trials(path)
    if reference is None:
        raise TrialResultsError(f"{path} has no trials yet; run `python -m smartfrz_fast.lab.trials` "
                                "(or lab.rebuild) for this run")
    wanted = {"metric": tolerance.metric, "value": tolerance.value}
    done = [row for row in other if row.get("kind") == "search-done" and row.get("tolerance") == wanted
            and row.get("search") == SEARCH]
    if not done:
        raise TrialResultsError(f"{path}: no finished search at tolerance {wanted}; resume the trials "
                                "(finished branches are kept) or pass the tolerance they ran at")
    earliest = done[-1]["earliest"]
    if len(earliest) != num_units:
        raise TrialResultsError(f"{path}: {len(earliest)} prefixes searched, but the recording has {num_units} "
                                "non-head units: the trials and the recording are of different runs")
    return torch.tensor([snapshots if j is None else int(j) for j in earliest], dtype=torch.int64)


# ----------------------------------------------------------------------------- recordings
RECORDING_KEYS = {"name": str, "spec": dict, "units": list, "forward_flops": list, "valid": Tensor,
                  "history": Tensor, "cka": Tensor, "sample_every": int, "test_accuracy": float, "sampling": str}


class RecordingError(ValueError):
    """A recorded run file is unreadable or not a recording of ``collect.record_run``."""


def load_recording(path: Path) -> Dict[str, Any]:
    """A recorded run (``collect.record_run``), loaded without unpickling code and checked."""
    path = Path(path)
    try:
        r = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign, or holding objects beyond tensors and builtins
        raise RecordingError(f"{path} is not a readable recorded run ({type(exc).__name__}: {exc}); delete it "
                             "and record it again (`python -m smartfrz_fast.lab.collect --out DIR`)") from exc
    if not isinstance(r, dict):
        raise RecordingError(f"{path} holds a {type(r).__name__}, not a recorded run (a dict); delete and re-record it")
    r.setdefault("sampling", UNRECORDED_SAMPLING)
    for key, kind in RECORDING_KEYS.items():
        value = r.get(key)
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind):
            raise RecordingError(f"{path}: '{key}' is {type(value).__name__}, expected {kind.__name__}; the file is "
                                 "not a recording of this version of collect.py: delete and re-record it")
    if r["sampling"] != SAMPLING:
        raise RecordingError(f"{path} holds histories sampled as {r['sampling']!r}; the engine now samples "
                             f"{SAMPLING!r} (history.SAMPLING): delete and re-record it "
                             "(`python -m smartfrz_fast.lab.rebuild` re-records such files itself)")
    u = len(r["units"])
    hist, cka = r["history"], r["cka"]
    problems = []
    if hist.dim() != 3 or hist.shape[0] != u:
        problems.append(f"history {tuple(hist.shape)} is not [units={u}, S, K]")
    elif tuple(cka.shape) != tuple(hist.shape[:2]):
        problems.append(f"cka {tuple(cka.shape)} is not [units, S] = {tuple(hist.shape[:2])}")
    if tuple(r["valid"].shape) != (u,) or len(r["forward_flops"]) != u:
        problems.append("valid / forward_flops do not have one entry per unit")
    if "family" not in r["spec"]:
        problems.append("spec has no family")
    if problems:
        raise RecordingError(f"{path}: {'; '.join(problems)}: delete and re-record it")
    return r


@dataclass
class RunData:
    """One recorded run, ready for training: its snapshots and per-unit label points."""

    name: str
    family: str
    history: Tensor  # [U, S, K] float32 raw sampled weights, as the engine recorded them
    valid: Tensor  # [U] valid positions per unit
    cka: Tensor  # [U, S]
    units: List[str]
    forward_flops: List[int]
    first_freezable: Tensor  # [U] first snapshot from which each unit may freeze (S: never)
    source: str = "cka"

    @property
    def snapshots(self) -> int:
        return self.history.shape[1]

    def labels(self, window: int) -> Tensor:
        """``[U, S - window + 1]`` labels of the windows ending at snapshots window-1 .. S-1."""
        ends = torch.arange(window - 1, self.snapshots)
        return (ends[None, :] >= self.first_freezable[:, None]).float()

    def prefix_points(self, window: int) -> Tensor:
        return prefix_points(self.first_freezable, window)


@dataclass(frozen=True)
class LabelSource:
    """Which labels a training uses: ``kind="cka"`` at ``threshold``, or ``kind="trials"`` from
    ``trials_dir/<run name>.jsonl`` at ``tolerance``."""

    kind: str = "cka"
    threshold: float = DEFAULT_THRESHOLD
    trials_dir: Optional[Path] = None
    tolerance: Tolerance = Tolerance()

    def __post_init__(self):
        if self.kind not in LABEL_SOURCES:
            raise ValueError(f"label source {self.kind!r}: choose one of {LABEL_SOURCES}")
        if self.kind != "cka" and self.trials_dir is None:
            raise ValueError("trial labels need trials_dir (the folder of <run>.jsonl trial results: "
                             "`python -m smartfrz_fast.lab.rebuild` writes them under OUT/trials)")

    def describe(self) -> str:
        if self.kind == "cka":
            return (f"linear CKA (128-sample probe) of each unit's output vs the end of training; "
                    f"freezable from the first snapshot where CKA >= {self.threshold} and stays there")
        return (f"freezing trials: the unit's prefix frozen at a snapshot step (the shorter prefixes at their "
                f"own earliest safe steps), trained to the end on the same batches, is safe when its "
                f"{self.tolerance.describe()}; freezable from the earliest safe snapshot (searched with "
                f"monotonicity in time)" + (f"; and not before its linear CKA point (>= {self.threshold})"
                                            if self.kind == "cka+trials" else ""))


def load_runs(paths: Sequence[Path], source: LabelSource = LabelSource(), min_accuracy: float = MIN_ACCURACY,
              skipped: Optional[List[str]] = None) -> List[RunData]:
    """Recorded runs labelled by ``source``. Runs that did not learn, and (for trials) runs whose
    trials are missing or unfinished, are left out and named in ``skipped``."""
    runs = []
    for path in paths:
        r = load_recording(path)
        if r["test_accuracy"] < min_accuracy:
            if skipped is not None:
                skipped.append(f"{r['name']} (accuracy {r['test_accuracy']:.3f})")
            continue
        hist, valid, cka = r["history"].float(), r["valid"], r["cka"].float()
        keep = slice(0, hist.shape[0] - 1)  # the head gets no label
        u, s = hist.shape[0] - 1, hist.shape[1]
        first = freeze_index(cka[keep], source.threshold)
        if source.kind != "cka":
            try:
                safe = trial_freeze_points(Path(source.trials_dir) / f"{r['name']}.jsonl", u, s, source.tolerance)
            except TrialResultsError as exc:
                if skipped is not None:
                    skipped.append(f"{r['name']} ({exc})")
                continue
            first = safe if source.kind == "trials" else torch.maximum(first, safe)
        runs.append(RunData(name=r["name"], family=r["spec"]["family"], history=hist[keep], valid=valid[keep],
                            cka=cka[keep], units=r["units"][keep], forward_flops=r["forward_flops"][keep],
                            first_freezable=first, source=source.kind))
    return runs


def label_summary(runs: Sequence[RunData], thresholds: Sequence[float]) -> Dict[str, Dict[float, float]]:
    """Per family: mean CKA freeze point (fraction of the run) of the units, for each threshold."""
    out: Dict[str, Dict[float, float]] = {}
    for family in sorted({r.family for r in runs}):
        fam = [r for r in runs if r.family == family]
        out[family] = {}
        for t in thresholds:
            points = torch.cat([freeze_index(r.cka, t).float() / r.cka.shape[1] for r in fam])
            out[family][t] = float(points.mean())
    return out


class LabelSchedule(FreezePolicy):
    """Labels used as a policy, with hindsight: the prefix of i + 1 units freezes once
    ``freeze_steps[i]`` optimizer steps are done (non-decreasing). With CKA labels: if this costs
    accuracy, the labels themselves freeze too early, whatever a predictor learns. With trial
    labels (no window constraint) it is the hindsight oracle."""

    name = "label-oracle"
    deterministic_schedule = True

    def __init__(self, freeze_steps: Sequence[float]) -> None:
        super().__init__()
        self.freeze_steps = list(freeze_steps)
        if any(b < a for a, b in zip(self.freeze_steps, self.freeze_steps[1:])):
            raise ValueError(f"LabelSchedule: freeze steps must be non-decreasing (front to back), got {self.freeze_steps}")

    @classmethod
    def from_points(cls, points: Tensor, sample_every: int, snapshots: int) -> "LabelSchedule":
        """From per-prefix snapshot indices (``prefix_points``): snapshot s is taken after step
        (s + 1) * sample_every; S (never) becomes inf."""
        return cls([float("inf") if int(s) >= snapshots else (int(s) + 1) * sample_every for s in points])

    @classmethod
    def from_recording(cls, path: Path, threshold: float, window: Optional[int] = None) -> "LabelSchedule":
        """CKA labels of a recorded run; not before the first full window of ``window`` snapshots
        (default: the predictor's), the earliest SmartFRZ can decide."""
        from ..predictor.model import PredictorConfig

        run = load_recording(path)
        window = PredictorConfig().window if window is None else window
        prefix = prefix_freeze_points(run["cka"][:-1].float(), threshold, window)  # the head gets no label
        return cls.from_points(prefix, run["sample_every"], run["cka"].shape[1])

    def decide(self, step: int, frozen: int) -> Optional[int]:
        n = sum(1 for s in self.freeze_steps if s <= step)
        return n if n > frozen else None
