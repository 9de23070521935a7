"""Where cached activations live: device memory, pinned host memory, or a memory-mapped file.

Every tier holds the same arrays: ``data [C, D]`` (C cache rows of D elements, in
float32, bfloat16 or float8_e4m3fn), ``scales [C]`` (the fp8 per-row scale), ``sums [C]`` (a
checksum of each row: its bits, scale and sample id), ``in_sums [C]`` (a checksum of the input
the row was computed from, 0 when unknown) and ``slot_of [num_samples]`` (the cache row of each
sample id, -1 when not cached). Rows are handed out first come, first served; once C rows are
used the remaining samples are simply not cached (their prefix is recomputed: slower, never
wrong). Values go in and out through the ``smartfrz::cache_store`` / ``smartfrz::cache_load`` ops.

A row is *published* (its ``slot_of`` entry set) only after its data, scale and checksums are
written, so a process killed at any instant leaves each sample either cached with a complete
row or not cached (the mmap file is then consistent). Rows that come from elsewhere (a reopened
file, a checkpoint's rows) are checked against their checksum before they are used; a row that
fails is dropped (recomputed when its sample comes back) and reported through ``on_bad_rows``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import glob
import json
import os
import resource
import shutil
import uuid
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_malloc_trim: Any = None  # glibc's malloc_trim, False where there is none (trim_host_heap)


def trim_host_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
    nothing). Freeing a multi-MB host store at each deeper freeze raises glibc's dynamic mmap
    threshold, and later allocations of that size then fragment the heap: a cache capped at
    8 MiB left the process 226 MB larger after 24 freezes, 29 MB trimmed at each free (23 MB
    without a cache; review103)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", False)
        except OSError:
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


STORAGE_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
TIERS = ("memory", "pinned", "mmap")
FILE_MAGIC = "smartfrz_fast.ActivationCache"
FILE_VERSION = 2  # 2: row and input checksums, rows published after they are written
HEADER_BYTES = 4096
ALIGN = 64


def storage_dtype(name: str) -> torch.dtype:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"ActivationCache dtype must be one of {sorted(STORAGE_DTYPES)}, got {name!r}")
    return STORAGE_DTYPES[name]


def row_bytes(row_numel: int, dtype: torch.dtype) -> int:
    """Bytes one cached sample takes (data, its fp32 scale and two int32 checksums)."""
    return row_numel * torch.empty((), dtype=dtype).element_size() + 12


# ------------------------------------------------------------------ checksums
# Sums of each row's words times odd weights, in wrapping int32 arithmetic: one flipped bit
# anywhere changes the sum (2^k times an odd number is never 0 mod 2^32), a swap of two words
# changes it too, and the work is one multiply-add per word (about one copy of the row).
_ID_MIX, _SCALE_MIX, _SALT = 0x2545F491, 0x61C88647, 0x3C6EF372  # odd, so an all-zero row never sums to 0
_CHUNK_WORDS = 1 << 22


def _words(rows: Tensor) -> Tensor:
    """``rows [N, ...]`` as ``[N, M]`` int32 words holding its bits (bytes zero-padded to a word)."""
    rows = rows.detach().contiguous().reshape(rows.shape[0], -1)
    if rows.element_size() % 4 == 0:
        return rows.view(torch.int32)
    raw = rows.view(torch.uint8)
    if raw.shape[1] % 4:
        raw = torch.nn.functional.pad(raw, (0, 4 - raw.shape[1] % 4))
    return raw.view(torch.int32)


def bit_sums(rows: Tensor, mix: bool = False) -> Tensor:
    """An int32 checksum of each row's bits (any dtype, any device); no host sync.

    ``mix``: hash each word with its position before summing (``_mixed_words``). The plain
    weighted sum catches damage (flipped bits, a swap of two words) but is linear: an edit that
    keeps a weighted sum of the words collides, and structured inputs do that often (a DNA
    sequence and its reverse complement, a reversed token sequence, a flipped binary image).
    Inputs, whose change must never go unseen, are summed mixed."""
    words = _words(rows)
    n, m = words.shape
    out = torch.zeros(n, dtype=torch.int32, device=words.device)
    if not n or not m:
        return out
    step = max(1, _CHUNK_WORDS // m)
    if mix:
        salts = _position_salts(m, words.device)
        for start in range(0, n, step):  # bounded temporaries for large rows
            out[start:start + step] = _mixed_words(words[start:start + step], salts).sum(1, dtype=torch.int32)
        return out
    weights = torch.arange(m, dtype=torch.int32, device=words.device) * 2 + 1
    for start in range(0, n, step):  # bounded temporaries for large rows
        out[start:start + step] = (words[start:start + step] * weights).sum(1, dtype=torch.int32)
    return out


def _position_salts(m: int, device: torch.device) -> Tensor:
    """A pseudo-random int32 per word position (Weyl sequence, then one mixing round)."""
    salts = torch.arange(1, m + 1, dtype=torch.int32, device=device) * _GOLDEN
    return _xorshift(salts * _MIX_A, 16)


def _xorshift(x: Tensor, k: int) -> Tensor:
    return x ^ ((x >> k) & ((1 << (32 - k)) - 1))  # a logical shift of int32 bits


def _mixed_words(words: Tensor, salts: Tensor) -> Tensor:
    """Each int32 word of ``words [N, M]`` hashed with its position: the position's salt, then
    xorshift-multiply rounds (murmur3's finaliser), in wrapping int32 arithmetic as the plain sum.
    For each position the map is a bijection of the word (xor, odd multipliers and xorshifts
    invert), so one changed word always changes its term; across positions the terms are
    unrelated, so a sum of them collides by chance (about 2^-32), not by the structure of an edit."""
    x = _xorshift(words ^ salts, 16) * _MIX_A
    x = _xorshift(x, 13) * _MIX_B
    return _xorshift(x, 16)


# murmur3's finaliser multipliers and the golden ratio's Weyl step, as int32 (odd)
_MIX_A, _MIX_B, _GOLDEN = -2048144789, -1028477387, -1640531527


def row_sums(ids: Tensor, data: Tensor, scales: Tensor) -> Tensor:
    """The checksum stored with each cached row: its bits, its scale and its sample id, so a
    row read for the wrong sample (a damaged ``slot_of``) fails as a damaged row does."""
    ids = ids.to(data.device)
    return (bit_sums(data) + ids.to(torch.int32) * _ID_MIX
            + scales.to(data.device).view(torch.int32) * _SCALE_MIX + _SALT)


def input_sums(leaves: Sequence[Tensor], batch: int) -> Tensor:
    """A checksum of each sample's input (the per-sample tensors of a batch), 0 never: 0 means
    "unknown" in the stored ``in_sums``."""
    total = None
    for leaf in leaves:
        part = bit_sums(leaf, mix=True) if leaf.dim() > 0 and leaf.shape[0] == batch else None
        if part is None:
            continue
        total = part if total is None else total.to(part.device) * 31 + part
    if total is None:
        return torch.full((batch,), 1, dtype=torch.int32)
    return torch.where(total == 0, torch.ones_like(total), total)


def tensor_sum(t: Tensor) -> Tensor:
    """An int32 checksum of all of a tensor's bits (any size, dtype and device; no host sync):
    ``bit_sums`` of its words in rows of 1024, weighted by row."""
    flat = t.detach().reshape(-1)
    pad = (-flat.numel()) % 1024
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    rows = bit_sums(flat.view(-1, 1024), mix=True)
    weights = torch.arange(rows.numel(), dtype=torch.int32, device=rows.device) * 2 + 1
    return (rows * weights).sum(dtype=torch.int32)


def bad_rows(ids: Tensor, data: Tensor, scales: Tensor, sums: Tensor) -> Tensor:
    """Which rows fail their checksum or hold a NaN/inf (bool, on the rows' device). A
    non-finite row is never served: recomputing it costs one prefix pass, serving it could
    cost the run."""
    bad = row_sums(ids, data, scales) != sums.to(data.device)
    finite = torch.ones_like(bad)
    step = max(1, _CHUNK_WORDS // max(1, data[0].numel())) if data.shape[0] else 1
    for start in range(0, data.shape[0], step):
        chunk = data[start:start + step].float()
        finite[start:start + step] = torch.isfinite(chunk).reshape(chunk.shape[0], -1).all(1)
    scales = scales.to(data.device)
    return bad | ~finite | ~torch.isfinite(scales) | ~(scales > 0)


def _ops():
    from .. import ops  # loads the op registry (and the extension) at first use only

    return ops


class Storage:
    """Rows in plain tensors on ``device`` (the "memory" tier: GPU memory, or RAM on a CPU)."""

    tier = "memory"

    def __init__(self, num_samples: int, row_shape: Tuple[int, ...], dtype: torch.dtype,
                 capacity: int, device: torch.device) -> None:
        self.num_samples = num_samples
        self.row_shape = tuple(row_shape)
        self.row_numel = int(torch.Size(row_shape).numel())
        self.dtype = dtype
        self.capacity = capacity
        self.device = torch.device(device)
        self._allocate()

    def _allocate(self) -> None:
        if self.device.type == "cpu":
            check_host_memory(self.capacity * self.nbytes_per_row)
        try:
            self.data = torch.empty(self.capacity, self.row_numel, dtype=self.dtype, device=self.device)
            self.scales = torch.ones(self.capacity, dtype=torch.float32, device=self.device)
            self.sums = torch.zeros(self.capacity, dtype=torch.int32, device=self.device)
            self.in_sums = torch.zeros(self.capacity, dtype=torch.int32, device=self.device)
        except torch.OutOfMemoryError as exc:
            raise torch.OutOfMemoryError(
                f"ActivationCache: no room for {self.capacity} rows of {self.nbytes_per_row} bytes on "
                f"{self.device} ({self.capacity * self.nbytes_per_row / 2**30:.2f} GiB). Pass a smaller "
                "max_bytes=, a smaller dtype ('bf16', 'fp8'), or storage='pinned' / 'mmap'."
            ) from exc
        except RuntimeError as exc:
            if "can't allocate memory" not in str(exc):
                raise
            raise MemoryError(f"ActivationCache: the host has no room for {self.capacity} rows of "
                              f"{self.nbytes_per_row} bytes ({exc})") from exc
        self._index_arrays()

    def _index_arrays(self) -> None:
        self.slot_of = torch.full((self.num_samples,), -1, dtype=torch.int64)
        self.owner = torch.full((self.capacity,), -1, dtype=torch.int64)  # the id a slot was handed to
        self.unverified: Optional[Tensor] = None  # bool [capacity]: rows not yet checked (loaded ones)
        self.on_bad_rows: Optional[Callable[[Tensor, str], None]] = None  # (ids, why), set by the cache
        self.free = torch.empty(0, dtype=torch.int64)  # rows below ``used`` to hand out again (dropped ones)
        self.used = 0

    @property
    def nbytes_per_row(self) -> int:
        return row_bytes(self.row_numel, self.dtype)

    # ------------------------------------------------------------------ slots
    def lookup(self, ids: Tensor) -> Tensor:
        """Cache row of each id (CPU int64), -1 where not cached (or its row failed its check)."""
        slots = self.slot_of[ids]
        if self.unverified is not None:
            slots = self._verify(ids, slots)
        return slots

    def allocate(self, ids: Tensor) -> Tensor:
        """Reserve rows for uncached ``ids`` (unique, CPU) while there is room; -1 for the rest.
        The rows are published (looked up) only once ``write`` has written them."""
        slots = torch.full((ids.numel(),), -1, dtype=torch.int64)
        reused = min(int(ids.numel()), self.free.numel())
        slots[:reused], self.free = self.free[:reused], self.free[reused:]
        n = min(int(ids.numel()) - reused, self.capacity - self.used)
        if n > 0:
            slots[reused:reused + n] = torch.arange(self.used, self.used + n)
            self.used += n
        given = slots >= 0
        self.owner[slots[given]] = ids[given]
        return slots

    def _publish(self, slots: Tensor) -> None:
        """Last step of a write: the rows become visible. Each entry is one aligned 8-byte store,
        so a kill leaves every sample either with its complete row or uncached."""
        slots = slots.cpu()
        self.slot_of[self.owner[slots]] = slots

    # ------------------------------------------------------------------ values
    def write(self, slots: Tensor, values: Tensor, in_sums: Optional[Tensor] = None) -> None:
        """Write rows into reserved ``slots``, then their checksums, then publish them.
        ``in_sums``: the checksums of the inputs the rows were computed from (0: unknown)."""
        values = values.reshape(values.shape[0], self.row_numel)
        if values.device != self.data.device:
            values = values.to(self.data.device)
        index = slots.to(self.data.device)
        _ops().cache_store(values, index, self.data, self.scales)
        self.sums[index] = row_sums(self.owner[slots.cpu()], self.data[index], self.scales[index])
        self.in_sums[index] = 0 if in_sums is None else in_sums.to(self.data.device, torch.int32)
        self._publish(slots)

    def read(self, slots: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        out = _ops().cache_load(self.data, self.scales, slots.to(self.data.device), dtype)
        return out.to(device, non_blocking=True).view(slots.numel(), *self.row_shape)

    def cached_slots(self) -> Tuple[Tensor, Tensor]:
        """(ids, slots) of every cached sample (rows not yet checked are checked now)."""
        ids = (self.slot_of >= 0).nonzero().flatten()
        slots = self.slot_of[ids]
        if self.unverified is not None:
            slots = self._verify(ids, slots)
            keep = slots >= 0
            ids, slots = ids[keep], slots[keep]
        return ids, slots

    def _verify(self, ids: Tensor, slots: Tensor) -> Tensor:
        """Check the not-yet-checked rows among ``slots`` (those of ``ids``); a row that fails
        is unpublished (its sample is then recomputed and stored anew) and reported."""
        pending = (slots >= 0) & self.unverified[slots.clamp(min=0)]
        if not bool(pending.any()):
            return slots
        ids_p, slots_p = ids[pending], slots[pending]
        index = slots_p.to(self.data.device)
        bad = bad_rows(ids_p, self.data[index], self.scales[index], self.sums[index]).cpu()
        self.unverified[slots_p] = False
        if bool(bad.any()):
            self._drop(ids_p[bad], "failed its checksum or holds NaN/inf", slots_p[bad])
            slots = slots.clone()
            slots[pending.nonzero().flatten()[bad]] = -1
        if not bool(self.unverified.any()):
            self.unverified = None  # every loaded row checked: lookups cost nothing extra again
        return slots

    def forget(self, ids: Tensor, slots: Optional[Tensor] = None) -> None:
        """Unpublish the rows of ``ids`` (CPU; their ``slots`` are handed out again): their
        samples are recomputed and stored anew when they come back."""
        self.slot_of[ids] = -1
        if slots is not None:
            self.free = torch.cat([self.free, slots]).unique()

    def _drop(self, ids: Tensor, why: str, slots: Optional[Tensor] = None) -> None:
        """Unpublish the rows of ``ids`` (their ``slots`` are handed out again) and report them."""
        self.forget(ids, slots)
        if self.on_bad_rows is not None and ids.numel():
            self.on_bad_rows(ids, why)

    def export_rows(self) -> Dict[str, Tensor]:
        """Every cached sample's row on the CPU, exactly as stored, with its checksums:
        ``ids``, ``data``, ``scales``, ``sums``, ``in_sums``."""
        ids, slots = self.cached_slots()
        slots = slots.to(self.data.device)
        return {"ids": ids, "data": self.data[slots].cpu(), "scales": self.scales[slots].cpu(),
                "sums": self.sums[slots].cpu(), "in_sums": self.in_sums[slots].cpu()}

    def import_rows(self, rows: Dict[str, Tensor]) -> None:
        """Put back rows from ``export_rows`` (bit for bit: no second quantisation). Rows that
        fail their checksum (or hold NaN/inf) are left out and reported."""
        ids, data = rows["ids"], rows["data"]
        if data.shape[1:] != self.data.shape[1:] or data.dtype != self.dtype:
            raise ValueError(f"ActivationCache: saved rows are {tuple(data.shape[1:])} {data.dtype}, this "
                             f"cache holds {tuple(self.data.shape[1:])} {self.dtype}")
        bad = bad_rows(ids, data, rows["scales"], rows["sums"]).cpu()
        if bool(bad.any()):
            self._drop(ids[bad], "failed its checksum or holds NaN/inf")
            keep = ~bad
            rows = {k: v[keep] for k, v in rows.items()}
            ids, data = rows["ids"], rows["data"]
        slots = self.allocate(ids)
        if bool((slots < 0).any()):
            raise ValueError(f"ActivationCache: {ids.numel()} saved rows do not fit in {self.capacity} rows")
        index = slots.to(self.data.device)
        for name in ("data", "scales", "sums", "in_sums"):
            getattr(self, name)[index] = rows[name].to(self.data.device)
        self._publish(slots)

    def listen(self, on_bad_rows: Callable[[Tensor, str], None]) -> None:
        """``on_bad_rows(ids, why)`` is called with the samples whose rows were dropped."""
        self.on_bad_rows = on_bad_rows

    def prefetch(self, ids: Tensor, dtype: torch.dtype, device: torch.device) -> None:
        """Only the pinned tier prefetches."""

    def close(self) -> None:
        on_host = self.data is not None and self.data.device.type == "cpu"
        self.data = self.scales = self.sums = self.in_sums = None
        if on_host:
            trim_host_heap()


PINNED_READS = ("copy", "kernel")


class PinnedStorage(Storage):
    """Pinned host memory; ``prefetch`` copies the next batch's rows to the GPU on a side stream.

    ``read``: how rows reach the GPU. "copy": ``index_select`` into a pinned staging buffer on
    the CPU, then one asynchronous copy. "kernel": a Triton kernel on the GPU reads the rows by
    index straight from pinned memory (mapped into the GPU's address space), with no CPU work
    per row. ``bench/bench_pinned_read.py`` measures both; neither has run on a GPU yet.
    """

    tier = "pinned"

    def __init__(self, *args, read: str = "copy", **kwargs) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "ActivationCache: storage='pinned' copies rows to a CUDA GPU and needs one; on a CPU "
                "use storage='memory' (plain RAM) or 'mmap'."
            )
        if read not in PINNED_READS:
            raise ValueError(f"PinnedStorage: read must be one of {PINNED_READS}, got {read!r}")
        self.read_path = read
        super().__init__(*args, **kwargs)
        self._stream = torch.cuda.Stream(device=self.target_device)
        self._prefetched: Optional[Tuple[Tensor, Tensor, Any]] = None
        # rows on their way to host memory: (slots, pinned [rows, scales, sums, in_sums], copy-done event)
        self._writing: Optional[Tuple[Tensor, List[Tensor], Any]] = None

    @property
    def target_device(self) -> torch.device:
        return self.device

    def _allocate(self) -> None:
        gpu = self.device
        self.device = torch.device("cpu")
        check_host_memory(self.capacity * self.nbytes_per_row)
        self.data = torch.empty(self.capacity, self.row_numel, dtype=self.dtype, pin_memory=True)
        self.scales = torch.ones(self.capacity, dtype=torch.float32, pin_memory=True)
        self.sums = torch.zeros(self.capacity, dtype=torch.int32, pin_memory=True)
        self.in_sums = torch.zeros(self.capacity, dtype=torch.int32, pin_memory=True)
        self._index_arrays()
        self.device = gpu  # where rows are delivered

    # NOTE: the non-blocking write path below has not run on a GPU yet (written on a CPU-only
    # machine); tests/test_cache.py::test_gpu_tiers_match_cpu covers it where a GPU exists.
    def write(self, slots: Tensor, values: Tensor, in_sums: Optional[Tensor] = None) -> None:
        # Quantise on the GPU (one op), then copy the compact rows into pinned staging without
        # waiting; the rows land in self.data at the next call (_finish_write), by when the
        # copy has long finished. Every reader of self.data finishes the write first.
        self._finish_write()
        values = values.reshape(values.shape[0], self.row_numel)
        n, dev = values.shape[0], values.device
        staged = torch.empty(n, self.row_numel, dtype=self.dtype, device=dev)
        staged_scales = torch.ones(n, dtype=torch.float32, device=dev)
        _ops().cache_store(values, torch.arange(n, device=dev), staged, staged_scales)
        parts = [staged, staged_scales, row_sums(self.owner[slots.cpu()], staged, staged_scales),
                 torch.zeros(n, dtype=torch.int32, device=dev) if in_sums is None else in_sums.to(dev, torch.int32)]
        if dev.type != "cuda":  # rows computed on the CPU: nothing to overlap
            self._land(slots, parts)
            return
        host = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in parts]
        for h, p in zip(host, parts):
            h.copy_(p, non_blocking=True)  # on the current stream, after cache_store
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(dev))
        self._writing = (slots.to("cpu", copy=True), host, done)
        self._publish(slots)  # readers land the rows first (_finish_write)

    def _land(self, slots: Tensor, parts: List[Tensor]) -> None:
        for name, part in zip(("data", "scales", "sums", "in_sums"), parts):
            getattr(self, name)[slots] = part
        self._publish(slots)

    def _finish_write(self, needed: Optional[Tensor] = None) -> None:
        """Land the last write's rows; with ``needed`` (slots about to be read) only if it
        holds one of them (a batch's hits never do: they were cached before its misses)."""
        if self._writing is None:
            return
        if needed is not None and not bool(torch.isin(needed, self._writing[0]).any()):
            return
        pending, self._writing = self._writing, None
        if pending is not None:
            slots, host, done = pending
            done.synchronize()  # recorded a step ago: normally long complete
            self._land(slots, host)

    def read(self, slots: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        self._finish_write(slots.cpu())
        return self._read(slots, dtype)

    def prefetch(self, ids: Tensor, dtype: torch.dtype, device: torch.device) -> None:
        self._finish_write(self.lookup(ids))
        self._prefetch(ids)

    def cached_slots(self) -> Tuple[Tensor, Tensor]:
        self._finish_write()
        return super().cached_slots()

    def close(self) -> None:
        self._finish_write()  # no copy may still target the staging buffers
        if self.read_path == "kernel":
            self._stream.synchronize()  # a prefetch kernel may still read the rows being freed
        super().close()

    def _gather_to_device(self, slots: Tensor, stream) -> Tuple[Tensor, Tensor]:
        if self.read_path == "kernel":
            from ..ops import KernelUnavailable
            from ..ops.triton_kernels import gather_rows

            try:
                with torch.cuda.stream(stream):
                    index = slots.to(self.device, non_blocking=True)
                    return gather_rows(self.data, index), gather_rows(self.scales.view(-1, 1), index).view(-1)
            except KernelUnavailable as exc:  # this GPU cannot run it: the staged copy, from now on
                warnings.warn(f"smartfrz_fast: {exc}. The pinned cache reads rows with the staged copy "
                              "(pinned_read='copy') from now on.", RuntimeWarning, stacklevel=2)
                self.read_path = "copy"
        host = torch.empty(slots.numel(), self.row_numel, dtype=self.dtype, pin_memory=True)
        host_scales = torch.empty(slots.numel(), dtype=torch.float32, pin_memory=True)
        torch.index_select(self.data, 0, slots, out=host)
        torch.index_select(self.scales, 0, slots, out=host_scales)
        with torch.cuda.stream(stream):
            return host.to(self.device, non_blocking=True), host_scales.to(self.device, non_blocking=True)

    def _prefetch(self, ids: Tensor) -> None:
        slots = self.lookup(ids)
        slots = slots[slots >= 0]
        data, scales = self._gather_to_device(slots, self._stream)
        event = torch.cuda.Event()
        event.record(self._stream)
        self._prefetched = (slots, data, scales, event)

    def _read(self, slots: Tensor, dtype: torch.dtype) -> Tensor:
        current = torch.cuda.current_stream(self.device)
        pre = self._prefetched
        self._prefetched = None
        if pre is not None and torch.equal(pre[0], slots):
            _, data, scales, event = pre
            current.wait_event(event)
            data.record_stream(current)
            scales.record_stream(current)
        else:
            data, scales = self._gather_to_device(slots, current)
        index = torch.arange(slots.numel(), device=self.device)
        return _ops().cache_load(data, scales, index, dtype).view(slots.numel(), *self.row_shape)


class StaleCacheFile(ValueError):
    """A cache file reopened with ``reuse=True`` was made for another model, cut or storage
    format (or is not its expected size): its rows cannot serve this run. ``why``: that part of
    the message, without the advice."""

    def __init__(self, why: str, advice: str = "Delete it or pass another path=.") -> None:
        super().__init__(f"{why} {advice}")
        self.why = why


class MmapStorage(Storage):
    """A memory-mapped file: a 4 KiB JSON header, then ``slot_of``, ``sums``, ``in_sums``,
    ``scales`` and ``data``.

    The file is allocated in full when created (``posix_fallocate``), so a full disk is a clear
    error now rather than a SIGBUS at some later write. Reopening a file checks its header
    against this model, boundary and storage format, and each row against its checksum when it
    is first used. A file is created under a name of its own, exclusively (never over an
    existing file); ``commit`` moves it to its final name atomically. ``lineage`` names the
    run a file belongs to: the files of a run's deeper freezes inherit it.
    """

    tier = "mmap"

    def __init__(self, num_samples, row_shape, dtype, capacity, device, *, path: str,
                 fingerprint: Dict[str, Any], reuse: bool = False, lineage: Optional[str] = None) -> None:
        self.path = os.fspath(path)
        self.fingerprint = fingerprint
        self.reuse = reuse
        self.lineage = lineage or uuid.uuid4().hex
        super().__init__(num_samples, row_shape, dtype, capacity, device)

    def _layout(self) -> Tuple[Dict[str, int], int]:
        offsets, at = {}, HEADER_BYTES
        for name, nbytes in (("slot_of", 8 * self.num_samples), ("sums", 4 * self.capacity),
                             ("in_sums", 4 * self.capacity), ("scales", 4 * self.capacity)):
            offsets[name] = at
            at = _align(at + nbytes)
        offsets["data"] = at
        item = torch.empty((), dtype=self.dtype).element_size()
        return offsets, at + self.capacity * self.row_numel * item

    def _header(self) -> Dict[str, Any]:
        return {"magic": FILE_MAGIC, "version": FILE_VERSION, "fingerprint": self.fingerprint,
                "num_samples": self.num_samples, "row_shape": list(self.row_shape),
                "dtype": str(self.dtype), "capacity": self.capacity, "lineage": self.lineage}

    def _allocate(self) -> None:
        self.device = torch.device("cpu")
        offsets, total = self._layout()
        reopen = os.path.exists(self.path) and self.reuse
        if not reopen and os.path.exists(self.path):
            raise FileExistsError(
                f"ActivationCache: {self.path} already exists. Pass reuse=True to reopen it (it is "
                "checked against this model and boundary), or delete it / choose another path."
            )
        if not reopen:
            self._create(total)
        fd = lock_file(self.path)  # before a reopened file's rows are read: no other cache writes them
        # a store dropped without close() (a notebook's failed run, a sweep's trial) lets the file
        # go as it is collected: its lock was held until the process ended (review92)
        self._lock_release = weakref.finalize(self, _release_lock, fd, os.getpid())
        try:
            if reopen:
                header = read_header(self.path)
                self._check_header(header)
                if os.path.getsize(self.path) != total:
                    raise StaleCacheFile(f"ActivationCache: cache file {self.path} has the wrong size "
                                         f"({os.path.getsize(self.path)} bytes, expected {total}).")
                self.lineage = header.get("lineage") or self.lineage
            self._map(offsets, total, reopen)
        except BaseException:  # the lock goes with the failure (review89: every later cache was refused)
            self._unlock()
            if not reopen:
                os.unlink(self.path)  # the file this call just created, under a name of its own
            raise

    def _map(self, offsets: Dict[str, int], total: int, reopen: bool) -> None:
        raw = torch.from_file(self.path, shared=True, size=total, dtype=torch.uint8)
        self._raw = raw
        self._index_arrays()
        self._reports: List[Tuple[Tensor, str]] = []
        o = offsets
        self.slot_of = raw[o["slot_of"]:o["slot_of"] + 8 * self.num_samples].view(torch.int64)
        self.sums = raw[o["sums"]:o["sums"] + 4 * self.capacity].view(torch.int32)
        self.in_sums = raw[o["in_sums"]:o["in_sums"] + 4 * self.capacity].view(torch.int32)
        self.scales = raw[o["scales"]:o["scales"] + 4 * self.capacity].view(torch.float32)
        self.data = raw[o["data"]:total].view(self.dtype).view(self.capacity, self.row_numel)
        if reopen:
            self._adopt()
        else:
            self.slot_of.fill_(-1)
            self.scales.fill_(1.0)

    def _adopt(self) -> None:
        """Take over the rows of a reopened file: an index entry that points outside the rows,
        or at a row another sample points at too, is damaged and dropped; every other row is
        checked against its checksum when first used."""
        slots = self.slot_of
        wild = (slots < -1) | (slots >= self.capacity)
        ids = ((slots >= 0) & ~wild).nonzero().flatten()
        taken = slots[ids]
        shared = torch.bincount(taken, minlength=self.capacity)[taken] > 1
        damaged = torch.cat([wild.nonzero().flatten(), ids[shared]])
        if damaged.numel():
            self._drop(damaged, "has a damaged index entry")
        ids, taken = ids[~shared], taken[~shared]
        self.owner[taken] = ids
        self.used = int(taken.max()) + 1 if taken.numel() else 0
        unused = torch.ones(self.used, dtype=torch.bool)  # rows a killed write never published, dropped rows
        unused[taken] = False
        self.free = unused.nonzero().flatten()
        if taken.numel():
            self.unverified = torch.zeros(self.capacity, dtype=torch.bool)
            self.unverified[taken] = True

    def _drop(self, ids: Tensor, why: str, slots: Optional[Tensor] = None) -> None:
        if self.on_bad_rows is None:  # found while opening: reported once the cache listens
            self._reports.append((ids, why))
        super()._drop(ids, why, slots)

    def listen(self, on_bad_rows: Callable[[Tensor, str], None]) -> None:
        self.on_bad_rows = on_bad_rows
        reports, self._reports = self._reports, []
        for ids, why in reports:
            on_bad_rows(ids, why)

    def _create(self, total: int) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < total:
            raise OSError(errno.ENOSPC,
                          f"ActivationCache: the cache file needs {total / 2**20:.1f} MiB but {folder} has "
                          f"{free / 2**20:.1f} MiB free. Pass a smaller max_bytes=, dtype='bf16'/'fp8', or "
                          "a path on a larger disk.")
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and total > limit:  # checked first: going past it sends SIGXFSZ
            raise OSError(errno.EFBIG,
                          f"ActivationCache: the cache file needs {total / 2**20:.1f} MiB but this process may "
                          f"write files of at most {limit / 2**20:.1f} MiB (RLIMIT_FSIZE, `ulimit -f`). Raise "
                          "the limit or pass a smaller max_bytes=, dtype='bf16'/'fp8'.")
        header = json.dumps(self._header()).encode()
        if len(header) >= HEADER_BYTES:
            raise ValueError("ActivationCache: cache file header too large (model signature too long)")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)  # never over an existing file
        try:
            try:
                os.posix_fallocate(fd, 0, total)  # reserve every block now: no SIGBUS later
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise
                raise OSError(exc.errno,
                              f"ActivationCache: the disk holding {self.path} is full or its file-size limit "
                              f"reached ({total / 2**20:.1f} MiB needed: {os.strerror(exc.errno)}). Free space, "
                              "pass a smaller max_bytes=, dtype='bf16'/'fp8', or a path on another disk.") from exc
            os.pwrite(fd, header.ljust(HEADER_BYTES, b" "), 0)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)  # the file this call just created, exclusively: ours
            raise
        os.close(fd)

    def _check_header(self, header: Dict[str, Any]) -> None:
        mine = self._header()
        for key in ("magic", "version", "fingerprint", "num_samples", "row_shape", "dtype", "capacity"):
            if header.get(key) != mine[key]:
                theirs, ours = header.get(key), mine[key]
                if isinstance(theirs, dict) and isinstance(ours, dict):  # name the fields that differ
                    fields = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
                    theirs, ours = ({k: d.get(k) for k in fields} for d in (theirs, ours))
                raise StaleCacheFile(
                    f"ActivationCache: cache file {self.path} was made for a different {key} "
                    f"({_short(theirs)} != {_short(ours)}): it belongs to another model, boundary or storage "
                    "format.")

    def flush(self) -> None:
        """Make the rows written so far durable (a checkpoint that names this file is saved
        after it). A kill needs no flush (the rows are in the page cache); a power cut does."""
        _fsync(self.path)

    def commit(self, path: str) -> None:
        """Move this file (made under a name of its own) to ``path``, atomically: a crash
        leaves ``path`` either the old file or this one, complete."""
        self.flush()
        os.replace(self.path, path)
        _fsync(os.path.dirname(os.path.abspath(path)))
        self.path = path

    def discard(self) -> None:
        """Close and delete this file (one this cache created under a name of its own)."""
        self.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def close(self) -> None:
        super().close()
        self.slot_of = None
        self._raw = None
        self._unlock()

    def _unlock(self) -> None:
        release = getattr(self, "_lock_release", None)
        if release is not None:
            release()  # once: a finalizer that ran is a no-op


def _release_lock(fd: Optional[int], pid: int) -> None:
    if fd is not None and pid == os.getpid():  # a forked child closed its copy already (the number may be reused)
        _LOCK_FDS.discard(fd)
        os.close(fd)  # releases the lock


TEMP_MARK = ".smartfrz-tmp-"


def owned_temp_path(path: str) -> str:
    """A fresh name beside ``path`` for a file this cache makes (created exclusively)."""
    return f"{path}{TEMP_MARK}{uuid.uuid4().hex[:12]}"


def remove_leftovers(path: str) -> List[str]:
    """Delete the files an interrupted move of ``path`` left (named by ``owned_temp_path`` and
    holding a cache header); any other file is left alone."""
    removed = []
    for leftover in glob.glob(glob.escape(path) + TEMP_MARK + "*"):
        try:
            read_header(leftover)
        except (OSError, ValueError):
            continue
        os.unlink(leftover)
        removed.append(leftover)
    return removed


# the descriptors holding cache files' locks: a forked child (a DataLoader worker) closes its
# copies, which would otherwise hold the lock after this process lets the file go (review89)
_LOCK_FDS: set = set()


def _close_lock_fds_in_child() -> None:
    for fd in list(_LOCK_FDS):
        try:
            os.close(fd)  # the child's copy only: the parent's lock stays
        except OSError:
            pass
    _LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_lock_fds_in_child)


def try_lock(fd: int) -> Optional[bool]:
    """An exclusive lock on the open file ``fd``, without waiting: True taken, False held through
    another open of the file (of this process or another), None on a file system without locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def lock_file(path: str) -> Optional[int]:
    """An open descriptor of ``path`` holding an exclusive lock on it, for as long as a cache
    holds the file open: two caches (of one process or two) writing one file hand out the same
    rows and serve each other's (review87: weights 7e-3 to 2.5e-2 off, blamed on the data). A
    holder the collector has not freed yet (a cache dropped in a cycle) is let go first. None on
    a file system without locks."""
    fd = os.open(path, os.O_RDWR)
    taken = try_lock(fd)
    if taken is False:
        gc.collect()  # a dropped cache in a reference cycle still holds it
        taken = try_lock(fd)
    if taken:
        _LOCK_FDS.add(fd)
        return fd
    os.close(fd)
    if taken is None:  # no locks here (some network file systems): as before
        return None
    raise OSError(errno.EBUSY, f"ActivationCache: the cache file {path} is open in another activation cache (of "
                  "this process or another): two caches writing one file would serve each other's rows. Give each "
                  "cache its own path= (a resumed run: stop or close the one still running first).")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ storage checks
def check_path(path: str, max_bytes: Optional[int]) -> None:
    """What can be known about an mmap ``path`` before training: its folder (or the nearest
    existing one above it) is a directory this process can create files in, the path is not
    a directory, and a ``max_bytes`` cap fits the file-size limit. Raises a clear error."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"ActivationCache: path={path!r} is a directory; name the cache "
                                f"file to create inside it (e.g. {path}/cache.bin)")
    folder = os.path.dirname(path)
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, f"ActivationCache: path={path!r} lies under {existing!r}, which is a "
                                 "regular file, not a folder. Choose a path in a folder.")
    probe = owned_temp_path(os.path.join(existing, ".activation-cache-probe"))
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # a name of our own
    except OSError as exc:
        raise OSError(exc.errno, f"ActivationCache: cannot create the cache file in {existing!r} "
                      f"({os.strerror(exc.errno)}). Choose a path in a writable folder.") from exc
    os.unlink(probe)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and max_bytes is not None and max_bytes + HEADER_BYTES > limit:
        raise OSError(errno.EFBIG, f"ActivationCache: max_bytes={max_bytes} is more than this process may write "
                      f"to one file ({limit} bytes, RLIMIT_FSIZE / `ulimit -f`). Raise the limit or pass a "
                      "smaller max_bytes=.")


def host_memory_available() -> Optional[int]:
    """Bytes the kernel says can be allocated without swapping (Linux MemAvailable), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_host_memory(nbytes: int) -> None:
    """Host rows are allocated lazily by the kernel: without this check an oversized cache is
    found by the OOM killer, hours later, instead of here."""
    available = host_memory_available()
    if available is not None and nbytes > available:
        raise MemoryError(f"ActivationCache: the rows need {nbytes / 2**30:.2f} GiB of host memory, "
                          f"{available / 2**30:.2f} GiB is available. Pass a smaller max_bytes=, dtype='bf16'/'fp8', "
                          "or storage='mmap'.")


def read_header(path: str) -> Dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    try:
        header = json.loads(raw.decode().strip())
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("magic") != FILE_MAGIC:
        raise ValueError(f"ActivationCache: {path} is not an activation cache file (no header)")
    return header


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) < 120 else text[:117] + "..."


def make_storage(tier: str, num_samples: int, row_shape: Sequence[int], dtype: torch.dtype,
                 capacity: int, device: torch.device, **tier_args) -> Storage:
    """``tier_args``: the mmap tier's file arguments, or the pinned tier's ``read``."""
    if tier == "memory":
        return Storage(num_samples, tuple(row_shape), dtype, capacity, device)
    if tier == "pinned":
        return PinnedStorage(num_samples, tuple(row_shape), dtype, capacity, device, **tier_args)
    if tier == "mmap":
        return MmapStorage(num_samples, tuple(row_shape), dtype, capacity, device, **tier_args)
    raise ValueError(f"ActivationCache storage must be one of {TIERS}, got {tier!r}")
