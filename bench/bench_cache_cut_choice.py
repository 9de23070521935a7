"""The activation cache's cut choice at depth (the module swap, at a freeze event).

Stacks of ``n`` blocks ``Linear(16, 16) + LayerNorm(16) + ReLU`` whose forward reads
``self.training`` in Python (so torch.fx cannot trace it and the module swap cuts), half the
blocks frozen. Side by side in one run, 1 thread, on fresh chains:

- recording: the module swap's one recorded forward (``find_blocks``);
- cut choice, lazy (shipped): ``usable_cut``, which counts what a cut skips only while it could
  beat the best counted so far;
- cut choice, every cut counted first: the same choice with every cut's skipped ops counted and
  sorted before the first check (the ranking before 2026-12-06; that code also walked its stand-in
  list per call, which made it cubic: 76 s at 1000 layers in review36).

Both choices must pick the same cut; the benchmark fails if they differ. Last, the whole freeze
event a user waits for: ``freezer.step()`` at the step a ``StaticFreeze`` freezes the first half,
with an ``ActivationCache`` on (the recording, the cut choice, its checks, the cache's own set-up).

::

    nice -n 19 python bench/bench_cache_cut_choice.py     # writes bench/results/cache_cut_choice_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_commit  # noqa: E402

from smartfrz_fast import SmartFreezer, StaticFreeze  # noqa: E402
from smartfrz_fast.cache import ActivationCache, Inputs, find_blocks  # noqa: E402


class ReadsTraining(nn.Module):
    def __init__(self, n: int, width: int = 16):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(width, width) for _ in range(n))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(n))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        if self.training:  # Python on a flag: no fx trace, the module swap is used
            x = x * 1.0
        for linear, norm in zip(self.linears, self.norms):
            x = torch.relu(norm(linear(x)))
        return self.head(x)


def count_every_cut_first(chain, frozen: int, refused):
    """The ranking before 2026-12-06: every plausible cut's skipped ops counted, then sorted."""
    ranked = []
    for cut in range(frozen, 0, -1):
        why = chain._plausible(cut)
        if why is None:
            ranked.append(cut)
        else:
            refused[cut] = why
    ranked.sort(key=lambda cut: (-chain._skipped_ops(cut), -cut))
    return iter(ranked)


def measure(n: int) -> dict:
    torch.manual_seed(0)
    model, inputs = ReadsTraining(n), Inputs((torch.randn(16, 16),))
    frozen = n  # candidates alternate Linear, LayerNorm: the first n/2 blocks
    row = {"layers": n, "record_ms": float("inf"), "lazy_ms": float("inf"), "every cut_ms": float("inf")}
    for _ in range(3):  # the best of three, the two choices taking turns
        for how in ("lazy", "every cut"):
            start = time.perf_counter()
            chain, found = find_blocks(model, inputs)
            recorded = time.perf_counter()
            assert found == "module swap", found
            if how == "every cut":
                chain._ranked_cuts = lambda frozen, refused, chain=chain: count_every_cut_first(chain, frozen, refused)
            row[f"cut_{how}"] = chain.usable_cut(frozen)
            row[f"{how}_ms"] = min(row[f"{how}_ms"], 1e3 * (time.perf_counter() - recorded))
            row["record_ms"] = min(row["record_ms"], 1e3 * (recorded - start))
            chain.release()
    if row["cut_lazy"] != row["cut_every cut"]:
        raise AssertionError(f"the two choices differ at {n} layers: {row}")
    row["event_ms"] = freeze_event_ms(model, inputs.args[0])
    return row


def freeze_event_ms(model: nn.Module, x: torch.Tensor) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    freezer = SmartFreezer(model, optimizer, StaticFreeze(len(model.linears) // 2, at_step=2), example_inputs=x,
                           total_steps=10)
    cache = ActivationCache(freezer, num_samples=len(x), deterministic=True, storage="memory")
    cached, ids = cache.wrap(), torch.arange(len(x))
    for _ in range(2):
        cached(x, ids).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        start = time.perf_counter()
        freezer.step()
    elapsed = time.perf_counter() - start
    assert freezer.num_frozen and cache.boundary, cache.describe()
    freezer.close()
    return 1e3 * elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[100, 250, 500, 1000])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cache_cut_choice_cpu.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    measure(20)  # warm-up: the first recording and check pay for imports and allocations
    rows = [measure(n) for n in args.layers]
    lines = [
        "# The activation cache's module-swap cut choice at depth (CPU)",
        "",
        f"`python bench/bench_cache_cut_choice.py`: {datetime.date.today()}, commit {git_commit()}, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}, 1 thread. Blocks of Linear(16, 16) + "
        "LayerNorm(16) + ReLU behind a Python `if self.training`, half frozen; the best of three after a warm-up "
        "(the freeze event: one), ms. Both choices picked the same cut.",
        "",
        "| layers | recording | cut choice, lazy | cut choice, every cut counted | ratio | cut "
        "| freeze event with the cache |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['record_ms']:.0f} | {r['lazy_ms']:.0f} | {r['every cut_ms']:.0f} | "
                     f"{r['every cut_ms'] / r['lazy_ms']:.1f} | {r['cut_lazy']} | {r['event_ms']:.0f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
