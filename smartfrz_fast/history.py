"""The weight-history ring buffer: K sampled weights per unit, T snapshots, on the GPU.

Positions are drawn once per unit from a seeded generator (sorted, so reads walk memory
forward) over the concatenation of the unit's parameters, and stored as (source tensor,
storage offset) pairs so that one op launch gathers every active unit, whatever its dtype,
size or strides. A unit with fewer than K weights uses all of them; the rest is masked.

FSDP2 (sharded DTensor parameters): positions are drawn over each parameter's full (global)
shape, exactly as in one process; each rank gathers the positions that fall in its own shard
(zeros elsewhere) and one all-reduce (sum) per snapshot completes the row on every rank. Adding
zeros is exact, so every rank holds the history a single process would hold for those weights.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .units import Unit

SAMPLEABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Which positions a history holds (``sample_positions``: uniform over all of a unit's parameters).
# Recordings and predictor weights carry it: a predictor reads best the histories it was trained
# on, and the lab remakes what was recorded otherwise (docs/predictor.md, "Which weights the
# history samples").
SAMPLING = "all-parameters"
UNRECORDED_SAMPLING = "all-parameters"  # what files from before SAMPLING was recorded hold


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
            raise ValueError(
                f"the weight history (SmartFRZ's input) samples float parameters only; units hold {bad[:3]}. "
                "Use a schedule policy for this model (FreezeOut, LinearFreeze, AutoFreeze), which freezes complex "
                "and integer parameters too, or freeze those parameters yourself before building the freezer.")
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
        # What the gather op reads: the parameters and positions themselves, or under FSDP2
        # this rank's shards and the positions that fall in them (see the module docstring).
        self._shard_group = None
        self._gather_args = (self.sources, self.source_ids, self.offsets)
        if any(_is_dtensor(p) for p in self.sources):
            self._shard_group, self._gather_args = _local_gather_args(self.sources, np.stack(ids), np.stack(offs),
                                                                      self.device)
        self._strides = [tuple(p.stride()) for p in self.sources]  # the layouts self.offsets address
        self._shapes = [tuple(p.shape) for p in self.sources]
        self._source_names = [name for unit in self.units for name in unit.param_names]
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

        self._follow_layouts()
        ops.gather_history(*self._gather_args, self.rows, self.cursor, self.history)
        if self._shard_group is not None:
            self._combine_shards()
        self.cursor.add_(1)
        self.count += 1

    def _follow_layouts(self) -> None:
        """Re-address the positions of parameters whose strides changed in place since they were
        drawn (``model.to(memory_format=torch.channels_last)`` keeps the Parameter objects and
        calls no hook): the same weights, at their new storage offsets. One stride read per
        parameter per snapshot; a host copy of the offsets only when a layout changed. A
        parameter whose shape changed in place (``p.data = smaller``, which calls no hook) has
        no such weights left: a clear error, where the gather read past its end."""
        resized = next((i for i, p in enumerate(self.sources) if tuple(p.shape) != self._shapes[i]), None)
        if resized is not None:
            raise RuntimeError(
                f"SmartFreezer: parameter {self._source_names[resized]} changed shape in place, from "
                f"{self._shapes[resized]} to {tuple(self.sources[resized].shape)}, after the freezer was set up "
                "(p.data = ... with another shape calls no hook): the weights its history samples are gone. Build "
                "a new SmartFreezer (and optimizer) for the changed model.")
        changed = [i for i, p in enumerate(self.sources) if tuple(p.stride()) != self._strides[i]]
        if not changed:
            return
        if self._shard_group is not None:
            raise RuntimeError("a parameter sharded with FSDP2 changed its memory layout after SmartFreezer was set "
                               "up; change the layout (e.g. channels_last) before building the freezer.")
        ids, offsets = self.source_ids.cpu().numpy(), self.offsets.cpu().numpy().copy()
        for i in changed:
            param, hit = self.sources[i], ids == i
            logical = _logical_indices(param.shape, self._strides[i], offsets[hit])
            offsets[hit] = _storage_offsets(param.shape, param.stride(), logical)
            self._strides[i] = tuple(param.stride())
        self.offsets.copy_(torch.from_numpy(offsets))

    def _combine_shards(self) -> None:
        """Sum the ranks' partial rows of the slot just written (each position is non-zero on
        the one rank that owns it). ``count`` is the host copy of ``cursor``: no sync."""
        import torch.distributed as dist

        slot = self.count % self.window
        partial = self.history[self.first_active:, slot].contiguous()
        dist.all_reduce(partial, group=self._shard_group)
        self.history[self.first_active:, slot] = partial

    def drop_leading(self, num_frozen: int) -> None:
        """Stop sampling the first ``num_frozen`` units (they froze)."""
        self.first_active = num_frozen
        self.rows = torch.arange(num_frozen, len(self.units), device=self.device)

    def replace_sources(self, new_of: Dict[int, Tensor]) -> None:
        """Sample the replacements of parameters swapped out of the model (``id(old) -> new``,
        same shape and dtype, so every position stays valid; other strides are followed at the
        next snapshot, ``_follow_layouts``)."""
        self.sources[:] = [new_of.get(id(p), p) for p in self.sources]  # the list the gather reads

    def restrict_to_masks(self, masks: Dict[int, Tensor], prev_masks: Optional[Dict[int, Tensor]] = None) -> List[int]:
        """Sparse training: re-draw the positions of every unit holding a masked parameter so
        that they fall only on unmasked weights. ``masks`` maps ``id(parameter)`` to a bool
        tensor of its shape. Returns the indices of the units re-drawn.

        A position drawn before and after keeps its history column. A new column is
        backfilled, in the snapshots taken so far only, with the weight's *effective* past value
        where it is known: 0 if ``prev_masks`` says the weight was pruned until now (exact: a
        pruned weight is 0), else its current value (an approximation: its past values were not
        sampled). Slots no snapshot has written yet stay 0 (a checkpoint's check relies on it)."""
        if self._shard_group is not None:
            raise NotImplementedError(
                "sparse masks with FSDP2-sharded parameters are not supported: train the sparse model "
                "with DistributedDataParallel (smartfrz_fast.distributed.FreezableDDP) instead.")
        self._follow_layouts()  # old and new positions compared at the parameters' current offsets
        changed = []
        first_source = 0
        prev_masks = prev_masks or {}
        written = min(self.count, self.window)  # slots 0..count-1 until the ring is full
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
                new_rows[:written, k] = param.detach().reshape(-1)[index].float()
            self.history[unit.index].copy_(new_rows)
            self.source_ids[unit.index] = torch.from_numpy(ids).to(self.device)
            self.offsets[unit.index] = torch.from_numpy(offs).to(self.device)
            self.valid[unit.index] = valid
            changed.append(unit.index)
        return changed

    def positions_digest(self) -> str:
        """Which weights are sampled, by logical index (the same for any memory layout; for
        contiguous parameters, as digests of before layouts were followed)."""
        self._follow_layouts()
        ids, offsets = self.source_ids.cpu().numpy(), self.offsets.cpu().numpy().copy()
        for i, param in enumerate(self.sources):
            if param.is_contiguous():  # storage offset == logical index
                continue
            hit = ids == i
            offsets[hit] = _logical_indices(param.shape, param.stride(), offsets[hit])
        h = hashlib.sha256()
        h.update(ids.tobytes())
        h.update(offsets.tobytes())
        return h.hexdigest()[:16]

    def state_dict(self) -> Dict[str, Any]:
        return {
            "sample_size": self.sample_size,
            "window": self.window,
            "seed": self.seed,
            "positions_digest": self.positions_digest(),
            # a copy on the CPU too: a state kept in memory (a rollback's checkpoint) would see
            # the later snapshots (review94: every unit frozen 40 steps early)
            "history": self.history.detach().to("cpu", copy=True),
            "cursor": int(self.cursor),
            "count": self.count,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.check_state(state)
        self.history.copy_(state["history"].to(self.device))
        self.cursor.fill_(state["cursor"])
        self.count = state["count"]
        bad = int((~torch.isfinite(state["history"])).sum())
        if bad:  # the run's own: until review92 refused, every checkpoint for a window's length after a glitch
            warnings.warn(f"SmartFreezer: the checkpoint's weight history holds {bad} NaN or inf values, from "
                          "snapshots taken while a weight was not finite (an overflow put right since, or a run that "
                          "diverged: check the model's weights). They are kept as the run had them: no unit is "
                          "frozen on a window that holds them, and they leave the window as new snapshots come.",
                          stacklevel=3)

    def check_state(self, state: Dict[str, Any], max_count: Optional[int] = None) -> None:
        """Raise (changing nothing) unless ``state`` is this history's, saved by ``state_dict``:
        settings, positions, shape, a snapshot count within ``max_count`` (the steps taken over
        the snapshot interval), finite values, and zeros where nothing was ever written."""
        missing = [k for k in ("sample_size", "window", "seed", "positions_digest", "history", "cursor", "count")
                   if k not in state]
        if missing:
            raise ValueError(f"the checkpoint's weight history lacks {missing}: it is truncated or not "
                             "from WeightHistory.state_dict()")
        for key in ("sample_size", "window", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"weight history in the checkpoint has {key}={state[key]}, this run has "
                    f"{getattr(self, key)}: construct SmartFreezer with the checkpoint's settings."
                )
        if state["positions_digest"] != self.positions_digest():
            raise ValueError(
                "the checkpoint's sampled weight positions differ from this run's: the model's "
                "parameters differ in shape, order or layout (channels_last?) from the saved run, or, "
                "in sparse training, its masks do: attach SparseMasks to the freezer and load its state "
                "before the freezer's (model, then masks.load_state_dict, then freezer.load_state_dict, "
                "then the optimizer's)."
            )
        saved = state["history"]
        if not isinstance(saved, torch.Tensor) or tuple(saved.shape) != tuple(self.history.shape):
            shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(f"the checkpoint's weight history is {shape}, this run's "
                             f"{tuple(self.history.shape)}: the checkpoint is corrupt or from another model.")
        count, cursor = state["count"], state["cursor"]
        if not (_is_int(count) and _is_int(cursor) and 0 <= count == cursor
                and (max_count is None or count <= max_count)):
            raise ValueError(f"the checkpoint's weight history is corrupt: count={count!r}, cursor={cursor!r} (two "
                             f"copies of the number of snapshots, at most {max_count} by the checkpoint's step).")
        if saved.dtype != self.history.dtype:
            raise ValueError(f"the checkpoint's weight history is {saved.dtype}, not {self.history.dtype}: corrupt.")
        unwritten = saved[:, count:] if count < self.window else saved[:, :0]
        masked = saved.masked_select((self.source_ids < 0).cpu()[:, None, :])
        if bool(unwritten.any()) or bool(masked.any()):
            raise ValueError("the checkpoint's weight history has values where no snapshot was ever written (slots "
                             "after its count, or positions past a unit's size): it is corrupt.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _logical_indices(shape: Sequence[int], strides: Sequence[int], offsets: np.ndarray) -> np.ndarray:
    """Row-major flat indices of the elements at storage ``offsets`` of a dense tensor of
    ``shape`` laid out with ``strides`` (any order of its dimensions: channels_last too); the
    inverse of ``_storage_offsets``."""
    rest = np.asarray(offsets, dtype=np.int64).copy()
    coords = [np.zeros_like(rest) for _ in shape]
    for d in sorted(range(len(shape)), key=lambda d: -strides[d]):
        if shape[d] > 1 and strides[d]:  # a dimension of size 1 holds coordinate 0, whatever its stride
            coords[d], rest = np.divmod(rest, strides[d])
    index = np.zeros_like(rest)
    for d, size in enumerate(shape):
        index = index * size + coords[d]
    return index


def _logical_index(param: Tensor, storage_offset: int) -> int:
    """Row-major flat index of the element at ``storage_offset`` (non-contiguous layouts)."""
    return int(_logical_indices(param.shape, param.stride(), np.array([storage_offset]))[0])



def _is_dtensor(tensor: Tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def _local_gather_args(sources: Sequence[Tensor], source_ids: np.ndarray, offsets: np.ndarray, device: torch.device):
    """``(process group, (local sources, local source ids, local offsets))`` for FSDP2.

    A position stays on the rank whose shard holds it, with its offset into that shard;
    elsewhere its id is -1 (the gather writes 0). A parameter that is not sharded is whole on
    every rank: rank 0 alone contributes it, so that the sum counts it once."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    meshes = [p.device_mesh for p in sources if _is_dtensor(p)]  # one object per fully_shard call
    if meshes[0].ndim != 1 or any(m != meshes[0] for m in meshes):
        raise ValueError(
            "WeightHistory: the sharded parameters must share one 1-D device mesh (FSDP2's "
            "fully_shard over one group); HSDP and other multi-dimensional meshes are not supported "
            "yet. Use a policy without a weight history (FreezeOut, AutoFreeze, LinearFreeze, StaticFreeze).")
    group = meshes[0].get_group()
    rank = dist.get_rank(group)
    shape_of_table = source_ids.shape  # [units, K]
    source_ids, offsets = source_ids.reshape(-1), offsets.reshape(-1)
    local_sources: List[Tensor] = []
    local_ids = np.full_like(source_ids, -1)
    local_offsets = np.zeros_like(offsets)
    for index, param in enumerate(sources):
        hit = source_ids == index
        if not _is_dtensor(param):
            local_sources.append(param)
            if rank == 0:
                local_ids[hit], local_offsets[hit] = index, offsets[hit]
            continue
        shape = tuple(param.shape)
        placements = tuple(param.placements)
        contiguous = tuple(torch.empty(shape, device="meta").stride())
        if param.dim() == 0 or tuple(param.stride()) != contiguous or not all(isinstance(p, Shard) for p in placements):
            raise ValueError(
                f"WeightHistory: a sharded parameter of shape {shape} has placements {placements} and "
                f"stride {tuple(param.stride())}; only row-major parameters sharded with Shard(dim) "
                "(FSDP2's layout) are supported.")
        # The local view is taken once: FSDP2 updates its shard in place (to_local() costs ~20 us
        # a call, too much per snapshot); it was set up by the unit-finding forward pass.
        local = param.to_local()
        local_shape, global_offset = compute_local_shape_and_global_offset(shape, param.device_mesh, placements)
        if tuple(local.shape) != tuple(local_shape):
            raise ValueError(f"WeightHistory: the local shard has shape {tuple(local.shape)}, DTensor expects "
                             f"{tuple(local_shape)}; the parameter's sharding is not one this engine reads.")
        local_sources.append(local)
        coords = np.unravel_index(offsets[hit], shape)  # global offsets are flat row-major indices
        local_coords = [c - start for c, start in zip(coords, global_offset)]
        owned = np.ones(len(coords[0]), dtype=bool)
        for c, size in zip(local_coords, local_shape):
            owned &= (c >= 0) & (c < size)
        local_offset = sum(c * stride for c, stride in zip(local_coords, local.stride()))
        where = np.flatnonzero(hit)[owned]
        local_ids[where] = index
        local_offsets[where] = np.asarray(local_offset)[owned]
    as_tensor = lambda a: torch.from_numpy(a.reshape(shape_of_table)).to(device)  # noqa: E731
    return group, (local_sources, as_tensor(local_ids), as_tensor(local_offsets))
