"""Where cached activations live: device memory, pinned host memory, or a memory-mapped file.

Every tier holds the same three arrays: ``data [C, D]`` (C cache rows of D elements, in
float32, bfloat16 or float8_e4m3fn), ``scales [C]`` (the fp8 per-row scale) and ``slot_of
[num_samples]`` (the cache row of each sample id, -1 when not cached). Rows are handed out
first come, first served; once C rows are used the remaining samples are simply not cached
(their prefix is recomputed: slower, never wrong). Values go in and out through the
``smartfrz::cache_store`` / ``smartfrz::cache_load`` ops.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
TIERS = ("memory", "pinned", "mmap")
FILE_MAGIC = "smartfrz_fast.ActivationCache"
FILE_VERSION = 1
HEADER_BYTES = 4096
ALIGN = 64


def storage_dtype(name: str) -> torch.dtype:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"ActivationCache dtype must be one of {sorted(STORAGE_DTYPES)}, got {name!r}")
    return STORAGE_DTYPES[name]


def row_bytes(row_numel: int, dtype: torch.dtype) -> int:
    """Bytes one cached sample takes (data plus its fp32 scale)."""
    return row_numel * torch.empty((), dtype=dtype).element_size() + 4


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
        try:
            self.data = torch.empty(self.capacity, self.row_numel, dtype=self.dtype, device=self.device)
            self.scales = torch.ones(self.capacity, dtype=torch.float32, device=self.device)
        except torch.OutOfMemoryError as exc:
            raise torch.OutOfMemoryError(
                f"ActivationCache: no room for {self.capacity} rows of {self.nbytes_per_row} bytes on "
                f"{self.device} ({self.capacity * self.nbytes_per_row / 2**30:.2f} GiB). Pass a smaller "
                "max_bytes=, a smaller dtype ('bf16', 'fp8'), or storage='pinned' / 'mmap'."
            ) from exc
        self.slot_of = torch.full((self.num_samples,), -1, dtype=torch.int64)
        self.used = 0

    @property
    def nbytes_per_row(self) -> int:
        return row_bytes(self.row_numel, self.dtype)

    # ------------------------------------------------------------------ slots
    def lookup(self, ids: Tensor) -> Tensor:
        """Cache row of each id (CPU int64), -1 where not cached."""
        return self.slot_of[ids]

    def allocate(self, ids: Tensor) -> Tensor:
        """Give uncached ``ids`` (unique, CPU) rows while there is room; -1 for the rest."""
        n = min(int(ids.numel()), self.capacity - self.used)
        slots = torch.full((ids.numel(),), -1, dtype=torch.int64)
        if n > 0:
            slots[:n] = torch.arange(self.used, self.used + n)
            self.slot_of[ids[:n]] = slots[:n]
            self.used += n
        return slots

    # ------------------------------------------------------------------ values
    def write(self, slots: Tensor, values: Tensor) -> None:
        values = values.reshape(values.shape[0], self.row_numel)
        if values.device != self.data.device:
            values = values.to(self.data.device)
        _ops().cache_store(values, slots.to(self.data.device), self.data, self.scales)

    def read(self, slots: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        out = _ops().cache_load(self.data, self.scales, slots.to(self.data.device), dtype)
        return out.to(device, non_blocking=True).view(slots.numel(), *self.row_shape)

    def cached_slots(self) -> Tuple[Tensor, Tensor]:
        """(ids, slots) of every cached sample."""
        ids = (self.slot_of >= 0).nonzero().flatten()
        return ids, self.slot_of[ids]

    def export_rows(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(ids, rows, scales) of every cached sample, on the CPU, exactly as stored."""
        ids, slots = self.cached_slots()
        slots = slots.to(self.data.device)
        return ids, self.data[slots].cpu(), self.scales[slots].cpu()

    def import_rows(self, ids: Tensor, rows: Tensor, scales: Tensor) -> None:
        """Put back rows from ``export_rows`` (bit for bit: no second quantisation)."""
        if rows.shape[1:] != self.data.shape[1:] or rows.dtype != self.dtype:
            raise ValueError(f"ActivationCache: saved rows are {tuple(rows.shape[1:])} {rows.dtype}, this "
                             f"cache holds {tuple(self.data.shape[1:])} {self.dtype}")
        slots = self.allocate(ids)
        if bool((slots < 0).any()):
            raise ValueError(f"ActivationCache: {ids.numel()} saved rows do not fit in {self.capacity} rows")
        slots = slots.to(self.data.device)
        self.data[slots] = rows.to(self.data.device)
        self.scales[slots] = scales.to(self.data.device)

    def prefetch(self, ids: Tensor, dtype: torch.dtype, device: torch.device) -> None:
        """Only the pinned tier prefetches."""

    def close(self) -> None:
        self.data = self.scales = None


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
        # rows on their way to host memory: (slots, pinned rows, pinned scales, copy-done event)
        self._writing: Optional[Tuple[Tensor, Tensor, Tensor, Any]] = None

    @property
    def target_device(self) -> torch.device:
        return self.device

    def _allocate(self) -> None:
        gpu = self.device
        self.device = torch.device("cpu")
        self.data = torch.empty(self.capacity, self.row_numel, dtype=self.dtype, pin_memory=True)
        self.scales = torch.ones(self.capacity, dtype=torch.float32, pin_memory=True)
        self.slot_of = torch.full((self.num_samples,), -1, dtype=torch.int64)
        self.used = 0
        self.device = gpu  # where rows are delivered

    # NOTE: the non-blocking write path below has not run on a GPU yet (written on a CPU-only
    # machine); tests/test_cache.py::test_gpu_tiers_match_cpu covers it where a GPU exists.
    def write(self, slots: Tensor, values: Tensor) -> None:
        # Quantise on the GPU (one op), then copy the compact rows into pinned staging without
        # waiting; the rows land in self.data at the next call (_finish_write), by when the
        # copy has long finished. Every reader of self.data finishes the write first.
        self._finish_write()
        values = values.reshape(values.shape[0], self.row_numel)
        staged = torch.empty(values.shape[0], self.row_numel, dtype=self.dtype, device=values.device)
        staged_scales = torch.ones(values.shape[0], dtype=torch.float32, device=values.device)
        _ops().cache_store(values, torch.arange(values.shape[0], device=values.device), staged, staged_scales)
        if staged.device.type != "cuda":  # rows computed on the CPU: nothing to overlap
            self.data[slots] = staged
            self.scales[slots] = staged_scales
            return
        host = torch.empty(staged.shape, dtype=self.dtype, pin_memory=True)
        host_scales = torch.empty(staged_scales.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(staged, non_blocking=True)  # on the current stream, after cache_store
        host_scales.copy_(staged_scales, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(staged.device))
        self._writing = (slots.to("cpu", copy=True), host, host_scales, done)

    def _finish_write(self, needed: Optional[Tensor] = None) -> None:
        """Land the last write's rows; with ``needed`` (slots about to be read) only if it
        holds one of them (a batch's hits never do: they were cached before its misses)."""
        if self._writing is None:
            return
        if needed is not None and not bool(torch.isin(needed, self._writing[0]).any()):
            return
        pending, self._writing = self._writing, None
        if pending is not None:
            slots, host, host_scales, done = pending
            done.synchronize()  # recorded a step ago: normally long complete
            self.data[slots] = host
            self.scales[slots] = host_scales

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


class MmapStorage(Storage):
    """A memory-mapped file: a 4 KiB JSON header, then ``slot_of``, ``scales`` and ``data``.

    The file is allocated in full when created (``posix_fallocate``), so a full disk is a clear
    error now rather than a SIGBUS at some later write. Reopening a file checks its header
    against this model, boundary and storage format.
    """

    tier = "mmap"

    def __init__(self, num_samples, row_shape, dtype, capacity, device, *, path: str,
                 fingerprint: Dict[str, Any], reuse: bool = False) -> None:
        self.path = os.fspath(path)
        self.fingerprint = fingerprint
        self.reuse = reuse
        super().__init__(num_samples, row_shape, dtype, capacity, device)

    def _layout(self) -> Tuple[int, int, int, int]:
        slot_off = HEADER_BYTES
        scale_off = _align(slot_off + 8 * self.num_samples)
        data_off = _align(scale_off + 4 * self.capacity)
        item = torch.empty((), dtype=self.dtype).element_size()
        total = data_off + self.capacity * self.row_numel * item
        return slot_off, scale_off, data_off, total

    def _header(self) -> Dict[str, Any]:
        return {"magic": FILE_MAGIC, "version": FILE_VERSION, "fingerprint": self.fingerprint,
                "num_samples": self.num_samples, "row_shape": list(self.row_shape),
                "dtype": str(self.dtype), "capacity": self.capacity}

    def _allocate(self) -> None:
        self.device = torch.device("cpu")
        slot_off, scale_off, data_off, total = self._layout()
        exists = os.path.exists(self.path)
        if exists and self.reuse:
            self._check_header(read_header(self.path))
            if os.path.getsize(self.path) != total:
                raise ValueError(f"ActivationCache: cache file {self.path} has the wrong size "
                                 f"({os.path.getsize(self.path)} bytes, expected {total}); delete it.")
        else:
            if exists:
                raise FileExistsError(
                    f"ActivationCache: {self.path} already exists. Pass reuse=True to reopen it (it is "
                    "checked against this model and boundary), or delete it / choose another path."
                )
            self._create(total)
        raw = torch.from_file(self.path, shared=True, size=total, dtype=torch.uint8)
        self._raw = raw
        self.slot_of = raw[slot_off:slot_off + 8 * self.num_samples].view(torch.int64)
        self.scales = raw[scale_off:scale_off + 4 * self.capacity].view(torch.float32)
        self.data = raw[data_off:total].view(self.dtype).view(self.capacity, self.row_numel)
        if exists and self.reuse:
            self.used = int((self.slot_of >= 0).sum())
        else:
            self.slot_of.fill_(-1)
            self.scales.fill_(1.0)
            self.used = 0

    def _create(self, total: int) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < total:
            raise OSError(errno.ENOSPC,
                          f"ActivationCache: the cache file needs {total / 2**20:.1f} MiB but {folder} has "
                          f"{free / 2**20:.1f} MiB free. Pass a smaller max_bytes=, dtype='bf16'/'fp8', or "
                          "a path on a larger disk.")
        header = json.dumps(self._header()).encode()
        if len(header) >= HEADER_BYTES:
            raise ValueError("ActivationCache: cache file header too large (model signature too long)")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                os.posix_fallocate(fd, 0, total)  # reserve every block now: no SIGBUS later
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise OSError(exc.errno,
                              f"ActivationCache: the disk holding {self.path} is full ({total / 2**20:.1f} MiB "
                              "needed). Free space, pass a smaller max_bytes=, dtype='bf16'/'fp8', or a path "
                              "on another disk.") from exc
            os.pwrite(fd, header.ljust(HEADER_BYTES, b" "), 0)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)

    def _check_header(self, header: Dict[str, Any]) -> None:
        mine = self._header()
        for key in ("magic", "version", "fingerprint", "num_samples", "row_shape", "dtype", "capacity"):
            if header.get(key) != mine[key]:
                raise ValueError(
                    f"ActivationCache: cache file {self.path} was made for a different {key} "
                    f"({_short(header.get(key))} != {_short(mine[key])}): it belongs to another model, "
                    "boundary or storage format. Delete it or pass another path= (or reuse=False)."
                )

    def close(self) -> None:
        super().close()
        self.slot_of = None
        self._raw = None


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
