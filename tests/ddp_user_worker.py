"""Two gloo ranks (test_distributed.py): what a user's own code does under DDP besides freezing.

Scenarios (argv[1]):
- ``hold_one_rank``: DDP(find_unused_parameters=True); rank 1 alone holds the first layer frozen
  for a warm-up (a mistake); an adaptive decision must still freeze the same prefix on both ranks.
- ``close_unfreeze`` (``_cache``: through the activation cache): FreezableDDP; freezer.close() and
  requires_grad_(True) train the frozen layers again, their gradients averaged across the ranks.
- ``resume_assign``: FreezableDDP; a checkpoint resumed with load_state_dict(assign=True) keeps
  the ranks in step and equals the uninterrupted run.
- ``smartfrz_set_up_lengths``: FreezableDDP, default SmartFRZ, each rank set up on a batch of
  another sequence length (so another FLOP share per unit): the ranks decide together.
- ``extra_step_schedule`` / ``extra_step_adaptive``: DDP(find_unused_parameters=True) with a
  schedule / FreezableDDP with an adaptive policy; rank 1 calls freezer.step() twice after one
  optimizer step: the ranks must still count the same steps.
- ``join_throw_rebuild``: FreezableDDP inside ``model.join(throw_on_early_termination=True)``,
  uneven inputs, a freeze (so a rebuild) inside it: every rank stops at the first one's end.
Each rank saves the flat parameters it ends with (and its freeze timeline) to OUT/rank<r>.pt."""

import copy
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

from smartfrz_fast import SmartFreezer, SmartFRZ, StaticFreeze
from smartfrz_fast.distributed import FreezableDDP
from smartfrz_fast.policy.base import FreezePolicy

from ddp_worker import leave_group_and_exit

WIDTH = 16


class FreezeTwo(FreezePolicy):
    """An adaptive policy's stand-in: "two units" at every step (rank 0's is broadcast)."""

    def decide(self, step, frozen):
        return 2


class FreezeTwoFromSix(FreezePolicy):
    """An adaptive policy's stand-in that decides at every step (rank 0's is broadcast): two units
    from step 6 on."""

    def decide(self, step, frozen):
        return 2 if step >= 6 else None


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(4)], nn.Linear(WIDTH, 3))


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, WIDTH, generator=g), torch.randint(0, 3, (8,), generator=g)


def train(model, opt, freezer, rank, start, stop, before_step=None):
    for step in range(start, stop):
        if before_step is not None:
            before_step(step)
        x, y = batch(step, rank)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if freezer is not None:
            freezer.step()


def flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def main(scenario, out):
    rank = dist.get_rank()
    result = {}
    if scenario == "hold_one_rank":  # plain DDP: FreezableDDP, like DDP, needs the same requires_grad on every rank
        inner = make_model()
        model = torch.nn.parallel.DistributedDataParallel(inner, find_unused_parameters=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = SmartFreezer(model, opt, FreezeTwo(), example_inputs=batch(0, rank)[0], window=4, sample_every=1,
                               total_steps=20)

        def hold(step):
            if rank == 1:
                inner[0].requires_grad_(step >= 6)
        train(model, opt, freezer, rank, 0, 20, before_step=hold)
        result["timeline"] = [(e.step, e.num_frozen) for e in freezer.timeline]
    elif scenario in ("close_unfreeze", "close_unfreeze_cache"):
        inner = make_model()
        model = FreezableDDP(inner)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=3), example_inputs=batch(0, rank)[0], total_steps=20)
        forward = model
        if scenario == "close_unfreeze_cache":  # the cache runs DDP's forward itself
            from smartfrz_fast.cache import ActivationCache

            cached = ActivationCache(freezer, num_samples=8, deterministic=True).wrap()
            forward = lambda x: cached(x, torch.arange(8))  # noqa: E731
        train(forward, opt, freezer, rank, 0, 8)
        frozen = flat(inner[0]).clone()
        freezer.close()
        inner.requires_grad_(True)
        train(forward, opt, None, rank, 8, 14)
        result["frozen_layer_moved"] = not torch.equal(frozen, flat(inner[0]))
    elif scenario == "resume_assign":
        def build():
            inner = make_model()
            model = FreezableDDP(inner)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            return inner, model, opt, SmartFreezer(model, opt, StaticFreeze(2, at_step=12),
                                                   example_inputs=batch(0, rank)[0], total_steps=20)
        inner, model, opt, freezer = build()
        train(model, opt, freezer, rank, 0, 8)
        ckpt = copy.deepcopy({"model": inner.state_dict(), "opt": opt.state_dict(), "freezer": freezer.state_dict()})
        train(model, opt, freezer, rank, 8, 20)
        result["uninterrupted"] = flat(inner)
        inner, model, opt, freezer = build()
        inner.load_state_dict(ckpt["model"], assign=True)
        freezer.load_state_dict(ckpt["freezer"])
        opt.load_state_dict(ckpt["opt"])
        train(model, opt, freezer, rank, 8, 20)
    elif scenario in ("extra_step_schedule", "extra_step_adaptive"):
        # the extra call put rank 1 a step ahead: with the schedule the ranks froze at different
        # steps and drifted apart silently (6.1e-3); with the adaptive policy they waited in
        # different collectives (a hang)
        inner = make_model()
        schedule = scenario == "extra_step_schedule"
        model = torch.nn.parallel.DistributedDataParallel(inner, find_unused_parameters=True) if schedule \
            else FreezableDDP(inner)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        policy = StaticFreeze(2, at_step=6) if schedule else FreezeTwoFromSix()
        freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0, rank)[0], total_steps=13)

        def extra(step):
            if rank == 1 and step == 3:
                freezer.step()  # a second call for step 2's optimizer step
        train(model, opt, freezer, rank, 0, 12, before_step=extra)
        result["timeline"] = [(e.step, e.num_frozen) for e in freezer.timeline]
        result["step_count"] = freezer.step_count
    elif scenario == "join_throw_rebuild":
        # the DDP rebuilt at the freeze was outside the join: gloo aborted on a size mismatch
        inner = make_model()
        model = FreezableDDP(inner)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=3), example_inputs=batch(0, rank)[0],
                               total_steps=10)
        try:
            with model.join(throw_on_early_termination=True):
                train(model, opt, freezer, rank, 0, 7 + rank)  # uneven inputs
        except RuntimeError as exc:
            result["error"] = str(exc)
        result["timeline"] = [(e.step, e.num_frozen) for e in freezer.timeline]
    elif scenario == "smartfrz_set_up_lengths":
        # each rank sets up on its own first batch, of another sequence length: the stem's share of
        # the FLOPs (attention's grows with the length) passed min_flops_share on rank 0 only, and
        # rank 1 stopped taking part in rank 0's decision broadcasts: a hang
        inner = StemThenAttention()
        model = FreezableDDP(inner)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x = torch.randn(4, 8 if rank == 0 else 192, 12, generator=torch.Generator().manual_seed(rank))
        freezer = SmartFreezer(model, opt, SmartFRZ(), example_inputs=x, total_steps=120, sample_every=1)
        for _ in range(40):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
        result["timeline"] = [(e.step, e.num_frozen) for e in freezer.timeline]
        result["limits"] = (freezer.policy._limit, freezer.policy._shared_limit)
    result["params"] = flat(inner)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


class StemThenAttention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(12, 32)
        self.layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.layer(self.stem(x)).mean(1))


def entry(rank, scenario, out, port):
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        main(scenario, out)
    except BaseException:
        dist.destroy_process_group()  # the other rank's next collective fails rather than waits
        raise
    leave_group_and_exit()


if __name__ == "__main__":
    torch.multiprocessing.spawn(entry, args=tuple(sys.argv[1:4]), nprocs=2)
