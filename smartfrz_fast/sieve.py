"""Data sieving (SpFDE, Yuan et al., NeurIPS 2022): train on a part of the dataset at a time
and, every few epochs, swap the easiest active samples for held-back ones.

``SievingSampler`` yields dataset indices, which stay the samples' ids: it composes with the
activation cache (keyed by sample id; a sieved-out sample keeps its cache rows and finds them
again when it returns) and with any freezing policy.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Tuple

import torch
from torch import Tensor

from .policy.base import plain_number


class SievingSampler(torch.utils.data.Sampler):
    """Trains on ``active_fraction`` of ``num_samples`` samples; every ``interval`` epochs the
    ``swap_fraction`` of the active set with the lowest recent loss goes to the back of the
    held-back pool (a queue) and as many samples come from its front, so every sample is
    visited: a held-back sample becomes active within ceil(pool / swap) rotations.

    Per-sample losses live on ``device``: call ``record(ids, losses)`` with the batch's sample
    ids and its unreduced losses (``reduction="none"``). A sample's loss is the last recorded
    (or an exponential average with ``momentum`` > 0); an active sample never recorded counts as
    hardest (it is not swapped out unseen). Ties break by position in the active set. One
    host read per rotation (the ids to swap).

    Deterministic under ``seed``: the first split is a seeded permutation; the order within an
    epoch is a permutation seeded by (seed, epoch). ``state_dict`` taken between epochs resumes
    the rotation exactly (taken mid-epoch, the resumed run starts the next epoch).
    """

    def __init__(self, num_samples: int, active_fraction: float = 0.8, swap_fraction: float = 0.2,
                 interval: int = 1, seed: int = 0, device: Any = "cpu", momentum: float = 0.0) -> None:
        num_samples, active_fraction, swap_fraction, interval, seed, momentum = map(
            plain_number, (num_samples, active_fraction, swap_fraction, interval, seed, momentum))  # numpy numbers too
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"SievingSampler: seed must be an int, got {seed!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"SievingSampler: num_samples must be a positive int, got {num_samples!r}")
        for knob, value in (("active_fraction", active_fraction), ("swap_fraction", swap_fraction),
                            ("momentum", momentum)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"SievingSampler: {knob} must be a number, got {value!r}")
        if not 0.0 < active_fraction <= 1.0:
            raise ValueError(f"SievingSampler: active_fraction must be in (0, 1], got {active_fraction!r}")
        if not 0.0 <= swap_fraction <= 1.0:
            raise ValueError(f"SievingSampler: swap_fraction must be in [0, 1], got {swap_fraction!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"SievingSampler: interval must be a positive number of epochs, got {interval!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SievingSampler: momentum must be in [0, 1), got {momentum!r}")
        # Python floats: a numpy scalar in the state would not load with torch.load(weights_only=True)
        self.num_samples, self.seed, self.interval, self.momentum = num_samples, seed, interval, float(momentum)
        self.active_fraction, self.swap_fraction = float(active_fraction), float(swap_fraction)
        num_active = max(1, round(active_fraction * num_samples))
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(num_samples, generator=g).tolist()
        self.active: List[int] = sorted(order[:num_active])
        self.pool: List[int] = order[num_active:]  # queue: front enters next
        # at least one sample per rotation when swapping at all: a small active set rounded to 0
        # never rotated, and the pool was never visited
        self.num_swap = min(max(1, round(swap_fraction * num_active)) if swap_fraction > 0 else 0, len(self.pool))
        self.loss = torch.full((num_samples,), float("inf"), device=device)
        self.epoch = 0  # epochs started
        self.rotations = 0

    def __len__(self) -> int:
        return len(self.active)

    def record(self, ids: Tensor, losses: Tensor) -> None:
        """Per-sample losses of a batch (no host sync)."""
        ids, losses = self._batch_records(ids, losses)
        self.loss[ids] = self._blend(self.loss[ids], losses)

    def _batch_records(self, ids: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        """A batch's sample ids (int64) and losses (fp32), flat, on the loss tensor's device."""
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{type(self).__name__}.record: sample ids must be integers (dataset indices), "
                            f"got {ids.dtype}")
        if ids.device.type == "cpu" and ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.num_samples):
            # checked where it costs no device sync (ids from a DataLoader are on the CPU); a -1
            # would silently record the last sample's loss
            raise IndexError(f"{type(self).__name__}.record: sample ids must be in [0, {self.num_samples}), got "
                             f"{int(ids.min())}..{int(ids.max())}; pass dataset indices (num_samples=len(dataset))")
        ids = ids.to(self.loss.device).long().reshape(-1)
        losses = losses.detach().to(self.loss.device, torch.float32).reshape(-1)
        if ids.numel() != losses.numel():
            raise ValueError(f"{type(self).__name__}.record: {ids.numel()} ids but {losses.numel()} losses; "
                             "pass per-sample losses (reduction='none')")
        return ids, losses

    def _blend(self, old: Tensor, new: Tensor) -> Tensor:
        """A sample's loss after a new record: the record, or its exponential average."""
        if self.momentum == 0:
            return new
        return torch.where(torch.isinf(old), new, self.momentum * old + (1 - self.momentum) * new)

    def rotate(self) -> List[int]:
        """Swap the easiest active samples for the pool's front; returns the ids sieved out."""
        if self.num_swap == 0:
            return []
        active = torch.tensor(self.active, device=self.loss.device)
        losses = self.loss[active]
        order = torch.sort(losses, stable=True).indices[: self.num_swap]
        # a sample never recorded is not swapped out unseen (an epoch started without training,
        # e.g. a look at the loader for example inputs, rotated before any loss existed)
        order = order[torch.isfinite(losses[order])]
        slots = order.tolist()  # the one host read
        if not slots:
            return []
        out = [self.active[s] for s in slots]
        incoming = self.pool[: len(out)]
        self.pool = self.pool[len(out):] + out
        for s, new in zip(slots, incoming):
            self.active[s] = new
            self.loss[new] = float("inf")  # unseen since it returned: not swapped out at once
        self.rotations += 1
        return out

    def _next_epoch(self) -> List[int]:
        """Starts an epoch: rotates when due; the active set in this epoch's seeded order."""
        if self.epoch > 0 and self.epoch % self.interval == 0:
            self.rotate()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        perm = torch.randperm(len(self.active), generator=g).tolist()
        return [self.active[i] for i in perm]

    def __iter__(self) -> Iterator[int]:
        return iter(self._next_epoch())

    def state_dict(self) -> Dict[str, Any]:
        return {"num_samples": self.num_samples, "seed": self.seed, "interval": self.interval,
                "active_fraction": self.active_fraction, "swap_fraction": self.swap_fraction,
                "momentum": self.momentum, "active": list(self.active), "pool": list(self.pool),
                "loss": self.loss.cpu().clone(),
                "epoch": self.epoch, "rotations": self.rotations}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        missing = [k for k in ("num_samples", "seed", "interval", "active", "pool", "loss", "epoch", "rotations")
                   if k not in state]
        if missing:
            raise ValueError(f"SievingSampler: the checkpoint lacks {missing}: it is truncated or not from "
                             "SievingSampler.state_dict()")
        # the fractions and momentum are absent from checkpoints of 0.1.0's first releases
        for key in ("num_samples", "seed", "interval", "active_fraction", "swap_fraction", "momentum"):
            if key in state and not (state[key] == getattr(self, key) or isinstance(state[key], float)
                                     and math.isclose(state[key], getattr(self, key), rel_tol=1e-9)):
                raise ValueError(f"SievingSampler: checkpoint has {key}={state[key]}, this sampler "
                                 f"{getattr(self, key)}: construct it with the checkpoint's settings")
        if len(state["active"]) != len(self.active) or sorted(state["active"] + state["pool"]) != list(range(self.num_samples)):
            raise ValueError("SievingSampler: checkpoint's active set and pool do not partition the dataset")
        if not isinstance(state["loss"], Tensor) or tuple(state["loss"].shape) != tuple(self.loss.shape):
            raise ValueError(f"SievingSampler: checkpoint's per-sample losses are not a tensor of shape "
                             f"{tuple(self.loss.shape)}: the checkpoint is corrupt")
        self.active, self.pool = list(state["active"]), list(state["pool"])
        self.loss.copy_(state["loss"].to(self.loss.device))
        self.epoch, self.rotations = int(state["epoch"]), int(state["rotations"])

    def describe(self) -> str:
        return (f"SievingSampler({len(self.active)}/{self.num_samples} active, swap {self.num_swap} "
                f"every {self.interval} epoch(s), seed={self.seed})")


class DistributedSievingSampler(SievingSampler, torch.utils.data.DistributedSampler):
    """``SievingSampler`` for data-parallel training: every rank holds the same active set,
    pool and per-sample losses, and iterates its shard of each epoch's order (as
    ``DistributedSampler``: padded by repeating the order's head to a multiple of the world
    size, or cut with ``drop_last``), so the ranks' shards are disjoint up to the padding and
    cover the active set.

    ``record`` only accumulates the rank's own losses (sum and count per sample, on the
    device, no collective); at the start of every epoch after the first (before a rotation),
    or when ``sync()`` is called, one all-reduce of the dense ``[2, num_samples]`` tensor
    combines every rank's records (a sample recorded on two ranks, by padding, gets their
    mean) and folds them in as ``record`` does on one process, so every rank rotates
    identically and the rotation equals a single-process sampler's fed the same losses.

    Collectives: every rank must start the same epochs and call ``sync()`` the same times.
    Checkpoints: at an epoch's end call ``sync()`` on every rank, then take ``state_dict()`` on
    any rank (it refuses while this rank holds records not yet combined); load it on every rank.

    It is a ``DistributedSampler`` (without that class's set-up: it shards itself), so trainers
    that shard every other sampler again (Lightning's ``use_distributed_sampler``, whose wrapper
    left each rank half its shard, review82) leave it as it is; their ``set_epoch`` calls change
    nothing, since the sampler counts its epochs by its iterations.
    """

    def __init__(self, num_samples: int, active_fraction: float = 0.8, swap_fraction: float = 0.2,
                 interval: int = 1, seed: int = 0, device: Any = "cpu", momentum: float = 0.0,
                 process_group: Any = None, drop_last: bool = False) -> None:
        import torch.distributed as dist

        from .distributed import DecisionSync

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistributedSievingSampler: torch.distributed is not initialised; call "
                               "init_process_group first (on one process, use SievingSampler)")
        super().__init__(num_samples, active_fraction, swap_fraction, interval, seed, device, momentum)
        self._comm = DecisionSync(process_group, self.loss.device)  # its all_reduce_sum handles gloo/NCCL
        self.rank, self.world_size = self._comm.rank, self._comm.world_size
        self.drop_last = drop_last
        self.num_replicas, self.shuffle = self.world_size, True  # as a DistributedSampler's, for trainers
        # what the ranks draw from: fractions that round to the same counts agree (0.8 and np.float32(0.8))
        settings = (f"num_samples={self.num_samples}, {len(self.active)} active, {self.num_swap} swapped, "
                    f"interval={self.interval}, seed={self.seed}, momentum={self.momentum!r}, drop_last={drop_last}")
        if not self._comm.same_on_every_rank(settings):
            # ranks that disagree draw other active sets (the shards neither disjoint nor covering)
            # or all-reduce tensors of other sizes, which aborts the processes inside gloo
            raise ValueError(
                f"DistributedSievingSampler: the ranks were given different settings (rank {self.rank}: "
                f"{settings}). Build it alike on every rank: num_samples the size of the whole dataset (not the "
                "rank's part), the same seed (not one per rank) and the same fractions.")
        if drop_last and len(self.active) < self.world_size:
            raise ValueError(f"DistributedSievingSampler: {len(self.active)} active samples cannot be split "
                             f"over {self.world_size} ranks with drop_last=True")
        self._pending = torch.zeros(2, num_samples, device=self.loss.device)  # loss sums, counts

    def __len__(self) -> int:
        n, w = len(self.active), self.world_size
        return n // w if self.drop_last else -(-n // w)

    def set_epoch(self, epoch: int) -> None:
        """Nothing: the sampler counts its epochs by its iterations (``state_dict`` resumes the
        count); a trainer calls this on every ``DistributedSampler``."""

    def record(self, ids: Tensor, losses: Tensor) -> None:
        """This rank's per-sample losses of a batch (no host sync, no collective)."""
        ids, losses = self._batch_records(ids, losses)
        self._pending[0].index_add_(0, ids, losses)
        self._pending[1].index_add_(0, ids, torch.ones_like(losses))

    def sync(self) -> None:
        """Combine every rank's records since the last sync (a collective: call on every rank)."""
        self._comm.all_reduce_sum(self._pending)
        total, count = self._pending
        seen = count > 0
        self.loss.copy_(torch.where(seen, self._blend(self.loss, total / count.clamp_min(1)), self.loss))
        self._pending.zero_()

    def __iter__(self) -> Iterator[int]:
        if self.epoch > 0:
            self.sync()  # every rank starts the epoch with the same losses, before any rotation
        order = self._next_epoch()
        n, w = len(order), self.world_size
        size = len(self) * w
        order = order[:size] if self.drop_last else (order * -(-size // n))[:size]
        return iter(order[self.rank:size:w])

    def state_dict(self) -> Dict[str, Any]:
        if bool(self._pending[1].any()):
            raise RuntimeError("DistributedSievingSampler.state_dict: this rank has losses not yet combined "
                               "with the other ranks'; call sampler.sync() on every rank first (at the "
                               "end of an epoch)")
        return super().state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._pending.zero_()

    def describe(self) -> str:
        return super().describe()[:-1] + f", rank {self.rank}/{self.world_size})"
