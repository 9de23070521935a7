"""Run by test_distributed.py: two real processes over gloo train with freezing.

usage: ddp_worker.py MODE OUT_DIR [PORT]
MODE in {rewrap, unused, fsdp2, fsdp2_autofreeze, fsdp2_history, fsdp2_smartfrz, schedule,
         cache_rewrap, cache_unused, unused_bn, cache_unused_bn, mismatch, fsdp2_nan}

Each rank sees different data and runs ``RankSkewed``, a policy that proposes a different
frozen prefix on each rank; the engine must apply rank 0's proposals on both. Rank 0 then
replays the same freeze schedule in a single process on the concatenated batches (the exact
equivalent of data-parallel SGD with mean-reduced gradients) and saves that reference.
"schedule" runs LinearFreeze (a deterministic schedule: no broadcast at all) under FreezableDDP,
and the reference runs the same LinearFreeze in one process. "fsdp2_history" runs a RankSkewed
that keeps a weight history (sharded parameters: each rank gathers its shards) and records it;
the reference records its own. "fsdp2_smartfrz" runs SmartFRZ with the shipped predictor.
"cache_rewrap" / "cache_unused" train through the activation cache (FreezableDDP with an mmap
file per rank / DDP with find_unused_parameters and memory rows) on a fixed set of samples
that come back, so rows are hit and migrated; the reference trains without a cache.
"unused_bn" / "cache_unused_bn": "unused" with BatchNorm, on the cached samples, without and
with the cache (no audits; no one-process reference: batch statistics are per rank).
"mismatch" gives each rank another total_steps (FreezableDDP): every rank's freezer refuses.
"fsdp2_nan" puts a NaN in one rank's shard only: every rank's freeze stops before that unit.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from smartfrz_fast import AutoFreeze, FreezePolicy, LinearFreeze, SmartFreezer, SmartFRZ, StaticFreeze
from smartfrz_fast.cache import ActivationCache
from smartfrz_fast.distributed import DecisionSync, FreezableDDP

STEPS, BATCH, WIDTH, BLOCKS = 14, 6, 12, 5


class RankSkewed(FreezePolicy):
    """Proposes ``step // 3 + 2 * rank`` frozen units every third step: ranks disagree."""

    name = "rank_skewed"

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank
        self.proposals = []

    def decides_at(self, step):
        return step % 3 == 0

    def decide(self, step, frozen):
        if step % 3:
            return None
        proposal = min(step // 3 + 2 * self.rank, self.context.num_units)  # a valid prefix length
        self.proposals.append((step, proposal))
        return torch.tensor(proposal) if step % 2 else proposal  # both decision kinds


class Replay(FreezePolicy):
    name = "replay"

    def __init__(self, schedule):
        super().__init__()
        self.schedule = dict(schedule)

    def decide(self, step, frozen):
        return self.schedule.get(step)


class RecordsHistory:
    """Mixin: the engine keeps a weight history; every decision records a copy of it."""

    needs_history = True

    def decide(self, step, frozen):
        history = self.context.history
        self.histories.append((step, history.history.clone(), history.count))
        return super().decide(step, frozen)


class RankSkewedWithHistory(RecordsHistory, RankSkewed):
    def __init__(self, rank):
        super().__init__(rank)
        self.histories = []


class ReplayWithHistory(RecordsHistory, Replay):
    def __init__(self, schedule):
        super().__init__(schedule)
        self.histories = []


# A history of 4 snapshots of 64 sampled weights (fewer than a unit holds: a real sample).
HISTORY = dict(window=4, sample_size=64)
SMARTFRZ_STEPS = 36  # the shipped predictor reads 30 snapshots: a window, then a few decisions


def schedule_policy():
    return LinearFreeze(freeze_start=0.2)


def make_model(batch_norm=False):
    torch.manual_seed(0)
    norm = nn.BatchNorm1d if batch_norm else nn.LayerNorm
    blocks = [nn.Sequential(nn.Linear(WIDTH, WIDTH), norm(WIDTH), nn.Tanh()) for _ in range(BLOCKS)]
    return nn.Sequential(*blocks, nn.Linear(WIDTH, 3))


def data(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


CACHED_SAMPLES = 4 * BATCH  # the two ranks see all of them every two steps


def cached_data(step, rank):
    """(inputs, labels, sample ids) from a fixed set: samples come back, on either rank."""
    g = torch.Generator().manual_seed(7)
    xs, ys = torch.randn(CACHED_SAMPLES, WIDTH, generator=g), torch.randint(0, 3, (CACHED_SAMPLES,), generator=g)
    order = torch.randperm(CACHED_SAMPLES, generator=torch.Generator().manual_seed(step // 2))
    quarter = 2 * (step % 2) + rank
    ids = order[quarter * BATCH:(quarter + 1) * BATCH]
    return xs[ids], ys[ids], ids


def train(model, freezer, optimizer, batches, steps=STEPS):
    loss_fn = nn.CrossEntropyLoss()
    for step in range(steps):
        x, y, *ids = batches(step)
        loss_fn(model(x, *ids), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        freezer.step()


def full_state(module):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in module.state_dict().items()}


def count_broadcasts():
    calls = []
    original = DecisionSync.broadcast

    def broadcast(self, decision):
        calls.append(1)
        return original(self, decision)

    DecisionSync.broadcast = broadcast
    return calls


def leave_group_and_exit() -> None:
    """End a rank once its results are on disk: both ranks leave the gloo group together, then
    the process exits without the interpreter's native teardown. Torn down at exit, gloo's worker
    threads can abort a good run ("terminate called without an active exception": a thread
    that drops a tensor's last reference needs the GIL while the interpreter finalizes; the
    process group outlives destroy_process_group while C++ objects such as DDP's reducer hold
    it). Seen at exit in about 2 runs in 25 under transformers 4.57, in a Lightning run and in a
    plain FreezableDDP run in CI."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def worker(rank, world, port, mode, out):
    torch.set_num_threads(1)
    broadcasts = count_broadcasts()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    inner = make_model(batch_norm=mode.endswith("_bn"))
    if mode in ("rewrap", "schedule", "cache_rewrap", "mismatch"):
        model = FreezableDDP(inner)
    elif mode in ("unused", "cache_unused", "unused_bn", "cache_unused_bn"):
        model = nn.parallel.DistributedDataParallel(inner, find_unused_parameters=True)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in inner:
            fully_shard(block)
        model = fully_shard(inner)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    steps, settings = STEPS, {}
    if mode == "fsdp2_autofreeze":
        policy = AutoFreeze(interval=3, percentile=60)
    elif mode == "schedule":
        policy = schedule_policy()
    elif mode == "fsdp2_history":
        policy, settings = RankSkewedWithHistory(rank), HISTORY
    elif mode == "fsdp2_smartfrz":
        policy, steps, settings = SmartFRZ(settle_ratio=None), SMARTFRZ_STEPS, dict(sample_every=1)
    else:
        policy = RankSkewed(rank)
    # "unused" hands the engine the inner module (the DDP wrapper stays outside its view).
    seen = inner if mode in ("unused", "cache_unused", "unused_bn", "cache_unused_bn") else model
    if mode == "fsdp2_nan":  # a NaN in rank 1's shard of unit 1 only: both ranks stop before unit 1
        freezer = SmartFreezer(model, optimizer, StaticFreeze(3), example_inputs=data(0, rank)[0])
        if rank == 1:
            with torch.no_grad():
                inner[1][0].weight.to_local().fill_(float("nan"))
        frozen = freezer.freeze_to(3)
        torch.save({"frozen": frozen}, out / f"rank{rank}.pt")
        leave_group_and_exit()
    if mode == "mismatch":  # each rank counted its own shard: refused on every rank, nothing hangs
        try:
            SmartFreezer(seen, optimizer, LinearFreeze(), example_inputs=data(0, rank)[0], total_steps=steps + rank)
        except ValueError as exc:
            torch.save({"error": str(exc)}, out / f"rank{rank}.pt")
        leave_group_and_exit()
    freezer = SmartFreezer(seen, optimizer, policy, example_inputs=data(0, rank)[0], total_steps=steps, **settings)
    batches, cache, shared_path_error = (lambda step: data(step, rank)), None, None
    if mode.startswith("cache"):
        tier = dict(storage="mmap", path=str(out / "cache.{rank}.bin")) if mode == "cache_rewrap" else {}
        try:  # one file for both ranks: refused
            ActivationCache(freezer, num_samples=CACHED_SAMPLES, deterministic=True, storage="mmap",
                            path=str(out / "shared.bin"))
        except ValueError as exc:
            shared_path_error = str(exc)
        if mode.endswith("_bn"):  # no audit to catch a stale row
            tier = dict(audit_rows=0)
        cache = ActivationCache(freezer, num_samples=CACHED_SAMPLES, deterministic=True, **tier)
        model = cache.wrap() if mode == "cache_rewrap" else cache.wrap(model)
    if mode.startswith("cache"):
        batches = lambda step: cached_data(step, rank)  # noqa: E731
    elif mode.endswith("_bn"):  # the same samples, without their ids
        batches = lambda step: cached_data(step, rank)[:2]  # noqa: E731
    train(model, freezer, optimizer, batches, steps)
    frozen = [p for u in freezer.units[:freezer.num_frozen] for p in u.parameters]
    result = {
        "events": [(e.step, e.num_frozen) for e in freezer.timeline],
        "proposals": getattr(policy, "proposals", None),
        "units": [u.name for u in freezer.units],
        "state": full_state(inner),
        "frozen_grads_none": all(p.grad is None and not p.requires_grad for p in frozen),
        "optimizer_params": sum(len(g["params"]) for g in optimizer.param_groups),
        "optimizer_state": len(optimizer.state),
        "rewraps": getattr(seen, "rewraps", None),
        "broadcasts": len(broadcasts),
        "histories": getattr(policy, "histories", None),
        "probabilities": getattr(policy, "last_probabilities", None),
        "cache": None if cache is None else dict(cache.stats, boundary=cache.boundary, rows=cache.rows_cached,
                                                 files=sorted(p.name for p in out.glob("*.bin")),
                                                 shared_path_error=shared_path_error),
    }
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # one process, same schedule (not with BatchNorm: each rank's batch statistics are its own)
    if rank == 0 and mode not in ("fsdp2_autofreeze", "fsdp2_smartfrz") and not mode.endswith("_bn"):
        ref = make_model()
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
        if mode == "schedule":
            ref_policy = schedule_policy()
        elif mode == "fsdp2_history":
            ref_policy = ReplayWithHistory(result["events"])
        else:
            ref_policy = Replay(result["events"])
        ref_freezer = SmartFreezer(ref, ref_opt, ref_policy, example_inputs=data(0, 0)[0],
                                   total_steps=STEPS, process_group=False, **settings)
        source = cached_data if mode.startswith("cache") else data
        train(ref, ref_freezer, ref_opt, lambda step: tuple(
            torch.cat(parts) for parts in zip(*(source(step, r)[:2] for r in range(world)))))
        torch.save({"events": [(e.step, e.num_frozen) for e in ref_freezer.timeline],
                    "state": full_state(ref), "histories": getattr(ref_policy, "histories", None)},
                   out / "reference.pt")
    leave_group_and_exit()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    port = int(sys.argv[3]) if len(sys.argv) > 3 else 29500
    torch.set_num_threads(1)
    mp.spawn(worker, args=(2, port, mode, out), nprocs=2)
