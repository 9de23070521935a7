"""The frozen-prefix activation cache: skip the forward pass through frozen blocks.

Once the freezer has frozen a prefix of the model, the prefix's output for a sample never
changes (frozen weights, eval mode, same input): it is stored per sample id the first time it
is computed, and later steps run only the trainable suffix on the stored activation.

    cache = ActivationCache(freezer, num_samples=len(train_set), deterministic=True)
    model_c = cache.wrap()                       # forward(inputs, sample_ids)
    loader = DataLoader(IndexedDataset(train_set), ...)
    for x, y, ids in loader:
        loss_fn(model_c(x, ids), y).backward()
        ...; freezer.step()

Correct only when a sample's input is the same every time it comes back: the user declares
it (``deterministic=True``), and the cache audits it by recomputing a few cached rows each
epoch; on a mismatch (random augmentation) it turns itself off with a warning and training
goes on through the plain model.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import gc
import hashlib
import io
import math
import os
import uuid
import warnings
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from enum import Enum
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.hooks import RemovableHandle

from ..distributed import FreezableDDP, _is_fsdp1, _is_fsdp2, check_ddp
from ..frozen import held_weakly, mode_blind, reestimating_statistics, remove_handles
from ..guards import ContainerChildren, warn_in_every_run
from ..policy.base import plain_number
from ..units import (PythonAttributes, SharedWrites, compiled_in_place, example_call, preserved_modes, preserved_rngs,
                     preserved_state, uncached_autocast, uninitialized_parameters)
from .split import (OUTPUT_SWITCHES, SWAP, BlockChain, Inputs, block_modules, captured_outputs, checkpointing_switches,
                    find_blocks, hooked_modules, modules_outside, rows_need_grad, skipped_hooks)
from .swap import GLOBAL_PRE_HOOKS, CutNotReached, holds_tensors
from .storage import (PINNED_READS, STORAGE_DTYPES, TIERS, StaleCacheFile, Storage, check_path,
                      host_memory_available, input_sums, make_storage, owned_temp_path, read_header, remove_leftovers,
                      row_bytes, storage_dtype, tensor_sum)

# the host index's bytes per sample id, whatever max_bytes: the row holding it (int64) and whether
# its side inputs were recorded (bool)
INDEX_BYTES_PER_SAMPLE = 9
# Audit tolerance: max |cached - recomputed| per row, relative to the row's largest magnitude.
# Storage rounding (bf16: 2^-9 relative, fp8 e4m3: 2^-4) plus recompute noise at the
# activation's own precision; random augmentation differs by O(1).
STORAGE_TOLERANCE = {torch.float64: 0.0, torch.float32: 1e-4, torch.bfloat16: 2.0 ** -7, torch.float8_e4m3fn: 2.0 ** -3}
ACTIVATION_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-7, torch.bfloat16: 2.0 ** -6, torch.float16: 2.0 ** -8}
MIGRATE_CHUNK = 256  # rows pushed through newly frozen blocks at a time
VALUE_CHECK_ROWS = 8  # cached rows recomputed to tell whether a changed Python value changes them
# deeper freezes in a row that drop rows none of which was read, after which the cache turns off
# (review90: a schedule freezing more often than an epoch; review93: 3 early freezes are no such)
UNREAD_DROPS_OFF = 4
STATE_FORMAT = "smartfrz_fast.ActivationCache.state"
STATE_VERSION = 2  # 2: rows carry checksums; the mmap file's lineage
_STATE_KEYS = ("settings", "enabled", "reason", "boundary", "chain", "stats", "seen", "audit_left", "input_sig",
               "path", "fingerprint", "row_shape", "activation", "rows", "side", "lineage")
_ROW_KEYS = ("ids", "data", "scales", "sums", "in_sums")
# Storage faults that turn the cache off (with one warning) instead of ending the run: the
# disk or quota is full, a file-size limit, a read-only or vanished folder, an I/O error.
_FAULT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                 errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
                 errno.EBUSY, errno.EEXIST}  # (EBUSY: another cache's file, storage.lock_file)


def _restoring_rngs(look: Callable) -> Callable:
    """A look of the cache's that lets the generators move between its passes (a random op must
    show as passes that differ) puts them back at its end: its draws moved every later one of the
    user's run (dropout masks, a shuffle) off the run without the cache (review97)."""
    @functools.wraps(look)
    def wrapper(self, *args, **kwargs):
        with preserved_rngs(self.freezer.module):
            return look(self, *args, **kwargs)
    return wrapper


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset so that each item also carries its index: ``(*item, index)``
    for tuple items, ``(item, index)`` otherwise; with ``key=``, items are dicts (as a Hugging
    Face dataset gives) and the index is added under that key. The default collate turns the
    indices into an int64 tensor of sample ids."""

    def __init__(self, dataset, key: Optional[str] = None) -> None:
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if self.key is None:
            return (*item, index) if isinstance(item, tuple) else (item, index)
        if not isinstance(item, Mapping):
            raise TypeError(f"IndexedDataset(key={self.key!r}) adds the index to dict items; item {index} is a "
                            f"{type(item).__name__}. Leave key= out for tuple items.")
        if self.key in item:
            raise ValueError(f"IndexedDataset: item {index} already has a {self.key!r} entry")
        return {**item, self.key: index}


class ActivationCache:
    """Caches the frozen prefix's output per sample id (see the module docstring).

    Args:
        freezer: the ``SmartFreezer`` that freezes the model; the cache follows its frozen prefix.
        num_samples: number of sample ids (the dataset's length); ids must lie in ``[0, n)``.
        deterministic: the user's declaration that a sample's model input is identical every
            time it is seen (no random augmentation). Without it the cache stays off.
        blocks: optional list of modules whose composition is the model; otherwise the chain is
            recognised (nn.Sequential, torchvision/timm ResNet, VGG, ViT, ConvNeXt) or traced.
        storage: "memory" (tensors on the activations' device), "pinned" (pinned host memory,
            next batch prefetched to the GPU on a side stream) or "mmap" (a file at ``path``).
        pinned_read: how pinned rows reach the GPU: "copy" (gathered on the CPU into a pinned
            buffer, then one copy) or "kernel" (a GPU kernel reads them in place by index).
        dtype: row storage: "fp64", "fp32", "bf16" or "fp8" (e4m3, per-row scale). Default: exact
            for the model, "fp64" if it has float64 parameters, else "fp32".
        max_bytes: capacity; samples beyond it are recomputed every time (slower, never wrong).
        path, reuse: the mmap file, and whether an existing one may be reopened (it is checked
            against this model, boundary and format).
        audit_rows: cached rows recomputed and compared each epoch (0: no audit).
        device: where "memory" storage lives (default: the activations' device).
    """

    def __init__(
        self,
        freezer,
        *,
        num_samples: int,
        deterministic: bool,
        blocks: Optional[Sequence[nn.Module]] = None,
        storage: str = "memory",
        dtype: Optional[str] = None,
        max_bytes: Optional[int] = None,
        path: Optional[str] = None,
        reuse: bool = False,
        audit_rows: int = 4,
        device: Optional[torch.device] = None,
        pinned_read: str = "copy",
    ) -> None:
        if not hasattr(freezer, "add_freeze_listener"):
            raise TypeError(f"ActivationCache expects a SmartFreezer, got {type(freezer).__name__}")
        _refuse_sharded(getattr(freezer, "_dist_kind", None))
        num_samples, max_bytes, audit_rows = map(plain_number, (num_samples, max_bytes, audit_rows))
        if isinstance(max_bytes, float) and math.isfinite(max_bytes) and max_bytes >= 0:
            max_bytes = int(max_bytes)  # max_bytes=4e9
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int (the dataset's length), got {num_samples!r}")
        index_bytes, available = INDEX_BYTES_PER_SAMPLE * num_samples, host_memory_available()
        if available is not None and index_bytes > available:  # torch's allocator error named nothing (review92)
            raise MemoryError(f"ActivationCache: num_samples={num_samples} needs an index of {index_bytes / 2**30:.1f} "
                              f"GiB of host memory ({INDEX_BYTES_PER_SAMPLE} bytes per sample id, whatever max_bytes), "
                              f"{available / 2**30:.1f} GiB is available. num_samples is the number of sample ids "
                              "your loop passes (the dataset's length).")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)):
            raise TypeError(f"max_bytes is a number of bytes (an int, or a float such as 4e9) or None, got {max_bytes!r}")
        if isinstance(audit_rows, bool) or not isinstance(audit_rows, int):
            raise TypeError(f"audit_rows is a number of rows (an int >= 0; 0: no audit), got {audit_rows!r}")
        if device is not None:
            device = torch.device(device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"ActivationCache device={str(device)!r}, but this machine has no CUDA device: "
                                 "leave device=None (the activations' device) or pass one that exists")
        if storage not in TIERS:
            raise ValueError(f"ActivationCache storage must be one of {TIERS}, got {storage!r}")
        if pinned_read not in PINNED_READS:
            raise ValueError(f"ActivationCache pinned_read must be one of {PINNED_READS}, got {pinned_read!r}")
        if storage == "mmap" and path is None:
            raise ValueError("storage='mmap' needs path= (the cache file to create)")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if audit_rows < 0:
            raise ValueError(f"audit_rows must be >= 0, got {audit_rows}")
        path = None if path is None else _rank_path(os.fspath(path))
        if storage == "mmap":
            check_path(path, max_bytes)  # a bad folder fails now, not at the first freeze hours in
            if os.path.exists(path) and not _is_cache_file(path):
                raise FileExistsError(f"ActivationCache: path={path!r} is an existing file without an activation "
                                      "cache header (another file, or a damaged cache file); the cache never "
                                      "overwrites it. Choose another path, or delete it if it is a damaged cache.")
        self.freezer = freezer
        self.num_samples = num_samples
        self.deterministic = bool(deterministic)
        self.user_blocks = blocks
        self.tier = storage
        self.pinned_read = pinned_read
        self._exact = dtype is None  # the default: rows as exact as the activations
        if dtype is None:  # exact: float32 rows would round a float64 model's activations
            dtype = "fp64" if any(p.dtype == torch.float64 for p in freezer.model.parameters()) else "fp32"
        self.storage_dtype = storage_dtype(dtype)
        self.max_bytes = max_bytes
        self.path = path
        self.reuse = reuse
        self.audit_rows = audit_rows
        self.device = device

        self.chain: Optional[BlockChain] = None
        self.boundary = 0  # number of chain blocks whose output is cached
        self.enabled = self.deterministic
        self.reason: Optional[str] = None if self.deterministic else (
            "inputs not declared deterministic: pass deterministic=True if a sample's input is the "
            "same every time it is seen (no random augmentation)")
        self.stats: Dict[str, int] = dict(hits=0, misses=0, stored=0, over_capacity=0, audited=0, migrated=0,
                                          bad_rows=0, bypassed=0, input_changed=0, weights_changed=0, values_changed=0,
                                          not_finite=0)
        self._store: Optional[Storage] = None
        self._setup_done = False
        self._input_sig = None
        self._act = None  # (dtype, device) of the prefix output
        self._act_format = torch.contiguous_format  # its memory layout (a channels_last CNN's rows too)
        self._format_unknown = False  # rows put back from a checkpoint: the layout is not saved with them
        # the autocast mode the rows were computed in ("off" or its dtype); None: no rows yet
        self._rows_autocast: Optional[str] = None
        self._seen = 0
        # per sample id: seen by this cache (since built or resumed; on this rank): what a pass is
        self._ids_seen: Optional[Tensor] = None
        self._audit_left = audit_rows
        self._changed = [0, 0]  # rows that changed with their input: in the last epoch, in this one
        self._resume: Optional[Dict[str, Any]] = None  # a loaded state, applied at the first forward
        self._sides = SideInputs(num_samples)
        # names the run an mmap file belongs to (in its header, kept by deeper freezes and resumes)
        self._lineage: Optional[str] = uuid.uuid4().hex if storage == "mmap" else None
        self._warned: set = set()  # kinds of warning given once already
        self.cut_note: Optional[str] = None  # why the cut is not as deep as the frozen prefix
        self._structure_changed = False  # a module or parameter registered in the model since set-up
        self._checkpointing: List[Tuple[nn.Module, str, Any]] = []  # checkpointing_switches at set-up
        self._containers = ContainerChildren()  # the model's containers' children at set-up
        self._compiled_at_setup: Set[int] = set()  # modules the chain does not call, compiled at set-up
        self._handles_seen = -1  # torch's hook-handle counter when hooks were last checked
        self._stopped_by_hooks = None  # the block whose modules' forward hooks stopped the cut, if any
        self._stopped_by_mode = None  # the module whose train mode stopped the cut, if any
        self._rows_migrated = False  # the store holds rows pushed through blocks at a deeper freeze
        self._frozen_norms: Tuple[Any, List[nn.Module]] = (None, [])  # (freeze, norm layers it holds in eval)
        self._rows_grad: Tuple[Any, bool] = (None, False)  # (chain, cut, hook counter), rows_need_grad
        self._outside: Tuple[Optional[BlockChain], list] = (None, [])  # (chain, modules it does not call)
        self._traced_values = PythonAttributes()  # what a torch.fx chain took as constants of its graph
        self._no_fx: Optional[str] = None  # why a torch.fx chain may no longer serve this model
        self._writers: Dict[int, str] = {}  # modules whose forward writes Python state (see _python_writers)
        self._structure_hooks: List[Any] = []  # torch's global registration hooks: see _watch_structure
        weakref.finalize(self, remove_handles, self._structure_hooks)  # a cache dropped without close()
        # the cached prefix's parameters and buffers as its rows were made: (store, tensors, their
        # (version, dtype, storage address, an alias of the storage), their checksums); see
        # _prefix_weights_unchanged
        self._prefix_state: Tuple[Any, List[Tensor], List[Tuple[int, torch.dtype, int, Tensor]], List[Tensor]] = \
            (None, [], [], [])
        self._prefix_slots: List[Tuple[Dict[str, Any], str, Tensor]] = []  # where the model holds them
        # the Python values (a temperature the loop anneals) of the modules whose forward the rows
        # hold, as the rows were made: (store, those modules, their values); see _check_values
        self._prefix_values: Tuple[Any, List[Tuple[str, nn.Module]], PythonAttributes] = (None, [], PythonAttributes())
        self._outside_called: Dict[int, nn.Module] = {}  # modules outside the model the prefix's forward called
        self._hits_at_values_drop: Optional[int] = None  # stats["hits"] when rows were last dropped for them
        # the watched values as a change since the rows were made was last noted (None: no change
        # waits for its check), and [capacity] bool: the rows made since then, with the values now
        self._values_noted: Optional[PythonAttributes] = None
        self._fresh_slots: Optional[Tensor] = None
        self._hits_at_store = 0  # stats["hits"] when the store was made (see _advance)
        self._unread_drops = 0  # deeper freezes in a row that dropped rows none of which was read
        # the prefix's tensors written in a row with no cached row read in between, and stats["misses"] at
        # the first of them (see _prefix_weights_unchanged)
        self._unread_writes, self._unread_writes_from = 0, 0
        # what a swapped-out forward found in those slots, and the training step it first did so
        self._swapped_seen: Optional[Tuple[int, List[Optional[weakref.ref]]]] = None
        # forwards run inside a plain DDP that copies rank 0's buffers into this rank (see _advance)
        self._buffers_broadcast = False
        self._leaf_reads: Tuple[Any, Optional[List[bool]]] = (None, None)  # see _read_leaves
        self._prefix_calls: Tuple[Any, Dict[int, int]] = (None, {})  # see _calls_in_prefix
        self._per_sample_checked: set = set()  # (boundary, batch size) of this chain found per sample
        self._mixing_cut: Optional[int] = None  # the shallowest cut found not per sample: cut before it
        self._waited_for_lazy = False  # a forward ran the model for its lazy layers before set-up
        self._unmanaged: Tuple[Any, List[Tuple[str, Tensor]]] = (None, [])  # see _unmanaged_in_prefix
        self._modes_kept: List[nn.Module] = []  # see _modes_not_held
        self._closed: Optional[str] = None  # close() was called: what describe() said before it
        self._off_by_storage = False  # turned off by a storage fault (not by its data or model)
        self._last_bypass = ""  # why the latest forward ran the whole model (describe())
        self._freeze_listener = _FreezeListener(self)
        freezer.add_freeze_listener(self._freeze_listener)
        # parameters replaced (load_state_dict(assign=True), a new Parameter set on a module): the
        # forward that first met them ran before the freezer froze them again, at its next step,
        # and cut before them; the cut goes back as deep as the freezer's prefix then
        if hasattr(freezer, "add_change_listener"):
            freezer.add_change_listener(self._freeze_listener)
        if storage == "mmap":
            _MMAP_CACHES.add(self)

    # ------------------------------------------------------------------ public
    def note_outer_ddp(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        """A DistributedDataParallel around more than the model this cache wraps (Lightning's,
        around the LightningModule): its buffer broadcast at each forward copies rank 0's norm
        statistics into this rank's frozen prefix too, so at a deeper freeze rows are refilled,
        not pushed through this rank's own (``_advance``; review79: 1.7e-3 off the run without
        the cache). A DDP the cache wraps itself is seen at each forward."""
        self._buffers_broadcast = (bool(ddp.broadcast_buffers)
                                   and torch.distributed.get_world_size(ddp.process_group) > 1)

    def wrap(self, model: Optional[nn.Module] = None) -> "CachedModel":
        """The model as a module whose forward takes ``(inputs, sample_ids)``. Default: the
        model the freezer was given; under DDP pass the wrapper if the freezer was given the
        inner module (the cached forward then runs inside DDP's own forward)."""
        if model is None:
            model = self.freezer.model
        else:
            _refuse_sharded(_distributed_kind(model))
            if isinstance(model, FreezableDDP) and model is not self.freezer.model:
                raise ValueError(
                    "ActivationCache.wrap: this FreezableDDP was not given to the SmartFreezer, so it "
                    "would not be rebuilt after a freeze (DDP would then wait for the frozen "
                    "parameters' gradients). Build the freezer on the FreezableDDP.")
            if isinstance(model, nn.parallel.DistributedDataParallel):
                check_ddp(model)
        ddp = _ddp_parts(model)[1]
        missing = [name for name in _DDP_FORWARD_PARTS if ddp is not None and not hasattr(ddp, name)]
        if missing:
            raise NotImplementedError(
                f"ActivationCache: this torch's ({torch.__version__}) DistributedDataParallel has no "
                f"{', '.join(missing)}, which the cache uses to run inside DDP's forward (tested on torch "
                "2.11 and 2.13). Train without the cache under DDP here (freezing itself works).")
        return CachedModel(model, self)

    @property
    def active(self) -> bool:
        return self.enabled and self._closed is None and self.chain is not None and self.boundary > 0

    @property
    def rows_cached(self) -> int:
        return 0 if self._store is None else self._store.used

    @property
    def bytes_per_sample(self) -> Optional[int]:
        return None if self._store is None else self._store.nbytes_per_row

    def describe(self) -> str:
        if self._closed is not None:
            return f"activation cache closed; before that: {self._closed}"
        if not self.enabled or (self._setup_done and self.chain is None):
            return f"activation cache off: {self.reason}"
        if self.chain is None:
            if self.stats["bypassed"] and not (self.stats["hits"] or self.stats["misses"]):  # (a copy: none)
                return (f"activation cache not set up: all {self.stats['bypassed']} forwards so far ran the whole "
                        f"model (the latest: {self._last_bypass})")
            return "activation cache: waiting for the first forward pass"
        if self.boundary == 0:
            return f"activation cache on, nothing cached ({self.chain.how}): {self.reason or self.cut_note}"
        cut = f", cut after {self.chain.blocks[self.boundary - 1].name}" if self.chain.how == SWAP else ""
        state = (f"{self.boundary}/{len(self.chain)} blocks cached ({self.chain.how}{cut}), "
                 f"{self.tier} {str(self.storage_dtype).replace('torch.', '')}")
        if self._store is not None:
            state += (f", {self._store.used}/{self._store.capacity} rows of "
                      f"{self._store.nbytes_per_row} B")
        note = f"; {self.cut_note}" if self.cut_note else ""
        if getattr(self.chain, "passed_over", None):  # a known structure's chain cuts at whole layers
            note += f"; not the model's known structure: {self.chain.passed_over}"
        if self.stats["bypassed"] and not (self.stats["hits"] or self.stats["misses"]):
            note += (f"; every forward since it set up ran the whole model, none through the cache (the latest: "
                     f"{self._last_bypass})")
        elif self.stats["bypassed"]:
            note += f"; the latest forward that ran the whole model: {self._last_bypass}"
        return f"activation cache on: {state}; " + ", ".join(f"{k} {v}" for k, v in self.stats.items()) + note

    def prefetch(self, sample_ids) -> None:
        """Start copying the cached rows of the next batch to the GPU (pinned tier only)."""
        if self.active and self._store is not None and self._act is not None:
            ids = self._check_ids(sample_ids, None)
            self._store.prefetch(ids, *self._act)

    def prefetching(self, loader: Iterable, ids_index: int = -1) -> Iterator:
        """Iterate ``loader``, prefetching each next batch's rows while the current one trains."""
        it = iter(loader)
        try:
            current = next(it)
        except StopIteration:
            return
        for upcoming in it:
            self.prefetch(upcoming[ids_index])
            yield current
            current = upcoming
        yield current

    def close(self) -> None:
        """Free the rows (an mmap file stays on disk) and every hook the cache placed; the wrapped
        model runs whole after it. A checkpoint taken after it resumes a cache as it was before."""
        if self._closed is None:
            self._closed = self.describe()
        self._release()

    def _release(self) -> None:
        self._free_rows_and_hooks()
        for stop in (getattr(self.freezer, "remove_freeze_listener", None),
                     getattr(self.freezer, "remove_change_listener", None)):
            if stop is not None:
                stop(self._freeze_listener)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, rows: bool = False) -> Dict[str, Any]:
        """What a resumed run needs: settings, boundary, chain, counters and, for the rows, a
        fingerprint of what they depend on. The "mmap" tier's rows stay in its file (the state
        records its path and holds the rows' side inputs); "memory" / "pinned" rows are included
        only with ``rows=True`` (they can be large), otherwise the resumed cache refills them as
        samples come back."""
        if self._resume is not None:  # loaded but not applied yet (no forward since): still the truth
            return dict(self._resume)
        if self._values_noted is not None and self._store is not None:
            # rows made before a change not checked yet would resume unchecked (review96): they go
            self._drop_rows()
        state: Dict[str, Any] = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "settings": self._settings(),
            "enabled": self.enabled, "reason": self.reason, "boundary": self.boundary,
            "chain": None if self.chain is None else [b.name for b in self.chain.blocks],
            "stats": dict(self.stats), "seen": self._seen, "audit_left": self._audit_left,
            "input_sig": self._input_sig, "path": self.path, "fingerprint": None, "row_shape": None,
            "activation": None, "rows": None, "side": None, "lineage": self._lineage,
            "mixing_cut": self._mixing_cut, "off_by_storage": self._off_by_storage,
        }
        if self.active and self._store is not None and (rows or self.tier == "mmap"):
            # the mmap file's header holds the fingerprint already: no second pass over the weights
            fingerprint = self._store.fingerprint if self.tier == "mmap" else self._fingerprint()
            state.update(fingerprint=fingerprint, row_shape=list(self._store.row_shape),
                         activation=str(self._act[0]))
            if self.tier == "mmap":  # the rows are in its file already: make them durable first
                # a fault here (the file deleted or its disk gone under the run) turns the cache
                # off, as during training: the checkpoint then holds no rows, and training goes on
                with self._storage_faults("making the cached rows durable for a checkpoint"):
                    self._store.flush()
                if not self.enabled:
                    state.update(enabled=False, reason=self.reason, fingerprint=None, row_shape=None,
                                 activation=None)
                    return state
            else:
                state["rows"] = self._store.export_rows()  # with each row's checksum
            if rows or self.tier == "mmap":
                # What migrating the rows through HF layers needs (not in the mmap file). Small:
                # a token's mask entry against its hidden-size activation in the row.
                state["side"] = self._sides.export(self._store.cached_slots()[0])
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from ``state_dict()``. Call it on a fresh cache built with the same settings,
        after the freezer's own ``load_state_dict``; it takes effect at the first forward (the
        chain is found then). Saved rows (mmap file, or ``rows=True``) are used only if their
        fingerprint (model, chain, boundary, prefix weights, activation dtype, row shape) matches
        this run: a mismatch is an error, never silently wrong rows."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("not an ActivationCache state_dict (missing its format tag)")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"ActivationCache state version {state.get('version')} is not supported "
                             f"(this is {STATE_VERSION})")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:  # checked before anything changes
            raise ValueError(f"this ActivationCache state_dict lacks {missing}: it is truncated or was edited. "
                             "Load the complete cache.state_dict() saved with the checkpoint.")
        mixing = state.get("mixing_cut")  # absent in states saved before 2026-12-07
        if mixing is not None and (isinstance(mixing, bool) or not isinstance(mixing, int) or mixing < 1):
            raise ValueError(f"this ActivationCache state_dict is damaged: mixing_cut={mixing!r} (a block count "
                             "or None). Load the complete cache.state_dict() saved with the checkpoint.")
        if self._setup_done or self._store is not None:
            raise RuntimeError("ActivationCache.load_state_dict needs a fresh cache (before its first forward)")
        if state["rows"] is not None:
            self._check_saved_rows(state["rows"])
        if state["side"] is not None:
            self._check_saved_side(state["side"])
        mine = self._settings()
        for key, saved in state["settings"].items():
            if mine.get(key) != saved:
                hint = ""
                if key == "dtype":  # saved as the torch dtype; the constructor takes its short name
                    name = next((n for n, d in STORAGE_DTYPES.items() if str(d) == saved), None)
                    hint = f" (pass dtype={name!r})" if name else ""
                raise ValueError(
                    f"ActivationCache: the checkpoint's cache was made with {key}={saved!r}, this one has "
                    f"{key}={mine.get(key)!r}. Construct the cache with the checkpoint's settings{hint}, or, where "
                    "they no longer fit (less memory, a grown dataset), leave the cache's state out: a cache "
                    "with the new settings refills its rows, and the model, freezer and optimizer resume "
                    "exactly as with it.")
        if not state["enabled"] and self.enabled and state.get("off_by_storage"):
            # a storage fault (a full disk, a file deleted under the run) is the interrupted run's
            # place, not its data: kept off, a resume on a new path stayed off, unsaid (review87)
            self._warn_once("storage_retry", f"ActivationCache: the interrupted run's cache was off ({state['reason']}); "
                            "this one tries its storage again.")
        elif not state["enabled"] and self.enabled:  # e.g. the audit caught augmentation: stay off
            self.enabled, self.reason = False, state["reason"]
        self.stats.update(state["stats"])
        self._seen, self._audit_left, self._input_sig = state["seen"], state["audit_left"], state["input_sig"]
        if state["lineage"] is not None:
            self._lineage = state["lineage"]  # the interrupted run's files are this run's
        self._resume = state

    def _check_saved_rows(self, rows: Any) -> None:
        """The saved rows' structure, before anything changes (each row's checksum is checked
        when the rows are put back: a row that fails is recomputed, not refused)."""
        def bad(what: str) -> ValueError:
            return ValueError(f"ActivationCache: the state's saved rows are damaged ({what}): it is truncated or "
                              "was edited. Load the complete cache.state_dict(rows=True) saved with the "
                              "checkpoint, or drop its rows (state['rows'] = None) to refill them.")
        if not isinstance(rows, dict) or any(not isinstance(rows.get(k), Tensor) for k in _ROW_KEYS):
            raise bad(f"rows must be a dict of tensors {list(_ROW_KEYS)}")
        ids = rows["ids"]
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise bad(f"ids are {ids.dtype} of shape {tuple(ids.shape)}, not a 1-d int64 tensor")
        if any(rows[k].shape[:1] != ids.shape for k in _ROW_KEYS) or rows["data"].dim() != 2:
            raise bad("ids, data, scales and checksums differ in length")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_samples
                            or torch.unique(ids).numel() != ids.numel()):
            raise bad(f"sample ids outside [0, {self.num_samples}) or repeated")
        if rows["scales"].dtype != torch.float32 or rows["sums"].dtype != torch.int32:
            raise bad("scales are not float32 or checksums not int32")

    def _check_saved_side(self, side: Any) -> None:
        ok = (isinstance(side, dict) and isinstance(side.get("ids"), Tensor) and isinstance(side.get("sums"), Tensor)
              and isinstance(side.get("values"), dict) and side["ids"].dtype == torch.int64 and side["ids"].dim() == 1
              and side["sums"].shape == side["ids"].shape
              and all(isinstance(v, Tensor) and v.shape[:1] == side["ids"].shape for v in side["values"].values()))
        if not ok or (side["ids"].numel() and (int(side["ids"].min()) < 0 or int(side["ids"].max()) >= self.num_samples)):
            raise ValueError("ActivationCache: the state's side inputs (masks, positions of the cached rows) are "
                             "damaged: it is truncated or was edited. Load the complete cache.state_dict() saved "
                             "with the checkpoint.")

    def _settings(self) -> Dict[str, Any]:
        return {"num_samples": self.num_samples, "storage": self.tier, "dtype": str(self.storage_dtype),
                "max_bytes": self.max_bytes, "audit_rows": self.audit_rows}

    def _restore(self, state: Dict[str, Any], boundary: int) -> None:
        """Take the saved rows back if there are any and they belong to this run."""
        names = [b.name for b in self.chain.blocks]
        file_rows = self.tier == "mmap" and state["fingerprint"] is not None and os.path.exists(self.path)
        if state["fingerprint"] is None or (state["rows"] is None and not file_rows):
            return  # nothing saved: rows refill as samples come back
        where = f"cache file {self.path}" if self.tier == "mmap" else "the checkpoint's cached rows"
        # a freeze between the load and the first forward (the resumed step freezes deeper): the
        # rows come back at the checkpoint's boundary and _setup then moves them on
        if state["chain"] != names or state["boundary"] > boundary:
            raise ValueError(
                f"ActivationCache: {where} cover {state['boundary']} blocks of the chain {state['chain'][:3]}..., "
                f"this run caches {boundary} blocks of {names[:3]}...: a different model or boundary. Restore "
                "the freezer's state before the first forward, or start the cache without the checkpoint's "
                "rows (delete the file / save without rows=True).")
        self.boundary = state["boundary"]
        self._act = self._recorded_activation(state["activation"], where)
        self._format_unknown = True
        self._rows_autocast = state["fingerprint"].get("autocast", "off")
        fingerprint = self._fingerprint()
        if fingerprint != state["fingerprint"]:
            key = next(k for k in fingerprint if fingerprint[k] != state["fingerprint"].get(k))
            raise ValueError(
                f"ActivationCache: {where} were made for a different {key} ({state['fingerprint'].get(key)!r}, "
                f"now {fingerprint[key]!r}): they belong to another model, boundary or prefix weights. Load "
                "the model's weights before the first forward, or delete the rows (file) to refill them.")
        with self._storage_faults("reopening the cached rows"):
            if self.tier == "mmap":
                self._store = self._reopen_checkpoint_file(state)
            else:
                self._store = self._make_store(tuple(state["row_shape"]), None)
                self._store.import_rows(state["rows"])
        if not self.enabled:
            return
        if state.get("side") is not None:
            damaged = self._sides.load(state["side"], self._act[1])
            if damaged.numel():
                self._on_bad_rows(damaged, "has damaged side inputs (mask, positions) in the checkpoint")

    def _reopen_checkpoint_file(self, state: Dict[str, Any]) -> Storage:
        """The checkpoint's mmap file. If this run went on past a deeper freeze before it
        stopped, the file (its own: same lineage) holds that boundary's rows: it is replaced,
        atomically, by an empty one for the checkpoint's boundary (rows refill). A file of
        another run is refused (``_make_store`` checks its header)."""
        row_shape = tuple(state["row_shape"])
        header = read_header(self.path)
        if state["lineage"] is not None and header.get("lineage") not in (None, state["lineage"]):
            # same model and weights, other samples (another run at the same path): never serve them
            raise ValueError(
                f"ActivationCache: the cache file {self.path} now belongs to another run (lineage "
                f"{header.get('lineage')!r}, the checkpoint's is {state['lineage']!r}): its rows were computed from "
                "that run's samples. Under DDP, load each rank's own cache state (cache.state_dict() saved per rank, "
                "not rank 0's on every rank); otherwise give each run its own path=, or delete the file to refill "
                "the rows.")
        if (header.get("fingerprint") != state["fingerprint"] and state["lineage"] is not None
                and header.get("lineage") == state["lineage"]):
            self._warn_once("moved", f"ActivationCache: the cache file {self.path} went on past the checkpoint (a "
                            "deeper freeze after it, before the run stopped); it starts again empty at the "
                            "checkpoint's boundary and refills.")
            return self._make_store(row_shape, self.path, reuse=False)  # replaces it: this run's own file
        return self._make_store(row_shape, self.path, reuse=True)

    # ------------------------------------------------------------------ forward
    def forward(self, model: nn.Module, inputs: Inputs, sample_ids) -> Any:
        if self._closed is not None:
            return model(*inputs.args, **inputs.kwargs)
        # values changed since the last forward (the loop's, or a validation pass's own), before
        # any forward path: checked against the rows at the next forward that serves them
        self._note_value_changes()
        try:
            return self._forward(model, inputs, sample_ids)
        finally:
            self._rebase_prefix_values()

    def _forward(self, model: nn.Module, inputs: Inputs, sample_ids) -> Any:
        if self.enabled and torch._C._functorch.maybe_current_level() is not None:
            # its ids and rows are batched tensors, which the cache's lookups (host reads) cannot index
            self._bypass("functorch", "a forward inside torch.func's vmap or grad runs the whole model (counted in "
                         "stats['bypassed']): the cache looks its rows up by the ids' values, which a transform "
                         "hides. Call the cached model outside the transform, or the transform on the model itself.")
            return model(*inputs.args, **inputs.kwargs)
        if self.enabled and compiled_in_place(model):
            self._disable(_COMPILED_WHOLE)  # model.compile(): its compiled graph calls neither the chain nor stand-ins
        if self.enabled and getattr(self.freezer, "_closed", False):  # its prefix is no longer held in eval: rows would be stale
            self._disable("its SmartFreezer was closed: the frozen prefix's norm and dropout layers follow "
                          "model.train() again, so rows made in eval mode no longer match it; the whole model runs")
        if self._structure_changed or self._containers.changed():
            self._rederive()
        elif self.chain is not None and model.training and torch.is_grad_enabled() and any(
                getattr(m, name, None) != on for m, name, on in self._checkpointing):  # (validation may switch it off)
            self._rederive("activation checkpointing was switched on or off in the model since the cache set up "
                           "(set_grad_checkpointing, gradient_checkpointing_enable), which changes where it can cut "
                           "(a recomputed call must not hold the cut) and which chain runs the blocks")
        elif self.enabled and self.chain is not None and self.chain.how == "torch.fx" and any(
                compiled_in_place(m) and id(m) not in self._compiled_at_setup for _, m in self._outside[1]):
            self._rederive("a block was compiled in place after the cache set up its torch.fx chain (compile_blocks, "
                           "module.compile()), and the chain runs the blocks' traced operations, never the compiled "
                           "blocks: the cache sets up again (the module swap runs compiled blocks)")
        elif self.enabled and self.chain is not None and self.chain.how == "torch.fx" and \
                self._traced_values.changed():
            # an attribute set for the first time counts: `getattr(self, "scale", 1.0)` traced the default
            moved = ", ".join(self._traced_values.changed()[:3])
            self._no_fx = (f"Python attributes the forward reads changed between steps ({moved}), which a torch.fx "
                           "trace holds as the constants it read once")
            self._rederive(f"{moved} changed since the cache traced the model with torch.fx, whose chain held the "
                           "old values as constants of its graph (for the trainable layers too): the cache sets up "
                           "again on the model's own forward (the module swap), which reads them at every step")
        elif self.boundary and any(p.requires_grad for _, p in self._unmanaged_in_prefix()):
            name = next(n for n, p in self._unmanaged_in_prefix() if p.requires_grad)
            self._rederive(f"{name}, inside the cached frozen prefix, trains now (it had requires_grad=False when "
                           "the freezer was built, so it is in no unit): cached rows would pass it no gradient, "
                           "and the cache now cuts before it")
        elif self.boundary and any(m.training for m in self._modes_kept):
            module = next(m for m in self._modes_kept if m.training)
            self._rederive(f"{type(module).__name__} {self._module_name(module)!r}, inside the cached prefix, is in "
                           "train mode now, and the freezer does not hold it in eval mode (you froze it): rows made "
                           "in eval mode could change what it computes (dropout, batch statistics, any forward that "
                           "reads self.training), so the cache now cuts before it")
        elif self.chain is not None and RemovableHandle.next_id != self._handles_seen:
            # a hook was registered somewhere since the last look (one counter read per step)
            self._handles_seen = RemovableHandle.next_id
            if self._outside[0] is not self.chain:  # the model's tree is fixed while its chain is
                self._outside = (self.chain, modules_outside(model, self.chain))
            hooked = skipped_hooks(model, self.chain, self._outside[1])
            if hooked:
                self._rederive(f"forward hooks were placed on {', '.join(hooked[:3])}, which the {self.chain.how} "
                               "blocks would not run")
            elif any(hooked_modules(block) for block in self.chain.blocks[:self.boundary]):
                self._rederive("a forward hook was placed on a module of the cached frozen prefix, which "
                               "cached rows would skip: the cache cuts before it")
        elif self._stopped_by_hooks is not None and not hooked_modules(self._stopped_by_hooks):
            # after the look at new hooks above (one placed inside the prefix as this one went)
            self._on_freeze(None, ())  # the hooks that stopped the cut were removed: as deep as the prefix again
        elif self._stopped_by_mode is not None and not self._stopped_by_mode.training and model.training:
            # the module whose train mode stopped the cut is in eval now (.eval()); not in a validation
            # pass (model.eval()), after which it trains again (review81: the cut moved back and forth)
            self._on_freeze(None, ())
        unsplittable = _unsplittable_inputs(inputs) if self.enabled else None
        if unsplittable is not None:  # crashed in the set-up's split, or said "no batch dimension" (review97)
            self._bypass(*unsplittable)
            return model(*inputs.args, **inputs.kwargs)
        if self.enabled:  # read once per forward
            inputs.batch = _batch_size(inputs, _id_count(sample_ids))
            if inputs.batch == 0 and _id_count(sample_ids) in (0, None):
                # no sample to look up, store or set up on (a collate that filtered every one out, a
                # rank's dry shard: review83)
                return model(*inputs.args, **inputs.kwargs)
        asked = captured_outputs(model, inputs.kwargs) if self.enabled else []
        if asked:  # not served, nor set up on: its outputs hold the frozen layers' own
            self._bypass("captured_outputs", f"a forward asks for {' and '.join(asked)} (in the call or as the model "
                         "config's default), which the model collects inside its layers, frozen ones included, and "
                         "cached rows skip those: such forwards run the whole model (counted in stats['bypassed']); "
                         "pass them only to forwards that need them to cache the others. Where every training "
                         "forward needs them (a Mixture-of-Experts router's auxiliary loss: output_router_logits "
                         "in the config), the cache cannot serve the model: train without it.")
            return model(*inputs.args, **inputs.kwargs)
        if self.enabled and self._statistics_reestimated():
            self._bypass("statistics", "the frozen norm layers' running statistics are being re-estimated (their "
                         "momentum is None: torch.optim.swa_utils.update_bn, Lightning's StochasticWeightAveraging), "
                         "in train mode, where a sample's output depends on its batch: such a pass runs the whole "
                         "model, neither reading nor storing rows (counted in stats['bypassed'])")
            return model(*inputs.args, **inputs.kwargs)
        if self.enabled and not self.active and (not isinstance(sample_ids, Tensor) or sample_ids.device.type == "cpu"):
            # bad ids fail now, not first at the freeze (free on the host; GPU ids would sync), and
            # before set-up, which splits the batch by them
            self._check_ids(sample_ids, inputs.batch)
        if self.enabled and not self._setup_done:
            if not self._waited_for_lazy and uninitialized_parameters(model):
                # lazy layers: this forward materialises them as it would without the cache (set-up's
                # looks would draw their weights and put torch's generator back); set up at the next
                # (once: a lazy layer training never reaches, an auxiliary head, stays unmaterialised)
                self._waited_for_lazy = True
                return model(*inputs.args, **inputs.kwargs)
            self._setup(model, inputs)
        if not self.active:
            return model(*inputs.args, **inputs.kwargs)
        if not model.training and self.freezer.num_frozen == len(self.freezer.units):
            self._bypass("all_frozen", "every unit of the model is frozen (keep_trainable=0), and the freezer holds "
                         "the whole model in eval mode: the cache serves training forwards, and with nothing left to "
                         "train it runs the whole model (counted in stats['bypassed'])")
            return model(*inputs.args, **inputs.kwargs)
        if not model.training:  # validation: its ids may name other samples than training's
            self._bypass("eval", "a forward with the model in eval mode (validation) runs the whole model, and "
                         "neither reads nor stores rows: a validation set's sample ids may name other samples than "
                         "training's (counted in stats['bypassed']). The cache tells training by the model's own mode: "
                         "to train with a backbone in eval mode (linear probing), call model.train() and then "
                         "backbone.eval(), not model.eval() and then head.train().")
            return model(*inputs.args, **inputs.kwargs)
        if not torch.is_grad_enabled():  # no training step either: a pass over other data, maybe under the same ids
            self._bypass("no_grad", "a forward under torch.no_grad() or inference_mode, with the model in train mode, "
                         "runs the whole model, and neither reads nor stores rows: it is no training step, and its "
                         "sample ids may name other samples than training's (counted in stats['bypassed']; call "
                         "model.eval() for validation).")
            return model(*inputs.args, **inputs.kwargs)
        batch = inputs.batch
        ids = self._check_ids(sample_ids, batch)
        why = self._cannot_serve(inputs, batch)
        if why is not None:
            self._bypass(why[0], f"{why[1]}: such forwards run the whole model (counted in stats['bypassed']).")
            return model(*inputs.args, **inputs.kwargs)
        if self._store is not None and not self._prefix_swapped_out():
            self._swapped_seen = None  # the prefix's own tensors are back: what was swapped in was one call's
        elif self._store is not None:
            if self._replaced_for_good():
                self._rederive("a parameter or buffer of the cached frozen prefix was replaced by another tensor "
                               "and stayed replaced (a cast such as model.half() then model.float(), or model.to(), "
                               "replaces buffers)")
            else:
                self._bypass("swapped_out", "a forward with other tensors in place of the cached prefix's parameters "
                             "or buffers (torch.func.functional_call) runs the whole model, on those tensors "
                             "(counted in stats['bypassed']); tensors that stay in place into the next training step "
                             "(a cast such as model.half() replaces buffers) set the cache up again")
            return model(*inputs.args, **inputs.kwargs)
        if not self._prefix_weights_unchanged():  # set up again at the next forward
            return model(*inputs.args, **inputs.kwargs)
        if not self._check_values(inputs, ids):
            return model(*inputs.args, **inputs.kwargs)
        h = self._prefix_output(inputs, ids)
        if h is None:  # the audit just turned the cache off
            return model(*inputs.args, **inputs.kwargs)
        if torch.is_grad_enabled() and self._rows_need_grad():
            h.requires_grad_(True)  # as Hugging Face's hook would have marked the prefix's output
        region = getattr(self.freezer, "_region", None)
        if region is not None and region.counted:
            region.start_after(self._calls_in_prefix(inputs), through_root=self.chain.how == SWAP)
        try:
            return self.chain.run(inputs, start=self.boundary, h=h)
        except CutNotReached as exc:  # raised before any module after the cut ran: nothing to undo
            self._bypass("cut_not_reached", f"{exc} (counted in stats['bypassed']; the cache stays on)")
            if region is not None:
                region.start_after({}, through_root=True)  # the whole model runs: nothing skipped
            return model(*inputs.args, **inputs.kwargs)

    def _unmanaged_in_prefix(self) -> List[Tuple[str, Tensor]]:
        """The cached blocks' parameters that are in no unit (the user froze them before the
        freezer was built, LoRA's base weights): the user may let them train again, and rows would
        then cut them off from their gradient. Per step: one flag read each (usually none)."""
        key = (id(self.chain), self.boundary)
        if self._unmanaged[0] != key:
            managed = {id(p) for unit in self.freezer.units for p in unit.parameters}
            names = {id(p): n for n, p in self.freezer.module.named_parameters()}
            self._unmanaged = (key, [(names.get(id(p), "?"), p) for b in self.chain.blocks[:self.boundary]
                                     for p in b.parameters() if id(p) not in managed])
        return self._unmanaged[1]

    def _statistics_reestimated(self) -> bool:
        """A pass that re-estimates the frozen norms' statistics (update_bn sets every norm's
        momentum to None first, and the freezer lets frozen ones run in train mode for it): the
        per-sample checks took their batch statistics for samples that mix and cut before each
        block in turn, and the cut stayed there (review79: 7 warnings, 1 of 8 blocks cached after).
        Per step: one attribute read per frozen norm layer."""
        region = getattr(self.freezer, "_region", None)
        key = (self.freezer.num_frozen, id(region))
        if self._frozen_norms[0] != key:
            held = getattr(region, "always", ()) or ()
            self._frozen_norms = (key, [m for m in held if isinstance(getattr(m, "running_mean", None), Tensor)])
        # momentum=None alone is an ordinary setting (a cumulative average: review81, nothing cached):
        # the freezer's own test also asks for statistics reset since the freeze
        return any(getattr(m, "momentum", 0.1) is None and reestimating_statistics(m) for m in self._frozen_norms[1])

    def _rows_need_grad(self) -> bool:
        """``split.rows_need_grad`` of the cached blocks, looked at again only when the cut
        moved or a hook was placed somewhere."""
        key = (id(self.chain), self.boundary, RemovableHandle.next_id)
        if self._rows_grad[0] != key:
            self._rows_grad = (key, rows_need_grad(self.chain.blocks[:self.boundary]))
        return self._rows_grad[1]

    def _cannot_serve(self, inputs: Inputs, batch: int) -> Optional[Tuple[str, str]]:
        """(kind, why) when cached rows cannot stand in for this forward's frozen prefix."""
        other = self._other_input_shape(inputs)
        if other is not None:
            return "shape", other
        if _user_global_hooks():
            return "global_hooks", ("a global forward hook (torch.nn.modules.module.register_module_forward_hook or "
                                    "_pre_hook) is registered, which runs at every module's call, the frozen "
                                    "prefix's too, and cached rows skip those calls; remove it to cache")
        if _python_rows((inputs.args, inputs.kwargs), batch):
            return "python_rows", ("the inputs hold a Python list of one value or tensor per sample (sequence "
                                   "lengths? images of different sizes?), which the cache cannot split into the "
                                   "samples it computes and those it serves; pass such values as one tensor (images "
                                   "of one size stacked) to cache")
        leaves = tree_flatten((inputs.args, inputs.kwargs))[0]
        opaque = _opaque_input(leaves)
        if opaque is not None:
            return opaque
        if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in leaves):
            return "input_grad", ("an input requires grad, and a cached row passes no gradient back to the input "
                                  "(the frozen prefix computed afresh does)")
        mode = self._autocast_now()
        if self._rows_autocast is None:
            self._rows_autocast = mode
        elif mode != self._rows_autocast:  # another precision: not what this prefix computes, maybe another dtype
            return "autocast", (f"a forward with autocast {mode}, while the cached rows were computed with autocast "
                                f"{self._rows_autocast}; the cache serves forwards in its rows' precision")
        return None

    def _setup(self, model: nn.Module, inputs: Inputs) -> None:
        self._setup_done = True
        if hasattr(model, "_orig_mod"):  # torch.compile(model): an OptimizedModule
            self._disable(_COMPILED_WHOLE)
            return
        # built without example inputs, the freezer sets up at the first forward: now, and not inside
        # the recording of the model's calls below (which then found no module called once)
        self.freezer.set_up_before_first_forward(tuple(inputs.args), dict(inputs.kwargs))
        chain, how = find_blocks(model, inputs, self.user_blocks, [u.parameters for u in self.freezer.units],
                                 no_fx=self._no_fx)
        if chain is None:
            self._disable(f"no block boundary to cut at: {how}")
            return
        self.chain = chain
        self._watch_structure(model)
        self._checkpointing = checkpointing_switches(model)
        self._writers = self._python_writers(model, inputs)
        if chain.how == "torch.fx":  # it calls only leaf modules: the code of the others runs traced
            self._outside = (chain, modules_outside(model, chain))
            self._compiled_at_setup = {id(m) for _, m in self._outside[1] if compiled_in_place(m)}
            self._traced_values = PythonAttributes(self._outside[1])
        if self._resume is not None and state_chain_matches(self._resume, chain):
            self._mixing_cut = self._resume.get("mixing_cut")  # found by the interrupted run: cut before it
        boundary = self._frozen_blocks()
        if self._resume is not None:
            state, self._resume = self._resume, None
            self._restore(state, boundary)
        self._advance(boundary)

    def _python_writers(self, model: nn.Module, inputs: Inputs) -> Dict[int, str]:
        """``{id(module): "its attribute"}`` of the modules whose forward writes Python state or a
        tensor onto itself (``self.feat = h`` that the loss reads, a count): a cached row would
        leave it as of another batch, so no cut goes past them. Look-only forwards, in the model's
        mode, at set-up: the first on the batch (what a first call sets once: a memo, ActNorm's
        flag), then batches of the same size made of one sample repeated, sample 0's then sample
        1's: what differs from the first look's state is written at every call (a value computed
        from the batch: `x.mean().item()`, a max; of the same size, so that a memo rebuilt per
        batch size, an RNN's zero initial state, is no write)."""
        n = inputs.batch or 0
        others = [_index_inputs(inputs, torch.full((n,), i, dtype=torch.long), n) for i in range(2) if i < n]
        with preserved_state(model), torch.no_grad():
            model(*inputs.args, **inputs.kwargs)
            attributes = PythonAttributes([(name or type(model).__name__, m) for name, m in model.named_modules()])
            writers: Dict[int, str] = {}
            for other in others or [inputs]:
                look = other
                try:
                    model(*other.args, **other.kwargs)
                except Exception:  # noqa: BLE001 -- a model that refuses repeated samples: the batch again
                    attributes.restore()
                    look = inputs
                    model(*inputs.args, **inputs.kwargs)
                written_by = None
                shared = attributes.shared_written()
                if shared:  # an object several modules hold changed: the same look again, telling which wrote it
                    attributes.restore()
                    with SharedWrites(model, shared, attributes.holders) as seen:
                        model(*look.args, **look.kwargs)
                    written_by = seen.written_by
                for module, attribute in attributes.writers(written_by).items():
                    writers.setdefault(module, attribute)
            return writers

    def _watch_structure(self, model: nn.Module) -> None:
        """Notice a module, parameter or buffer registered in the model after set-up (a block
        appended to an nn.Sequential, a parameter added to or replaced in a cached block), or a
        container's children edited without registration (insert, pop, del): the block chain no
        longer matches the model, so the cache re-derives it at the next forward. torch's global
        registration hooks cost nothing per step; the containers, one pass over their children per forward."""
        from torch.nn.modules import module as module_lib

        remove_handles(self._structure_hooks)
        self._containers = ContainerChildren(model)
        watched = {id(m) for m in model.modules()}
        me = weakref.ref(self)

        def changed(module, name, value):
            cache = me()
            if cache is None or id(module) not in watched:
                return
            held = (module._parameters.get(name), module._buffers.get(name), module._modules.get(name))
            if value is not None and any(value is h for h in held):
                return  # the same object set again: `self.count += 1` on a buffer, in the model's forward
            cache._structure_changed = True
        self._structure_hooks += [module_lib.register_module_module_registration_hook(changed),
                                  module_lib.register_module_parameter_registration_hook(changed),
                                  module_lib.register_module_buffer_registration_hook(changed)]

    def _rederive(self, why: str = "the model's modules or parameters changed since the cache was set up") -> None:
        """Drop the chain and every cached row (computed by the old structure); the next
        forward finds the chain of the model as it is now."""
        self._forget_chain()
        if self.enabled:
            warnings.warn(f"ActivationCache: {why}; its cached rows are dropped and its blocks found again",
                          stacklevel=4)

    def _forget_chain(self) -> None:
        """No chain and no rows: the next forward sets the cache up again."""
        self._structure_changed, self._containers = False, ContainerChildren()
        self._free_rows_and_hooks()
        self.chain, self.boundary, self._act, self._input_sig = None, 0, None, None
        # keyed by id(chain), which the next chain may reuse once this one is freed
        self._leaf_reads, self._prefix_calls = (None, None), (None, {})
        self._stopped_by_hooks = self._stopped_by_mode = None
        self._rows_autocast = None
        self._per_sample_checked = set()
        self._mixing_cut = None
        self._setup_done = False

    def _free_rows_and_hooks(self) -> None:
        """The rows (an mmap file stays on disk), their side inputs, the module swap's guard hooks
        and torch's global registration hooks."""
        if self._store is not None:
            self._store.close()
            self._store = None
        self._prefix_state, self._prefix_slots = (None, [], [], []), []  # hold the store and the prefix's tensors
        self._prefix_values = (None, [], PythonAttributes())
        self._sides = SideInputs(self.num_samples)
        if hasattr(self.chain, "release"):
            self.chain.release()
        remove_handles(self._structure_hooks)

    def __deepcopy__(self, memo) -> "ActivationCache":
        """A copy (of a wrapped model, of a whole run) finds its blocks again and refills its rows
        at its first forward: the chain's functions call the modules of the model it was found
        on, not the copy's, and the rows' storage and the global hooks are this cache's own."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        mine = ("chain", "_store", "_structure_hooks", "_prefix_state", "_prefix_slots", "_swapped_seen", "_containers",
                "_leaf_reads", "_prefix_calls", "_prefix_values", "_outside_called")  # looks at this chain (a TreeSpec's deepcopy warns): done again
        new.__dict__.update(copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in mine}, memo))
        new.chain, new._store, new._structure_hooks, new._containers = None, None, [], ContainerChildren()
        new._prefix_state, new._prefix_slots, new._swapped_seen = (None, [], [], []), [], None
        new._prefix_values, new._outside_called = (None, [], PythonAttributes()), {}
        weakref.finalize(new, remove_handles, new._structure_hooks)
        if self.tier == "mmap":  # a file of its own beside the original's, never the original's
            new._lineage = uuid.uuid4().hex
            root, ext = os.path.splitext(self.path)
            new.path, new.reuse = f"{root}.copy-{new._lineage[:8]}{ext}", False
            _MMAP_CACHES.add(new)
        new._forget_chain()
        return new

    def _prefix_output(self, inputs: Inputs, ids: Tensor) -> Optional[Tensor]:
        if not self._rows_per_sample(inputs, ids.numel()):
            return None
        store = self._store
        slots = store.lookup(ids) if store is not None else torch.full_like(ids, -1)
        leaves, spec = tree_flatten((inputs.args, inputs.kwargs))  # once per step, for both uses
        in_sums = _input_sums(leaves, ids.numel(), self._read_leaves(inputs, spec, ids.numel()))
        changed, old_rows = ids.new_empty(0), None
        if store is not None:
            slots, changed, old_rows = self._forget_changed_inputs(ids, slots, in_sums)
        hit = (slots >= 0).nonzero().flatten()
        miss = (slots < 0).nonzero().flatten()
        side = self._side_inputs(inputs, ids.numel())
        parts = []
        if miss.numel():
            missed = _index_inputs(inputs, miss, ids.numel())
            fresh = self._compute_prefix(missed)
            if fresh is None:
                return None
            if store is not None and tuple(fresh.shape[1:]) != store.row_shape:  # the batch's inputs have its shape
                self._cut_before_mixing(_shape_follows_batch(tuple(fresh.shape[1:]), store.row_shape))
                return None
            parts.append((miss, fresh))
            self._store_rows(ids[miss], fresh, {n: v[miss.to(v.device)] for n, v in side.items()},
                             in_sums[miss.to(in_sums.device)])
            if not self.enabled:  # a storage fault turned the cache off
                return None
            if changed.numel() and not self._count_changed_rows(ids, changed, miss, fresh, old_rows):
                return None
        if hit.numel() and self._format_unknown:  # after a resume: one sample's prefix shows the rows' layout
            if self._compute_prefix(_index_inputs(inputs, hit[:1], ids.numel())) is None:
                return None
        if hit.numel():
            self._sides.compare(ids[hit], {n: v[hit.to(v.device)] for n, v in side.items()})
            loaded = self._store.read(slots[hit], *self._act).contiguous(memory_format=self._act_format)
            if not self._audit(inputs, ids, hit, loaded, parts[0] if parts else None):
                return None
            parts.append((hit, loaded))
        self.stats["hits"] += hit.numel()
        self.stats["misses"] += miss.numel()
        if self._ids_seen is None or self._ids_seen.device != ids.device:
            self._ids_seen = torch.zeros(self.num_samples, dtype=torch.bool, device=ids.device)
        self._ids_seen[ids] = True
        self._seen += ids.numel()
        if self._seen >= self.num_samples:  # a new epoch: a new audit budget
            self._seen -= self.num_samples
            self._audit_left = self.audit_rows
            self._changed = [self._changed[1], 0]
        if len(parts) == 1:
            return parts[0][1]
        first = parts[0][1]
        if first.dtype != parts[1][1].dtype:  # never expected: the weights' dtypes are watched
            self._disable(f"the frozen prefix gave {first.dtype} for new samples, and its cached rows are "
                          f"{parts[1][1].dtype}; the whole model runs")
            return None
        out = torch.empty((ids.numel(), *first.shape[1:]), dtype=first.dtype, device=first.device,
                          memory_format=self._act_format)
        for index, values in parts:
            out[index.to(out.device)] = values
        return out

    def _rows_per_sample(self, inputs: Inputs, n: int) -> bool:
        """Whether each sample's row depends on that sample's inputs alone, as computing only the
        missed samples of a batch assumes. Checked once per cut and batch size (the last batch of
        an epoch is smaller), on batches of two or more: each part of ``_separating_parts`` (every
        two samples lie apart in one) computed alone must give its samples' rows of the whole
        batch. A prefix that mixes some samples of a batch (message passing over the batch's
        nodes, attention within a group), whose output's shape follows the batch, or an input the
        batch shares whose length happens to be the batch size (a [T, D] table with T == batch
        size) fails it: the cache cuts before it (False), saying so."""
        key = (self.boundary, n)
        if n < 2 or key in self._per_sample_checked:
            return True
        return self._rows_per_sample_look(inputs, n, key)

    @_restoring_rngs
    def _rows_per_sample_look(self, inputs: Inputs, n: int, key: Tuple[int, int]) -> bool:
        with preserved_state(self.freezer.module, rngs=False):  # a look (random ops must still show)
            whole = self._compute_prefix(inputs)
        if whole is None:
            return False
        for part in _separating_parts(n):
            try:
                with preserved_state(self.freezer.module, rngs=False), _probe_errors_unprinted():
                    rows = self._run_prefix(_index_inputs(inputs, part, n))
            except CutNotReached:
                continue  # the part takes another path (an early exit): a batch that does runs whole
            except Exception as exc:  # noqa: BLE001 -- the model refused part of the batch: the answer is no
                rows, failure = None, f" (on part of the batch the model fails: {type(exc).__name__}: {exc})"
            else:
                failure = "" if isinstance(rows, Tensor) else f" (on part of the batch it gave {type(rows).__name__})"
                rows = rows if isinstance(rows, Tensor) else None
            if rows is not None and rows.shape[1:] != whole.shape[1:]:
                self._cut_before_mixing(_shape_follows_batch(tuple(rows.shape[1:]), tuple(whole.shape[1:]),
                                                             (part.numel(), n)))
                return False
            if rows is None or rows.shape != (part.numel(), *whole.shape[1:]) or not bool(
                    self._rows_agree(whole[part.to(whole.device)], rows, nan_equal=True).all()):
                with preserved_state(self.freezer.module, rngs=False):  # a draw of p=0.5 may agree by chance
                    again = [self._compute_prefix(inputs) for _ in range(3)]
                if any(a is not None and not bool(self._rows_agree(whole, a, nan_equal=True).all()) for a in again):
                    # the whole batch again: a draw, not a mix (torchvision's v2 transforms draw in eval too)
                    self._cut_before_mixing(
                        "the frozen prefix's output is drawn at random even in eval mode: the same batch gave other "
                        "rows when computed again (a module that draws with torch.rand whatever its mode, as "
                        "torchvision's v2 transforms do). Move random augmentation out of the model, into the data "
                        "pipeline, to cache the layers after it")
                    return False
                self._cut_before_mixing(
                    "a sample's frozen-prefix output depends on the other samples of its batch: computed for part "
                    f"of a batch, samples got other rows than with the whole batch{failure}. A prefix that mixes "
                    "samples (attention across the batch or within a group, message passing over the batch's "
                    "nodes, x - x.mean(0)) or whose output holds no row per sample in dimension 0 (an RNN's final "
                    "state [layers, B, H]) cannot be cached by sample. An input that the whole batch shares and "
                    "whose first dimension happens to be the batch size (a [T, D] table with T == batch size) is "
                    "taken for one value per sample and split; pass it with another first dimension "
                    "(unsqueeze(0), or as a module buffer)")
                return False
        self._per_sample_checked.add(key)
        return True

    def _cut_before_mixing(self, why: str) -> None:
        """The cut at ``boundary`` failed the per-sample check: its rows go, and the cache cuts
        before it from now on (a shallower cut that passes keeps its savings; a deeper freeze had
        turned the whole cache off)."""
        bad = self.boundary
        self._mixing_cut = bad if self._mixing_cut is None else min(self._mixing_cut, bad)
        self._drop_rows()
        self.boundary = self._frozen_blocks()
        if self.boundary == 0:  # no cut before it: nothing this cache can do
            self._disable(why)
            return
        warnings.warn(f"ActivationCache cuts before block {self.chain.blocks[bad - 1].name!r} (caching "
                      f"{self.boundary} of {len(self.chain.blocks)} blocks): {why}", stacklevel=5)

    def _forget_changed_inputs(self, ids: Tensor, slots: Tensor,
                               in_sums: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """``slots`` without the rows whose sample came with another input than the row was
        computed from (a dataset edited in place or swapped for another under the same ids, an
        augmentation of some samples, or only an input the prefix does not read, such as labels
        passed to the model): such rows are forgotten, so the sample is computed and stored
        anew, never served stale. Also returns those positions and their old rows, which
        ``_count_changed_rows`` compares with the new ones. One host read per step with hits."""
        none = ids.new_empty(0)
        cached = (slots >= 0).nonzero().flatten()
        if not cached.numel():
            return slots, none, None
        store = self._store
        stored = store.in_sums[slots[cached].to(store.in_sums.device)]
        now = in_sums[cached.to(in_sums.device)].to(stored.device)
        changed = ((stored != 0) & (stored != now)).cpu()  # 0: a row whose input is not known
        if not bool(changed.any()):
            return slots, none, None
        which = cached[changed]
        old = store.read(slots[which], *self._act)
        store.forget(ids[which], slots[which])
        slots = slots.clone()
        # every position of a forgotten id misses, also one that came with the row's own input
        # (one id twice in a batch): its slot is free now, and the new rows may take it
        slots[torch.isin(ids, ids[which])] = -1
        return slots, which, old

    def _count_changed_rows(self, ids: Tensor, which: Tensor, miss: Tensor, fresh: Tensor, old: Tensor) -> bool:
        """Count the samples of ``which`` (forgotten for another input, now among ``miss`` and
        recomputed in ``fresh``) whose row really changed: an input the prefix does not read
        (labels, weights) changes nothing. More than half of the rows the cache holds changing in
        two epochs in a row means the inputs change all the time (random augmentation, ids not per
        sample): the cache turns off (False). A dataset swapped now and then (a curriculum)
        changes them in one epoch and keeps them the next."""
        rows = fresh[torch.searchsorted(miss, which).to(fresh.device)]
        moved = ~self._rows_agree(old, rows)
        real = int(moved.sum())
        if not real:
            return True
        self.stats["input_changed"] += real
        self._changed[1] += real
        held = min(self.num_samples, self._store.capacity) if self._store is not None else self.num_samples
        if min(self._changed) > held // 2:  # rows that can change: no more than the cache holds
            self._audit_failed(f"in two epochs in a row, more than half of the {held} samples the cache holds came "
                               f"back with other inputs than their rows were cached from ({self._changed[0]}, "
                               f"then {self._changed[1]} so far)",
                               "The inputs change from epoch to epoch (random augmentation?), or one sample id is "
                               "given to several samples. It stays off for the rest of the run: inputs that change "
                               "only for a while (a warm-up ramp of the inputs, progressive resizing) can be cached "
                               "by an ActivationCache made once that part is over")
            return False
        sample = int(ids[which[moved.nonzero()[0, 0].to(which.device)]])
        self._warn_once("input_changed", f"ActivationCache: sample id {sample} came with another input than its "
                        "cached row was computed from (the dataset was edited or swapped under the same ids, some "
                        "samples are augmented, a value the same for the whole batch changed, or one id is given "
                        "to two samples: ids must be unique per sample, "
                        "as IndexedDataset over the whole dataset gives): such rows are computed again and replaced, "
                        "never served (counted in stats['input_changed']; more than half of the cached rows in two "
                        "epochs in a row turns the cache off).")
        return True

    def _row_tolerance(self) -> float:
        """How far a cached row may be from a recomputed one, relative to the row's largest
        magnitude: storage rounding, or the activation's own precision if looser."""
        computed_in = self._act[0]
        if torch.is_autocast_enabled(self._act[1].type):  # mixed precision: rounding depends on the batch
            computed_in = torch.get_autocast_dtype(self._act[1].type)
        return max(STORAGE_TOLERANCE[self.storage_dtype], ACTIVATION_TOLERANCE.get(computed_in, 1e-4))

    def _rows_agree(self, cached: Tensor, fresh: Tensor, nan_equal: bool = False) -> Tensor:
        """Per row: a cached row matches a recomputed one (NaN never matches; with ``nan_equal``,
        for two recomputes, a NaN or inf in the same place in both does)."""
        cached, fresh = cached.float().flatten(1), fresh.float().flatten(1).to(cached.device)
        diff, scale = (cached - fresh).abs(), fresh.abs()
        if nan_equal:
            diff = torch.where((cached == fresh) | (cached.isnan() & fresh.isnan()), 0.0, diff)
            scale = scale.nan_to_num(0.0, 0.0, 0.0)
        return diff.amax(1) <= self._row_tolerance() * scale.amax(1) + 1e-6

    def _note_prefix_weights(self, store: Storage) -> None:
        """Remember the cached prefix's parameters and buffers as a new store's rows are made
        from them: their version counters (torch bumps one at every in-place write) and their
        checksums (one pass over them, at a freeze)."""
        seen, tensors = set(), []
        for block in self.chain.blocks[:self.boundary]:
            for t in list(block.parameters()) + block.buffers():
                if id(t) not in seen:
                    seen.add(id(t))
                    tensors.append(t)
        self._prefix_state = (store, tensors, [_pinned_state(t) for t in tensors], [tensor_sum(t) for t in tensors])
        ids = {id(t) for t in tensors}
        self._prefix_slots = [(slots, name, t) for m in self.freezer.module.modules()
                              for slots in (m._parameters, m._buffers) for name, t in slots.items() if id(t) in ids]
        self._swapped_seen = None
        self._values_noted, self._fresh_slots = None, None  # a new store's rows: made with the values now
        self._watch_prefix_values(store)

    def _watch_prefix_values(self, store: Storage) -> None:
        """Note the Python values ``store``'s rows are made with (see _check_values): those of
        the cached blocks' modules, of the modules outside the model they were seen calling (one
        kept without registering it, which every block calls), and of the modules whose forward
        runs up to the cut and goes on after it (the module swap's root and blocks around the
        cut: a value they read only after the cut is let be at its first change)."""
        model = self.freezer.module
        found = {id(m): m for block in self.chain.blocks[:self.boundary] for m in block_modules(block)}
        found.update(self._outside_called)
        if self.chain.how == SWAP and self.boundary:
            found.update((id(m), m) for b in self.chain.blocks[:self.boundary] for m in b.enters)
            found.setdefault(id(model), model)
        names = {id(m): name or type(model).__name__ for name, m in model.named_modules()}
        modules = [(names.get(key, f"<{type(m).__name__} outside the model>"), m) for key, m in found.items()]
        self._prefix_values = (store, modules, PythonAttributes(modules))

    def _note_value_changes(self) -> None:
        """A watched value that differs from those the rows were made with (see _check_values),
        or, with a change noted already, from the values then (a second step of a schedule, a
        value set back): the rows made before now wait for their check, and those made from now
        on are made with the values now."""
        store, modules, values = self._prefix_values
        if store is None or store is not self._store:
            return
        since = values if self._values_noted is None else self._values_noted
        if _changed(since):
            self._values_noted = PythonAttributes(modules)
            self._fresh_slots = torch.zeros(store.capacity, dtype=torch.bool)

    def _check_values(self, inputs: Inputs, ids: Tensor) -> bool:
        """Where watched Python values changed since the rows were made (a temperature or scale
        the loop anneals: rows made with the old value were served, review89), recompute up to
        VALUE_CHECK_ROWS of this batch's cached rows made before the change: if they differ,
        every row is dropped (and made again with the values now); if they agree (a memo that
        ``train()`` empties, a flag or an epoch number the prefix does not read: review93 found
        dropping at every change turned the cache off on such models), the values now are those
        of the rows, and the next change is checked again. A batch with no such row serves only
        rows made since, and waits. A change that alters only rows the check does not recompute
        passes it (review96; the audit is the net). Values that change the rows again before any
        row was served turn the cache off (it could only make rows and drop them): False then."""
        if self._values_noted is None or self._store is None:
            return True
        store, _, values = self._prefix_values
        slots = store.lookup(ids)
        old = (slots >= 0) & ~self._fresh_slots[slots.clamp(min=0).cpu()].to(slots.device)
        hit = old.nonzero().flatten()[:VALUE_CHECK_ROWS]
        if not hit.numel():
            return True
        return self._check_values_look(inputs, ids, store, values, slots, hit)

    @_restoring_rngs
    def _check_values_look(self, inputs: Inputs, ids: Tensor, store: Storage, values: PythonAttributes,
                           slots: Tensor, hit: Tensor) -> bool:
        with preserved_state(self.freezer.module, rngs=False):  # a look, as the audit's
            fresh = self._compute_prefix(_index_inputs(inputs, hit, ids.numel()))
        if not self.enabled:
            return False
        self._values_noted = self._fresh_slots = None
        if fresh is not None and tuple(fresh.shape[1:]) == tuple(store.row_shape) and bool(
                self._rows_agree(store.read(slots[hit], *self._act), fresh).all()):
            self._watch_prefix_values(store)  # the values now: the rows' own
            return True
        changed = sorted({f"{name}.{key}" for name, key in values.changed_values() if key not in OUTPUT_SWITCHES})
        what = ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else "") or "a value set back since"
        self.stats["values_changed"] += 1
        self._drop_rows()
        if self._hits_at_values_drop == self.stats["hits"]:
            self._disable(f"{what}, of modules whose forward the cached rows hold, changed what the frozen prefix "
                          "computes again before any cached row was read (counted in stats['values_changed']): rows "
                          "made with one value cannot serve another, so the cache could only make rows and drop "
                          "them; the whole model runs")
            return False
        self._hits_at_values_drop = self.stats["hits"]
        self._warn_once("values_changed", f"ActivationCache: {what}, of modules whose forward the cached rows hold, "
                        "changed since the rows were computed (a value the loop anneals or sets), and the frozen "
                        "prefix computes other rows now: every cached row is dropped and computed again with the "
                        "values now (counted in stats['values_changed']; each such change costs the rows once).")
        return True

    def _rebase_prefix_values(self) -> None:
        """After a forward, the values its own code set (a memo it fills, a shape it notes; a
        forward whose writes change its output stops the cut at set-up) are the values now: of
        the rows, or, with a change waiting for its check, of the change. Modules outside the
        model it was first seen calling are watched from now on."""
        store, modules, values = self._prefix_values
        if store is None or store is not self._store:
            return
        if self._values_noted is not None:
            if _changed(self._values_noted):
                self._values_noted = PythonAttributes(modules)
            return
        watched = {id(m) for _, m in modules}
        if any(key not in watched for key in self._outside_called) or _changed(values):
            self._watch_prefix_values(store)

    def _prefix_swapped_out(self) -> bool:
        """A tensor of the cached prefix is not where the rows were made from: a forward under
        ``torch.func.functional_call`` with other weights (a perturbed copy, MAML's fast weights)
        puts its own in the modules for the call, which cached rows would not see."""
        return any(slots.get(name) is not t for slots, name, t in self._prefix_slots)

    def _replaced_for_good(self) -> bool:
        """Whether the tensors now in the prefix's slots were found there by a swapped-out forward
        of an earlier training step, with no forward on the prefix's own tensors since: a
        replacement that stays (``model.half()`` sets new buffers, not ``.data``), not
        ``functional_call``'s (fast weights are new tensors each step; an EMA's or a target
        network's dict is in place only for its calls: an evaluation's calls fall within one step,
        and the model's own forwards come between a target network's). Weak references: a dead
        tensor's id may come back as the next step's."""
        now = [slots.get(name) for slots, name, _ in self._prefix_slots]
        step, seen = self._swapped_seen or (None, [])
        if len(seen) == len(now) and all((r is None and t is None) or (r is not None and r() is t)
                                         for r, t in zip(seen, now)):
            return step < self.freezer.step_count
        self._swapped_seen = (self.freezer.step_count, [None if t is None else weakref.ref(t) for t in now])
        return False

    def check_prefix_weights(self) -> bool:
        """Compare every tensor of the cached prefix with its checksum now, not only those whose
        version counter moved: a write through ``.data`` moves none (Lightning's weight-averaging
        callbacks copy the averages in so at the end of fit(); a second fit trained on stale rows,
        review79). Rows made from other values are dropped (False). One pass over the prefix's
        weights: call it where such a write may have happened (the Lightning callback does, as a
        second fit starts)."""
        return self._prefix_weights_unchanged(every_tensor=True)

    def _prefix_weights_unchanged(self, every_tensor: bool = False) -> bool:
        """Drop every cached row if a parameter or buffer of the cached prefix was written in
        place since the rows were made (``model.load_state_dict`` mid-run, weights copied in for
        an evaluation, a user's ``copy_``): rows computed from the old values would be served.
        A changed buffer sets the cache up again (returns False): it can change what the prefix
        computes, which the set-up checked (a quantization observer turned back on writes its
        statistics at every call, eval mode or not, and its fused op without a version bump).
        Per step: one version read per tensor; a written tensor costs one checksum (a write that
        leaves the values as they were, as DDP's buffer broadcast, drops nothing)."""
        store, tensors, versions, sums = self._prefix_state
        if store is None or store is not self._store:
            return True
        written = [i for i, t in enumerate(tensors) if every_tensor or _written_state(t) != versions[i][:3]]
        if not written:
            return True
        # a cast (model.bfloat16() sets .data: no version bump) changed the values' precision; cast
        # back (model.half().float()), only the storage moved: the checksum tells
        changed = [i for i in written if tensors[i].dtype != versions[i][1]]
        written = [i for i in written if i not in changed]
        for i in written:
            versions[i] = _pinned_state(tensors[i])
        if written:
            now = [tensor_sum(tensors[i]) for i in written]
            device = now[0].device
            moved = (torch.stack([x.to(device) for x in now]) != torch.stack([sums[i].to(device) for i in written]))
            changed += [i for i, m in zip(written, moved.tolist()) if m]  # one host read for all of them
        if not changed:
            return True
        module = self.freezer.module
        names = {id(t): n for n, t in [*module.named_parameters(), *module.named_buffers()]}
        what = ", ".join(names.get(id(tensors[i]), "?") for i in changed[:3]) + (" ..." if len(changed) > 3 else "")
        self.stats["weights_changed"] += 1
        unread = self.stats["hits"] == self._hits_at_store
        self._drop_rows()
        if not unread or not self._unread_writes:
            self._unread_writes_from = self.stats["misses"]
        self._unread_writes = self._unread_writes + 1 if unread else 0
        # off once such writes went on for a whole pass over the samples this cache sees (a subset,
        # a DDP rank's share: review108): a burst that stops within one (an Embedding's max_norm
        # renormalising each row at its first look-up after the freeze, review106) leaves the rows
        # made after it to serve the next pass
        if (self._unread_writes >= UNREAD_DROPS_OFF
                and self.stats["misses"] - self._unread_writes_from >= self._samples_in_a_pass()):
            self._disable(f"{what} of the cached frozen prefix changed in place {self._unread_writes} times in a row, "
                          "over a whole pass over the samples, before any cached row was read (each time every row "
                          "was dropped): a tensor written at every step, such as an EMA or momentum update of a "
                          "target network, cannot be cached over. Call such a network after the networks that "
                          "train, or give the freezer and the cache a model without it")
            return False
        buffers = {id(b) for b in module.buffers()}
        if any(id(tensors[i]) in buffers for i in changed):
            self._rederive(f"{what} of the cached frozen prefix changed in place since its rows were computed "
                           "(model.load_state_dict, a copy_, a flag such as a quantization observer's turned on; "
                           "counted in stats['weights_changed']): a buffer can change what the prefix computes, so "
                           "the cache checks it again")
            return False
        warnings.warn(f"ActivationCache: {what} of the cached frozen prefix changed in place since its rows were "
                      "computed (model.load_state_dict, weights copied in, a copy_, a cast such as "
                      "model.bfloat16()): every cached row is dropped "
                      "and computed again from the values now (counted in stats['weights_changed']).", stacklevel=4)
        return True

    def _samples_in_a_pass(self) -> int:
        """The distinct sample ids this cache has seen (one host read), at least 1."""
        return max(1, int(self._ids_seen.sum())) if self._ids_seen is not None else self.num_samples

    def _drop_rows(self) -> None:
        """Every cached row goes (the store and an mmap file of this run's own, with the side
        inputs and the prefix's tensors noted with them); the boundary stays, and rows refill."""
        store, self._store = self._store, None
        if store is not None:
            with self._storage_faults("dropping the cached rows"):
                self._discard_store(store)  # an mmap file too: with reuse=True it would be reopened
        self._sides = SideInputs(self.num_samples)
        self._prefix_state, self._prefix_slots = (None, [], [], []), []
        self._prefix_values, self._values_noted, self._fresh_slots = (None, [], PythonAttributes()), None, None

    def _discard_store(self, store: Storage) -> None:
        """Close a store whose rows no longer hold, and remove its mmap file (this run's own):
        with reuse=True it would otherwise be reopened."""
        path = getattr(store, "path", None)
        store.close()
        if path is not None and os.path.exists(path) and self._owns(path):
            os.unlink(path)

    def _read_leaves(self, inputs: Inputs, spec: Any, batch: int) -> Optional[List[bool]]:
        """Per input leaf (``tree_flatten`` order): whether the cached prefix, or the chain's
        blocks before its last, read it, so that the input checksum leaves out what they do not
        (labels passed to the model, per-sample loss weights: pseudo-labels renewed every epoch
        made every row a miss). Looked at once per chain, input structure and cut, on a few
        samples of this batch: each per-sample leaf rolled by one sample in turn, the outputs at
        the cut and before the last block compared; a leaf found read stays read. None: all
        count (fewer than two samples, a probe that failed, or no leaf found read). A leaf read
        in a way those samples do not show is left out, and its changes are then caught only by
        the audit, as before the checksum."""
        key = (id(self.chain), spec, self.boundary)  # a TreeSpec compares by structure
        if self._leaf_reads[0] == key:
            return self._leaf_reads[1]
        before = self._leaf_reads[1] if self._leaf_reads[0] is not None and self._leaf_reads[0][:2] == key[:2] else None
        reads = None
        n = min(batch, 4)
        if n >= 1:  # one sample tells about the batch-wide inputs (batch 1: HF's num_items_in_batch)
            sample = _index_inputs(inputs, torch.arange(n), batch)
            leaves, sample_spec = tree_flatten((sample.args, sample.kwargs))
            stops = sorted({self.boundary, len(self.chain.blocks) - 1} - {0})
            consts = dict(getattr(self.chain, "consts", {}))  # the swap chain records what it computes
            try:
                with preserved_state(self.freezer.module), self._eval_mode(0, stops[-1]), torch.no_grad(), \
                        _probe_errors_unprinted():
                    base = [self.chain.run(sample, 0, stop) for stop in stops]
                    reads = []
                    for i, leaf in enumerate(leaves):
                        if _per_sample(leaf, n):
                            others = [leaf.roll(1, 0)]
                        else:  # the same for the whole batch (HF's num_items_in_batch, a noise level)
                            others = _nudges(leaf)
                        if not others or (_per_sample(leaf, n) and torch.equal(others[0], leaf)):
                            reads.append(True)  # cannot tell (all samples alike, a flag)
                            continue
                        reads.append(any(self._reads_leaf(leaves, i, other, sample_spec, stops, base)
                                         for other in others))
            except Exception:  # noqa: BLE001 -- a probe the model cannot run: every leaf counts
                reads = None
            finally:
                if hasattr(self.chain, "consts"):
                    self.chain.consts = consts
            if reads is not None and before is not None:
                reads = [a or b for a, b in zip(reads, before)]  # read at a shallower cut: still read
            if reads is not None and not any(reads):
                reads = None  # nothing found read: the probe tells nothing
        self._leaf_reads = (key, reads)
        return reads

    def _calls_in_prefix(self, inputs: Inputs) -> Dict[int, int]:
        """The calls the cached blocks make of each module the freezer numbers per forward (a
        dropout shared by the frozen prefix and the trainable layers): a cached forward skips
        them, and the trainable layers' calls are numbered after them. Counted once per chain
        and cut, on one sample of the step's inputs (none: a probe the model cannot run)."""
        key = (id(self.chain), self.boundary)
        if self._prefix_calls[0] != key:
            counts: Dict[int, int] = {}
            # the module swap runs the model's own forward: only calls inside the modules its rows
            # stand in for are skipped (others before the cut still run)
            swapped = {id(m) for b in self.chain.blocks[:self.boundary] for m in (b.runs or b.modules)} \
                if self.chain.how == SWAP else None
            depth = [0]

            def count(module, args) -> None:
                if swapped is None or depth[0] or id(module) in swapped:
                    counts[id(module)] = counts.get(id(module), 0) + 1

            def enter(module, args) -> None:
                depth[0] += 1

            def leave(module, args, output) -> None:
                depth[0] -= 1

            hooks = [m.register_forward_pre_hook(count) for m in self.freezer._region.counted.values()]
            for m in self.freezer.module.modules() if swapped else ():
                if id(m) in swapped:
                    hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave, always_call=True)]
            try:
                with preserved_state(self.freezer.module), self._eval_mode(0, self.boundary), torch.no_grad(), \
                        _probe_errors_unprinted():
                    self.chain.run(_index_inputs(inputs, torch.arange(1), inputs.batch), 0, self.boundary)
            except Exception:  # noqa: BLE001 -- numbered as before: wrapped at the traced count
                counts = {}
            finally:
                remove_handles(hooks)
            self._prefix_calls = (key, counts)
        return self._prefix_calls[1]

    def _reads_leaf(self, leaves: List[Any], i: int, other: Any, spec: Any, stops: List[int],
                    base: List[Any]) -> bool:
        """Whether the outputs at ``stops`` change when leaf ``i`` is ``other``."""
        args, kwargs = tree_unflatten(leaves[:i] + [other] + leaves[i + 1:], spec)
        try:
            return any(not _same_tensor(self.chain.run(Inputs(args, kwargs), 0, stop), b)
                       for stop, b in zip(stops, base))
        except Exception:  # noqa: BLE001 -- a value the prefix cannot take changed: it reads it
            return True

    def _run_prefix(self, inputs: Inputs) -> Any:
        """The cached blocks' output, as rows are made (raises ``CutNotReached``)."""
        # autocast's cast cache off: a trainable weight the prefix reads (a tied embedding) cast under
        # no_grad would be served to the trainable layers' reads without its grad_fn (review99)
        with self._eval_mode(0, self.boundary), torch.no_grad(), uncached_autocast(), self._noting_outside_calls():
            return self.chain.run(inputs, 0, self.boundary)

    @contextmanager
    def _noting_outside_calls(self) -> Iterator[None]:
        """Note the modules outside the model that the forward inside calls (a scale module kept
        without registering it): their Python values are watched with the prefix's."""
        own = {id(m) for m in self.freezer.module.modules()}

        def note(module, args) -> None:
            if id(module) not in own:
                self._outside_called.setdefault(id(module), module)
        # put in torch's table directly: a registered hook moves torch's hook counter, which the
        # cache reads as "a hook was placed" (the cut would be looked at again at every step)
        key = -2 - id(self)
        GLOBAL_PRE_HOOKS[key] = note
        try:
            yield
        finally:
            GLOBAL_PRE_HOOKS.pop(key, None)

    def _compute_prefix(self, inputs: Inputs) -> Optional[Tensor]:
        try:
            h = self._run_prefix(inputs)
        except CutNotReached as exc:  # these samples' forward left the recorded path (an early exit, a branch)
            self._bypass("cut_not_reached", f"{exc} (counted in stats['bypassed']; the cache stays on)")
            return None
        if not isinstance(h, Tensor) or h.dim() == 0:
            self._disable(f"the prefix output ({type(h).__name__}) is not one tensor with a batch dimension")
            return None
        if not self._storable(h):
            return None
        if self._format_unknown:  # the first prefix computed after a resume shows the rows' layout
            self._act_format, self._format_unknown = _memory_format(h), False
        return h

    def _storable(self, h: Tensor) -> bool:
        """The rows hold ``h`` exactly (a new store's first rows set their dtype and layout from
        it); False, and the cache off saying why, where they cannot."""
        if self._store is None and not self._adopt_activation(h):
            return False
        return h.is_floating_point() or self._holds_integers(h)

    def _adopt_activation(self, h: Tensor) -> bool:
        """A new store's rows are kept and served in ``h``'s dtype and layout; False (and the
        cache off, saying why) where its rows cannot hold ``h`` exactly."""
        if h.is_complex():
            self._disable(f"the frozen prefix's output is {h.dtype}: rows are real, it would lose its imaginary part")
            return False
        if self._exact and h.dtype == torch.float64 and self.storage_dtype != torch.float64:
            cast = any(p.dtype == torch.float64 for p in self.freezer.model.parameters())
            self._disable("the frozen prefix's output is float64, and the cache keeps float32 rows (" + (
                "the model was cast to float64 after the cache was built: build it after the cast, or"
                if cast else "the model's parameters are not float64:")
                + " pass dtype='fp64' to store its rows exactly)")
            return False
        exact_rows = self.storage_dtype in (torch.float32, torch.float64)
        if h.dtype == torch.uint64 or (not h.is_floating_point() and not exact_rows):
            self._disable(f"the frozen prefix's output is {h.dtype} (codes, ids), which {self.storage_dtype} rows "
                          "round to other values: use the default (exact) dtype")
            return False
        self._act = (h.dtype, h.device)
        self._act_format, self._format_unknown = _memory_format(h), False
        return True

    def _holds_integers(self, h: Tensor) -> bool:
        """Float rows hold integers (bool) exactly below 2**24 (fp32) or 2**53 (fp64): False, and the
        cache off, for larger ones (hashed ids). One host read per stored integer batch."""
        limit = 2 ** (53 if self.storage_dtype == torch.float64 else 24)
        # as int64: torch has no abs or max for uint16/uint32 on the CPU (uint64 is refused above)
        largest = int(h.to(torch.int64).abs().max()) if h.numel() and h.dtype != torch.bool else 0
        if largest > limit:
            hint = ": pass dtype='fp64'" if self.storage_dtype != torch.float64 else ""
            self._disable(f"the frozen prefix's output holds integers up to {largest}, which {self.storage_dtype} "
                          f"rows round (exact up to {limit}){hint}")
            return False
        return True

    def _side_inputs(self, inputs: Inputs, batch: int) -> Dict[str, Tensor]:
        """The step's per-sample inputs that the chain's layers read besides the activation."""
        names = self.chain.side_inputs
        if not names:
            return {}
        given = self.chain.bind(inputs)
        side = {}
        for name in names:
            value = given.get(name)
            if not isinstance(value, Tensor):
                continue
            if value.dim() == 0 or value.shape[0] not in (1, batch):
                raise ValueError(
                    f"ActivationCache: input {name!r} has shape {tuple(value.shape)}, not one row per sample "
                    f"(batch {batch}); the cache keeps it per sample. Pass it with a leading batch dimension.")
            side[name] = value.expand(batch, *value.shape[1:])
        return side

    def _store_rows(self, ids: Tensor, values: Tensor, side: Optional[Dict[str, Tensor]] = None,
                    in_sums: Optional[Tensor] = None) -> None:
        """Store rows (and, for rows computed from a step, the side inputs they go with, and
        the checksums of the inputs they were computed from). A storage fault turns the cache off."""
        if self._store is None:
            with self._storage_faults("creating the cache's storage"):
                self._store = self._make_store(tuple(values.shape[1:]), self.path)
            if not self.enabled:
                return
        if tuple(values.shape[1:]) != self._store.row_shape:
            raise ValueError(
                f"ActivationCache: samples {ids[:5].tolist()} give a prefix output of shape "
                f"{tuple(values.shape[1:])}, the cache holds rows of shape {self._store.row_shape}. "
                "Cached samples need the same input shape every time (pad to a fixed length)."
            )
        unique, first = _first_occurrences(ids)
        if in_sums is not None and unique.numel() < ids.numel():
            self._check_repeated_ids(ids, first, in_sums)
        finite = (values[first.to(values.device)].flatten(1).abs().amax(1).isfinite().cpu()
                  if values.is_floating_point() and values[0].numel() else None)
        if finite is not None and not bool(finite.all()):
            # a row with NaN or inf (an input with inf, a float16 overflow) is not cached: its sample
            # runs the prefix each time, as without the cache, and no check takes it for a fault
            self.stats["not_finite"] += int((~finite).sum())
            unique, first = unique[finite], first[finite]
        slots = self._store.allocate(unique)
        ok = slots >= 0
        if bool(ok.any()):
            rows = first[ok]
            with self._storage_faults("writing cached rows"):
                self._store.write(slots[ok], values[rows.to(values.device)],
                                  None if in_sums is None else in_sums[rows.to(in_sums.device)])
            if not self.enabled:
                return
            if self._fresh_slots is not None:  # made with the values now, while a change waits for its check
                self._fresh_slots[slots[ok].cpu()] = True
            if side is not None:
                self._sides.put(unique[ok], {n: v[first[ok].to(v.device)] for n, v in side.items()})
        self.stats["stored"] += int(ok.sum())
        self.stats["over_capacity"] += int((~ok).sum())

    def _audit(self, inputs: Inputs, ids: Tensor, hit: Tensor, loaded: Tensor,
               missed: Optional[Tuple[Tensor, Tensor]] = None) -> bool:
        """Up to the epoch's audit budget, the served rows ``loaded`` (of the ``hit`` positions)
        and the rows ``missed`` just computed for the batch's other samples, apart, against the
        prefix recomputed for the whole batch, as the model computes it. False (the whole model
        runs) where one differs, saying why: a row that depends on the other samples of its batch
        (a branch on the whole batch in the model's code, samples that mix and first met in this
        batch) cuts before the block; a prefix that is not deterministic, or that changed, turns
        the cache off."""
        k = min(self._audit_left, hit.numel())
        if k <= 0:
            return True
        return self._audit_look(inputs, ids, hit, loaded, missed, k)

    @_restoring_rngs
    def _audit_look(self, inputs: Inputs, ids: Tensor, hit: Tensor, loaded: Tensor,
                    missed: Optional[Tuple[Tensor, Tensor]], k: int) -> bool:
        self._audit_left -= k
        self.stats["audited"] += k
        if not self._side_inputs_unchanged():
            return False
        with preserved_state(self.freezer.module, rngs=False):  # a look, as _rows_per_sample's
            whole = self._compute_prefix(inputs)
        if whole is None:
            return False
        fresh = whole[hit[:k].to(whole.device)]
        if fresh.shape[1:] != loaded.shape[1:]:
            self._cut_before_mixing(_shape_follows_batch(tuple(fresh.shape[1:]), tuple(loaded.shape[1:])))
            return False
        cached = loaded[:k]
        bad = ~self._rows_agree(cached, fresh)  # NaN counts as bad
        missed_agree = missed is None or (missed[1].shape[1:] == whole.shape[1:] and bool(
            self._rows_agree(missed[1], whole[missed[0].to(whole.device)], nan_equal=True).all()))
        if not bool(bad.any()) and missed_agree:
            return True
        with preserved_state(self.freezer.module, rngs=False):
            again = self._compute_prefix(inputs)  # the whole batch again: is the prefix deterministic?
        if again is None:
            return False
        worst = int(bad.nonzero()[0]) if bool(bad.any()) else None
        sample = int(ids[hit[worst if worst is not None else 0]])
        if worst is not None and not bool(fresh[worst].isfinite().all()):
            self._disable(
                f"audit: the frozen prefix now computes NaN or inf for sample {sample}, whose cached row is "
                f"{'finite' if bool(cached[worst].isfinite().all()) else 'not finite either'}: a NaN or inf "
                "reached a frozen weight (written through .data, which the cache does not see) or the sample's "
                "input; the cache is off and the prefix runs every step")
            warnings.warn(f"ActivationCache turned off: {self.reason}", stacklevel=5)
            return False
        if not bool(self._rows_agree(again, whole, nan_equal=True).all()):  # the same inputs twice: the prefix differs
            drift = float((again.float() - whole.float()).abs().max())
            self._disable(
                f"audit: the frozen prefix is not deterministic: computing the batch twice from the same input "
                f"gave results {drift:.3g} apart. Some op before the cut draws random numbers or is "
                "nondeterministic even in eval mode; the cache is off and the prefix runs every step")
            warnings.warn(f"ActivationCache turned off: {self.reason}", stacklevel=5)
            return False
        if not missed_agree:
            self._cut_before_mixing(
                "audit: the rows computed for the samples a batch missed, apart from the rest of the batch, differ "
                "from those computed with the whole batch: a row depends on the other samples of its batch (a "
                "branch on the whole batch in the model's own code, samples that mix and first met in this batch)")
            return False
        with preserved_state(self.freezer.module, rngs=False):
            alone = self._compute_prefix(_index_inputs(inputs, hit[worst:worst + 1], ids.numel()))
        if alone is None:
            return False
        if alone.shape[1:] != whole.shape[1:] or not bool(
                self._rows_agree(alone, fresh[worst:worst + 1], nan_equal=True).all()):
            self._cut_before_mixing(
                f"audit: sample {sample}'s frozen-prefix row computed with its batch differs from the row computed "
                "alone and from its cached row: a row depends on the other samples of its batch (a branch on the "
                "whole batch in the model's own code, samples that mix and first met in this batch)")
            return False
        err = float((cached[worst].float() - fresh[worst].float()).abs().max())
        allowed = self._row_tolerance() * float(fresh[worst].float().abs().max()) + 1e-6
        found = (f"the cached activation of sample {sample} differs from a fresh recompute (max error {err:.3g}, "
                 f"allowed {allowed:.3g})")
        self._audit_failed(found, self._diagnose(sample, _index_inputs(inputs, hit[worst:worst + 1], ids.numel())))
        return False

    def _diagnose(self, sample: int, inputs: Inputs) -> str:
        """Why a served row disagrees with the recompute, from the checksum of the input the
        row was stored from (kept with the row) against the input that came now."""
        slot = self._store.lookup(torch.tensor([sample]))
        stored = int(self._store.in_sums[slot.to(self._store.in_sums.device)][0]) if int(slot[0]) >= 0 else 0
        if stored == 0:
            return ("The sample's input changed since it was cached (random augmentation?), or sample ids are "
                    "shared by different inputs, or the frozen prefix is not deterministic")
        # another input than the row's is never served (_forget_changed_inputs): the prefix changed
        return (f"Sample id {sample} came with the same input its row was cached from, yet the frozen prefix "
                "now computes something else: the prefix is not deterministic (random ops, nondeterministic "
                "kernels beyond the tolerance), its frozen weights or buffers were changed through .data, "
                "which torch does not track (in-place writes otherwise drop the rows), or a setting of a frozen "
                "module that is no tensor changed (an adapter's scaling or active adapter, an attribute the "
                "forward reads), or its row depends on the batch it was computed in (a branch on the whole "
                "batch in the model's own code)")

    def _check_repeated_ids(self, ids: Tensor, first: Tensor, in_sums: Tensor) -> None:
        """One id twice in a batch with two different inputs: the ids are not per sample.
        ``first``: each unique id's first position (``_first_occurrences``)."""
        _, inverse = torch.unique(ids, return_inverse=True)
        differs = (in_sums[first[inverse].to(in_sums.device)] != in_sums).cpu()
        if bool(differs.any()):
            sample = int(ids[differs][0])
            self._warn_once("ids", f"ActivationCache: sample id {sample} appears twice in one batch with two "
                            "different inputs. Ids must be unique per sample (IndexedDataset over the whole "
                            "dataset gives that); the cache stores one row per id and would serve it for both.")

    def _side_inputs_unchanged(self) -> bool:
        """False (and the cache off) if a cached sample came back with other side inputs than
        those stored with its row (checked at audits and deeper freezes: a host sync)."""
        changed = self._sides.first_changed()
        if changed is None:
            return True
        self._input_changed(f"sample {changed} came back with other {'/'.join(self._sides.values)} than "
                            "were stored with its cached row")
        return False

    def _input_changed(self, what: str) -> None:
        self._audit_failed(what, "The sample's input changed since it was cached (random augmentation?)")

    def _audit_failed(self, what: str, diagnosis: str) -> None:
        self._disable(f"audit: {what}. {diagnosis}; so the cache is off and the prefix runs every step. Cache "
                      "only deterministic inputs under unique sample ids.")
        warnings.warn(f"ActivationCache turned off: {self.reason}", stacklevel=5)

    # ------------------------------------------------------------------ boundary
    def _frozen_blocks(self) -> int:
        """Leading chain blocks with every parameter frozen (the last block always runs); for
        the module-swap chain, the deepest of those cuts that passes its check. Sets
        ``cut_note``: why the cut is not deeper, when something the user can act on stops it."""
        count, stopped_by, hooked, in_train, by_user, writer = 0, None, None, None, None, None
        self._stopped_by_hooks = self._stopped_by_mode = None
        held = self._held_in_eval()
        held_by_user = self._held_by_user()
        for block in self.chain.blocks[:-1]:
            trainable = [p for p in block.parameters() if p.requires_grad]
            if trainable:
                stopped_by = (block, trainable[0])
                break
            by_user = next((p for p in block.parameters() if id(p) in held_by_user), None)
            if by_user is not None:
                break
            hooked = hooked_modules(block)
            if hooked:
                self._stopped_by_hooks = block
                break
            in_train = next((m for m in self._modes_not_held(block, held) if m.training), None)
            if in_train is not None:
                self._stopped_by_mode = in_train
                break
            writer = next((m for m in block_modules(block) if id(m) in self._writers), None)
            if writer is not None:
                break
            count += 1
        self.cut_note = self._why_not_deeper(count, stopped_by)
        if self._mixing_cut is not None and count >= self._mixing_cut:  # the first thing that stops the cut
            count = self._mixing_cut - 1
            self.cut_note = (f"the output of block {self.chain.blocks[count].name!r} failed the per-sample check (the "
                             "prefix up to it mixes the samples of a batch, its output's shape follows the batch, or it "
                             "holds no row per sample in dimension 0), so the cache cuts before that block")
            by_user = hooked = in_train = writer = None
        if by_user is not None:
            name = next((n for n, p in self.freezer.module.named_parameters() if p is by_user), "?")
            self.cut_note = (f"parameter {name} (block {self.chain.blocks[count].name!r}) has requires_grad=False, but "
                             "the freezer has not frozen it: your code holds it (a warm-up?) and may let it train "
                             "again, when cached rows would pass it no gradient, so the cache cuts before it; it "
                             "goes deeper once the freezer freezes it")
        if hooked and self.freezer.num_frozen:
            self.cut_note = self._hook_note(count, hooked)
        if in_train is not None and self.cut_note is None and self.freezer.plan.input_side(in_train):
            self.cut_note = (f"{type(in_train).__name__} {self._module_name(in_train)!r} runs in train mode before the "
                             "model's first layer (an augmentation, which the freezer leaves running): a row made once "
                             "would stand in for every later draw of it, so the cache cuts before it. A random "
                             "augmentation gives every step new inputs, which no cached row can serve; a deterministic "
                             "input transform can be cached behind: call .eval() on it")
            if count == 0 and self.freezer.num_frozen:  # nothing cached, said only by describe() (review97)
                self._warn_once("front_train_mode", f"ActivationCache caches nothing: {self.cut_note}")
        if in_train is not None and self.cut_note is None:
            name, block = self._module_name(in_train), self.chain.blocks[count].name
            outer = self._outermost_untrained(in_train)
            advice = (f"Call .eval() on {outer!r}, the largest module around it with nothing to train (again after "
                      "each model.train()), to cache it now" if outer not in ("", name) else
                      "Call .eval() on it to cache it now")
            self.cut_note = (f"{type(in_train).__name__} {name!r}{'' if name == block else f' (in block {block!r})'} "
                             "has no trainable parameter but runs in train mode, and the freezer does not hold it in eval "
                             "mode (you froze it, or it lies after the frozen prefix): rows made in eval mode "
                             "could change what it computes (dropout, batch statistics, any forward that reads "
                             f"self.training), so the cache cuts before it. {advice}; the "
                             "cache goes deeper once the freezer freezes it")
        if writer is not None and self.cut_note is None:
            self.cut_note = (f"{type(writer).__name__} {self._module_name(writer)!r} writes {self._writers[id(writer)]} "
                             "in its forward: served from cached rows, it would keep the value of another batch "
                             "(a feature the loss reads, a count), so the cache cuts before it. Return such a value "
                             "from the forward instead, to cache past it")
        usable = getattr(self.chain, "usable_cut", None)
        if usable is not None:
            count = usable(count)
            if self.chain.note:
                if self.cut_note is None or (count == 0 and stopped_by is None):
                    self.cut_note = self.chain.note
                elif count == 0:  # a trainable parameter stopped the frozen blocks: the first thing to fix
                    self.cut_note = f"{self.cut_note}; {self.chain.note}"
                else:
                    self.cut_note = f"{self.chain.note}; {self.cut_note}"
        if count == 0 and self.cut_note is None:
            if self.freezer.num_frozen and stopped_by is not None:
                # the frozen units run only inside the first block, beside a trainable parameter
                block, param = stopped_by
                name = next((n for n, p in self.freezer.module.named_parameters() if p is param), "?")
                unit = self.freezer._unit_of_param.get(id(param))
                unit_name = f" (unit {self.freezer.units[unit].name!r})" if unit is not None else ""
                if self.chain.how in ("torch.fx", SWAP):  # cuts at module calls: say why none is inside
                    why = ("the frozen units are called only within it, where no module call is a cut (one called "
                           "several times per forward, as in a loop over time steps, or one whose output holds no "
                           "row per sample in dimension 0, as a sequence-first [T, B, H] layer output), so no "
                           "cached row can stand in for them")
                else:
                    why = (f"this chain cuts only between its blocks, so the cache goes deeper once every parameter "
                           f"of {block.name!r} is frozen")
                self.cut_note = (f"the first cut the chain ({self.chain.how}) allows is after {block.name!r}, and that "
                                 f"block also holds trainable parameter {name}{unit_name}: {why}")
            else:
                self.cut_note = "nothing is frozen yet (the cache serves the frozen prefix once the freezer freezes one)"
        if self.enabled:  # while nothing is cached, cache.reason says why
            self.reason = self.cut_note if count == 0 else None
        self._modes_kept = [m for b in self.chain.blocks[:count] for m in self._modes_not_held(b, held)]
        return count

    def _held_by_user(self) -> Set[int]:
        """Ids of the units' parameters that need no gradient but that the freezer has not frozen:
        the user's code holds them (a warm-up, gradual unfreezing) and may let them train again,
        which no flag the cache reads would show (their rows would cut them off from their
        gradient for good)."""
        plan = getattr(self.freezer, "plan", None)
        if plan is None:
            return set()
        frozen = {id(p) for _, p in plan.frozen_parameters(self.freezer.num_frozen)}
        return {id(p) for unit in self.freezer.units for p in unit.parameters
                if not p.requires_grad and id(p) not in frozen}

    def _held_in_eval(self) -> Set[int]:
        """Ids of the modules the freezer's frozen region holds in eval mode."""
        region = getattr(self.freezer, "_region", None)
        return set() if region is None else {id(m) for m in region.always} | {id(m) for m in region.partly}

    def _modes_not_held(self, block, held: Set[int]) -> List[nn.Module]:
        """Modules of ``block`` that read their mode and that the freezer's frozen region does not
        hold in eval (``held``, ``_held_in_eval``: layers the user froze, parameter-free layers
        after the prefix). The cache runs them in eval mode: right only while they are in eval
        mode anyway, which each forward checks for those of the cached blocks (``_modes_kept``)."""
        # no forward (a holder of attributes) or a torch.fx segment's generated one (a trace that
        # depends on the mode is refused): no mode is read
        return [m for m in block_modules(block) if id(m) not in held and not mode_blind(m)
                and type(m).forward is not nn.Module.forward and not isinstance(m, torch.fx.GraphModule)]

    def _outermost_untrained(self, module: nn.Module) -> str:
        """The name of the outermost module around ``module`` (itself included) none of whose
        parameters trains ("" for the model itself): a backbone the user froze (a linear probe),
        put in eval at once rather than one module at a time."""
        parent: Dict[int, Tuple[str, nn.Module]] = {}
        names = {}
        for name, outer in self.freezer.module.named_modules():
            names[id(outer)] = name
            for child in outer.children():
                parent.setdefault(id(child), (name, outer))
        found = names.get(id(module), type(module).__name__)
        while id(module) in parent:
            name, module = parent[id(module)]
            if any(p.requires_grad for p in module.parameters()):
                break
            found = name
        return found

    def _module_name(self, module: nn.Module) -> str:
        return next((n for n, m in self.freezer.module.named_modules() if m is module), type(module).__name__)

    def _hook_note(self, count: int, hooked: List[nn.Module]) -> str:
        names = {id(m): n for n, m in self.freezer.module.named_modules()}
        where = ", ".join(names.get(id(m), type(m).__name__) for m in hooked[:3])
        block = self.chain.blocks[count].name
        hooks = [h for m in hooked for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
                 if not getattr(h, "engine_hook", False)]
        if hooks and all(getattr(h, "__module__", "").startswith("torch.ao.quantization") for h in hooks):
            # eager-mode prepare()/prepare_qat(): the user did not place them and cannot remove them
            return (f"the quantization observers that prepare_qat/prepare hooked onto {where} (block {block!r} of "
                    "the frozen prefix) run at every call and would not run on cached rows, so the cache cuts "
                    "before them. FX-mode QAT (prepare_qat_fx) with the prefix's observers disabled "
                    "(torch.ao.quantization.disable_observer) can be cached")
        return (f"a forward hook you placed on {where} (block {block!r} of the frozen "
                "prefix) would not run on cached rows, so the cache cuts before it. Remove the hook, or place it "
                "on a module after the frozen prefix, to cache deeper")

    def _why_not_deeper(self, count: int, stopped_by) -> Optional[str]:
        """A trainable parameter in a block before the freezer's frozen prefix ends: cached rows
        computed through it would go stale (a weight shared with a trainable head)."""
        if stopped_by is None:
            return None
        block, param = stopped_by
        unit_of = {id(p): u.index for u in self.freezer.units for p in u.parameters}
        later_frozen = [unit_of[id(p)] for b in self.chain.blocks[count:] for p in b.parameters()
                        if not p.requires_grad and id(p) in unit_of]
        if id(param) in unit_of and not any(i > unit_of[id(param)] for i in later_frozen):
            # the freezer's frozen prefix ends here; inside this block, which a coarse chain keeps whole
            frozen = {unit_of[id(p)] for p in block.parameters() if not p.requires_grad and id(p) in unit_of}
            if not frozen or count == 0:  # at 0 the caller says why the first block is no cut
                return None
            units = len(frozen | {unit_of[id(p)] for p in block.parameters() if id(p) in unit_of})
            return (f"the frozen prefix ends inside block {block.name!r} ({len(frozen)} of its {units} units "
                    f"frozen), and the chain ({self.chain.how}) cuts only between blocks, so the cache cuts "
                    "before it; it goes deeper once the whole block is frozen")
        names = [n for n, p in self.freezer.module.named_parameters(remove_duplicate=False) if p is param]
        name = names[0] if names else "?"
        if id(param) not in unit_of and name not in self.freezer.plan.untraced_parameters:
            # in no unit because it was frozen when the freezer was built: the user trains it now
            return (f"parameter {name} had requires_grad=False when the freezer was built (so it is in no unit) "
                    f"and trains now, in block {block.name!r} of the frozen prefix: rows cached through that block "
                    f"would go stale, so the cache cuts before it ({count} of {len(self.chain.blocks)} blocks). "
                    "Choose which layers train before building the freezer: close() it and the cache, and build "
                    "them again")
        if id(param) not in unit_of:  # in no unit: SmartFreezer found no read of it in the example forward
            return (f"parameter {name} keeps training and belongs to block {block.name!r} of the frozen prefix, "
                    "but the freezer manages it in no unit (the example forward did not read it, as a word "
                    "embedding when the model is given inputs_embeds): rows cached through that block could go "
                    f"stale, so the cache cuts before it ({count} of {len(self.chain.blocks)} blocks). Set "
                    f"requires_grad=False on {name} if your forwards do not read it, to cache deeper")
        shared = f" (shared: {', '.join(names)})" if len(names) > 1 else ""
        return (f"parameter {name}{shared} keeps training and is read by block "
                f"{block.name!r} of the frozen prefix; rows cached through it would go stale, so the cache "
                f"cuts before it ({count} of {len(self.chain.blocks)} blocks). Freeze that parameter with the "
                "prefix (or untie it) to cache deeper")

    def _on_freeze(self, event, newly_frozen) -> None:
        if self.enabled and self.chain is not None:
            self._advance(self._frozen_blocks())

    def _advance(self, boundary: int) -> None:
        """Move the cut deeper: push cached rows through the newly frozen blocks, or drop them
        (the module swap's, rows made from weights or values changed since). A freezer that
        freezes deeper UNREAD_DROPS_OFF times in a row before any dropped row was read (a
        schedule that freezes more often than an epoch, on the module swap) turns the cache off:
        it could only make rows and drop them, each cut's set-up costing a second or so
        (review90: 2.5-8x slower)."""
        if boundary <= self.boundary:
            return
        store, unread = self._store, self.stats["hits"] == self._hits_at_store
        self._move_rows(boundary)
        if store is None or self._store is not None or not self.enabled:
            return
        self._unread_drops = self._unread_drops + 1 if unread else 0
        if self._unread_drops >= UNREAD_DROPS_OFF:
            self._disable(f"the freezer froze deeper {self._unread_drops} times in a row before any cached row was "
                          "read, and each freeze dropped the rows (the module swap cannot carry them to a deeper "
                          "cut): the cache could only make rows and drop them, at a cost. Add it once freezing has "
                          "settled (a later phase of the run), or with a policy that freezes less often than once "
                          "an epoch")

    def _move_rows(self, boundary: int) -> None:
        if not self._prefix_weights_unchanged():  # rows made from weights written since are dropped, not migrated
            return
        if self._values_noted is not None:  # rows made with values changed since, not checked yet: dropped, not moved
            self._drop_rows()
        old, self.boundary = self.boundary, boundary
        if self._store is None:
            if old == 0 and self.reuse and self.path is not None and os.path.exists(self.path):
                self._reopen()
            return
        blocks = self.chain.blocks[old:self.boundary]
        if self._buffers_broadcast and any(b.buffers() for b in blocks):
            # plain DDP copies rank 0's buffers (BatchNorm statistics) into every rank at its next
            # forward, with no version bump: rows pushed now through this rank's own would go
            # stale then, unseen (6.8e-3 in weights). They refill in forwards, after that copy.
            self._drop_rows()
            return
        reads_side = any(b.side_inputs for b in blocks)
        if reads_side and not self._side_inputs_unchanged():
            return
        if self._rows_migrated and STORAGE_TOLERANCE[self.storage_dtype] > STORAGE_TOLERANCE[torch.float32]:
            # bf16/fp8 rows carry their rounding through the blocks they are pushed through: once
            # stays within the audit's tolerance, a prefix deepened unit by unit did not (review76:
            # 16 moves, 0.0377 off against 0.0366 allowed, the cache off); recomputed instead
            self._drop_rows()
            return
        store, self._store = self._store, None
        try:
            self._migrate(store, old, blocks, reads_side)
        finally:
            store.close()
        self._rows_migrated = self._store is not None

    def _migrate(self, store: Storage, old: int, blocks, reads_side: bool) -> None:
        """Push ``store``'s rows through ``blocks`` into a new store. An mmap file is built under
        a name of its own and moved over ``path`` when complete: a crash leaves the old file."""
        ids, slots = store.cached_slots()
        if reads_side:  # rows whose side inputs are not known (reopened from a file) are dropped
            known = self._sides.known[ids]
            ids, slots = ids[known], slots[known]
        moved = ids.numel() and not any(b.needs_inputs for b in blocks)
        if moved:
            old_act = self._act
            for start in range(0, ids.numel(), MIGRATE_CHUNK):
                chunk, chunk_slots = ids[start:start + MIGRATE_CHUNK], slots[start:start + MIGRATE_CHUNK]
                h = store.read(chunk_slots, *old_act)
                run = Inputs((), self._sides.get(chunk)) if reads_side else Inputs(())
                with self._eval_mode(old, self.boundary), torch.no_grad(), uncached_autocast(), self._rows_precision(), \
                        self._noting_outside_calls():
                    h = self.chain.run(run, old, self.boundary, h=h)
                if h.shape[0] != chunk.numel():
                    # no row per sample in dimension 0 (a GRU's final state [1, B, H]): nothing to move;
                    # the next forward's per-sample check cuts before this block
                    if self._store is not None:
                        self._discard_store(self._store)
                        self._store = None
                    moved = False
                    break
                if not self._storable(h):
                    return
                if self._store is None:
                    with self._storage_faults(f"moving the cached rows to {self.boundary} blocks"):
                        self._store = self._make_store(tuple(h.shape[1:]), self.path, reuse=False, commit=False)
                    if not self.enabled:
                        return
                # the rows keep the checksums of the inputs they came from
                self._store_rows(chunk, h, in_sums=store.in_sums[chunk_slots.to(store.in_sums.device)])
                if not self.enabled:
                    return
            if moved:
                self.stats["migrated"] += int(ids.numel())
        if self.path is not None:
            with self._storage_faults(f"moving the cached rows to {self.boundary} blocks"):
                if self._store is not None:
                    self._store.commit(self.path)
                elif os.path.exists(self.path):
                    os.unlink(self.path)  # this cache's rows of a boundary that no longer exists

    def _reopen(self) -> None:
        """Open an existing cache file (reuse=True). One made for another model, cut or storage
        format (a rerun of a schedule that froze deeper: the file holds the last cut's rows) is
        replaced, with a warning: its rows cannot serve this run, and a cache's rows are made
        again. It raised at the first freeze, mid-training (review87)."""
        header = read_header(self.path)  # (a file without a cache header is refused when the cache is built)
        before = self._act, self._format_unknown, self._rows_autocast
        self._act = self._recorded_activation(header.get("fingerprint", {}).get("activation", ""),
                                              f"cache file {self.path}")
        self._format_unknown = True
        self._rows_autocast = header.get("fingerprint", {}).get("autocast", "off")
        try:
            with self._storage_faults("reopening the cache file"):
                self._store = self._make_store(tuple(header["row_shape"]), self.path)
        except StaleCacheFile as exc:
            self._act, self._format_unknown, self._rows_autocast = before
            self._warn_once("stale_file", f"{exc.why} With reuse=True such a file is replaced: this run's rows "
                            "fill a new one.")
            with self._storage_faults("replacing the cache file"):
                os.unlink(self.path)

    def _recorded_activation(self, name: Any, where: str) -> Tuple[torch.dtype, torch.device]:
        """(dtype, device) of the prefix output for rows saved earlier: the dtype they recorded
        (e.g. "torch.float32"), on this cache's device, else the device of the chain's parameters."""
        dtype = getattr(torch, str(name).replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"ActivationCache: {where} does not record its activation dtype; delete it")
        return dtype, self._chain_device()

    def _chain_device(self) -> torch.device:
        """This cache's device, else the device of the chain's parameters."""
        return self.device or next((p.device for b in self.chain.blocks for p in b.parameters()), torch.device("cpu"))

    def _make_store(self, row_shape: Tuple[int, ...], path: Optional[str], reuse: Optional[bool] = None,
                    commit: bool = True) -> Storage:
        """A store for rows of ``row_shape``. The mmap tier reopens ``path`` (``reuse``) or makes
        a new file under a name of its own and, with ``commit``, moves it to ``path`` at once (a
        migration commits once its rows are written). An existing file at ``path`` is replaced
        only if this run made it (its lineage): never a file of the user's or of another run."""
        # not inference tensors, though the first cached forward may run under inference_mode
        # (a validation pass): training writes into the store
        with torch.inference_mode(False):
            store = self._make_store_now(row_shape, path, reuse, commit)
        self._note_prefix_weights(store)
        self._rows_migrated = False  # (a move sets it once its rows are in)
        self._hits_at_store = self.stats["hits"]
        return store

    def _make_store_now(self, row_shape: Tuple[int, ...], path: Optional[str], reuse: Optional[bool],
                        commit: bool) -> Storage:
        numel = int(torch.Size(row_shape).numel())
        per_row = row_bytes(numel, self.storage_dtype)
        capacity = self.num_samples if self.max_bytes is None else min(self.num_samples, self.max_bytes // per_row)
        device = self.device or self._act[1]
        extra, reopen = {}, False
        if self.tier == "mmap":
            reopen = (self.reuse if reuse is None else reuse) and os.path.exists(path)
            if not reopen and os.path.exists(path) and not self._owns(path):
                # mid-run (the file appeared, or was replaced, since the cache was built): a storage
                # fault, which turns the cache off; it raised out of freezer.step() (review87)
                raise FileExistsError(
                    errno.EEXIST, f"ActivationCache: {path} already exists and is not this run's. Pass reuse=True "
                    "to reopen it (it is checked against this model and boundary), or delete it / choose another "
                    "path.")
            _take_path_over(path, self)  # this cache opens or replaces the file now
            if not reopen:
                remove_leftovers(path)  # files of a creation or move that a crash interrupted
            extra = dict(path=path if reopen else owned_temp_path(path), fingerprint=self._fingerprint(),
                         reuse=reopen, lineage=self._lineage)
        elif self.tier == "pinned":
            extra = dict(read=self.pinned_read)
        store = make_storage(self.tier, self.num_samples, row_shape, self.storage_dtype, capacity, device, **extra)
        store.listen(held_weakly(self._on_bad_rows))  # the store must not keep its cache (and model) alive
        if self.tier == "mmap":
            self._lineage = store.lineage
            if not reopen and commit:
                try:
                    store.commit(path)
                except BaseException:
                    store.discard()
                    raise
        return store

    def _owns(self, path: str) -> bool:
        """Whether the file at ``path`` is a cache file of this run (its lineage)."""
        try:
            return self._lineage is not None and read_header(path).get("lineage") == self._lineage
        except (OSError, ValueError):
            return False

    def _fingerprint(self) -> Dict[str, Any]:
        """What a cache file's rows depend on: the model, the cut, and the prefix's weights."""
        digest = hashlib.sha256()
        for block in self.chain.blocks[:self.boundary]:
            for t in list(block.parameters()) + block.buffers():
                digest.update(str((tuple(t.shape), t.dtype)).encode())
                digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        model = hashlib.sha256(repr(self.freezer._signature()).encode()).hexdigest()[:16]
        fingerprint = {"model": model, "chain": self.chain.how, "boundary": self.boundary,
                       "blocks": [b.name for b in self.chain.blocks[:self.boundary]][-3:],
                       "prefix_weights": digest.hexdigest()[:16], "activation": str(self._act[0])}
        if self._rows_autocast not in (None, "off"):  # absent (files of before): computed without autocast
            fingerprint["autocast"] = self._rows_autocast
        return fingerprint

    def _device_type(self) -> str:
        return (self._act[1] if self._act is not None else self._chain_device()).type

    def _autocast_now(self) -> str:
        """The autocast mode a forward runs in now on the chain's device: "off", or its dtype."""
        kind = self._device_type()
        return str(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else "off"

    def _rows_precision(self):
        """A context that runs blocks in the autocast mode the rows were computed in (a deeper
        freeze migrates them from ``freezer.step()``, usually outside the user's autocast)."""
        kind = self._device_type()
        if self._rows_autocast in (None, "off"):
            return torch.autocast(kind, enabled=False)
        return torch.autocast(kind, dtype=getattr(torch, self._rows_autocast.replace("torch.", "")))

    @contextmanager
    def _eval_mode(self, start: int, stop: int):
        """Frozen blocks run in eval mode: dropout off, norm statistics fixed, so a cached row
        and a recomputed one agree."""
        modules = {m for b in self.chain.blocks[start:stop] for root in b.modules for m in root.modules()}
        with preserved_modes(modules):
            for m in modules:
                m.training = False
            yield

    def _disable(self, reason: str) -> None:
        self.enabled = False
        self.reason = reason
        store = self._store
        if store is not None and getattr(store, "path", self.path) != self.path:
            store.discard()  # the unfinished file of a move: this cache's own
            self._store = None
        self._release()
        if "audit" not in reason:
            warnings.warn(f"ActivationCache is off (freezing still works): {reason}", stacklevel=5)

    @contextmanager
    def _storage_faults(self, what: str):
        """A storage fault (full disk, file-size limit, read-only folder, host memory) inside
        turns the cache off with one warning naming the cause; training goes on through the
        plain forward. Callers check ``self.enabled`` after the block."""
        try:
            yield
        except (OSError, MemoryError, RuntimeError) as exc:
            if not _is_storage_fault(exc):
                raise
            self._disable(f"{what} failed: {exc}")
            self._off_by_storage = True  # a resumed run (another disk, path, machine) tries again

    def _on_bad_rows(self, ids: Tensor, why: str) -> None:
        """Rows dropped by the storage (a failed checksum, NaN/inf, a damaged index): counted,
        reported once, recomputed when their samples come back; the cache stays on."""
        self.stats["bad_rows"] += int(ids.numel())
        self._warn_once("bad_rows", f"ActivationCache: the cached row of sample {int(ids[0])} {why} (damaged "
                        "storage or checkpoint); such rows are recomputed, never served, and counted in "
                        "stats['bad_rows']. The cache stays on.")

    def _bypass(self, kind: str, why: str) -> None:
        """A forward that runs the whole model: counted, warned once per kind, and the latest
        reason kept for describe()."""
        self.stats["bypassed"] += 1
        self._last_bypass = why
        self._warn_once(kind, f"ActivationCache: {why}")

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warn_in_every_run(message, stacklevel=4)

    # ------------------------------------------------------------------ checks
    def _check_ids(self, sample_ids, batch: Optional[int]) -> Tensor:
        ids = torch.as_tensor(sample_ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
            raise TypeError(f"sample_ids must be integers (the dataset indices), got {ids.dtype}")
        ids = ids.reshape(-1).to("cpu", torch.int64)
        if batch is not None and ids.numel() != batch:
            raise ValueError(f"got {ids.numel()} sample ids for a batch of {batch} samples (the size of the inputs' "
                             "first dimension): pass one id per sample, and batch-first inputs (the cache keys "
                             "dimension 0 by sample id; a sequence-first [T, B, ...] input must be transposed, and "
                             "flat inputs with offsets, as EmbeddingBag(text, offsets) takes, padded to [B, L]; "
                             "samples of different sizes concatenated along dimension 0, as the nodes of a batch of "
                             "graphs, cannot be cached: train without the cache)")
        bad = (ids < 0) | (ids >= self.num_samples)
        if bool(bad.any()):
            raise IndexError(
                f"sample ids {ids[bad][:5].tolist()} are outside [0, {self.num_samples}) (num_samples="
                f"{self.num_samples}). Ids must be dataset indices: wrap the dataset in IndexedDataset "
                "and pass num_samples=len(dataset).")
        return ids

    def _other_input_shape(self, inputs: Inputs) -> Optional[str]:
        """Why this batch's per-sample input shapes or dtypes are not those the cache serves (its
        first batch's: every row has one shape), or None. A 0-dim tensor (a Trainer's
        num_items_in_batch) is not per sample."""
        sig = [(tuple(t.shape[1:]), t.dtype) if isinstance(t, Tensor) and t.dim() > 0 else None
               for t in tree_flatten((inputs.args, inputs.kwargs))[0]]
        if self._input_sig is None:
            self._input_sig = sig
        elif sig != self._input_sig:
            same_shapes = len(sig) == len(self._input_sig) and all(
                (a is None) == (b is None) and (a is None or a[0] == b[0]) for a, b in zip(sig, self._input_sig))
            fix = ("The shapes are the same and the dtypes differ (inputs cast with the model, as model.bfloat16() "
                   "takes them): build the cache (and freezer) after the cast, or cast the inputs back" if same_shapes
                   else "e.g. multi-resolution training or per-batch padding. Pad every batch to one shape to cache "
                   "them all")
            return (f"a batch came with per-sample input shapes/dtypes {sig}, while the cache serves inputs of "
                    f"{self._input_sig} (its first batch's; all rows have one shape). {fix}")
        return None


def _pinned_state(t: Tensor) -> Tuple[int, torch.dtype, int, Tensor]:
    """``_written_state`` and an alias of ``t``'s storage, which keeps that storage allocated: a
    cast there and back (``model.half().float()`` sets ``.data`` twice) would otherwise free it, and
    the new float32 storage could take the same address (then nothing told the cast: a flaky miss)."""
    return (*_written_state(t), t.detach())


def _written_state(t: Tensor) -> Tuple[int, torch.dtype, int]:
    """What changes when a tensor is written: its version (in place), its dtype and its storage
    (``.data`` set, as model casts do, bumps no version)."""
    try:
        address = t.data_ptr()
    except RuntimeError:  # a tensor subclass without storage of its own (DTensor): version and dtype
        address = 0
    return t._version, t.dtype, address


class _FreezeListener:
    """The cache's freeze (and change) listener on its freezer: either moves the cut as deep as
    the freezer's prefix allows now. It holds the cache weakly, so a dropped cache
    (a re-run notebook cell) goes with its rows; a deep copy of the freezer (of a wrapped model)
    calls the copied cache."""

    __slots__ = ("cache",)

    def __init__(self, cache: "ActivationCache") -> None:
        self.cache = weakref.ref(cache)

    def __call__(self, event, newly_frozen) -> None:
        cache = self.cache()
        if cache is not None:
            cache._on_freeze(event, newly_frozen)

    def __deepcopy__(self, memo):
        cache = self.cache()
        return _FreezeListener(copy.deepcopy(cache, memo)) if cache is not None else self

    def report_line(self) -> Optional[str]:
        """The freezer's report counts the frozen units' backward only: say what the cache skipped."""
        cache = self.cache()
        if cache is None:
            return None
        hits, seen = cache.stats["hits"], cache.stats["hits"] + cache.stats["misses"]
        if not hits:
            return cache.describe()
        return (f"activation cache: {hits} of {seen} samples since it started were served from it, each "
                "skipping its cached prefix's forward too (not in the FLOPs saved above)")


_COMPILED_WHOLE = ("the model is torch.compile'd as a whole (torch.compile(model) or model.compile()), and the cache "
                   "runs its blocks itself, outside the compiled graph. Compile the blocks one by one instead "
                   "(smartfrz_fast.compile.compile_blocks, which also avoids a recompile of the whole model at every "
                   "freeze), before the cache's first forward: the cache then runs the compiled blocks")


class SideInputs:
    """Per-sample inputs that layers read besides the activation (attention mask, position ids),
    kept by sample id next to the cached rows so that rows can be pushed through newly frozen
    layers with their own inputs. In memory on the inputs' device, whatever the tier: a mask is
    a small fraction of a row (a token's int64 mask entry against its hidden-size activation)."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.values: Dict[str, Tensor] = {}  # name -> [num_samples, ...]
        self.known = torch.zeros(num_samples, dtype=torch.bool)  # recorded for this sample id
        self.changed: Optional[Tensor] = None  # per sample id: came back with other values

    def put(self, ids: Tensor, side: Dict[str, Tensor]) -> None:
        """Record ``side[name][i]`` for sample ``ids[i]`` (ids unique, CPU)."""
        for name, value in side.items():
            if name not in self.values:
                self.values[name] = value.new_zeros((self.num_samples, *value.shape[1:]))
            store = self.values[name]
            store[ids.to(store.device)] = value.to(store.device)
        self.known[ids] = True

    def get(self, ids: Tensor) -> Dict[str, Tensor]:
        return {name: store[ids.to(store.device)] for name, store in self.values.items()}

    def compare(self, ids: Tensor, side: Dict[str, Tensor]) -> None:
        """Note cached samples whose side inputs differ from the stored ones (no host sync)."""
        for name, value in side.items():
            store = self.values.get(name)
            if store is None or not ids.numel():
                continue
            index = ids.to(store.device)
            differs = (store[index] != value.to(store.device)).reshape(ids.numel(), -1).any(1)
            differs &= self.known[ids].to(store.device)  # nothing recorded (e.g. a damaged checkpoint's): no claim
            if self.changed is None:
                self.changed = torch.zeros(self.num_samples, dtype=torch.bool, device=store.device)
            self.changed[index] |= differs

    def first_changed(self) -> Optional[int]:
        if self.changed is None:
            return None
        changed = self.changed.nonzero()
        return int(changed[0]) if changed.numel() else None

    def export(self, ids: Tensor) -> Dict[str, Any]:
        """The side inputs of those ``ids`` that have them, on the CPU (for a checkpoint), with
        a checksum per sample (of its values and id)."""
        ids = ids[self.known[ids]]
        values = {name: v[ids.to(v.device)].cpu() for name, v in self.values.items()}
        return {"ids": ids, "values": values, "sums": _side_sums(ids, values)}

    def load(self, saved: Dict[str, Any], device: torch.device) -> Tensor:
        """Take back exported side inputs; returns the ids whose checksum failed (left unknown:
        their rows are dropped, not migrated with a damaged mask, at the next deeper freeze)."""
        ids, values = saved["ids"], saved["values"]
        bad = _side_sums(ids, values) != saved["sums"]
        keep = ~bad
        self.put(ids[keep], {name: v[keep].to(device) for name, v in values.items()})
        return ids[bad]


class CachedModel(nn.Module):
    """``model`` whose forward takes ``(inputs, sample_ids)`` and skips the cached prefix.
    ``inputs`` is the model's input tensor, a tuple of its positional inputs (a NamedTuple is one
    input), or a dict of its keyword inputs (a Hugging Face batch), as ``SmartFreezer``'s
    ``example_inputs``."""

    def __init__(self, model: nn.Module, cache: ActivationCache) -> None:
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(self, inputs, sample_ids, **kwargs):
        inner, ddp = _ddp_parts(self.model)
        args, kwargs = example_call(inner, inputs, kwargs)
        if ddp is not None and compiled_in_place(self.model):
            # the cache runs inside DDP's forward, never through the wrapper's compiled call
            if self.cache.enabled:
                self.cache._disable(_COMPILED_WHOLE)
            return self.model(*args, **kwargs)

        def cached_forward(*args, **kw):
            return self.cache.forward(inner, Inputs(args, kw), sample_ids)

        if ddp is None:
            return cached_forward(*args, **kwargs)
        # FreezableDDP's rewrap at a freeze copies rank 0's buffers before the rows move
        self.cache._buffers_broadcast = (bool(ddp.broadcast_buffers) and not isinstance(self.model, FreezableDDP)
                                         and torch.distributed.get_world_size(ddp.process_group) > 1)
        return _forward_through_ddp(ddp, cached_forward, args, kwargs)


# ------------------------------------------------------------------ helpers
def _distributed_kind(model: nn.Module) -> Optional[str]:
    if isinstance(model, (nn.parallel.DistributedDataParallel, FreezableDDP)):
        return "ddp"
    if any(_is_fsdp1(m) or _is_fsdp2(m) for m in model.modules()):
        return "fsdp"
    return None


def _refuse_sharded(kind: Optional[str]) -> None:
    # The cache calls the blocks directly. Under DDP that runs inside DDP's forward (see
    # _forward_through_ddp); FSDP's per-module all-gathers and its root hooks would not run so.
    if kind is not None and "fsdp" in kind:
        raise NotImplementedError(
            f"ActivationCache does not support FSDP yet (the model is {kind}-wrapped): it runs the "
            "model's blocks directly, around FSDP's root forward that gathers and reshards the "
            "parameters. Train without the cache under FSDP (freezing itself works), or use DDP "
            "(smartfrz_fast.distributed.FreezableDDP), under which the cache works.")


def _rank_path(path: str) -> str:
    """Each rank caches the samples it sees in its own file: ``{rank}`` in the path names it."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return path.replace("{rank}", "0")
    if "{rank}" in path:
        return path.replace("{rank}", str(dist.get_rank()))
    if dist.get_world_size() > 1:
        raise ValueError(
            f"ActivationCache: with several processes every rank caches the samples it sees in its own file, but "
            f"path={path!r} is the same on every rank. Put {{rank}} in the path (e.g. "
            "'cache.{rank}.bin'): the cache replaces it with the process's rank.")
    return path


def _ddp_parts(model: nn.Module) -> Tuple[nn.Module, Optional[nn.parallel.DistributedDataParallel]]:
    """(module the cache runs, the DDP object whose forward must surround it, if any)."""
    if isinstance(model, FreezableDDP):
        ddp = model.current()  # rebuilt after each freeze and when what trains changed; the module if none does
        return model.module, ddp if isinstance(ddp, nn.parallel.DistributedDataParallel) else None
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, model
    return model, None


# DDP's (private) pieces of its forward that _forward_through_ddp calls, checked in wrap().
_DDP_FORWARD_PARTS = ("_pre_forward", "_post_forward", "_inside_ddp_forward", "_delay_all_reduce_all_params",
                      "_use_python_reducer")


def _forward_through_ddp(ddp: nn.parallel.DistributedDataParallel, run, args: tuple, kwargs: dict) -> Any:
    """``DistributedDataParallel.forward`` with the call of its module replaced by ``run`` (the
    cache's forward over that same module): DDP's pre-forward (inputs to the device, buffer
    broadcast, reducer set-up) and post-forward (the unused-parameter search with
    find_unused_parameters=True) run as in DDP's own forward, so the reducer all-reduces the
    suffix's gradients in backward. Mirrors DDP.forward of torch 2.11 and 2.13 (tested with two
    processes on both)."""
    with torch.autograd.profiler.record_function("DistributedDataParallel.forward"):
        args, kwargs = ddp._pre_forward(*args, **kwargs)
        if ddp._delay_all_reduce_all_params or ddp._use_python_reducer:
            output = run(*args, **kwargs)
        else:
            with ddp._inside_ddp_forward():
                output = run(*args, **kwargs)
        return ddp._post_forward(output)


def _memory_format(h: Tensor) -> torch.memory_format:
    """channels_last for a 4-d activation laid out so (a channels_last CNN's), else contiguous."""
    channels_last = h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def _user_global_hooks() -> bool:
    """Whether a global forward hook or pre-hook of the user's is registered (torch's own keys
    count up from 0; a swap chain's guard takes a negative one while it serves)."""
    from torch.nn.modules import module as module_lib

    return bool(module_lib._global_forward_hooks) or any(key >= 0 for key in module_lib._global_forward_pre_hooks)


def _opaque_input(leaves: List[Any]) -> Optional[Tuple[str, str]]:
    """(kind, why) where an input is an object holding tensors that pytree does not know."""
    opaque = next((leaf for leaf in leaves if not isinstance(leaf, Tensor) and holds_tensors(leaf)), None)
    if opaque is None:
        return None
    kind = type(opaque).__name__
    return "opaque_input", (f"the inputs hold a {kind}, an object whose tensors the cache can neither split per "
                            "sample nor check; pass them in a dict, tuple or NamedTuple, or register "
                            f"{kind} with torch.utils._pytree.register_dataclass, to cache")


def _unsplittable_inputs(inputs: Inputs) -> Optional[Tuple[str, str]]:
    """(kind, why) for inputs the cache cannot split by sample at all: such a forward runs the
    whole model. A sparse or nested (jagged) tensor has no per-sample rows to index; an object
    pytree does not know, as the only input, leaves no tensor to find the batch in."""
    leaves = tree_flatten((inputs.args, inputs.kwargs))[0]
    odd = next((leaf for leaf in leaves if isinstance(leaf, Tensor)
                and (leaf.layout != torch.strided or leaf.is_nested)), None)
    if odd is not None:
        layout = "nested" if odd.is_nested else str(odd.layout).replace("torch.", "")
        return "layout", (f"the inputs hold a {layout} tensor, which the cache cannot split into the samples it "
                          "computes and those it serves: such forwards run the whole model (counted in "
                          "stats['bypassed']); pass dense, batch-first tensors (padded sequences) to cache")
    if not any(isinstance(leaf, Tensor) and leaf.dim() > 0 for leaf in leaves):
        return _opaque_input(leaves)
    return None


def _batch_size(inputs: Inputs, count: Optional[int] = None) -> int:
    """The number of samples in ``inputs``: the first dimension of its first tensor, unless that
    is 1 and another input has ``count`` (the number of sample ids) first: an input the batch
    shares may come first (a Hugging Face position_ids of shape [1, T]). The sample ids must
    number that many (_check_ids): a sequence-first input or a wrong id count is refused, not
    guessed around."""
    if inputs.batch is not None:
        return inputs.batch
    firsts = [leaf.shape[0] for leaf in tree_flatten((inputs.args, inputs.kwargs))[0]
              if isinstance(leaf, Tensor) and leaf.dim() > 0]
    if not firsts:
        raise ValueError("ActivationCache: the model inputs hold no tensor with a batch dimension")
    if firsts[0] == 1 and count is not None and count in firsts:
        return count
    if firsts[0] != count and any(isinstance(leaf, list) and len(leaf) == count and leaf
                                  and all(isinstance(t, Tensor) for t in leaf)
                                  for leaf in (*inputs.args, *inputs.kwargs.values())):
        return count  # a list of one tensor per sample (torchvision detection's images): _python_rows says so
    return firsts[0]


def _id_count(sample_ids) -> Optional[int]:
    """How many sample ids there are, without reading them (None: not ids; _check_ids says so)."""
    if isinstance(sample_ids, Tensor):
        return sample_ids.numel()
    try:
        return len(sample_ids)
    except TypeError:
        return None


def _separating_parts(n: int) -> List[Tensor]:
    """Parts of a batch of ``n`` (each in the batch's order) such that every two samples lie in
    different parts at least once: for each bit of the position, the samples with it clear and
    those with it set (2 * ceil(log2 n) parts, as much work as ceil(log2 n) batches). A row that
    depends on any other sample of its batch changes in one of them."""
    positions = torch.arange(n)
    parts = []
    for bit in range((n - 1).bit_length()):
        is_set = (positions >> bit) & 1 == 1
        parts += [positions[~is_set], positions[is_set]]
    return parts


def _shape_follows_batch(apart: Tuple[int, ...], together: Tuple[int, ...],
                         samples: Optional[Tuple[int, int]] = None) -> str:
    """Why rows of samples computed apart (shape ``apart`` after dimension 0) and with their
    batch (``together``) differ; ``samples``: how many were computed apart and with it, where known."""
    if samples is not None and len(apart) == len(together):
        moved = [d for d, (a, t) in enumerate(zip(apart, together)) if a != t]
        if moved and all((apart[d], together[d]) == samples for d in moved):
            # review99: blamed pad_packed_sequence in a model that had none
            return (f"the frozen prefix's output holds the batch in dimension {moved[0] + 1} too, not only in 0 (rows "
                    f"of shape {apart} for {samples[0]} samples, {together} for {samples[1]}): a sequence-first "
                    "output, as nn.LSTM, nn.GRU and nn.TransformerEncoder give with their default batch_first=False "
                    "(build them with batch_first=True, or transpose back inside the frozen module, to cache them), "
                    "or a product across the batch (x @ x.T), which no row per sample can hold")
    if len(apart) != len(together):
        return (f"the frozen prefix's rows have shape {apart} for samples computed apart from the rest of their "
                f"batch and {together} with it: a squeeze() in the frozen layers drops the batch dimension of a "
                "batch of one (or another dimension of size 1). Use flatten(1), or squeeze with the dimension "
                "named (squeeze(-1)), there")
    return (f"the frozen prefix's output shape follows the batch: samples computed apart from the rest of their "
            f"batch get rows of shape {apart}, with it {together}, from inputs of one shape (pad_packed_sequence "
            "without total_length=, or trimming to the batch's longest sequence, in the frozen layers). Such a "
            "row depends on the other samples of its batch and cannot be cached by sample: pass total_length= "
            "(keep one padded length) there")


def _index_inputs(inputs: Inputs, index: Tensor, batch: int) -> Inputs:
    """The samples ``index`` of every batched tensor in ``inputs``."""
    def take(leaf):
        if _per_sample(leaf, batch):
            return leaf[index.to(leaf.device)]
        return leaf

    return Inputs(tree_map(take, inputs.args), tree_map(take, inputs.kwargs), batch=index.numel())


# the mmap caches of this process: two writing one file serve each other's rows
_MMAP_CACHES: "weakref.WeakSet[ActivationCache]" = weakref.WeakSet()


def _take_path_over(path: str, cache: ActivationCache) -> None:
    """``cache`` opening the file another cache of this process has open (a notebook's re-run, a
    resume beside the finished run's trainer) takes it over: the other turns off, with a warning.
    Two writing one file handed out the same rows and served each other's (review87: weights
    1.7e-2 off, the warnings blaming the data). Another process's is kept off by the file's lock
    (``storage.lock_file``). Matched by the file's real path (a symlinked folder too); a cache
    dropped but not collected yet is let go first."""
    key = os.path.realpath(path)

    def holders() -> List[ActivationCache]:  # one turned off, or not open yet, holds nothing
        return [other for other in list(_MMAP_CACHES) if other is not cache and other._closed is None
                and other._store is not None and os.path.realpath(other.path) == key]

    if holders():
        gc.collect()
    for other in holders():
        other._disable(f"another ActivationCache of this process opened its file {path}, and takes it over "
                       "(two caches writing one file would serve each other's rows). Give each cache its own path= "
                       "to keep both on")


def _is_storage_fault(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _FAULT_ERRNOS
    # torch's CPU allocator; torch.from_file's mmap refused (RLIMIT_AS, `ulimit -v`: review89)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "unable to mmap" in str(exc))


def _changed(values: PythonAttributes) -> bool:
    """A watched value differs now (one that only chooses the outputs a forward returns aside)."""
    return any(key not in OUTPUT_SWITCHES for _, key in values.changed_values())


def _side_sums(ids: Tensor, values: Dict[str, Tensor]) -> Tensor:
    """A checksum of each sample's side inputs and id (``SideInputs.export``)."""
    return input_sums([ids.view(-1, 1), *(values[name] for name in sorted(values))], ids.numel())


def _is_cache_file(path: str) -> bool:
    try:
        read_header(path)
        return True
    except (OSError, ValueError):
        return False


def _same_tensor(a: Any, b: Any) -> bool:
    return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)


def _input_sums(leaves: List[Any], batch: int, reads: Optional[List[bool]] = None) -> Tensor:
    """A checksum of each sample's input, from the inputs' flattened ``leaves`` (with ``reads``,
    only the leaves it marks): every tensor with the batch dimension, and the values that are the
    same for the whole batch (a number, a 0-dim or ``[1]`` tensor: an annealed scale or noise
    level), folded into every sample's sum, so that a change of them recomputes the rows."""
    if reads is not None:
        leaves = [t for t, read in zip(leaves, reads) if read]
    sums = input_sums([t for t in leaves if isinstance(t, Tensor)], batch)
    shared = [t for t in leaves if not _per_sample(t, batch)]
    total = None
    for value in shared:
        if isinstance(value, Tensor):
            part = tensor_sum(value).to(sums.device)
        else:
            raw = _value_bytes(value)
            if raw is None:
                continue  # an object without a stable value (its repr holds an address): not checked
            part = int.from_bytes(hashlib.blake2b(raw, digest_size=4).digest(), "little", signed=True)
        total = (sums.to(torch.int32) if total is None else total) * _SHARED_MIX + part
    if total is None:
        return sums
    return torch.where(total == 0, torch.ones_like(total), total)


_SHARED_MIX = 1000003  # odd: folding a value in keeps every bit of the sum


def _value_bytes(value: Any) -> Optional[bytes]:
    """The bytes of a batch-wide non-tensor input's value: a number, string, enum member or
    numpy scalar/array; None for other objects (hash() of a str is salted per process)."""
    if hasattr(value, "tobytes") and hasattr(value, "dtype"):  # numpy, without importing it
        return repr((str(value.dtype), getattr(value, "shape", ()))).encode() + value.tobytes()
    if isinstance(value, (int, float, complex, str, bytes, type(None), Enum)):
        return repr(value).encode()
    return None


def _nudges(value: Any) -> List[Any]:
    """Other values of a batch-wide input, to see whether the prefix reads it: up, down and
    halfway to 1 (a clamp such as min(sigma, 1) hides a change one way); none if none can be
    made (a flag, a string, a mask)."""
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex():
            return []
        return [value + 1, value - 1]
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "dtype"):
        return []
    try:
        return [value + 1, value - 1, value * 0.5 + 0.5]
    except (TypeError, ValueError):  # a numpy value of a kind that takes no arithmetic
        return []


def state_chain_matches(state: Dict[str, Any], chain: BlockChain) -> bool:
    """A saved cache state was made on this chain (its blocks' names)."""
    return state.get("chain") == [b.name for b in chain.blocks]


def _probe_errors_unprinted() -> contextlib.AbstractContextManager:
    """Around a probe forward on a few samples or nudged inputs, whose error is an answer (the
    prefix reads the input, or mixes samples), not the user's: torch.fx prints the traceback of an
    error in a traced module to stderr before raising it."""
    return contextlib.redirect_stderr(io.StringIO())


def _per_sample(leaf: Any, batch: int) -> bool:
    return isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch


def _python_rows(tree: Any, batch: int) -> bool:
    """Whether ``tree`` holds a list of ``batch`` plain values or tensors: one per sample (a
    collate's lengths, per-sample tensors of unequal sizes), which no indexing of the batch's
    tensors splits. A tuple is a setting (a size, a shape), not looked into as such."""
    if batch < 2:
        return False
    if isinstance(tree, list) and len(tree) == batch and all(
            isinstance(v, (int, float, complex, str, bytes, Tensor)) for v in tree):
        return True
    if isinstance(tree, (list, tuple)):
        return any(_python_rows(child, batch) for child in tree)
    if isinstance(tree, Mapping):
        return any(_python_rows(child, batch) for child in tree.values())
    return False


def _first_occurrences(ids: Tensor) -> Tuple[Tensor, Tensor]:
    """Unique ids and the position of each one's first occurrence."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((unique.numel(),), ids.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(ids.numel()), reduce="amin")
    return unique, first
