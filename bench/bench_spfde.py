"""SpFDE (Yuan et al., NeurIPS 2022) on the held-out networks of the policy comparison.

Per network (``smartfrz_fast.lab.zoo.EVAL_SPECS``: same models, data, optimizers,
lr schedule and seeds as ``bench/results/policy_comparison.md``), five runs:

- ``dense``: full training, 480 steps of batch 64 drawn with replacement (``Task.batch``);
  re-run here for a same-load wall time (its accuracy equals the comparison's "full" column).
- ``sparse``: the same with SpFDE's initial sparse structure: a seeded random mask per
  Conv/Linear weight at initialisation (uniform ``--sparsity``, stem and classifier dense),
  static (no dynamic-sparse-training updates), kept by ``SparseMasks`` after every step.
- ``sparse+freeze``: plus progressive front-to-back freezing from mid-training, the library's
  ``LinearFreeze(freeze_start=0.5, freeze_level=1.0)`` (the comparison's "linear" column)
  standing in for SpFDE's progressive schedule, with the masks frozen with their layers.
- ``sparse+freeze+epochs``: the control for sieving: the same, trained in shuffled epochs over
  the 4096 training samples (``SievingSampler`` with active fraction 1: nothing sieved),
  480 steps.
- ``sparse+freeze+sieve``: SpFDE's circular data sieving: ``SievingSampler`` with 80% of the
  samples active, the 20% easiest (per-sample loss recorded every step) swapped for the pool's
  front every epoch; the same number of epochs as the control, so 0.8 x 480 = 384 steps.

Compute is counted in dense training FLOPs relative to ``dense``: ``(steps / 480) x (1 -
training_flops_saved)``, the engine's frozen-backward accounting over the run's own steps; so
sieving saves 20% only because the run takes 20% fewer steps. ``nominal sparse`` adds what
sparse kernels would save (each unit's FLOPs scaled by its weight density; attention and other
non-unit ops stay dense): a model, not measured (these dense CPU kernels run masked weights at
full cost, as the wall times show).

``python bench/bench_spfde.py`` (about 10 min on 2 shared CPU cores, 1 thread per run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from smartfrz_fast import LinearFreeze, SievingSampler, SmartFreezer, SparseMasks
from smartfrz_fast.lab.evaluate import network_grid
from smartfrz_fast.lab.zoo import EVAL_SPECS, RunSpec, Task, build_model, cosine, make_optimizer
from smartfrz_fast.sparse import random_masks
from smartfrz_fast.units import UnitPlan, discover_units

RUNS = ("dense", "sparse", "sparse+freeze", "sparse+freeze+epochs", "sparse+freeze+sieve")
ACTIVE, SWAP = 0.8, 0.2  # sieving: active fraction of the dataset, swapped fraction of the active set
OUT = Path(__file__).parent / "results" / "spfde_comparison.md"


def nominal_sparse_cost(plan: UnitPlan, timeline: List, masks: SparseMasks, steps: int) -> float:
    """Mean per-step training FLOPs over ``steps``, relative to a dense unfrozen step, if
    sparse kernels skipped the masked weights (forward 1, backward 2 per unit FLOP; a frozen
    unit keeps its forward only, as in the engine's accounting). ``timeline``: the freezer's
    events (empty without freezing)."""
    mask_of = {id(p): masks.bool_mask(n) for n, p in masks.params.items()}
    density = []
    for u in plan.units:
        big = [p for p in u.parameters if p.dim() >= 2]  # weights; biases and norms are cheap
        kept = sum(int(mask_of[id(p)].sum()) if id(p) in mask_of else p.numel() for p in big)
        density.append(kept / max(1, sum(p.numel() for p in big)) if big else 1.0)
    f = [u.forward_flops for u in plan.units]
    total = plan.total_forward_flops
    other = total - sum(f)  # attention products, pooling, ...: dense

    def step_cost(n_frozen: int) -> float:
        return (3 * other + sum(fu * d * (1 if i < n_frozen else 3)
                                for i, (fu, d) in enumerate(zip(f, density)))) / (3 * total)

    cost, level, since = 0.0, 0, 0
    for e in timeline:  # a freeze after step s first saves in step s + 1
        cost += step_cost(level) * (min(e.step, steps) - since)
        level, since = e.num_frozen, min(e.step, steps)
    return (cost + step_cost(level) * (steps - since)) / steps


def train(spec: RunSpec, run: str, sparsity: float, steps: Optional[int] = None) -> Dict:
    """One run of ``spec`` (same init and, without sieving, same batches as the comparison)."""
    steps = steps or spec.steps
    sparse, freeze = run != "dense", "freeze" in run
    epochs = "epochs" in run or "sieve" in run
    torch.manual_seed(spec.seed)
    model = build_model(spec)
    task = Task(spec)
    optimizer = make_optimizer(spec, model)
    sampler = loader = None
    run_steps = steps
    if epochs:
        active = ACTIVE if "sieve" in run else 1.0
        ids = torch.arange(len(task.x))
        sampler = SievingSampler(len(task.x), active_fraction=active, swap_fraction=SWAP, seed=spec.seed)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(task.x, task.y, ids),
                                             batch_size=spec.batch, sampler=sampler, drop_last=True)
        run_steps = round(active * steps)  # same epochs as the control: fewer samples, fewer steps
    masks = SparseMasks(model, random_masks(model, sparsity, seed=spec.seed)) if sparse else None
    freezer = None
    if freeze:
        freezer = SmartFreezer(model, optimizer, policy=LinearFreeze(freeze_start=0.5, freeze_level=1.0),
                               example_inputs=(task.probe[:8],), total_steps=run_steps)
        masks.attach(freezer)
    elif masks is not None:
        masks.attach_optimizer(optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(run_steps))

    def batches():
        if loader is None:
            for _ in range(run_steps):
                yield task.batch() + (None,)
        else:
            done = 0
            while True:
                for batch in loader:
                    yield batch
                    done += 1
                    if done == run_steps:
                        return

    visited = torch.zeros(len(task.x), dtype=torch.bool)
    load0 = os.getloadavg()[0]
    start, cpu0 = time.perf_counter(), time.process_time()
    for x, y, idb in batches():
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()  # = Task.loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sched.step()
        if freezer is not None:
            freezer.step()
        if sampler is not None:
            sampler.record(idb, losses)
            visited[idb] = True
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    result = {"network": spec.name, "run": run, "steps": run_steps, "accuracy": task.accuracy(model),
              "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
              "freeze_saved": freezer.training_flops_saved(run_steps) if freezer else 0.0}
    result["dense_cost"] = run_steps / steps * (1.0 - result["freeze_saved"])
    if masks is not None:
        result["density"] = round(masks.density(), 4)
        result["violations"] = sum(masks.violations().values())
        plan = freezer.plan if freezer else discover_units(model, (task.probe[:8],))
        timeline = freezer.timeline if freezer else []
        result["nominal_sparse_cost"] = run_steps / steps * nominal_sparse_cost(plan, timeline, masks, run_steps)
    if sampler is not None:
        result["rotations"] = sampler.rotations
        result["samples_visited"] = int(visited.sum())
    if freezer is not None:
        result["timeline"] = [(e.step, e.num_frozen) for e in freezer.timeline]
        result["units"] = len(freezer.units)
        freezer.close()
    return result


def write_table(results: List[Dict], path: Path, sparsity: float, note: str) -> None:
    by = {(r["network"], r["run"]): r for r in results}
    nets = list(dict.fromkeys(r["network"] for r in results))
    lines = [
        "# SpFDE on the held-out networks", "",
        "SpFDE (Yuan et al., NeurIPS 2022: sparse training + layer freezing + data sieving) on the "
        "networks of `policy_comparison.md` (same models, data, optimizers, cosine lr, seeds; "
        "480 steps of batch 64 on 16x16 digits, 4096 training and 1024 test samples).", "",
        "Settings:",
        f"- sparse: a seeded random mask per Conv/Linear weight at initialisation (SpFDE's random "
        f"initial sparse structure), {sparsity:.0%} sparsity uniform per layer, stem/patch "
        "embedding and classifier dense; static (no dynamic-sparse-training updates); masked "
        "weights and their optimizer state zeroed after every step (`SparseMasks`).",
        "- freeze: progressive front-to-back freezing from mid-training, "
        "`LinearFreeze(freeze_start=0.5, freeze_level=1.0)` (standing in for SpFDE's progressive "
        "schedule; the same as the dense `linear` column of policy_comparison.md); masks freeze "
        "with their layers.",
        "- epochs: the same, in shuffled epochs over the 4096 training samples (`SievingSampler`, "
        "active fraction 1: nothing sieved), 480 steps: the control for sieving.",
        f"- sieve: `SievingSampler(active_fraction={ACTIVE}, swap_fraction={SWAP}, interval=1)`; "
        "per-sample losses recorded every step; the same number of epochs as the control, "
        f"so {ACTIVE:g} x 480 = {round(ACTIVE * 480)} steps.", "",
        "Each cell: test accuracy % (change vs dense) / compute saved vs dense in dense FLOPs / "
        "nominal compute saved with sparse kernels / wall time of the training loop, s (its "
        "process CPU time, s: one thread, so less sensitive than the wall time to the other jobs "
        "on the machine).",
        "Compute saved in dense FLOPs = 1 - (steps / 480) x (1 - `training_flops_saved`) (the "
        "engine's count: a frozen unit's backward, 2x its forward, is skipped). Sieving saves "
        "only through the steps it does not run. Nominal sparse = the same with every unit's "
        "FLOPs scaled by its weight density (non-unit ops such as attention products stay "
        "dense): a model, not a measurement; these dense CPU kernels run masked weights at "
        "full cost.", "",
    ]
    if note:
        lines += [note, ""]

    def cell(r, delta):
        nominal = f"{100 * (1 - r['nominal_sparse_cost']):.0f}%" if "nominal_sparse_cost" in r else "0%"
        return (f"{100 * r['accuracy']:.1f}{delta} / {100 * (1 - r['dense_cost']):.1f}% / "
                f"{nominal} / {r['wall_s']:.0f} ({r['cpu_s']:.0f})")

    lines += network_grid(by, nets, RUNS, "dense", cell)
    lines += ["", "| run | mean accuracy change (points) | mean saved, dense FLOPs | mean saved, nominal sparse |",
              "|---|---|---|---|"]
    for run in RUNS[1:]:
        rows = [(by[(n, run)], by[(n, "dense")]) for n in nets if (n, run) in by and (n, "dense") in by]
        if rows:
            d = sum(100 * (a["accuracy"] - b["accuracy"]) for a, b in rows) / len(rows)
            s = sum(100 * (1 - a["dense_cost"]) for a, _ in rows) / len(rows)
            ns = sum(100 * (1 - a.get("nominal_sparse_cost", 1.0)) for a, _ in rows) / len(rows)
            lines.append(f"| {run} | {d:+.2f} | {s:.1f}% | {ns:.1f}% |")
    lines += ["", "Load average (1 min) at the start and end of each run, in run order: " + "; ".join(
        f"{r['network']} {r['run']}: {r['load'][0]}-{r['load'][1]}" for r in results) + ".", "",
        "Reproduce: `python bench/bench_spfde.py` (writes this file; one JSON line per run to "
        "`--json`)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/bench_spfde.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", default=None, help="comma-separated indices into EVAL_SPECS")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--steps", type=int, default=None, help="override the 480 steps (smoke tests)")
    p.add_argument("--json", type=Path, default=Path("/tmp/spfde_runs.jsonl"))
    p.add_argument("--out", default=str(OUT), help="markdown table ('' to skip)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = args.runs.split(",")
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        p.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    specs = list(EVAL_SPECS)
    if args.networks:
        specs = [specs[int(i)] for i in args.networks.split(",")]
    results = []
    for spec in specs:
        for run in runs:
            r = train(spec, run, args.sparsity, args.steps)
            results.append(r)
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps({k: v for k, v in r.items() if k != "timeline"}), flush=True)
    if args.out:
        note = (f"Machine: {platform.processor() or platform.machine()}, 2 shared CPU cores, "
                f"{args.threads} thread per run; torch {torch.__version__}; "
                f"{datetime.date.today().isoformat()}. Wall times share the machine with other jobs "
                "(load below); compare them within a network only.")
        write_table(results, Path(args.out), args.sparsity, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
