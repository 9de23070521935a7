"""The engine's host overhead on deep models of tiny layers, where its Python dominates.

Stacks of ``n`` blocks ``Linear(4, 4) + LayerNorm(4) + ReLU`` (nested ten to a ``Sequential``,
as deep real models are), half of the units frozen. Side by side in one run, 1 thread:

- set-up: ``SmartFreezer(...)`` with example inputs (the traced forward, the unit plan);
- freeze event: ``freeze_to`` one unit deeper (median of 10);
- train-mode forward with the frozen half: the engine's model against a hand-written ideal, the
  same model frozen by hand (``requires_grad=False``, the frozen modules' eval flags set once,
  no hooks);
- training step (forward, backward, ``optimizer.step()``, ``freezer.step()``): the engine
  against the same ideal, whose optimizer holds only the trainable parameters.

::

    nice -n 19 python bench/bench_engine_overhead.py     # writes bench/results/engine_overhead_cpu.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_commit  # noqa: E402

from smartfrz_fast import SmartFreezer  # noqa: E402
from smartfrz_fast.policy import StaticFreeze  # noqa: E402


def deep_model(n: int, group: int = 10) -> nn.Module:
    torch.manual_seed(0)
    groups = [nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU())
                              for _ in range(min(group, n - g))]) for g in range(0, n, group)]
    return nn.Sequential(*groups, nn.Linear(4, 2))


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(n: int, repeats: int) -> dict:
    x = torch.randn(8, 4)
    model = deep_model(n)
    ideal = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    start = time.perf_counter()
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=10**9), example_inputs=x, total_steps=10**9)
    setup = 1e3 * (time.perf_counter() - start)
    half = len(freezer.units) // 2
    deeper = min(10, half - 1)  # freeze events one unit deeper each
    freezer.freeze_to(half - deeper)
    events = []
    for k in range(deeper - 1, -1, -1):
        start = time.perf_counter()
        freezer.freeze_to(half - k)
        events.append(time.perf_counter() - start)

    # the ideal: the same units frozen by hand, the same modules' flags set once
    by_name = dict(ideal.named_modules())
    names = {id(m): name for name, m in model.named_modules()}
    always, _ = freezer.plan.eval_modules(half)
    for m in always:
        by_name[names[id(m)]].training = False
    frozen = {name for name, p in freezer.plan.frozen_parameters(half)}
    for name, p in ideal.named_parameters():
        p.requires_grad_(name not in frozen)
    ideal_opt = torch.optim.SGD([p for p in ideal.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def forward(m):
        return lambda: m(x)

    def step(m, o, f=None):
        def run():
            m(x).square().mean().backward()
            o.step()
            o.zero_grad(set_to_none=True)
            if f is not None:
                f.step()
        return run

    row = {"layers": n, "units": len(freezer.units), "setup_ms": setup, "freeze_event_ms": 1e3 * statistics.median(events),
           "forward_engine_ms": median_ms(forward(model), repeats), "forward_ideal_ms": median_ms(forward(ideal), repeats),
           "step_engine_ms": median_ms(step(model, opt, freezer), repeats),
           "step_ideal_ms": median_ms(step(ideal, ideal_opt), repeats)}
    freezer.close()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[50, 500, 2000])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "engine_overhead_cpu.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = [measure(n, args.repeats) for n in args.layers]
    lines = [
        "# Engine host overhead on deep models of tiny layers (CPU)",
        "",
        f"`python bench/bench_engine_overhead.py`: {datetime.date.today()}, commit {git_commit()}, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}, 1 thread. Blocks of Linear(4, 4) + "
        "LayerNorm(4) + ReLU, half of the units frozen; medians in ms. Ideal: the same model frozen by hand "
        "(requires_grad=False, eval flags set once, an optimizer of the trainable parameters, no freezer).",
        "",
        "| layers | units | set-up | freeze event (+1 unit) | forward, engine | forward, ideal | step, engine | step, ideal | step ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['units']} | {r['setup_ms']:.0f} | {r['freeze_event_ms']:.2f} | "
                     f"{r['forward_engine_ms']:.2f} | {r['forward_ideal_ms']:.2f} | {r['step_engine_ms']:.2f} | "
                     f"{r['step_ideal_ms']:.2f} | {r['step_engine_ms'] / r['step_ideal_ms']:.2f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
