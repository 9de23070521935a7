"""One command that rebuilds the predictor's weights and the comparison table, resumable.

    nice -n 19 python -m smartfrz_fast.lab.rebuild --out lab_runs [--max-hours H]

Stages (each skips what its files show finished, so the command resumes wherever it stopped;
a recording or predictor file made from histories sampled otherwise than ``history.SAMPLING``
is not finished, and is made again):

1. ``trials``: every zoo run (families interleaved, so that a partial rebuild covers them all)
   and every evaluation network is recorded (``OUT/zoo/<run>.pt``) and its freezing trials run
   (``OUT/trials/<run>.jsonl``, one JSON line per branch): trial labels and the hindsight oracle.
2. ``predictors``: for each label source (``cka``, ``trials``), one predictor per family trained
   on the other families (``OUT/predictors/<source>/without-<family>.pt``), then one on all
   (``all.pt``, with the held-out metrics in its provenance). Starts once stage 1 is complete.
3. ``evaluate``: the evaluation networks (``EVAL_SPECS``, plus one zoo run per family from
   scratch and one fine-tuned, scored by the predictors that never saw their family) trained
   with every policy, back to back, one JSON line per run (``OUT/eval-<shard>.jsonl``); full training
   and SmartFRZ also on a second seed.
4. ``table``: ``OUT/policy_comparison.md`` (the oracle column from the trials), written by the shard
   that finds every evaluation row there.

Nothing here replaces the shipped weights: compare ``OUT/predictors/*/all.pt``'s leave-one-
family-out metrics with the shipped file's, and copy by hand if better (``docs/predictor.md``).
``OUT/progress.md`` says what is done and an estimate of what remains. ``--max-hours``: start no
new piece after that long. ``--shard I/N``: this process does every N-th piece of each stage from
the I-th (one process per core; a shard that reaches a stage whose inputs another shard still makes
stops there). Exit code 3: not finished (out of time, or waiting for another shard): run the same
command again; 0: every stage asked for is done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..cache.storage import try_lock
from ..history import SAMPLING
from ..predictor.model import PredictorWeightsError, load_predictor, write_atomically
from .evaluate import TABLE_COLUMNS, build_policy, latest_rows, policy_settings, train_with_policy, write_table
from .labels import SEARCH, LabelSource, RecordingError, Tolerance, TrialResultsError, load_recording, read_trials
from .train import leave_one_out, run_pipeline
from .trials import DEFAULT_STRIDE, OutOfTime, Trials, append_line, drop_torn_tail
from .zoo import EVAL_SPECS, RunSpec, zoo_specs

STAGES = ("trials", "predictors", "evaluate", "table")
SECOND_SEED = 100  # full training and SmartFRZ are run again with seed + this


def interleaved(specs: Sequence[RunSpec]) -> List[RunSpec]:
    """Specs reordered round-robin over families (first of each family, then second, ...)."""
    by_family: Dict[str, List[RunSpec]] = defaultdict(list)
    for spec in specs:
        by_family[spec.family].append(spec)
    out: List[RunSpec] = []
    for i in range(max(len(v) for v in by_family.values())):
        out += [v[i] for v in by_family.values() if i < len(v)]
    return out


def evaluation_networks(zoo: Sequence[RunSpec]) -> List[RunSpec]:
    """EVAL_SPECS, and per family its first zoo run from scratch and its first fine-tuned one
    (scored by predictors that never saw the family: the test of every family, unseen)."""
    nets = list(EVAL_SPECS)
    for finetune in (False, True):
        seen = set()
        for spec in zoo:
            if spec.finetune == finetune and spec.family not in seen:
                seen.add(spec.family)
                nets.append(spec)
    return nets


def second_seed(spec: RunSpec) -> RunSpec:
    return RunSpec(**{**spec.as_dict(), "seed": spec.seed + SECOND_SEED})


class Rebuild:
    def __init__(self, out: Path, quick: bool = False, tolerance: Tolerance = Tolerance(),
                 stride: int = DEFAULT_STRIDE, deadline: Optional[float] = None, log=print,
                 shard: Tuple[int, int] = (0, 1)) -> None:
        self.out, self.quick, self.tolerance, self.stride = Path(out), quick, tolerance, stride
        self.deadline, self.log = deadline, log
        self.shard = shard
        self.zoo = zoo_specs(quick)
        self.trial_specs = interleaved(self.zoo) + ([] if quick else list(EVAL_SPECS))
        self.networks = self.zoo[:2] if quick else evaluation_networks(self.zoo)
        self.families = sorted({s.family for s in self.zoo})
        self.sources = {"cka": LabelSource("cka"),
                        "trials": LabelSource("trials", trials_dir=self.out / "trials", tolerance=tolerance)}
        self.started = time.time()
        self._settings_now: Dict[tuple, str] = {}  # (policy, weights) -> policy_settings of the policy built now

    def _check_time(self, what: str) -> None:
        if self.deadline is not None and time.time() > self.deadline:
            raise OutOfTime(f"time budget spent before {what}")

    # ------------------------------------------------------------------ stages
    def mine(self, pieces: Sequence) -> List:
        """This process's share of a stage's pieces (``--shard i/n``: every n-th from the i-th)."""
        i, n = self.shard
        return list(pieces)[i::n]

    def trials(self) -> bool:
        for spec in self.mine(self.trial_specs):
            self.log(f"[trials {self.trial_specs.index(spec) + 1}/{len(self.trial_specs)}] {spec.name}")
            recording = self.out / "zoo" / f"{spec.name}.pt"
            problem = self._recording_problem(spec) if recording.exists() else None
            if problem is not None:  # cut short, from other code, or of another history sampling
                self.log(f"recording {spec.name} again: {problem}")
                recording.unlink()  # the trials re-record it from their unbranched run (checked against it)
            Trials(spec, self.out / "trials" / f"{spec.name}.jsonl", self.tolerance, self.stride,
                   recording=recording, deadline=self.deadline, log=self.log).run()
            self.write_progress()
        return True

    def predictors(self) -> bool:
        if not self._trials_done():
            self.log("predictors: waiting for the trials stage to finish")
            return False
        for name, family in self.mine([(n, f) for n in self.sources for f in self.families]):
            folder = self.out / "predictors" / name
            if not self._predictor_current(folder / f"without-{family}.pt"):
                self._check_time(f"the {name} predictor without {family}")
                leave_one_out(self.out / "zoo", folder, [family], self.sources[name], None, log=self.log,
                              quick=self.quick, all_families=self.families, specs=self.zoo)
        for name, source in self.mine(list(self.sources.items())):
            folder = self.out / "predictors" / name
            if not all(self._predictor_current(folder / f"without-{f}.pt") for f in self.families):
                self.log(f"predictors: {name}/all.pt waits for every without-<family>.pt (another shard)")
                return False
            if not self._predictor_current(folder / "all.pt"):
                self._check_time(f"the {name} predictor on all families")
                run_pipeline(self.out / "zoo", folder / "all.pt", self.quick, source, self.families, log=self.log,
                             recorded_only=True, unseen_dir=folder, specs=self.zoo)
            self.write_progress()
        return True

    def _runs_to_evaluate(self) -> List[tuple]:
        """(spec, policy, weights) of every evaluation run, in order (a network's runs back to back)."""
        pred = self.out / "predictors"
        runs = []
        for spec in self.networks:
            unseen = {f"smartfrz-unseen-{s}": pred / s / f"without-{spec.family}.pt" for s in self.sources}
            for policy in ("full", "smartfrz", *unseen, "freezeout", "autofreeze", "linear", "egeria"):
                runs.append((spec, policy, unseen.get(policy)))
            # the second seed for the shipped weights' label source, scored by the predictor that never saw the family
            runs += [(second_seed(spec), "full", None),
                     (second_seed(spec), "smartfrz-unseen-cka", unseen["smartfrz-unseen-cka"])]
        return runs

    def _eval_rows(self) -> Dict[tuple, Dict]:
        # one file per shard; a torn last line: that run is redone
        return latest_rows(sorted(self.out.glob("eval*.jsonl")), skip_torn=True)

    def evaluate(self) -> bool:
        if not all(self._predictor_current(self.out / "predictors" / s / "all.pt") for s in self.sources):
            self.log("evaluate: waiting for the predictors stage to finish")
            return False
        done = self._eval_rows()
        threads = {row["threads"] for row in done.values() if "threads" in row}  # (rows before 2026-12-07: none)
        if threads - {torch.get_num_threads()}:
            # another thread count rounds otherwise: the table mixed both kinds of row, silently
            # (review95: Egeria, which froze nothing, at -0.5 points)
            raise ValueError(f"{self.out}: the evaluation rows were made with {sorted(threads)} thread(s), this run "
                             f"has {torch.get_num_threads()}. Resume with the same --threads, or move "
                             f"{self.out}/eval-*.jsonl away to redo every row.")
        mine = {id(spec) for spec in self.mine(self.networks)}  # a network's runs stay together
        for spec, policy, weights in self._runs_to_evaluate():
            if id(self._network_of(spec)) not in mine:
                continue
            row = done.get((spec.name, policy))
            if row is not None and not self._stale(row, policy, weights):
                continue
            self._check_time(f"evaluating {spec.name} with {policy}")
            row = dict(train_with_policy(spec, policy, weights), threads=torch.get_num_threads(),
                       finished=round(time.time(), 1))
            path = self.out / f"eval-{self.shard[0]}.jsonl"
            drop_torn_tail(path)  # the half line of a run killed while writing: that run was redone
            append_line(path, row)
            self.log(json.dumps({k: v for k, v in row.items() if k != "timeline"}))
        self.write_progress()
        return True

    def _stale(self, row: Dict, policy: str, weights: Optional[Path]) -> bool:
        """A SmartFRZ row made with other settings or weights than SmartFRZ's now (a default
        changed, the shipped weights were replaced): it is redone, its old line stays in the file."""
        if not policy.startswith("smartfrz"):
            return False
        key = (policy, weights)
        if key not in self._settings_now:
            self._settings_now[key] = policy_settings(build_policy(policy, weights))
        return row.get("policy_settings") != self._settings_now[key]

    def _network_of(self, spec: RunSpec) -> RunSpec:
        """The evaluation network a run belongs to (its second seed belongs to the first)."""
        return next(n for n in self.networks if n.name == spec.name or second_seed(n).name == spec.name)

    def table(self) -> bool:
        """The table, once every scheduled row is there (rows of today's runs, made with today's
        settings): whichever shard finishes last writes it (a shard done first wrote a table
        without the other's rows)."""
        scheduled = {(spec.name, policy): weights for spec, policy, weights in self._runs_to_evaluate()}
        rows = [row for key, row in self._eval_rows().items()
                if key in scheduled and not self._stale(row, key[1], scheduled[key])]
        if len(rows) < len(scheduled):
            self.log(f"table: waiting for {len(scheduled) - len(rows)} of {len(scheduled)} evaluation runs "
                     "(another shard's, or this one's next time)")
            return False
        for spec in self.networks:  # the hindsight oracle of each network, from its trials
            reference, _, other = read_trials(self.out / "trials" / f"{spec.name}.jsonl")
            if self._search_done(other) is None:
                continue
            # written just before its search-done line
            oracle = next((r for r in reversed(other) if r.get("kind") == "oracle"), None)
            if oracle is not None and "accuracy" in oracle:
                rows.append({"network": spec.name, "policy": "oracle", "accuracy": oracle["accuracy"],
                             "flops_saved": oracle["flops_saved"]})
        path = self.out / "policy_comparison.md"
        note = (f"Made by `python -m smartfrz_fast.lab.rebuild`. `smartfrz-unseen-<labels>`: the predictor trained "
                f"without the network's family on CKA or freezing-trial labels; `oracle`: the hindsight schedule of "
                f"the freezing trials (each prefix at its earliest safe step, {self.tolerance.describe()}; no wall "
                f"time: it is not a policy one can run).")

        def write(tmp: Path) -> None:
            write_table(rows, tmp, note=note)
            with open(tmp, "a") as f:
                f.write("\n".join(["", *self.goal_lines(rows)]) + "\n")
        write_atomically(path, write)  # two shards may finish together
        self.log(f"wrote {path}")
        return True

    @staticmethod
    def goal_lines(rows: Sequence[Dict]) -> List[str]:
        """Issue 16's goals per network, for each leave-one-family-out SmartFRZ: at most 0.5
        points lost; at least 25 % saved where the oracle saves that much (40 % on fine-tuning);
        the share of the oracle's savings kept."""
        by = {(r["network"], r["policy"]): r for r in rows}
        lines = ["| network | policy | accuracy change | FLOPs saved | oracle saves | share of oracle | goals met |",
                 "|---|---|---|---|---|---|---|"]
        for net in dict.fromkeys(r["network"] for r in rows):
            full, oracle = by.get((net, "full")), by.get((net, "oracle"))
            if full is None or oracle is None:
                continue
            need = min(oracle["flops_saved"], 0.40 if net.endswith("-ft") else 0.25)
            for policy in ("smartfrz", "smartfrz-unseen-cka", "smartfrz-unseen-trials"):
                r = by.get((net, policy))
                if r is None:
                    continue
                delta = 100 * (r["accuracy"] - full["accuracy"])
                share = r["flops_saved"] / oracle["flops_saved"] if oracle["flops_saved"] > 0 else float("nan")
                met = delta >= -0.5 and r["flops_saved"] >= need - 1e-9
                lines.append(f"| {net} | {policy} | {delta:+.2f} | {100 * r['flops_saved']:.1f} % | "
                             f"{100 * oracle['flops_saved']:.1f} % | {share:.2f} | {'yes' if met else 'no'} |")
        return lines

    def compare_labels(self) -> List[str]:
        """Markdown rows, per run with finished trials: the trial oracle (accuracy change, FLOPs
        saved) and how the CKA labels (0.998) relate to it: prefixes whose CKA point comes
        before their earliest safe point (CKA would freeze them at a cost) and after it."""
        from .labels import DEFAULT_THRESHOLD, load_recording, prefix_freeze_points

        lines = ["| run | units | oracle accuracy change | oracle FLOPs saved | CKA points before safe | "
                 "CKA points after safe | CKA schedule's FLOPs saved |", "|---|---|---|---|---|---|---|"]
        for spec in self.trial_specs:
            path, recording = self.out / "trials" / f"{spec.name}.jsonl", self.out / "zoo" / f"{spec.name}.pt"
            reference, _, other = read_trials(path)
            done = self._search_done(other)
            if done is None or not recording.exists():
                continue
            r = load_recording(recording)
            s = r["cka"].shape[1]
            cka = prefix_freeze_points(r["cka"][:-1].float(), DEFAULT_THRESHOLD)
            safe = torch.tensor([s if j is None else j for j in done["earliest"]])
            # of the whole run's training FLOPs, as the oracle's: a unit frozen after snapshot p
            # saves its backward (2/3 of its work) over the rest of the run
            flops = torch.tensor(r["forward_flops"], dtype=torch.float64)
            rest = (1 - (cka.double() + 1) / s).clamp_min(0)
            cka_saved = float((flops[:-1] / flops.sum() * rest).sum() * 2 / 3)
            lines.append(f"| {spec.name} | {len(safe)} | {done['oracle_accuracy_change_points']:+.2f} | "
                         f"{100 * done['oracle_flops_saved']:.1f} % | {int((cka < safe).sum())} | "
                         f"{int((cka > safe).sum())} | {100 * cka_saved:.1f} % |")
        return lines

    def replay_lines(self, predictors: Dict[str, Path]) -> List[str]:
        """Markdown rows, per zoo run with finished trials: each leave-one-family-out predictor
        (``predictors``: name -> folder of ``without-<family>.pt``) replayed on the run's
        recording as SmartFRZ decides in use (first decision at ``min_progress`` of the run,
        threshold 0.5, patience 1), against the trial oracle: FLOPs saved, units frozen before
        their earliest safe snapshot, and how early the earliest of them (share of the run).
        Offline and cheap; ``evaluate`` measures accuracy in real runs."""
        from ..policy.smartfrz import DEFAULT_MIN_PROGRESS
        from ..predictor import load_predictor
        from .labels import load_runs
        from .scoring import flops_saved_of_units, replay, window_probabilities

        runs = load_runs([self.out / "zoo" / f"{s.name}.pt" for s in self.zoo
                          if (self.out / "zoo" / f"{s.name}.pt").exists()], self.sources["trials"])
        header = "| run | oracle | " + " | ".join(predictors) + " |"
        lines = [header, "|---|---|" + "---|" * len(predictors)]
        totals = {name: [0, 0.0, 0] for name in predictors}
        loaded: Dict[Path, Any] = {}  # each without-<family>.pt, loaded once for all its family's runs
        for run in runs:
            s = run.snapshots
            safe = run.prefix_points(1)
            cells = [run.name, f"{100 * flops_saved_of_units(run.forward_flops, safe, s):.1f} %"]
            for name, folder in predictors.items():
                path = Path(folder) / f"without-{run.family}.pt"
                if not path.exists():
                    cells.append("-")
                    continue
                if path not in loaded:
                    loaded[path] = load_predictor(path)
                model = loaded[path]
                t = model.config.window
                prob = window_probabilities(model, [run])[run.name]
                prob[:, :max(0, math.ceil(DEFAULT_MIN_PROGRESS * s) - (t - 1))] = 0.0  # the guard in use
                frozen_at = replay(prob, t, s)
                early = int((frozen_at < safe).sum())
                lead = float(((safe - frozen_at).clamp_min(0).float() / s).max())
                saved = flops_saved_of_units(run.forward_flops, frozen_at, s)
                cells.append(f"{100 * saved:.1f} %, {early} early" + (f" (by {lead:.2f})" if early else ""))
                totals[name][0] += early
                totals[name][1] += saved
                totals[name][2] += 1
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("| **all runs** | | " + " | ".join(
            f"mean {100 * v[1] / max(v[2], 1):.1f} %, {v[0]} early" for v in totals.values()) + " |")
        return lines

    # ------------------------------------------------------------------ progress
    def _search_done(self, other: Sequence[Dict]) -> Optional[Dict]:
        """The results file's finished search at this rebuild's settings (None: unfinished)."""
        wanted = {"tolerance": {"metric": self.tolerance.metric, "value": self.tolerance.value},
                  "stride": self.stride, "search": SEARCH}
        return next((r for r in reversed(other) if r.get("kind") == "search-done"
                     and all(r.get(k) == v for k, v in wanted.items())), None)

    def _trials_done(self) -> bool:
        return all(self._trial_status(s)[0] and self._recording_current(s) for s in self.trial_specs)

    def _recording_current(self, spec: RunSpec) -> bool:
        """The run's recording is there and holds the histories the engine samples now."""
        return self._recording_problem(spec) is None

    def _recording_problem(self, spec: RunSpec) -> Optional[str]:
        """What is wrong with the run's recording (missing too), None when it is current."""
        try:
            load_recording(self.out / "zoo" / f"{spec.name}.pt")
        except RecordingError as exc:
            return str(exc)
        return None

    @staticmethod
    def _predictor_current(path: Path) -> bool:
        """A predictor file is there and was trained on histories sampled as the engine samples
        now (older ones are retrained, and the evaluation rows made with them redone). A file
        that does not load (cut short by a disk that filled up, from another version) is
        retrained too: it is the rebuild's own output."""
        if not path.exists():
            return False
        try:
            return load_predictor(path).history_sampling == SAMPLING
        except PredictorWeightsError:
            print(f"rebuild: {path} does not load (cut short, corrupt or of another version): training it again",
                  file=sys.stderr)
            return False

    def _trial_status(self, spec: RunSpec) -> tuple:
        reference, branches, other = read_trials(self.out / "trials" / f"{spec.name}.jsonl")
        done = self._search_done(other)
        rows = [reference or {}, *branches.values()]
        # CPU seconds where recorded (what the work costs on an idle core), else wall seconds
        seconds = sum(r.get("cpu_seconds", r.get("seconds", 0)) for r in rows)
        return done is not None, len(branches), seconds

    def write_progress(self) -> None:
        status = [self._trial_status(s) for s in self.trial_specs]
        finished = [st for st in status if st[0]]
        mean = sum(st[2] for st in finished) / len(finished) if finished else None
        left = len(status) - len(finished)
        eval_left = sum(1 for spec, policy, _ in self._runs_to_evaluate()
                        if (spec.name, policy) not in self._eval_rows())
        table = "not yet"
        if (self.out / "policy_comparison.md").exists():
            table = "written" if eval_left == 0 else "an older one, remade once every evaluation run is there"
        lines = ["# Rebuild progress", "",
                 f"Updated {time.strftime('%Y-%m-%d %H:%M:%S')}, {torch.get_num_threads()} thread(s).", "",
                 f"- trials: {len(finished)}/{len(status)} runs finished, {sum(st[1] for st in status)} branches "
                 f"recorded, {sum(st[2] for st in status) / 3600:.2f} CPU hours of training in them"
                 + (f"; ~{mean / 60:.0f} CPU min per finished run, so ~{left * mean / 3600:.1f} CPU hours left for "
                    f"this stage (one idle core; a finished run's cost varies with its size and units)" if mean else ""),
                 f"- predictors: " + ", ".join(f"{s}: {len(list((self.out / 'predictors' / s).glob('*.pt')))}"
                                               f"/{len(self.families) + 1}" for s in self.sources),
                 f"- evaluate: {len(self._runs_to_evaluate()) - eval_left}/{len(self._runs_to_evaluate())} runs",
                 f"- table: {table}", "",
                 "| run | trials finished | branches | CPU seconds |", "|---|---|---|---|"]
        lines += [f"| {s.name} | {'yes' if st[0] else 'no'} | {st[1]} | {st[2]:.0f} |"
                  for s, st in zip(self.trial_specs, status)]
        (self.out / "progress.md").write_text("\n".join(lines) + "\n")

    def run(self, stages: Sequence[str] = STAGES) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        ignore = self.out / ".gitignore"
        if not ignore.exists():  # recordings and weights are big and remade; trial results are the work
            ignore.write_text("zoo/\npredictors/\n*.tmp\n*.lock\n")
        lock = self._lock()
        if lock is None:
            return 4
        try:
            return self._run(stages)
        except TrialResultsError as exc:  # a damaged or foreign results file: what to do, no traceback
            self.log(f"stopped: {exc}")
            return 1
        finally:
            os.close(lock)

    def _lock(self) -> Optional[int]:
        """This shard's lock on the folder (the other shards run beside it): two copies of one
        command did every piece twice and wrote every line twice, both exiting 0 (review95).
        None, said, where another holds it; a file system without locks goes on unlocked."""
        fd = os.open(self.out / f".rebuild-{self.shard[0]}of{self.shard[1]}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        if try_lock(fd) is False:
            os.close(fd)
            self.log(f"another rebuild with --shard {self.shard[0]}/{self.shard[1]} is running on {self.out}: let it "
                     "finish (or stop it), then run the command again; shards of one command run side by side.")
            return None
        return fd

    def _run(self, stages: Sequence[str]) -> int:
        try:
            for stage in stages:
                if not getattr(self, stage)():  # said why: it waits for another shard's pieces
                    self.write_progress()
                    self.log("not finished: run the same command again once the other shards are done "
                             "(exit code 3).")
                    return 3
        except OutOfTime as exc:
            self.write_progress()
            self.log(f"stopped: {exc}. Run the same command again to continue.")
            return 3
        except KeyboardInterrupt:
            self.write_progress()
            self.log("interrupted: every finished piece is on disk. Run the same command again to continue.")
            return 130
        self.write_progress()
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smartfrz_fast.lab.rebuild", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("lab_runs"))
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {STAGES}")
    p.add_argument("--max-hours", type=float, default=None, help="start no new piece after this long")
    p.add_argument("--tolerance", type=float, default=Tolerance().value, help="trial labels: points a branch may lose")
    p.add_argument("--metric", choices=("accuracy", "loss"), default="accuracy")
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help="snapshots between branch points")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="the tiny CI zoo (minutes)")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="do every N-th piece of each stage from the I-th (one process per core: 0/2 and 1/2)")
    p.add_argument("--replay", action="append", default=[], metavar="NAME=DIR",
                   help="instead: replay these leave-one-family-out predictor folders on the zoo runs against "
                        "the trial oracle (repeatable; e.g. trials=lab_runs/predictors/trials)")
    p.add_argument("--compare-labels", action="store_true",
                   help="instead: print, per run with finished trials, the oracle and where the CKA labels fall")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {STAGES}")
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        p.error(f"--shard is I/N with 0 <= I < N, got {args.shard!r}")
    if args.max_hours is not None and not (math.isfinite(args.max_hours) and args.max_hours > 0):
        # nan meant no limit; 0 started nothing, and asked to be run again, forever (review95)
        p.error(f"--max-hours is a number of hours > 0, got {args.max_hours}")
    torch.set_num_threads(args.threads)
    deadline = None if args.max_hours is None else time.time() + 3600 * args.max_hours
    rebuild = Rebuild(args.out, args.quick, Tolerance(args.metric, args.tolerance), args.stride, deadline,
                      log=lambda m: print(m, flush=True), shard=shard)
    if args.replay:
        try:
            predictors = {name: Path(folder) for name, folder in (item.split("=", 1) for item in args.replay)}
        except ValueError:
            p.error("--replay is NAME=DIR")
        print("\n".join(rebuild.replay_lines(predictors)))
        return 0
    if args.compare_labels:
        print("\n".join(rebuild.compare_labels()))
        return 0
    return rebuild.run(stages)


if __name__ == "__main__":
    sys.exit(main())
