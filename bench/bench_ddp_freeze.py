"""DDP after a freeze: re-wrap (FreezableDDP) vs find_unused_parameters=True, per-step time.

    python bench/bench_ddp_freeze.py                       # gloo on the CPU, 2 processes
    python bench/bench_ddp_freeze.py --backend nccl --nproc 8 --width 4096 --blocks 24

Each mode trains the same MLP (``--blocks`` residual blocks of ``--width``), freezes the
first ``--freeze`` fraction of its units after ``--warmup`` steps, and times ``--steps``
steps after the freeze (median of per-step wall times on rank 0, after a barrier-synchronised
start; CUDA is synchronised per step). Modes:

- ``ddp``: plain DDP, nothing frozen (the baseline).
- ``unused``: DDP(find_unused_parameters=True) and the freeze.
- ``rewrap``: FreezableDDP (rebuilt after the freeze) and the freeze; the rebuild's own cost is
  reported as ``freeze_ms`` (the freeze step, including the engine's bookkeeping).
"""

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def build(width, blocks, device):
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 10)).to(device)


def run_mode(mode, args, rank, device):
    from smartfrz_fast import SmartFreezer, StaticFreeze
    from smartfrz_fast.distributed import FreezableDDP

    inner = build(args.width, args.blocks, device)
    ids = [device.index] if device.type == "cuda" else None
    if mode == "rewrap":
        model = FreezableDDP(inner, device_ids=ids)
    else:
        model = nn.parallel.DistributedDataParallel(inner, device_ids=ids, find_unused_parameters=(mode == "unused"))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch, args.width, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    n_freeze = 0 if mode == "ddp" else int(args.freeze * args.blocks)
    # process_group=False here only for the baseline's plain DDP without find_unused (never freezes).
    freezer = SmartFreezer(model if mode != "ddp" else inner, opt, StaticFreeze(n_freeze, at_step=args.warmup),
                           example_inputs=x, process_group=None if mode != "ddp" else False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, freeze_ms = [], float("nan")
    for step in range(args.warmup + args.steps):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        t1 = time.perf_counter()
        freezer.step()
        sync()
        t2 = time.perf_counter()
        if step + 1 == args.warmup:
            freeze_ms = (t2 - t1) * 1e3
        elif step >= args.warmup:
            times.append((t2 - t0) * 1e3)
    return statistics.median(times), freeze_ms, freezer.num_frozen


def worker(rank, world, port, args):
    torch.set_num_threads(args.threads)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    rows = []
    for mode in args.modes.split(","):
        step_ms, freeze_ms, frozen = run_mode(mode, args, rank, device)
        rows.append((mode, frozen, step_ms, freeze_ms))
    if rank == 0:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)/rank"
        print(f"# {backend}, {world} ranks, {where}, torch {torch.__version__}, width {args.width}, "
              f"blocks {args.blocks}, batch {args.batch}, {args.steps} timed steps")
        print(f"{'mode':>8} {'frozen units':>12} {'step ms (median)':>17} {'freeze step ms':>15}")
        for mode, frozen, step_ms, freeze_ms in rows:
            print(f"{mode:>8} {frozen:>12} {step_ms:>17.2f} {freeze_ms:>15.2f}")
    dist.barrier()  # the ranks leave together: one that tore gloo down first can abort the other
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--freeze", type=float, default=0.5, help="fraction of the blocks frozen")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--modes", default="ddp,unused,rewrap")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.nproc, port, args), nprocs=args.nproc)


if __name__ == "__main__":
    main()
