"""Egeria on the demo's CNN (digits, the demo's loop and settings), CPU.

    python bench/bench_egeria_demo.py                      # Egeria's defaults vs full training
    python bench/bench_egeria_demo.py --tolerance 1e-9     # never freezes: a plasticity trace

Prints one JSON line per run: accuracy, FLOPs saved, timeline, and per evaluation the
plasticity of every measured unit (to see where the tolerance sits on an ordinary run).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from smartfrz_fast import Egeria, SmartFreezer
from smartfrz_fast import demo
from smartfrz_fast.data import load_digits_dataset


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=16000)
    p.add_argument("--full", action="store_true", help="also run full training")
    p.add_argument("--trace", action="store_true", help="print the plasticity of every evaluation")
    for knob in ("interval", "warmup", "window", "patience", "ref_refresh"):
        p.add_argument(f"--{knob.replace('_', '-')}", type=int, default=None)
    p.add_argument("--tolerance", type=float, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    batch, epochs, lr = 128, 3, 0.05
    x_train, y_train, x_test, y_test = load_digits_dataset(num_samples=args.samples, seed=args.seed, image_size=16,
                                                           return_tensors=True)
    torch.manual_seed(args.seed)
    init = copy.deepcopy(demo.DigitNet().state_dict())
    steps_per_epoch = x_train.shape[0] // batch
    total = steps_per_epoch * epochs
    knobs = {k: getattr(args, k) for k in ("interval", "warmup", "window", "patience", "ref_refresh", "tolerance")
             if getattr(args, k) is not None}

    for policy_on in ([False] if args.full else []) + [True]:
        model = demo.DigitNet()
        model.load_state_dict(init)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        freezer = policy = None
        trace = []
        if policy_on:
            policy = Egeria(model, x_train[:64], **knobs)
            observe = policy.observe

            def traced(distances, frozen, observe=observe):
                out = observe(distances, frozen)
                trace.append([None if v != v else round(v, 4) for v in policy.last_plasticity])
                return out

            policy.observe = traced
            freezer = SmartFreezer(model, opt, policy, example_inputs=(x_train[:batch],), total_steps=total)
        order = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        for _ in range(epochs):
            perm = torch.randperm(x_train.shape[0], generator=order)
            for b in range(steps_per_epoch):
                idx = perm[b * batch:(b + 1) * batch]
                F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                if freezer is not None:
                    freezer.step()
        seconds = time.perf_counter() - start
        accuracy = demo.evaluate(model, x_test, y_test)
        row = {"policy": policy.describe() if policy else "full", "seed": args.seed, "steps": total,
               "accuracy": round(100 * accuracy, 2), "seconds": round(seconds, 1)}
        if freezer is not None:
            row.update(flops_saved=round(100 * freezer.training_flops_saved(total), 1),
                       timeline=[(e.step, e.num_frozen) for e in freezer.timeline])
            if args.trace:
                row["plasticity"] = trace
            freezer.close()
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
