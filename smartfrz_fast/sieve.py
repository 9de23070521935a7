"""Data sieving (SpFDE, Yuan et al., NeurIPS 2022): train on a part of the dataset at a time
and, every few epochs, swap the easiest active samples for held-back ones.

``SievingSampler`` yields dataset indices, which stay the samples' ids: it composes with the
activation cache (keyed by sample id; a sieved-out sample keeps its cache rows and finds them
again when it returns) and with any freezing policy.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List

import torch
from torch import Tensor


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
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"SievingSampler: num_samples must be a positive int, got {num_samples!r}")
        if not 0.0 < active_fraction <= 1.0:
            raise ValueError(f"SievingSampler: active_fraction must be in (0, 1], got {active_fraction!r}")
        if not 0.0 <= swap_fraction <= 1.0:
            raise ValueError(f"SievingSampler: swap_fraction must be in [0, 1], got {swap_fraction!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"SievingSampler: interval must be a positive number of epochs, got {interval!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SievingSampler: momentum must be in [0, 1), got {momentum!r}")
        self.num_samples, self.seed, self.interval, self.momentum = num_samples, seed, interval, momentum
        self.active_fraction, self.swap_fraction = active_fraction, swap_fraction
        num_active = max(1, round(active_fraction * num_samples))
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(num_samples, generator=g).tolist()
        self.active: List[int] = sorted(order[:num_active])
        self.pool: List[int] = order[num_active:]  # queue: front enters next
        self.num_swap = min(round(swap_fraction * num_active), len(self.pool))
        self.loss = torch.full((num_samples,), float("inf"), device=device)
        self.epoch = 0  # epochs started
        self.rotations = 0

    def __len__(self) -> int:
        return len(self.active)

    def record(self, ids: Tensor, losses: Tensor) -> None:
        """Per-sample losses of a batch (no host sync)."""
        ids = torch.as_tensor(ids, device=self.loss.device).long().reshape(-1)
        losses = losses.detach().to(self.loss.device, torch.float32).reshape(-1)
        if ids.numel() != losses.numel():
            raise ValueError(f"SievingSampler.record: {ids.numel()} ids but {losses.numel()} losses; "
                             "pass per-sample losses (reduction='none')")
        if self.momentum > 0:
            old = self.loss[ids]
            losses = torch.where(torch.isinf(old), losses, self.momentum * old + (1 - self.momentum) * losses)
        self.loss[ids] = losses

    def rotate(self) -> List[int]:
        """Swap the easiest active samples for the pool's front; returns the ids sieved out."""
        if self.num_swap == 0:
            return []
        active = torch.tensor(self.active, device=self.loss.device)
        order = torch.sort(self.loss[active], stable=True).indices[: self.num_swap]
        slots = order.tolist()  # the one host read
        out = [self.active[s] for s in slots]
        incoming = self.pool[: self.num_swap]
        self.pool = self.pool[self.num_swap:] + out
        for s, new in zip(slots, incoming):
            self.active[s] = new
            self.loss[new] = float("inf")  # unseen since it returned: not swapped out at once
        self.rotations += 1
        return out

    def __iter__(self) -> Iterator[int]:
        if self.epoch > 0 and self.epoch % self.interval == 0:
            self.rotate()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        perm = torch.randperm(len(self.active), generator=g).tolist()
        active = list(self.active)
        return iter([active[i] for i in perm])

    def state_dict(self) -> Dict[str, Any]:
        return {"num_samples": self.num_samples, "seed": self.seed, "interval": self.interval,
                "active": list(self.active), "pool": list(self.pool), "loss": self.loss.cpu().clone(),
                "epoch": self.epoch, "rotations": self.rotations}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("num_samples", "seed", "interval"):
            if state[key] != getattr(self, key):
                raise ValueError(f"SievingSampler: checkpoint has {key}={state[key]}, this sampler "
                                 f"{getattr(self, key)}: construct it with the checkpoint's settings")
        if len(state["active"]) != len(self.active) or sorted(state["active"] + state["pool"]) != list(range(self.num_samples)):
            raise ValueError("SievingSampler: checkpoint's active set and pool do not partition the dataset")
        self.active, self.pool = list(state["active"]), list(state["pool"])
        self.loss.copy_(state["loss"].to(self.loss.device))
        self.epoch, self.rotations = int(state["epoch"]), int(state["rotations"])

    def describe(self) -> str:
        return (f"SievingSampler({len(self.active)}/{self.num_samples} active, swap {self.num_swap} "
                f"every {self.interval} epoch(s), seed={self.seed})")
