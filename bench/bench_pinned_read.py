"""How cached rows in pinned host memory reach the GPU: a staged copy or a kernel that reads
them by index in place. Issue 5 asks to measure both and keep the faster as the default.

    python bench/bench_pinned_read.py [--batch 256] [--capacity 512] [--csv bench/results/pinned_read.csv]

For activation rows shaped like the caches of real models (ResNet-50 after layer2, ViT-B/16 and
BERT-base after any block) in fp32, bf16 and fp8, a ``PinnedStorage`` is filled with random rows
and a batch of random cached rows is read to the GPU three ways, side by side in one run:

- ``copy``: ``read="copy"`` (``index_select`` into pinned staging on the CPU, one async copy);
- ``kernel``: ``read="kernel"`` (Triton ``gather_rows`` reads pinned memory by index);
- ``bound``: one ``copy_`` of a contiguous pinned block of the same size to the GPU, the PCIe
  bandwidth bound neither can beat.

Each is timed end to end (host call until the rows are on the GPU, synchronised) and, for the
two read paths, as the prefetch the cache issues: host time of the call (what the training loop
pays while the copy overlaps its step). Both paths are checked to deliver the same bits.
Needs a CUDA GPU (the pinned tier does).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cache import finish_rows  # noqa: E402

from smartfrz_fast.cache.storage import PinnedStorage, storage_dtype  # noqa: E402

# (name, activation shape per sample) of the cut points DESIGN.md measures
SHAPES = [("resnet50 layer2", (512, 28, 28)), ("vit-b16 block", (197, 768)), ("bert-base block", (128, 768))]
FIELDS = ["device", "torch", "triton", "date", "commit", "machine", "shape", "dtype", "batch", "mb_per_batch",
          "path", "mode", "us", "gb_per_s"]


def median_us(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--capacity", type=int, default=512, help="cached rows (pinned host memory)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "pinned_read.csv"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_pinned_read.py needs a CUDA GPU (the pinned tier copies rows to one)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: it would time the CPU interpreter")
    device = torch.device("cuda")
    rows = []
    for shape_name, shape in SHAPES:
        for dtype_name in ("fp32", "bf16", "fp8"):
            dtype = storage_dtype(dtype_name)
            stores = {path: PinnedStorage(args.capacity, shape, dtype, args.capacity, device, read=path)
                      for path in ("copy", "kernel")}
            values = torch.randn(args.capacity, *shape, device=device)
            for store in stores.values():
                store.write(store.allocate(torch.arange(args.capacity)), values)
                store._finish_write()
            del values
            slots = torch.randperm(args.capacity)[:args.batch]
            reads = {path: store.read(slots, torch.float32, device) for path, store in stores.items()}
            if not torch.equal(reads["copy"], reads["kernel"]):
                raise SystemExit(f"{shape_name} {dtype_name}: the kernel read differs from the copy")
            nbytes = args.batch * stores["copy"].nbytes_per_row
            block = stores["copy"].data[:args.batch]
            target = torch.empty(block.shape, dtype=block.dtype, device=device)
            timings = {("bound", "end to end"): median_us(lambda: target.copy_(block, non_blocking=True),
                                                           args.repeat)}
            for path, store in stores.items():
                timings[(path, "end to end")] = median_us(lambda: store.read(slots, torch.float32, device),
                                                          args.repeat)
                timings[(path, "prefetch call (host)")] = median_us(
                    lambda: store.prefetch(torch.arange(args.batch), torch.float32, device), args.repeat)
            for store in stores.values():
                store.close()
            for (path, mode), us in timings.items():
                rows.append(dict(shape=shape_name, dtype=dtype_name, batch=args.batch, mb_per_batch=f"{nbytes / 1e6:.1f}",
                                 path=path, mode=mode, us=f"{us:.1f}",
                                 gb_per_s=f"{nbytes / us / 1e3:.2f}" if mode == "end to end" else ""))
                print(f"{shape_name:16s} {dtype_name:5s} {path:7s} {mode:22s} {us:10.1f} us")
    finish_rows(args.csv, FIELDS, rows, device)


if __name__ == "__main__":
    main()
