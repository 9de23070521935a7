"""Step 4: evidence that the predictor generalises.

``offline_metrics``: on recorded runs (held-out families), per-window balanced accuracy and the
policy replayed on the recording: units freeze front to back at the first window whose
probability clears the policy threshold; how often, and by how much, that is *before* the CKA
label says the unit is freezable (freezing early is what costs accuracy).

``python -m smartfrz_fast.predictor.evaluate``: trains held-out networks (families not used to
train the predictor, configurations not in the zoo) through the same engine with full training,
SmartFRZ, FreezeOut, AutoFreeze, Linear and Egeria, appending one JSON line per run;
``write_table`` turns them into ``bench/results/policy_comparison.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .labels import RunData, freeze_index
from .zoo import RunSpec, Task, build_model, cosine, make_optimizer

POLICIES = ("full", "smartfrz", "freezeout", "autofreeze", "linear", "egeria")
# Held-out networks: families the shipped predictor never saw, sizes/seeds not in the zoo.
EVAL_SPECS = (
    RunSpec("resnet", 1, 10, "sgd", 10, steps=480),
    RunSpec("vit", 2, 40, "sgd", 10, steps=480),
    RunSpec("resnet", 1, 16, "adamw", 11, steps=480),
    RunSpec("vit", 3, 32, "adamw", 11, steps=480),
)


@torch.no_grad()
def offline_metrics(model, runs: Sequence[RunData], threshold: float, policy_threshold: float = 0.5,
                    gain: Optional[float] = None) -> Dict:
    from .train import INPUT_GAIN, all_window_logits

    gain = INPUT_GAIN if gain is None else gain

    t = model.config.window
    out: Dict[str, Dict] = {}
    for family in sorted({r.family for r in runs}):
        tp = tn = fp = fn = 0
        early, lead, units, sim_saved, label_saved = 0, [], 0, [], []
        for r in (r for r in runs if r.family == family):
            prob = torch.softmax(all_window_logits(model, r, gain), -1)[..., 1]  # [U, W]
            y = r.labels(threshold, t).bool()
            pred = prob >= policy_threshold
            tp += int((pred & y).sum()); tn += int((~pred & ~y).sum())
            fp += int((pred & ~y).sum()); fn += int((~pred & y).sum())
            s = r.cka.shape[1]
            label_first = freeze_index(r.cka, threshold).clamp_min(t - 1)  # [U] snapshot index
            # replay the policy: the frozen prefix grows while the next unit clears the threshold
            frozen_at = torch.full((prob.shape[0],), s, dtype=torch.int64)
            n = 0
            for w in range(prob.shape[1]):
                while n < prob.shape[0] and bool(pred[n, w]):
                    frozen_at[n] = w + t - 1
                    n += 1
            # a prefix cannot freeze before its slowest member's label allows it
            label_prefix = torch.cummax(label_first, 0).values
            early += int((frozen_at < label_prefix).sum())
            lead += ((label_prefix - frozen_at).clamp_min(0).float() / s).tolist()
            units += prob.shape[0]
            flops = torch.tensor(r.forward_flops, dtype=torch.float64)
            share = flops / flops.sum()
            sim_saved.append(float((share * (1 - frozen_at.double() / s)).sum() * 2 / 3))
            label_saved.append(float((share * (1 - label_prefix.double() / s)).sum() * 2 / 3))
        tpr = tp / max(tp + fn, 1)
        tnr = tn / max(tn + fp, 1)
        out[family] = {
            "windows": tp + tn + fp + fn, "balanced_accuracy": round((tpr + tnr) / 2, 4),
            "precision": round(tp / max(tp + fp, 1), 4), "recall": round(tpr, 4),
            "units_frozen_before_label": f"{early}/{units}",
            "mean_early_lead_of_run": round(sum(lead) / max(len(lead), 1), 4),
            "replayed_flops_saved_of_units": round(sum(sim_saved) / len(sim_saved), 4),
            "label_oracle_flops_saved_of_units": round(sum(label_saved) / len(label_saved), 4),
        }
    return out


def build_policy(name: str, weights: Optional[Path] = None, model=None, probe=None):
    from ..policy import AutoFreeze, Egeria, FreezeOut, LinearFreeze, SmartFRZ

    if name == "smartfrz":
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


def train_with_policy(spec: RunSpec, policy: str, weights: Optional[Path] = None) -> Dict:
    """Train ``spec`` from its seed (same init, same batches for every policy) with a policy."""
    from ..engine import SmartFreezer

    torch.manual_seed(spec.seed)
    model = build_model(spec)
    task = Task(spec)
    optimizer = make_optimizer(spec, model)
    freezer = None
    if policy != "full":
        freezer = SmartFreezer(model, optimizer, policy=build_policy(policy, weights, model, training_probe(task)),
                               example_inputs=(task.probe[:8],), total_steps=spec.steps)
    sched = None
    if freezer is None or not freezer.policy.manages_lr:
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(spec.steps))
    start = time.perf_counter()
    for _ in range(spec.steps):
        x, y = task.batch()
        Task.loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        if freezer is not None:
            freezer.step()
    wall = time.perf_counter() - start
    result = {"network": spec.name, "policy": policy, "accuracy": task.accuracy(model), "wall_s": round(wall, 2)}
    if freezer is not None:
        result["flops_saved"] = freezer.training_flops_saved(spec.steps)
        result["timeline"] = [(e.step, e.num_frozen) for e in freezer.timeline]
        result["units"] = len(freezer.units)
        freezer.close()
    else:
        result["flops_saved"] = 0.0
    return result


def write_table(results: List[Dict], path: Path, note: str = "") -> None:
    nets = list(dict.fromkeys(r["network"] for r in results))
    policies = [p for p in POLICIES if any(r["policy"] == p for r in results)]
    by = {(r["network"], r["policy"]): r for r in results}
    lines = ["# Policy comparison on held-out architectures", "",
             "Each cell: test accuracy % / training FLOPs saved (engine's `training_flops_saved`) / "
             "wall time of the training loop (s). Accuracy change vs full training in brackets.", ""]
    if note:
        lines += [note, ""]
    lines.append("| network | " + " | ".join(policies) + " |")
    lines.append("|---|" + "---|" * len(policies))
    for net in nets:
        full = by.get((net, "full"))
        cells = []
        for p in policies:
            r = by.get((net, p))
            if r is None:
                cells.append("-")
                continue
            delta = f" ({100 * (r['accuracy'] - full['accuracy']):+.1f})" if full and p != "full" else ""
            cells.append(f"{100 * r['accuracy']:.1f}{delta} / {100 * r['flops_saved']:.1f}% / {r['wall_s']:.0f}")
        lines.append(f"| {net} | " + " | ".join(cells) + " |")
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
    p = argparse.ArgumentParser(prog="python -m smartfrz_fast.predictor.evaluate")
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--networks", default=None, help="comma-separated indices into EVAL_SPECS")
    p.add_argument("--json", type=Path, default=Path("/tmp/smartfrz_eval.jsonl"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = list(EVAL_SPECS)
    if args.networks:
        specs = [specs[int(i)] for i in args.networks.split(",")]
    for spec in specs:
        for policy in args.policies.split(","):
            r = train_with_policy(spec, policy, args.weights)
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps({k: v for k, v in r.items() if k != "timeline"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
