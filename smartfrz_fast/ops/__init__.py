"""The registry of smartfrz ops: one schema, one fake and one reference each.

Every op is a ``torch.library.custom_op`` in the ``smartfrz`` namespace. Its default
implementation is the pure-PyTorch reference in ``reference.py`` (the specification); faster
kernels register per device below, and ``backends()`` reports which one runs where.
Importing this module loads the compiled extension if there is one; ``import smartfrz_fast``
does not import this module.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference
from ._extension import extension_status, reference_only, triton_interpret
from ._fallback import KernelUnavailable, fallbacks, run_guarded

__all__ = ["gather_history", "predict", "backends", "fallbacks", "KernelUnavailable", "OPS"]


@torch.library.custom_op("smartfrz::gather_history", mutates_args=("history",))
def gather_history(
    sources: List[Tensor],
    source_ids: Tensor,
    offsets: Tensor,
    rows: Tensor,
    cursor: Tensor,
    history: Tensor,
) -> None:
    """Snapshot the sampled weights of units ``rows`` into slot ``cursor % T`` of ``history``."""
    reference.gather_history_ref(sources, source_ids, offsets, rows, cursor, history)


@gather_history.register_fake
def _(sources, source_ids, offsets, rows, cursor, history) -> None:
    return None


@torch.library.custom_op("smartfrz::predict", mutates_args=())
def predict(
    history: Tensor,
    cursor: Tensor,
    rows: Tensor,
    valid: Tensor,
    weights: List[Tensor],
    threshold: float,
    input_gain: float = 1.0,
    sort_by_newest: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Freeze probability per unit in ``rows`` and the freezable prefix length (0-dim int64).

    ``input_gain`` and ``sort_by_newest``: the predictor's input transform, applied to each
    window before normalisation (``reference.transform_window``; the identity at the defaults).
    """
    return reference.predict_ref(history, cursor, rows, valid, weights, threshold, input_gain, sort_by_newest)


@predict.register_fake
def _(history, cursor, rows, valid, weights, threshold, input_gain=1.0, sort_by_newest=False):
    prob = history.new_empty(rows.shape[0], dtype=torch.float32)
    prefix = history.new_empty((), dtype=torch.int64)
    return prob, prefix


OPS = {"gather_history": gather_history, "predict": predict}

# (op name, device type) -> backend name, for the kernels registered below; unlisted pairs run
# the reference.
_BACKENDS: Dict[Tuple[str, str], str] = {}


def _register(op, op_name: str, device_type: str, backend: str, fn: Callable) -> None:
    op.register_kernel(device_type)(fn)
    _BACKENDS[(op_name, device_type)] = backend


def _register_cpu_kernels() -> None:
    """The predict op's CPU path in fewer passes (``cpu_predict``): the reference computes it
    again in every test, and runs instead under SMARTFRZ_BACKEND=reference."""
    if reference_only():
        return
    from .cpu_predict import predict_cpu

    _register(predict, "predict", "cpu", "PyTorch, fused passes (ops/cpu_predict.py)", predict_cpu)


def _register_extension_kernels() -> None:
    status = extension_status()
    if not status.loaded:
        return
    ext = torch.ops.smartfrz_ext

    def gather_history_ext(sources, source_ids, offsets, rows, cursor, history):
        ext.gather_history(sources, source_ids, offsets, rows, cursor, history)

    _register(gather_history, "gather_history", "cpu", "C++ (csrc/gather_history.cpp)", gather_history_ext)
    if status.has_cuda:
        _register(gather_history, "gather_history", "cuda", "CUDA (csrc/cuda/gather_history.cu)",
                  gather_history_ext)


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    """``ops.triton_kernels`` (imports Triton), loaded at the first CUDA call; None if it fails."""
    global _TRITON_IMPORT_ERROR
    try:
        from . import triton_kernels
    except Exception as exc:  # a broken Triton install must not stop training: warn, fall back
        _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"smartfrz_fast: the Triton kernels failed to load ({_TRITON_IMPORT_ERROR}); "
                      "CUDA ops run the CUDA C++ extension or the PyTorch reference instead.")
        return None
    return triton_kernels


_TRITON_IMPORT_ERROR: Optional[str] = None


def triton_import_error() -> Optional[str]:
    """Why the Triton kernels failed to load, once an op tried them (None: loaded, or not tried):
    every Triton op then runs its fallback."""
    return _TRITON_IMPORT_ERROR


def _triton_impls() -> Dict[str, Callable]:
    """The Triton implementation of each op, as registered for CUDA tensors: each runs its
    kernel, or its next backend where Triton fails to import (warned once) or the kernel cannot
    compile or launch on that device (``_fallback``: warned once per op and device, sticky).
    Under TRITON_INTERPRET=1 the same functions run on CPU tensors (how the tests force
    each failure)."""
    gather_fallback, gather_fallback_name = reference.gather_history_ref, "the PyTorch reference"
    if extension_status().loaded and extension_status().has_cuda:
        gather_fallback, gather_fallback_name = torch.ops.smartfrz_ext.gather_history, "the CUDA C++ extension"
    ref = "the PyTorch reference"

    def gather_history_triton(sources, source_ids, offsets, rows, cursor, history):
        args = (sources, source_ids, offsets, rows, cursor, history)
        kernels = _triton_kernels()
        if kernels is None:
            return gather_fallback(*args)
        run_guarded("gather_history", history, kernels.gather_history, gather_fallback, gather_fallback_name, args)

    def predict_triton(history, cursor, rows, valid, weights, threshold, input_gain=1.0, sort_by_newest=False):
        args = (history, cursor, rows, valid, weights, threshold, input_gain, sort_by_newest)
        kernels = _triton_kernels()
        if kernels is None:
            return reference.predict_ref(*args)
        return run_guarded("predict", history, kernels.predict, reference.predict_ref, ref, args)

    # the activation cache's storage ops; activations in other dtypes (float64) take the reference
    def cache_store_triton(values, slots, data, scales):
        args = (values, slots, data, scales)
        kernels = _triton_kernels()
        if kernels is None or values.dtype not in kernels.ROW_DTYPES or data.dtype not in kernels.STORAGE_DTYPES:
            return reference.cache_store_ref(*args)
        run_guarded("cache_store", data, kernels.cache_store, reference.cache_store_ref, ref, args)

    def cache_load_triton(data, scales, slots, dtype):
        args = (data, scales, slots, dtype)
        kernels = _triton_kernels()
        if kernels is None or dtype not in kernels.ROW_DTYPES or data.dtype not in kernels.STORAGE_DTYPES:
            return reference.cache_load_ref(*args)
        return run_guarded("cache_load", data, kernels.cache_load, reference.cache_load_ref, ref, args)

    return {"gather_history": gather_history_triton, "predict": predict_triton,
            "cache_store": cache_store_triton, "cache_load": cache_load_triton}


def _register_triton_kernels() -> None:
    """Triton kernels for CUDA tensors, registered without importing Triton (done at first call).

    They take precedence over the CUDA C++ gather kernel (csrc/cuda/, never run on a GPU yet;
    bench/bench_history_ops.py measures both). Not registered under TRITON_INTERPRET=1, the CPU
    test mode, where compiled CUDA kernels do not exist and device pointers cannot be followed.
    """
    if reference_only():
        return
    if triton_interpret():
        return
    if importlib.util.find_spec("triton") is None:
        return
    for name, impl in _triton_impls().items():
        _register(OPS[name], name, "cuda", "Triton (ops/triton_kernels.py)", impl)


def backends(device_types: Sequence[str] = ("cpu", "cuda")) -> Dict[str, Dict[str, str]]:
    """``{op: {device_type: backend}}`` for the ops of this registry, as registered; a device
    whose kernel could not run shows in ``fallbacks()``."""
    return {
        name: {dev: _BACKENDS.get((name, dev), "reference (PyTorch)") for dev in device_types}
        for name in OPS
    }


_register_cpu_kernels()
_register_extension_kernels()


# ---------------------------------------------------------------------------------------------
# Activation cache storage ops (smartfrz_fast.cache): quantise rows into cache storage, and back.

@torch.library.custom_op("smartfrz::cache_store", mutates_args=("data", "scales"))
def cache_store(values: Tensor, slots: Tensor, data: Tensor, scales: Tensor) -> None:
    """Write ``values[i]`` into row ``slots[i]`` of ``data`` (fp64, fp32, bf16, or fp8 e4m3 with
    a per-row scale in ``scales``)."""
    reference.cache_store_ref(values, slots, data, scales)


@cache_store.register_fake
def _(values, slots, data, scales) -> None:
    return None


@torch.library.custom_op("smartfrz::cache_load", mutates_args=())
def cache_load(data: Tensor, scales: Tensor, slots: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows ``slots`` of ``data`` as ``[N, D]`` in ``dtype``, dequantised."""
    return reference.cache_load_ref(data, scales, slots, dtype)


@cache_load.register_fake
def _(data, scales, slots, dtype):
    return data.new_empty((slots.shape[0], data.shape[1]), dtype=dtype)


OPS.update({"cache_store": cache_store, "cache_load": cache_load})
__all__ += ["cache_store", "cache_load"]
_register_triton_kernels()  # after the cache ops are defined: it registers them too
