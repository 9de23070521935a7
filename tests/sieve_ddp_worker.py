"""Run by test_sieve_distributed.py: DistributedSievingSampler on two real processes over gloo.

usage: sieve_ddp_worker.py MODE OUT_DIR PORT
MODE "sampler": no model; each rank records a fixed loss per (sample, epoch) for its shard;
    per epoch it saves its shard and the sampler's active set, pool and losses; a sampler
    resumed from a mid-run state_dict repeats the tail; rank 0 also runs a single-process
    SievingSampler fed the same losses for every active sample (the reference rotation).
MODE "ddp": FreezableDDP + SmartFreezer (AutoFreeze: rank 0's decisions broadcast) trained in
    epochs from the sampler, per-sample losses recorded; saves weights, freeze events and the
    sampler's state.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from smartfrz_fast import AutoFreeze, SievingSampler, SmartFreezer
from smartfrz_fast.distributed import FreezableDDP
from smartfrz_fast.sieve import DistributedSievingSampler

from ddp_worker import leave_group_and_exit

# 41 samples, 25 active (odd: one padded duplicate per epoch over 2 ranks), 8 swapped per epoch
N, ACTIVE, SWAP, MOMENTUM, EPOCHS, RESUME_AT = 41, 0.6, 0.3, 0.5, 8, 3


def loss_of(i, epoch):
    return float((i * 7 + epoch * 3) % 13)


def sampler_mode(rank):
    def make():
        return DistributedSievingSampler(N, ACTIVE, SWAP, seed=4, momentum=MOMENTUM)

    def epoch(s, e):
        shard = list(iter(s))
        s.record(torch.tensor(shard), torch.tensor([loss_of(i, e) for i in shard]))
        s.sync()  # end of epoch: combine before a checkpoint may be taken
        return shard

    s = make()
    epochs, state = [], None
    for e in range(EPOCHS):
        epochs.append({"shard": epoch(s, e), "active": list(s.active), "pool": list(s.pool),
                       "loss": s.loss.clone(), "len": len(s)})
        if e == RESUME_AT - 1:
            state = s.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = [epoch(resumed, e) for e in range(RESUME_AT, EPOCHS)]
    result = {"epochs": epochs, "tail": tail, "rotations": s.rotations,
              # trainers shard every sampler that is not one again (Lightning: half the shard, review82)
              "a_distributed_sampler": isinstance(s, torch.utils.data.DistributedSampler)}
    try:  # a seed per rank: the shards would be neither disjoint nor covering
        DistributedSievingSampler(N, ACTIVE, SWAP, seed=4 + rank, momentum=MOMENTUM)
    except ValueError as exc:
        result["refused"] = str(exc)
    if rank == 0:  # one process, every active sample recorded once per epoch
        ref, ref_epochs = SievingSampler(N, ACTIVE, SWAP, seed=4, momentum=MOMENTUM), []
        for e in range(EPOCHS):
            ids = list(iter(ref))
            ref.record(torch.tensor(ids), torch.tensor([loss_of(i, e) for i in ids]))
            ref_epochs.append({"active": list(ref.active), "pool": list(ref.pool), "loss": ref.loss.clone()})
        result["reference"] = ref_epochs
    return result


def ddp_mode(rank):
    torch.manual_seed(0)
    inner = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(4)], nn.Linear(6, 3))
    model = FreezableDDP(inner)
    g = torch.Generator().manual_seed(7)  # the same dataset on both ranks
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    sampler = DistributedSievingSampler(48, active_fraction=0.5, swap_fraction=0.25, seed=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, torch.arange(48)),
                                         batch_size=4, sampler=sampler)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    epochs = 6
    freezer = SmartFreezer(model, optimizer, AutoFreeze(interval=3, percentile=60), example_inputs=x[:2],
                           total_steps=epochs * len(loader))
    seen = []
    for _ in range(epochs):
        for xb, yb, ids in loader:
            losses = nn.functional.cross_entropy(model(xb), yb, reduction="none")
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            freezer.step()
            sampler.record(ids, losses)
            seen += ids.tolist()
    sampler.sync()
    return {"state": {k: v.detach().clone() for k, v in inner.state_dict().items()},
            "events": [(e.step, e.num_frozen) for e in freezer.timeline], "seen": seen,
            "sampler": sampler.state_dict(), "steps_per_epoch": len(loader)}


def worker(rank, world, port, mode, out):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = sampler_mode(rank) if mode == "sampler" else ddp_mode(rank)
    torch.save(result, out / f"rank{rank}.pt")
    leave_group_and_exit()


if __name__ == "__main__":
    mode, out, port = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    mp.spawn(worker, args=(2, port, mode, out), nprocs=2)
