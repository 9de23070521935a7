"""Step time with the frozen-prefix activation cache, per storage tier and dtype, against the
hand-written ideal (the suffix trained on a precomputed activation tensor).

    python bench/bench_cache.py [--device cpu|cuda] [--csv bench/results/cache_cpu.csv]
    python bench/bench_cache.py --sweep      # the boundary depth below which caching does not pay

Rows appended to the CSV: device name, versions, date, commit, mode, tier, dtype, median ms per
step, bytes per cached sample. Modes: ``full`` (nothing frozen), ``frozen`` (prefix frozen, no
cache), ``ideal`` (suffix only, on a preloaded tensor), ``cache`` (ActivationCache, steady state
after one filling epoch). ``--sweep``: for every boundary (1..depth conv units frozen), the
``frozen`` and ``cache`` (memory, fp32) modes side by side, with the bytes per cached sample.
Each row records the CPU (or GPU) name and the 1-minute load average while it ran.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch
from torch import nn

from provenance import git_commit
from smartfrz_fast import SmartFreezer, StaticFreeze
from smartfrz_fast.cache import ActivationCache

FIELDS = ["device", "torch", "python", "date", "commit", "threads", "model", "batch", "samples",
          "frozen_units", "mode", "tier", "dtype", "ms_per_step", "bytes_per_sample", "steps", "machine", "load"]


def make_model(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def machine_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'cpu'}, {os.cpu_count()} cores"


def write_rows(path, rows, fields=FIELDS) -> None:
    """Append ``rows``; an older file whose header lacks a column is rewritten with it (blank)."""
    old = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != fields:
                old = list(reader)
    mode = "w" if old or not os.path.exists(path) else "a"
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        if mode == "w":
            writer.writeheader()
        writer.writerows(old + rows)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, batches, device, warmup):
    for ids in batches[:warmup]:
        step(ids)
    times = []
    for ids in batches[warmup:]:
        sync(device)
        t0 = time.perf_counter()
        step(ids)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, len(times)


def timed_pair(step_a, step_b, batches, device, warmup):
    """Median ms of two step functions timed alternately on the same batches, so that a change
    of machine load hits both alike (the sweep compares them)."""
    for ids in batches[:warmup]:
        step_a(ids)
        step_b(ids)
    times = ([], [])
    for ids in batches[warmup:]:
        for step, out in ((step_a, times[0]), (step_b, times[1])):
            sync(device)
            t0 = time.perf_counter()
            step(ids)
            sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3, len(times[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "cache_cpu.csv"))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--frozen", type=int, default=5, help="units frozen (of depth + 1)")
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the filling one")
    parser.add_argument("--sweep", action="store_true", help="frozen vs cached step time at every boundary")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x_all = torch.randn(args.samples, 3, args.image, args.image, device=device)
    y_all = torch.randint(0, 10, (args.samples,), device=device)
    g = torch.Generator().manual_seed(0)
    epochs = [torch.randperm(args.samples, generator=g) for _ in range(1 + args.epochs)]
    batches = [p[i:i + args.batch] for p in epochs for i in range(0, args.samples - args.batch + 1, args.batch)]
    per_epoch = args.samples // args.batch
    loss_fn = nn.functional.cross_entropy
    rows = []

    def setup(frozen):
        model = make_model(args.width, args.depth).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        freezer = SmartFreezer(model, opt, policy=StaticFreeze(frozen, 10 ** 9), example_inputs=x_all[:2])
        if frozen:
            freezer.freeze_to(frozen)
        return model, opt, freezer

    def record(mode, tier, dtype, ms, nbytes, steps, frozen):
        load = f"{os.getloadavg()[0]:.2f}"
        rows.append(dict(mode=mode, tier=tier, dtype=dtype, ms_per_step=f"{ms:.3f}",
                         bytes_per_sample=nbytes, steps=steps, frozen_units=frozen, load=load))
        print(f"{frozen:>2} {mode:>7} {tier:>7} {dtype:>5}  {ms:8.3f} ms/step  {nbytes or '-':>7} B/sample"
              f"  load {load}", flush=True)

    def plain_step(model, opt):
        def step(ids):
            loss_fn(model(x_all[ids]), y_all[ids]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def cached_step(frozen, tier, dtype, path):
        model, opt, freezer = setup(frozen)
        cache = ActivationCache(freezer, num_samples=args.samples, deterministic=True,
                                storage=tier, dtype=dtype, path=path)
        wrapped = cache.wrap()

        def step(ids):
            loss_fn(wrapped(x_all[ids], ids), y_all[ids]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, cache

    def cached_run(frozen, tier, dtype, path):
        step, cache = cached_step(frozen, tier, dtype, path)
        ms, n = timed_steps(step, batches, device, per_epoch)  # first epoch fills the cache
        assert cache.active and cache.stats["hits"] >= n * args.batch, cache.describe()
        record("cache", tier, dtype, ms, cache.bytes_per_sample, n, frozen)
        cache.close()

    model, opt, _ = setup(0)
    ms, n = timed_steps(plain_step(model, opt), batches, device, per_epoch)
    record("full", "-", "-", ms, "", n, 0)
    if args.sweep:  # frozen and cached steps alternate, so that both see the same machine load
        for frozen in range(1, args.depth + 1):
            model, opt, _ = setup(frozen)
            step, cache = cached_step(frozen, "memory", "fp32", None)
            ms_frozen, ms_cache, n = timed_pair(plain_step(model, opt), step, batches, device, per_epoch)
            assert cache.active and cache.stats["hits"] >= n * args.batch, cache.describe()
            record("frozen", "-", "-", ms_frozen, "", n, frozen)
            record("cache", "memory", "fp32", ms_cache, cache.bytes_per_sample, n, frozen)
            cache.close()
        finish(args, device, rows)
        return
    model, opt, _ = setup(args.frozen)
    ms, n = timed_steps(plain_step(model, opt), batches, device, per_epoch)
    record("frozen", "-", "-", ms, "", n, args.frozen)

    # hand-written ideal: the frozen prefix's output of every sample, precomputed, indexed
    model, opt, freezer = setup(args.frozen)
    cut = next(i for i, m in enumerate(model) if any(p.requires_grad for p in m.parameters()))
    prefix, suffix = model[:cut].eval(), model[cut:]
    with torch.no_grad():
        acts = torch.cat([prefix(x_all[i:i + 256]) for i in range(0, args.samples, 256)])

    def ideal(ids):
        loss_fn(suffix(acts[ids]), y_all[ids]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms, n = timed_steps(ideal, batches, device, per_epoch)
    record("ideal", "-", "fp32", ms, acts[0].numel() * acts.element_size(), n, args.frozen)

    tiers = ["memory", "mmap"] + (["pinned"] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as tmp:
        for tier in tiers:
            for dtype in ("fp32", "bf16", "fp8"):
                path = os.path.join(tmp, f"{tier}-{dtype}.bin") if tier == "mmap" else None
                cached_run(args.frozen, tier, dtype, path)
    finish(args, device, rows)


def finish(args, device, rows) -> None:
    model = dict(model=f"conv{args.depth}x{args.width} {args.image}px", batch=args.batch, samples=args.samples)
    finish_rows(args.csv, FIELDS, [{**model, **row} for row in rows], device)


def finish_rows(path, fields, rows, device) -> None:
    """Append ``rows`` to the CSV at ``path`` with what the run ran on (device, versions, date,
    commit, machine): the one place the benchmarks of the cache record that."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    common = dict(device=name, torch=torch.__version__, triton=triton_version, python=platform.python_version(),
                  date=datetime.date.today().isoformat(), commit=git_commit(),
                  threads=torch.get_num_threads(), machine=machine_name(device))
    write_rows(path, [{**common, **row} for row in rows], fields)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
