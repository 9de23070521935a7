"""Step time of the real architectures of tests/real_models.py (tiny configs from their
libraries, random init): nothing frozen / about half the units frozen / frozen + activation
cache, side by side in one run (the three modes alternate per model, so they see the same
machine load).

    nice -n 19 python bench/bench_real_models.py --threads 1      # a few minutes on 2 CPU cores

Rows are appended to bench/results/real_models_cpu.csv with the CPU, versions, date and commit.
Each mode: build the model, freeze half its units (where the engine freezes nothing across a
tied weight, the first half of the units, shared weight included, by hand), run ``--warmup`` steps (the cache stores every sample's row), then time
``--steps`` steps over the same samples (the cache serves hits) and keep the median of the
process's CPU time per step (with ``--threads 1`` the compute, whatever else loads the machine)
and of the wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench"), str(ROOT)]

from bench_cache import finish_rows  # noqa: E402
from real_models import ALL_MODELS, BATCH, build, importable_torchvision  # noqa: E402

MODES = ("full", "frozen", "cached")
FIELDS = ["device", "torch", "transformers", "torchvision", "python", "date", "commit", "threads", "machine",
          "load", "model", "batch", "units", "frozen_units", "mode", "cache", "cpu_ms_per_step", "ms_per_step", "steps_timed"]
BATCHES = 2  # distinct batches cycled (sample ids 0..2*BATCH-1)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=list(ALL_MODELS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--csv", default=str(ROOT / "bench" / "results" / "real_models_cpu.csv"))
    return p.parse_args()


def run_mode(name: str, mode: str, steps: int, warmup: int):
    from smartfrz_fast import SmartFreezer
    from smartfrz_fast.cache import ActivationCache
    from smartfrz_fast.policy import StaticFreeze

    real = build(name)
    model = real.model
    args, kwargs = real.batch(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        freezer = SmartFreezer(model, optimizer, policy=StaticFreeze(0), example_inputs=args, example_kwargs=kwargs)
        # audits off: with 8 samples an epoch is 2 steps, and 4 rows audited per epoch would be
        # timed as a cost that a real dataset spreads over thousands of steps
        cache = (ActivationCache(freezer, num_samples=BATCHES * BATCH, deterministic=True, audit_rows=0)
                 if mode == "cached" else None)
        if mode != "full":
            half = len(freezer.units) // 2
            if freezer.freeze_to(half) == 0:  # a tie the engine does not freeze across: by hand
                for unit in freezer.units[:half]:
                    for p in unit.parameters:
                        p.requires_grad_(False)
                for listener in freezer._freeze_listeners:
                    listener(None, [])
        run = cache.wrap() if cache else model
        model.train()
        times, cpu = [], []
        for step in range(warmup + steps):
            b = step % BATCHES
            args, kwargs = real.batch(b)
            ids = torch.arange(BATCH) + BATCH * b
            start, start_cpu = time.perf_counter(), time.process_time()
            out = run(args, ids, **kwargs) if cache else model(*args, **kwargs)
            loss = real.loss(out, b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            freezer.step()
            if step >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
                cpu.append((time.process_time() - start_cpu) * 1e3)
    state = "-"
    if cache is not None:
        state = (f"{cache.chain.how if cache.chain else 'none'}: {cache.boundary}/{len(cache.chain)} blocks"
                 if cache.active else f"off/nothing cached: {(cache.reason or '')[:60]}")
    frozen = sum(all(not p.requires_grad for p in u.parameters) for u in freezer.units)
    return len(freezer.units), frozen, statistics.median(times), statistics.median(cpu), len(times), state


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    importable_torchvision()
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = ""
    tv = importable_torchvision()
    rows = []
    print(f"{'model':<20} {'mode':<7} {'units':>5} {'frozen':>6} {'cpu ms':>9} {'wall ms':>9}  cache")
    for name in args.models:
        for mode in MODES:
            units, frozen, ms, cpu_ms, n, state = run_mode(name, mode, args.steps, args.warmup)
            load = f"{os.getloadavg()[0]:.2f}"
            print(f"{name:<20} {mode:<7} {units:>5} {frozen:>6} {cpu_ms:9.1f} {ms:9.1f}  {state}", flush=True)
            rows.append(dict(model=name, batch=BATCH, units=units, frozen_units=frozen, mode=mode, cache=state,
                             cpu_ms_per_step=round(cpu_ms, 2), ms_per_step=round(ms, 2), steps_timed=n, load=load, transformers=tf_version,
                             torchvision=tv.__version__ if tv else ""))
    finish_rows(args.csv, FIELDS, rows, torch.device("cpu"))


if __name__ == "__main__":
    main()
