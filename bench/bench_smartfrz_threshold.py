"""SmartFRZ's decision threshold on the rebuild's 22 evaluation networks, two seeds, each scored
by the leave-one-family-out CKA predictor that never saw its family (CPU).

    python bench/bench_smartfrz_threshold.py --lab lab_runs [--thresholds 0.5,0.42,0.35] [--shard I/N]

Needs ``LAB/predictors/cka/without-<family>.pt`` (``python -m smartfrz_fast.lab.rebuild --out
LAB``; its trial results give the oracle). Trains each network with full training and with
SmartFRZ at each threshold (every other setting at its default, the attention stop included)
from the rebuild's initialisation and batches, seed 0 and seed 100. One JSON line per run,
appended to ``bench/results/threshold_runs.jsonl`` (runs already there are skipped); then per
threshold and seed the mean accuracy change, FLOPs saved, share of the trial oracle's savings
and the networks below -0.5 points.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from smartfrz_fast import SmartFRZ
from smartfrz_fast.lab.evaluate import train_with_policy
from smartfrz_fast.lab.rebuild import evaluation_networks, second_seed
from smartfrz_fast.lab.zoo import zoo_specs

RESULTS = Path(__file__).parent / "results" / "threshold_runs.jsonl"


def _rows():
    rows = {}
    if RESULTS.exists():
        for line in RESULTS.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:  # a torn last line: that run is redone
                continue
            rows[(r["network"], r["setting"])] = r
    return rows


def _oracle(lab: Path):
    out = {}
    for path in (lab / "trials").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "oracle" and "flops_saved" in r:
                out[path.stem] = r["flops_saved"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lab", type=Path, default=Path("lab_runs"))
    p.add_argument("--thresholds", default="0.5,0.42,0.35")
    p.add_argument("--shard", default="0/1", metavar="I/N")
    p.add_argument("--tag", default="", help="appended to each setting's name (t0.5@TAG): measures a threshold "
                   "again after a code change, beside the rows already there (full training is shared)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shard, n = map(int, args.shard.split("/"))
    settings = {f"t{t}{'@' + args.tag if args.tag else ''}": float(t) for t in args.thresholds.split(",")}
    done = _rows()
    runs = [(run, spec.family) for spec in evaluation_networks(zoo_specs()) for run in (spec, second_seed(spec))]
    # the shards split the runs (network and seed), each taking all of its runs' settings: the same
    # split whether the shards run side by side or one after the other (a split of the jobs left
    # gave a shard started later half of what the first left; one of every job gave one shard
    # every full-training run)
    todo = [(run, family, name, t) for run, family in runs[shard::n] for name, t in (("full", None), *settings.items())
            if (run.name, name) not in done]
    for run, family, name, threshold in todo:
        if threshold is None:
            row = train_with_policy(run, "full")
        else:
            policy = SmartFRZ(weights=args.lab / "predictors" / "cka" / f"without-{family}.pt", threshold=threshold)
            row = train_with_policy(run, policy, name=name)
        row = {**{k: v for k, v in row.items() if k != "timeline"}, "setting": name}
        with open(RESULTS, "a") as f:
            f.write(json.dumps(row) + "\n")
    rows, oracle = _rows(), _oracle(args.lab)
    first = {s.name for s in evaluation_networks(zoo_specs())}
    print("| threshold | seed | networks | accuracy change | FLOPs saved | share of the oracle's | below -0.5 points |")
    print("|---|---|---|---|---|---|---|")
    for name in settings:
        for seed, nets in (("0", first), ("100", {second_seed(s).name for s in evaluation_networks(zoo_specs())})):
            pairs = [(rows[(net, name)], rows[(net, "full")], net) for net in sorted(nets)
                     if (net, name) in rows and (net, "full") in rows]
            if not pairs:
                continue
            change = [100 * (r["accuracy"] - f["accuracy"]) for r, f, _ in pairs]
            saved = [r["flops_saved"] for r, _, _ in pairs]
            # the oracle of the network's first seed (the trials ran on it)
            base = [oracle.get(re.sub(r"-s(\d+)", lambda m: f"-s{int(m.group(1)) % 100}", net), float("nan"))
                    for _, _, net in pairs]
            below = [f"{net} {c:+.2f}" for c, (_, _, net) in zip(change, pairs) if c < -0.5]
            print(f"| {name[1:].replace('@', ' @')} | {seed} | {len(pairs)} | {sum(change) / len(pairs):+.2f} | "
                  f"{100 * sum(saved) / len(pairs):.1f} % | {sum(saved) / sum(base):.2f} | "
                  f"{len(below)}{': ' + '; '.join(below) if below else ''} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
