"""The noise floor of "accuracy change": full training of the rebuild's 22 evaluation networks
again, with every initial weight nudged, by a relative 1e-6 and 1e-3 (CPU).

    python bench/bench_noise_floor.py [--out lab_runs] [--nudges 2] [--shard I/N]

A freezing policy changes a run a little and training may amplify any change, so a policy's
accuracy change against full training holds the policy's effect and the run's own sensitivity.
The nudged runs keep the batches, the schedule and the optimizer, and freeze nothing: how far
their test accuracy lands from the unnudged run's is change a policy cannot be blamed for (1e-6:
rounding-sized; 1e-3: about what a few optimizer steps move a weight). One JSON line per run,
appended to
``bench/results/noise_floor_runs.jsonl`` (runs already there are skipped); then per network the
nudged runs' changes beside SmartFRZ's (``OUT/eval-*.jsonl``: the shipped weights and the
predictor that never saw the family).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from smartfrz_fast.lab.evaluate import latest_rows
from smartfrz_fast.lab.rebuild import Rebuild
from smartfrz_fast.lab.zoo import Session

RESULTS = Path(__file__).parent / "results" / "noise_floor_runs.jsonl"
RELATIVE_NUDGES = (1e-6, 1e-3)
POLICIES = ("smartfrz", "smartfrz-unseen-cka")


def nudged_run(spec, size: float, nudge: int) -> dict:
    """Full training of ``spec`` with each initial weight of a tensor W moved by
    ``size * mean|W| * N(0, 1)`` (nudge ``k`` draws from seed 1000 + k)."""
    session = Session(spec)
    noise = torch.Generator().manual_seed(1000 + nudge)
    with torch.no_grad():
        for p in session.model.parameters():
            p.add_(torch.randn(p.shape, generator=noise, dtype=p.dtype) * (size * float(p.abs().mean())))
    for _ in range(spec.steps):
        session.train_step()
    return {"network": spec.name, "policy": name(size, nudge), **session.task.evaluate(session.model)}


def name(size: float, nudge: int) -> str:
    return f"nudge{size:g}-{nudge}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("lab_runs"), help="the rebuild's folder (its eval-*.jsonl)")
    p.add_argument("--nudges", type=int, default=2, help="nudged runs per network")
    p.add_argument("--shard", default="0/1", metavar="I/N")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    i, n = (int(x) for x in args.shard.split("/"))
    networks = Rebuild(args.out, log=lambda m: None).networks
    done = latest_rows([RESULTS])
    for spec in networks[i::n]:
        for size in RELATIVE_NUDGES:
            for nudge in range(args.nudges):
                if (spec.name, name(size, nudge)) not in done:
                    with open(RESULTS, "a") as f:
                        f.write(json.dumps(nudged_run(spec, size, nudge)) + "\n")
    rows = latest_rows([RESULTS, *sorted(args.out.glob("eval*.jsonl"))])
    sizes = " | ".join(f"nudged {size:g}" for size in RELATIVE_NUDGES)
    print(f"| network | {sizes} | {' | '.join(POLICIES)} |")
    print("|---|" + "---|" * (len(RELATIVE_NUDGES) + len(POLICIES)))
    spread = {size: [] for size in RELATIVE_NUDGES}
    inside = {policy: 0 for policy in POLICIES}  # policy loses no more than the worst nudged run
    for spec in networks:
        full = rows.get((spec.name, "full"))
        changes = {size: [100 * (rows[(spec.name, name(size, k))]["accuracy"] - full["accuracy"])
                          for k in range(args.nudges) if (spec.name, name(size, k)) in rows]
                   for size in RELATIVE_NUDGES} if full is not None else {}
        if not any(changes.values()):
            continue
        for size, c in changes.items():
            spread[size] += [abs(x) for x in c]
        worst = min([x for c in changes.values() for x in c] + [0.0])
        cells = [", ".join(f"{x:+.2f}" for x in changes[size]) or "-" for size in RELATIVE_NUDGES]
        for policy in POLICIES:
            r = rows.get((spec.name, policy))
            if r is None:
                cells.append("-")
                continue
            change = 100 * (r["accuracy"] - full["accuracy"])
            inside[policy] += change >= worst - 1e-9
            cells.append(f"{change:+.2f} / {100 * r['flops_saved']:.1f} %")
        print(f"| {spec.name} | {' | '.join(cells)} |")
    print()
    for size, s in spread.items():
        if s:
            s.sort()
            print(f"nudged {size:g}: {len(s)} runs, mean |change| {sum(s) / len(s):.2f} points, median "
                  f"{s[len(s) // 2]:.2f}, largest {s[-1]:.2f}, {sum(x > 0.5 for x in s)} beyond 0.5")
    for policy, count in inside.items():
        print(f"{policy}: on {count} networks it loses no more than the worst nudged run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
