"""Step time with the frozen-prefix activation cache, per storage tier and dtype, against the
hand-written ideal (the suffix trained on a precomputed activation tensor).

    python bench/bench_cache.py [--device cpu|cuda] [--csv bench/results/cache_cpu.csv]

Rows appended to the CSV: device name, versions, date, commit, mode, tier, dtype, median ms per
step, bytes per cached sample. Modes: ``full`` (nothing frozen), ``frozen`` (prefix frozen, no
cache), ``ideal`` (suffix only, on a preloaded tensor), ``cache`` (ActivationCache, steady state
after one filling epoch).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import tempfile
import time

import torch
from torch import nn

from smartfrz_fast import SmartFreezer, StaticFreeze
from smartfrz_fast.cache import ActivationCache

FIELDS = ["device", "torch", "python", "date", "commit", "threads", "model", "batch", "samples",
          "frozen_units", "mode", "tier", "dtype", "ms_per_step", "bytes_per_sample", "steps"]


def make_model(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


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
    args = parser.parse_args()
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
        rows.append(dict(mode=mode, tier=tier, dtype=dtype, ms_per_step=f"{ms:.3f}",
                         bytes_per_sample=nbytes, steps=steps, frozen_units=frozen))
        print(f"{mode:>7} {tier:>7} {dtype:>5}  {ms:8.3f} ms/step  {nbytes or '-':>7} B/sample", flush=True)

    def plain_step(model, opt):
        def step(ids):
            loss_fn(model(x_all[ids]), y_all[ids]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    model, opt, _ = setup(0)
    ms, n = timed_steps(plain_step(model, opt), batches, device, per_epoch)
    record("full", "-", "-", ms, "", n, 0)
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
                model, opt, freezer = setup(args.frozen)
                path = os.path.join(tmp, f"{tier}-{dtype}.bin") if tier == "mmap" else None
                cache = ActivationCache(freezer, num_samples=args.samples, deterministic=True,
                                        storage=tier, dtype=dtype, path=path)
                wrapped = cache.wrap()

                def step(ids):
                    loss_fn(wrapped(x_all[ids], ids), y_all[ids]).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                ms, n = timed_steps(step, batches, device, per_epoch)  # first epoch fills the cache
                assert cache.active and cache.stats["hits"] >= n * args.batch, cache.describe()
                record("cache", tier, dtype, ms, cache.bytes_per_sample, n, args.frozen)
                cache.close()

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    common = dict(device=name, torch=torch.__version__, python=platform.python_version(),
                  date=datetime.date.today().isoformat(), commit=commit or "unknown",
                  threads=torch.get_num_threads(),
                  model=f"conv{args.depth}x{args.width} {args.image}px", batch=args.batch, samples=args.samples)
    new = not os.path.exists(args.csv)
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**common, **row})
    print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
