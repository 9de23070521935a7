"""Evidence in use: policies on networks outside the zoo, and the policy-settings sweep.

``python -m smartfrz_fast.lab.evaluate``: trains networks that are not in the zoo (sizes and
seeds never recorded) through the same engine with full training, SmartFRZ, FreezeOut,
AutoFreeze, Linear and Egeria, appending one JSON line per run; ``write_table`` turns them into
``bench/results/policy_comparison.md``. Two SmartFRZ columns: ``smartfrz`` runs the shipped
weights (trained on every family), ``smartfrz-unseen`` the leave-one-family-out predictor that
never saw the network's family (``train --leave-one-out DIR``): the test of an unseen
architecture.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from ..policy.base import FreezePolicy
from .labels import DEFAULT_THRESHOLD, LabelSchedule, LabelSource, load_runs
from .scoring import offline_metrics, window_probabilities
from .zoo import EVAL_SPECS, RunSpec, Session, Task, zoo_specs

POLICIES = ("full", "smartfrz", "smartfrz-unseen", "freezeout", "autofreeze", "linear", "egeria")
# Column order of the tables (rebuild adds a leave-one-family-out predictor per label source and
# the hindsight oracle of the freezing trials).
TABLE_COLUMNS = ("full", "smartfrz", "smartfrz-unseen", "smartfrz-unseen-cka", "smartfrz-unseen-trials",
                 "freezeout", "autofreeze", "linear", "egeria", "oracle")
UNSEEN_DIR = Path("/tmp/smartfrz_lofo")  # where `train --leave-one-out` puts without-<family>.pt

SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
SWEEP_PATIENCE = (1, 2, 3, 5)
MIN_SHARE_OF_ORACLE = 0.7  # 25 % of compute was ~70 % of what the 0.99 labels allowed (~35 %)


def policy_settings_sweep(unseen_dir: Path, zoo_dir: Path, source: LabelSource = LabelSource(), log=print) -> Dict:
    """Replay every ``without-<family>.pt`` on its left-out family's zoo recordings for each policy
    (threshold, patience); mean over the folds of the share of units frozen before their label
    and of the label oracle's savings kept (capped at 1 per fold: freezing earlier than the labels
    allow is not a saving to credit). Selected: the fewest early freezes among the settings that
    keep ``MIN_SHARE_OF_ORACLE`` (a rule fixed before the sweep was first run); if none does, the
    setting that keeps the most. ``source``: the labels the folds are scored against."""
    from ..predictor.model import load_predictor

    # zoo runs only (the full and the --quick zoo), never evaluation networks recorded beside them
    paths = [Path(zoo_dir) / f"{s.name}.pt" for s in (*zoo_specs(), *zoo_specs(quick=True))]
    runs = load_runs([p for p in paths if p.exists()], source)
    models = sorted(Path(unseen_dir).glob("without-*.pt"))
    if not models:
        raise FileNotFoundError(f"no without-<family>.pt in {unseen_dir}: run "
                                f"`python -m smartfrz_fast.lab.train --leave-one-out {unseen_dir}` first")
    folds: Dict[tuple, List[tuple]] = {}
    for path in models:
        family = path.stem[len("without-"):]
        model = load_predictor(path)
        held = [r for r in runs if r.family == family]
        if not held:
            raise FileNotFoundError(f"{path.name}: no recorded zoo runs of family {family!r} in {zoo_dir}")
        probs = window_probabilities(model, held)
        for t in SWEEP_THRESHOLDS:
            for patience in SWEEP_PATIENCE:
                m = offline_metrics(model, held, t, patience=patience, probs=probs)[family]
                early, units = map(int, m["units_frozen_before_label"].split("/"))
                oracle = m["label_oracle_flops_saved_of_units"]
                kept = min(1.0, m["replayed_flops_saved_of_units"] / oracle) if oracle else 0.0
                folds.setdefault((t, patience), []).append((early / units, kept))
    table, best = {}, None
    log("| threshold | patience | units frozen before label | share of the oracle's savings kept |")
    log("|---|---|---|---|")
    for (t, patience), values in sorted(folds.items()):
        early = sum(v[0] for v in values) / len(values)
        kept = sum(v[1] for v in values) / len(values)
        table[f"{t}/{patience}"] = {"early": round(early, 3), "kept": round(kept, 3)}
        log(f"| {t} | {patience} | {early:.2f} | {kept:.2f} |")
        if kept >= MIN_SHARE_OF_ORACLE and (best is None or (early, -kept) < (best[2], -best[3])):
            best = (t, patience, early, kept)
    if best is None:  # nothing keeps enough: the setting that keeps the most
        t, patience = max(table, key=lambda k: table[k]["kept"]).split("/")
        best = (float(t), int(patience))
    log(f"selected (threshold, patience): {best[:2]}")
    return {"table": table, "selected": best[:2]}


def build_policy(name: str, weights: Optional[Path] = None, model=None, probe=None):
    from ..policy import AutoFreeze, Egeria, FreezeOut, LinearFreeze, SmartFRZ

    if name == "smartfrz" or name.startswith("smartfrz-unseen"):
        return SmartFRZ(weights=weights)
    if name == "freezeout":
        return FreezeOut(t0=0.8, spacing="cubic", scale_lr=True)  # Brock et al.'s recommendation
    if name == "autofreeze":
        return AutoFreeze(num_intervals=10, percentile=50.0)
    if name == "linear":
        return LinearFreeze(freeze_start=0.5, freeze_level=1.0)  # Composer's defaults
    if name == "egeria":
        return Egeria(model, probe)  # the paper's knobs at their defaults (docs/egeria_spfde.md)
    raise ValueError(f"unknown policy {name!r}; choose one of {POLICIES}")


def training_probe(task: Task, n: int = 64) -> torch.Tensor:
    """A fixed batch of training inputs for policies that watch activations (Egeria); the CKA
    probe comes from the test split, which a policy must not see."""
    if task.spec.family == "lm":
        return torch.stack([task.train_text[i * task.context:(i + 1) * task.context] for i in range(n)])
    return task.x[:n]


def latest_rows(paths: Sequence[Path], skip_torn: bool = False) -> Dict[tuple, Dict]:
    """Result rows of JSON-lines files by (network, policy), the newest line of each counting:
    by its ``finished`` time where rows have one (a rebuild sharded otherwise than before writes
    a network's new row to another shard's file than its old one), else the last line read; a
    file not there yet has none. ``skip_torn``: pass over a line that does not parse (the torn
    last line of an interrupted run, which is then redone) instead of raising."""
    rows: Dict[tuple, Dict] = {}
    for path in paths:
        if not Path(path).exists():
            continue
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if skip_torn:
                    continue
                raise
            key = (row["network"], row["policy"])
            if key not in rows or row.get("finished", 0) >= rows[key].get("finished", 0):
                rows[key] = row
    return rows


def policy_settings(policy: FreezePolicy) -> str:
    """What a run's result depends on besides the network: the policy's settings and, for
    SmartFRZ, which weights (the digest of what their answers depend on: a retraining that ends in
    the same weights keeps the rows). A rebuild redoes rows whose settings changed since."""
    predictor = getattr(policy, "predictor", None)
    return policy.describe() + (f", weights {predictor.prediction_digest[:16]}" if predictor is not None else "")


def train_with_policy(spec: RunSpec, policy: Union[str, FreezePolicy], weights: Optional[Path] = None,
                      name: Optional[str] = None) -> Dict:
    """Train ``spec`` from its seed (same init, same batches for every policy, the run the zoo
    records and the trials branch from) with a policy (a name from POLICIES, or a policy object
    recorded under ``name``)."""
    from ..engine import SmartFreezer

    session = Session(spec, schedule=False)
    model, task = session.model, session.task
    freezer = None
    if policy != "full":
        if isinstance(policy, str):
            name, policy = policy, build_policy(policy, weights, model, training_probe(task))
        freezer = SmartFreezer(model, session.optimizer, policy=policy, example_inputs=session.example_inputs(),
                               total_steps=spec.steps)
    else:
        name = "full"
    if freezer is None or not freezer.policy.manages_lr:  # FreezeOut sets every unit's lr itself
        session.add_schedule()
    start = time.perf_counter()
    for _ in range(spec.steps):
        session.train_step()
        if freezer is not None:
            freezer.step()
    wall = time.perf_counter() - start
    result = {"network": spec.name, "policy": name, **task.evaluate(model), "wall_s": round(wall, 2)}
    if freezer is not None:
        result["flops_saved"] = freezer.training_flops_saved(spec.steps)
        result["timeline"] = [(e.step, e.num_frozen) for e in freezer.timeline]
        result["units"] = len(freezer.units)
        result["policy_settings"] = policy_settings(freezer.policy)
        freezer.close()
    else:
        result["flops_saved"] = 0.0
    return result


def network_grid(by: Dict, nets: List[str], columns: List[str], baseline: str, cell) -> List[str]:
    """Markdown table lines: a row per network, a cell per column (policy or run) from
    ``by[(network, column)]``, "-" where missing. ``cell(result, delta)`` formats one result;
    ``delta`` is its accuracy change vs the ``baseline`` column, " (+0.1)", or "" for the
    baseline itself or without one. Shared by this table and bench/bench_spfde.py's."""
    lines = ["| network | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for net in nets:
        base = by.get((net, baseline))
        cells = []
        for column in columns:
            r = by.get((net, column))
            if r is None:
                cells.append("-")
                continue
            delta = f" ({100 * (r['accuracy'] - base['accuracy']):+.1f})" if base and column != baseline else ""
            cells.append(cell(r, delta))
        lines.append(f"| {net} | " + " | ".join(cells) + " |")
    return lines


def write_table(results: List[Dict], path: Path, note: str = "") -> None:
    nets = list(dict.fromkeys(r["network"] for r in results))
    policies = [p for p in TABLE_COLUMNS if any(r["policy"] == p for r in results)]
    by = {(r["network"], r["policy"]): r for r in results}
    lines = ["# Policy comparison on networks outside the predictor's zoo", "",
             "Each cell: test accuracy % / training FLOPs saved (engine's `training_flops_saved`) / "
             "wall time of the training loop (s). Accuracy change vs full training in brackets.", ""]
    if note:
        lines += [note, ""]
    lines += network_grid(by, nets, policies, "full", lambda r, delta: (
        f"{100 * r['accuracy']:.1f}{delta} / {100 * r['flops_saved']:.1f}% / "
        + (f"{r['wall_s']:.0f}" if "wall_s" in r else "-")))
    lines.append("")
    lines.append("| policy | mean accuracy change (points) | mean FLOPs saved |")
    lines.append("|---|---|---|")
    for p in policies:
        if p == "full":
            continue
        rows = [(by[(n, p)], by[(n, "full")]) for n in nets if (n, p) in by and (n, "full") in by]
        if rows:
            d = sum(100 * (a["accuracy"] - b["accuracy"]) for a, b in rows) / len(rows)
            s = sum(100 * a["flops_saved"] for a, _ in rows) / len(rows)
            lines.append(f"| {p} | {d:+.2f} | {s:.1f}% |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smartfrz_fast.lab.evaluate")
    p.add_argument("--weights", type=Path, default=None, help="for smartfrz (default: the shipped file)")
    p.add_argument("--unseen-dir", type=Path, default=UNSEEN_DIR,
                   help="for smartfrz-unseen: the directory of `train --leave-one-out`")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--networks", default=None, help="comma-separated indices into EVAL_SPECS")
    p.add_argument("--json", type=Path, default=Path("/tmp/smartfrz_eval.jsonl"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", type=Path, default=None, metavar="MD",
                   help="instead of training: write the tables of the runs in --json (the last run of "
                        "each network and policy) to MD (bench/results/policy_comparison.md adds "
                        "hand-written notes: write elsewhere and merge)")
    p.add_argument("--label-oracle", default=None, metavar="THRESHOLDS",
                   help="instead: train zoo runs (--oracle-runs) fully and with the CKA labels at each "
                        "threshold as the freeze schedule (LabelSchedule); needs the recordings in --zoo")
    p.add_argument("--oracle-runs", default="mlp-d5-w64-sgd-s2,cnn-d6-w16-sgd-s0,resnet-d1-w12-sgd-s0,"
                   "vit-d3-w48-sgd-s0,lm-d2-w64-sgd-s0")
    p.add_argument("--zoo", type=Path, default=Path("/tmp/smartfrz_zoo"))
    p.add_argument("--sweep-policy-settings", action="store_true",
                   help="instead: replay the --unseen-dir predictors over policy thresholds and patience")
    p.add_argument("--label-threshold", type=float, default=None, help="CKA label threshold of the sweep "
                   "(default: the labels' default)")
    args = p.parse_args(argv)
    if args.sweep_policy_settings:
        torch.set_num_threads(args.threads)
        policy_settings_sweep(args.unseen_dir, args.zoo, LabelSource(threshold=args.label_threshold or DEFAULT_THRESHOLD))
        return 0
    if args.label_oracle is not None:
        torch.set_num_threads(args.threads)
        specs = {s.name: s for s in (*zoo_specs(), *EVAL_SPECS)}
        for run_name in args.oracle_runs.split(","):
            spec = specs.get(run_name)
            if spec is None or not (args.zoo / f"{run_name}.pt").exists():
                p.error(f"{run_name}: not a zoo or evaluation run recorded in {args.zoo} (record it with "
                        "`python -m smartfrz_fast.lab.collect [--eval-networks] --out DIR`)")
            if spec.finetune:
                p.error(f"{run_name} fine-tunes; pick runs trained from scratch")
            runs = [train_with_policy(spec, "full")]
            for t in args.label_oracle.split(","):
                runs.append(train_with_policy(spec, LabelSchedule.from_recording(args.zoo / f"{run_name}.pt", float(t)),
                                              name=f"label-oracle@{t}"))
            for r in runs:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
                print(json.dumps({k: v for k, v in r.items() if k != "timeline"}), flush=True)
        return 0
    if args.table is not None:
        write_table(list(latest_rows([args.json]).values()), args.table)
        return 0
    torch.set_num_threads(args.threads)
    specs = list(EVAL_SPECS)
    if args.networks:
        specs = [specs[int(i)] for i in args.networks.split(",")]
    for spec in specs:
        for policy in args.policies.split(","):
            weights = args.weights
            if policy == "smartfrz-unseen":
                weights = args.unseen_dir / f"without-{spec.family}.pt"
                if not weights.exists():
                    p.error(f"{weights} is missing: run `python -m smartfrz_fast.lab.train "
                            f"--leave-one-out {args.unseen_dir}` first")
            r = train_with_policy(spec, policy, weights)
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps({k: v for k, v in r.items() if k != "timeline"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
