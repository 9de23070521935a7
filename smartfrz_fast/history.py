"""The weight-history ring buffer: K sampled weights per unit, T snapshots, on the GPU.

Positions are drawn once per unit from a seeded generator (sorted, so reads walk memory
forward) over the concatenation of the unit's parameters, and stored as (source tensor,
storage offset) pairs so that one op launch gathers every active unit, whatever its dtype,
size or strides. A unit with fewer than K weights uses all of them; the rest is masked.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .units import Unit

SAMPLEABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _storage_offsets(shape: Sequence[int], strides: Sequence[int], flat: np.ndarray) -> np.ndarray:
    """Storage offsets of logical (row-major) flat indices into a tensor of given shape/strides."""
    offsets = np.zeros_like(flat)
    remainder = flat.copy()
    for size, stride in zip(reversed(shape), reversed(strides)):
        offsets += (remainder % size) * stride
        remainder //= size
    return offsets


def sample_positions(unit: Unit, first_source: int, sample_size: int, seed: int,
                     masks: Optional[Sequence[Optional[Tensor]]] = None):
    """``(source_ids [K] int32, offsets [K] int64, valid)`` for one unit.

    ``masks`` (sparse training): per parameter of the unit, None or a bool tensor of its shape;
    positions are then drawn only where the mask is true (pruned weights are not history)."""
    sizes = [p.numel() for p in unit.parameters]
    total = sum(sizes)
    rng = np.random.default_rng([seed, unit.index])
    if masks is None or all(m is None for m in masks):
        valid = min(sample_size, total)
        flat = np.sort(rng.choice(total, size=valid, replace=False)).astype(np.int64)
    else:
        keep = np.concatenate([
            np.ones(n, dtype=bool) if m is None else m.detach().reshape(-1).cpu().numpy().astype(bool)
            for n, m in zip(sizes, masks)
        ])
        candidates = np.flatnonzero(keep).astype(np.int64)
        valid = min(sample_size, candidates.size)
        flat = np.sort(candidates[rng.choice(candidates.size, size=valid, replace=False)])
    source_ids = np.full(sample_size, -1, dtype=np.int32)
    offsets = np.zeros(sample_size, dtype=np.int64)
    starts = np.cumsum([0] + sizes)
    for i, param in enumerate(unit.parameters):
        hit = (flat >= starts[i]) & (flat < starts[i + 1])
        source_ids[:valid][hit] = first_source + i
        offsets[:valid][hit] = _storage_offsets(param.shape, param.stride(), flat[hit] - starts[i])
    return source_ids, offsets, valid


class WeightHistory:
    """``[units, window, sample_size]`` float32 ring buffer of sampled weights."""

    def __init__(self, units: Sequence[Unit], *, sample_size: int = 1024, window: int = 30, seed: int = 0):
        if sample_size < 1 or window < 2:
            raise ValueError(f"WeightHistory needs sample_size >= 1 and window >= 2, got {sample_size}, {window}")
        self.units = list(units)
        self.sample_size = sample_size
        self.window = window
        self.seed = seed
        self.sources: List[Tensor] = [p for unit in self.units for p in unit.parameters]
        bad = [(u.name, p.dtype) for u in self.units for p in u.parameters if p.dtype not in SAMPLEABLE_DTYPES]
        if bad:
            raise ValueError(f"WeightHistory samples float parameters only; got {bad[:3]}")
        devices = {p.device for p in self.sources}
        if len(devices) != 1:
            raise ValueError(
                f"WeightHistory needs every unit on one device, found {sorted(map(str, devices))}; "
                "model-parallel layouts are not supported yet."
            )
        self.device = devices.pop()
        ids, offs, valid = [], [], []
        first_source = 0
        for unit in self.units:
            i, o, v = sample_positions(unit, first_source, sample_size, seed)
            first_source += len(unit.parameters)
            ids.append(i)
            offs.append(o)
            valid.append(v)
        self.source_ids = torch.from_numpy(np.stack(ids)).to(self.device)
        self.offsets = torch.from_numpy(np.stack(offs)).to(self.device)
        self.valid = torch.tensor(valid, dtype=torch.int64, device=self.device)
        self.history = torch.zeros(len(self.units), window, sample_size, dtype=torch.float32, device=self.device)
        self.cursor = torch.zeros((), dtype=torch.int64, device=self.device)
        self.count = 0  # snapshots taken (host copy of ``cursor``; no sync needed to know it)
        self.first_active = 0
        self.rows = torch.arange(len(self.units), device=self.device)

    @property
    def full(self) -> bool:
        """Every active unit's window holds ``window`` snapshots."""
        return self.count >= self.window

    def snapshot(self) -> None:
        """Gather every active unit's sampled weights into the next slot (one op launch)."""
        if self.rows.numel() == 0:
            return
        from . import ops

        ops.gather_history(self.sources, self.source_ids, self.offsets, self.rows, self.cursor, self.history)
        self.cursor.add_(1)
        self.count += 1

    def drop_leading(self, num_frozen: int) -> None:
        """Stop sampling the first ``num_frozen`` units (they froze)."""
        self.first_active = num_frozen
        self.rows = torch.arange(num_frozen, len(self.units), device=self.device)

    def restrict_to_masks(self, masks: Dict[int, Tensor], prev_masks: Optional[Dict[int, Tensor]] = None) -> List[int]:
        """Sparse training: re-draw the positions of every unit holding a masked parameter so
        that they fall only on unmasked weights. ``masks`` maps ``id(parameter)`` to a bool
        tensor of its shape. Returns the indices of the units re-drawn.

        A position drawn before and after keeps its history column. A new column is
        backfilled with the weight's *effective* past value where it is known: 0 if
        ``prev_masks`` says the weight was pruned until now (exact: a pruned weight is 0),
        else its current value (an approximation: its past values were not sampled)."""
        changed = []
        first_source = 0
        prev_masks = prev_masks or {}
        for unit in self.units:
            unit_masks = [masks.get(id(p)) for p in unit.parameters]
            start = first_source
            first_source += len(unit.parameters)
            if all(m is None for m in unit_masks):
                continue
            for p, m in zip(unit.parameters, unit_masks):
                if m is not None and tuple(m.shape) != tuple(p.shape):
                    raise ValueError(
                        f"mask for a parameter of unit {unit.index} ({unit.name}) has shape "
                        f"{tuple(m.shape)}, the parameter {tuple(p.shape)}: pass one mask per weight, same shape."
                    )
            ids, offs, valid = sample_positions(unit, start, self.sample_size, self.seed, unit_masks)
            old_ids = self.source_ids[unit.index].cpu().numpy()
            old_offs = self.offsets[unit.index].cpu().numpy()
            old_col = {(int(i), int(o)): k for k, (i, o) in enumerate(zip(old_ids, old_offs)) if i >= 0}
            old_rows = self.history[unit.index].clone()  # [T, K]
            new_rows = torch.zeros_like(old_rows)
            for k in range(valid):
                key = (int(ids[k]), int(offs[k]))
                if key in old_col:
                    new_rows[:, k] = old_rows[:, old_col[key]]
                    continue
                param = self.sources[key[0]]
                prev = prev_masks.get(id(param))
                index = _logical_index(param, key[1])
                if prev is not None and not bool(prev.reshape(-1)[index]):
                    continue  # pruned until now: its effective value was 0
                new_rows[:, k] = param.detach().reshape(-1)[index].float()
            self.history[unit.index].copy_(new_rows)
            self.source_ids[unit.index] = torch.from_numpy(ids).to(self.device)
            self.offsets[unit.index] = torch.from_numpy(offs).to(self.device)
            self.valid[unit.index] = valid
            changed.append(unit.index)
        return changed

    def positions_digest(self) -> str:
        h = hashlib.sha256()
        h.update(self.source_ids.cpu().numpy().tobytes())
        h.update(self.offsets.cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def state_dict(self) -> Dict[str, Any]:
        return {
            "sample_size": self.sample_size,
            "window": self.window,
            "seed": self.seed,
            "positions_digest": self.positions_digest(),
            "history": self.history.cpu(),
            "cursor": int(self.cursor),
            "count": self.count,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("sample_size", "window", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"weight history in the checkpoint has {key}={state[key]}, this run has "
                    f"{getattr(self, key)}: construct SmartFreezer with the checkpoint's settings."
                )
        if state["positions_digest"] != self.positions_digest():
            raise ValueError(
                "the checkpoint's sampled weight positions differ from this run's: the model's "
                "parameters differ in shape, order or layout (channels_last?) from the saved run."
            )
        self.history.copy_(state["history"].to(self.device))
        self.cursor.fill_(state["cursor"])
        self.count = state["count"]


def _logical_index(param: Tensor, storage_offset: int) -> int:
    """Row-major flat index of the element at ``storage_offset`` (non-contiguous layouts)."""
    rest, index = storage_offset, 0
    order = sorted(range(param.dim()), key=lambda d: -param.stride(d))
    coords = [0] * param.dim()
    for d in order:
        coords[d], rest = divmod(rest, param.stride(d)) if param.stride(d) else (0, rest)
    for d in range(param.dim()):
        index = index * param.shape[d] + coords[d]
    return index

