"""SmartFRZ with and without ``settle_ratio`` on the rebuild's 22 evaluation networks (CPU).

    python bench/bench_settle_ratio.py [--out lab_runs] [--shard I/N]

Trains each network of ``python -m smartfrz_fast.lab.rebuild``'s evaluation stage with the
shipped weights, ``settle_ratio=None`` (policy ``new``) and ``0.5`` (``new-settle0.5``), from the
same initialisation and batches as the rebuild's runs (``OUT/eval-*.jsonl`` holds their full
training). One JSON line per run, appended to ``bench/results/settle_ratio_runs.jsonl`` (runs
already there are skipped); then the mean accuracy change and FLOPs saved per policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from smartfrz_fast import SmartFRZ
from smartfrz_fast.lab.evaluate import latest_rows, train_with_policy
from smartfrz_fast.lab.rebuild import Rebuild

RESULTS = Path(__file__).parent / "results" / "settle_ratio_runs.jsonl"
POLICIES = {"new": {"settle_ratio": None}, "new-settle0.5": {"settle_ratio": 0.5}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("lab_runs"), help="the rebuild's folder (its eval-*.jsonl)")
    p.add_argument("--shard", default="0/1", metavar="I/N")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    i, n = (int(x) for x in args.shard.split("/"))
    networks = Rebuild(args.out, log=lambda m: None).networks
    done = latest_rows([RESULTS])
    for spec in networks[i::n]:
        for name, options in POLICIES.items():
            if (spec.name, name) not in done:
                row = train_with_policy(spec, SmartFRZ(**options), name=name)
                row.pop("timeline", None)
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(row) + "\n")
    rows = latest_rows([RESULTS])
    rows.update({k: v for k, v in latest_rows(sorted(args.out.glob("eval*.jsonl"))).items() if k[1] == "full"})
    for name in POLICIES:
        deltas = [(100 * (rows[(s.name, name)]["accuracy"] - rows[(s.name, "full")]["accuracy"]),
                   100 * rows[(s.name, name)]["flops_saved"]) for s in networks
                  if (s.name, name) in rows and (s.name, "full") in rows]
        if deltas:
            print(f"{name}: {len(deltas)} networks, mean accuracy change {sum(d for d, _ in deltas) / len(deltas):+.2f} "
                  f"points, mean FLOPs saved {sum(s for _, s in deltas) / len(deltas):.1f} %, "
                  f"{sum(d < -0.5 for d, _ in deltas)} below -0.5 points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
