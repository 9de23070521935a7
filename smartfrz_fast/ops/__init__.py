"""The registry of smartfrz ops: one schema, one fake and one reference each.

Every op is a ``torch.library.custom_op`` in the ``smartfrz`` namespace. Its default
implementation is the pure-PyTorch reference in ``reference.py`` (the specification); faster
kernels register per device below, and ``backends()`` reports which one runs where.
Importing this module loads the compiled extension if there is one; ``import smartfrz_fast``
does not import this module.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from . import reference
from ._extension import extension_status

__all__ = ["gather_history", "predict", "backends", "OPS"]


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
) -> Tuple[Tensor, Tensor]:
    """Freeze probability per unit in ``rows`` and the freezable prefix length (0-dim int64)."""
    return reference.predict_ref(history, cursor, rows, valid, weights, threshold)


@predict.register_fake
def _(history, cursor, rows, valid, weights, threshold):
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


def backends(device_types: Sequence[str] = ("cpu", "cuda")) -> Dict[str, Dict[str, str]]:
    """``{op: {device_type: backend}}`` for the ops of this registry."""
    return {
        name: {dev: _BACKENDS.get((name, dev), "reference (PyTorch)") for dev in device_types}
        for name in OPS
    }


_register_extension_kernels()
