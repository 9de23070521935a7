"""Triton kernels for ``smartfrz::gather_history``, ``smartfrz::predict`` and the activation
cache's ``smartfrz::cache_store`` / ``smartfrz::cache_load`` (CUDA).

Importing this module imports Triton and defines the kernels; ``ops/__init__.py`` imports it
only at the first CUDA call, so ``import smartfrz_fast`` never does. The specification of both
ops is ``ops/reference.py``; tests/test_triton_kernels.py checks these kernels against it.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors in Triton's interpreter; that is
how CI tests them without a GPU. Without it they need CUDA tensors. It must be set before
Triton itself is imported (not only before these kernels): triton.language's own helpers
(tl.zeros, tl.sum, ...) are @jit functions defined at Triton's import, and a kernel calling a
compiled-mode helper fails in the interpreter. Importing this module checks that.

GPU sessions: for gather_history measure this Triton kernel (the registry's CUDA default) and
the never-run CUDA C++ kernel in csrc/cuda/ side by side with bench/bench_history_ops.py.

No host synchronisation: the ring slot comes from the ``cursor`` tensor on the device, the
frozen-prefix length is written to a device tensor, and the per-source pointer table is cached
by (address, dtype), so after a first call with a given set of parameters both ops can be
captured in a CUDA graph.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._extension import triton_interpret
from ._fallback import KernelUnavailable
from .reference import NORM_EPS, NUM_PREDICTOR_WEIGHTS, WEIGHTS_PER_MLP, check_input_gain, check_window_length

INTERPRET = triton_interpret()


def _check_interpreter_state() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    if INTERPRET and not isinstance(tl.zeros, InterpretedFunction):
        raise ImportError("TRITON_INTERPRET=1 was set after triton had been imported, so Triton's own helpers "
                          "are not interpretable and every kernel would fail. Set TRITON_INTERPRET=1 before "
                          "anything imports triton (export it in the shell).")


_check_interpreter_state()


def _launch(kernel, grid, device: torch.device, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``; any failure to compile or launch it (Triton's
    OutOfResources or CompilationError, ptxas, an unsupported architecture, the driver) is
    raised as KernelUnavailable, on which the registry falls back to the op's next backend.
    Such failures happen before the launch: the kernel has written nothing. A CUDA
    out-of-memory error is not the kernel's: it propagates as is."""
    try:
        kernel[grid](*args, **meta)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        raise KernelUnavailable(kernel.__name__, device, exc) from exc


def _out_of_resources(exc: KernelUnavailable) -> bool:
    return isinstance(exc.cause, triton.runtime.OutOfResources)


# dtype codes of the gather kernel's per-source type table
_DTYPE_CODES: Dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# gather_history


@triton.jit
def _gather_history_kernel(
    table_ptr, dtype_ptr, num_sources,
    ids_ptr, offsets_ptr, rows_ptr, cursor_ptr, hist_ptr,
    ids_su, ids_sk, off_su, off_sk, h_su, h_st, h_sk,
    K, T,
    BLOCK_K: tl.constexpr,
):
    unit = tl.load(rows_ptr + tl.program_id(0))
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = k < K
    sid = tl.load(ids_ptr + unit * ids_su + k * ids_sk, mask=in_k, other=-1)
    off = tl.load(offsets_ptr + unit * off_su + k * off_sk, mask=in_k, other=0)
    live = in_k & (sid >= 0) & (sid < num_sources)  # -1 (and any stray id) reads nothing: 0
    safe = tl.where(live, sid, 0)
    base = tl.load(table_ptr + safe, mask=live, other=0)
    code = tl.load(dtype_ptr + safe, mask=live, other=-1)
    # One masked load per dtype: each position reads only through its own source's type.
    # Everything is upcast at once (bf16 arithmetic is broken in the interpreter).
    m = live & (code == 0)
    value = tl.load((base + off * 4).to(tl.pointer_type(tl.float32)), mask=m, other=0.0)
    m = live & (code == 1)
    x = tl.load((base + off * 2).to(tl.pointer_type(tl.float16)), mask=m, other=0.0).to(tl.float32)
    value = tl.where(m, x, value)
    m = live & (code == 2)
    x = tl.load((base + off * 2).to(tl.pointer_type(tl.bfloat16)), mask=m, other=0.0).to(tl.float32)
    value = tl.where(m, x, value)
    m = live & (code == 3)
    x = tl.load((base + off * 8).to(tl.pointer_type(tl.float64)), mask=m, other=0.0).to(tl.float32)
    value = tl.where(m, x, value)
    slot = tl.load(cursor_ptr) % T
    slot = tl.where(slot < 0, slot + T, slot)  # Python's modulo, as the reference
    tl.store(hist_ptr + unit * h_su + slot * h_st + k * h_sk, value, mask=in_k)


# (device, ((address, dtype code), ...)) -> (address table, dtype table). Parameters keep their
# storage during training, so after the first snapshot no host-to-device copy happens (and the
# launch can be captured in a CUDA graph). The tables depend only on the key: always correct.
_TABLES: "OrderedDict[tuple, Tuple[Tensor, Tensor]]" = OrderedDict()
_TABLES_MAX = 16


def _source_tables(sources: Sequence[Tensor], device: torch.device) -> Tuple[Tensor, Tensor]:
    entries = []
    for i, s in enumerate(sources):
        code = _DTYPE_CODES.get(s.dtype)
        if code is None:
            raise TypeError(f"gather_history: source {i} has dtype {s.dtype}; the Triton kernel reads "
                            f"{', '.join(str(d) for d in _DTYPE_CODES)} parameters only")
        if s.device != device:
            raise ValueError(f"gather_history: source {i} is on {s.device} but history is on {device}; "
                             "every sampled parameter must live on the history's device")
        entries.append((s.data_ptr(), code))
    key = (str(device), tuple(entries))
    tables = _TABLES.get(key)
    if tables is None:
        entries = entries or [(0, -1)]  # a kernel argument cannot be empty; ids never reach it
        addresses = torch.tensor([a for a, _ in entries], dtype=torch.int64).to(device)
        codes = torch.tensor([c for _, c in entries], dtype=torch.int32).to(device)
        tables = _TABLES[key] = (addresses, codes)
        if len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return tables


def _check_device(name: str, device: torch.device) -> None:
    if INTERPRET:
        if device.type != "cpu":
            raise ValueError(
                f"{name}: TRITON_INTERPRET=1 runs Triton kernels on the CPU, but the tensors are on "
                f"{device}. Unset TRITON_INTERPRET to run the compiled kernels on the GPU, or pass CPU tensors.")
    elif device.type != "cuda":
        raise ValueError(
            f"{name}: the Triton kernels take CUDA tensors, got {device} ones. On the CPU use the "
            "smartfrz ops (reference or C++), or set TRITON_INTERPRET=1 before importing this module.")


def _check_index(name: str, t: Tensor, dtype: torch.dtype, ndim: int, device: torch.device) -> None:
    if t.dtype != dtype or t.dim() != ndim:
        raise TypeError(f"{name} must be a {ndim}-D {dtype} tensor, got {t.dim()}-D {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but history is on {device}: move it to the history's device")


def gather_history(
    sources: Sequence[Tensor],
    source_ids: Tensor,
    offsets: Tensor,
    rows: Tensor,
    cursor: Tensor,
    history: Tensor,
    *,
    block_k: int = 1024,
) -> None:
    """Triton ``smartfrz::gather_history``: one launch, grid (rows, ceil(K / block_k))."""
    device = history.device
    _check_device("gather_history", device)
    if history.dtype != torch.float32 or history.dim() != 3:
        raise TypeError(f"history must be a 3-D float32 [U, T, K] tensor, got {history.dim()}-D {history.dtype}")
    _check_index("source_ids", source_ids, torch.int32, 2, device)
    _check_index("offsets", offsets, torch.int64, 2, device)
    _check_index("rows", rows, torch.int64, 1, device)
    _check_index("cursor", cursor, torch.int64, 0, device)
    num_units, window, k = history.shape
    if source_ids.shape != (num_units, k) or offsets.shape != (num_units, k):
        raise ValueError(f"source_ids {tuple(source_ids.shape)} and offsets {tuple(offsets.shape)} must both "
                         f"be [U, K] = [{num_units}, {k}] to match history {tuple(history.shape)}")
    if rows.numel() == 0 or k == 0:
        return
    addresses, codes = _source_tables(sources, device)
    block_k = min(block_k, triton.next_power_of_2(k))
    grid = (rows.numel(), triton.cdiv(k, block_k))
    _launch(
        _gather_history_kernel, grid, device,
        addresses, codes, len(sources),
        source_ids, offsets, rows, cursor, history,
        source_ids.stride(0), source_ids.stride(1), offsets.stride(0), offsets.stride(1),
        history.stride(0), history.stride(1), history.stride(2),
        k, window,
        BLOCK_K=block_k,
    )


# --------------------------------------------------------------------------------------------
# predict


@triton.jit
def _load_window(row_ptrs, newest_ptr, h_sk, row_in, pos, pos_in, gain, AMPLIFY: tl.constexpr):
    """Window values [TP, B] at positions ``pos`` [B], amplified as reference.amplify_deviation:
    newest + gain * (x - newest). Out-of-mask entries are 0."""
    x = tl.load(row_ptrs[:, None] + pos[None, :] * h_sk, mask=row_in[:, None] & pos_in[None, :], other=0.0)
    if AMPLIFY:
        newest = tl.load(newest_ptr + pos * h_sk, mask=pos_in, other=0.0)
        x = newest[None, :] + gain * (x - newest[None, :])
    return x


@triton.jit
def _window_mlp(
    row_ptrs, newest_ptr, perm_ptr, h_sk, row_in, mean, std, n_valid, gain,
    w1, b1, w2, b2, w3, b3,
    K: tl.constexpr, H: tl.constexpr, E: tl.constexpr,
    TP: tl.constexpr, BK: tl.constexpr, HP: tl.constexpr, BN: tl.constexpr, EP: tl.constexpr,
    PRECISION: tl.constexpr, SORT: tl.constexpr, AMPLIFY: tl.constexpr,
):
    """One K -> H -> H -> E MLP (ReLU between) over the normalised window [TP, K] -> [TP, EP].

    With SORT, input position j reads the window at position perm[j] (the rank order).
    """
    # (every name below has one shape: compiled Triton rejects a loop-carried name whose shape
    # changes, which the interpreter does not check)
    hcol = tl.arange(0, HP)
    h_in = hcol < H
    acc1 = tl.zeros([TP, HP], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        k_in = kk < K
        if SORT:
            pos = tl.load(perm_ptr + kk, mask=k_in, other=0)
        else:
            pos = kk
        x = _load_window(row_ptrs, newest_ptr, h_sk, row_in, pos, k_in, gain, AMPLIFY)
        keep = row_in[:, None] & (kk < n_valid)[None, :]  # sorted or not, the valid ones come first
        xn = tl.where(keep, (x - mean[:, None]) / std[:, None], 0.0)
        w1t = tl.load(w1 + hcol[None, :] * K + kk[:, None], mask=h_in[None, :] & k_in[:, None], other=0.0)
        acc1 = tl.dot(xn, w1t.to(tl.float32), acc1, input_precision=PRECISION)  # W1^T chunk [BK, HP]
    bias1 = tl.load(b1 + hcol, mask=h_in, other=0.0).to(tl.float32)
    h1 = tl.maximum(acc1 + bias1[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN weights: prob 0, as the reference
    # Layers 2 and 3 chunked over layer 2's outputs: the full [TP, H] layer-2 tile never lives.
    ecol = tl.arange(0, EP)
    e_in = ecol < E
    acc3 = tl.zeros([TP, EP], dtype=tl.float32)
    for n0 in range(0, H, BN):
        nn = n0 + tl.arange(0, BN)
        n_in = nn < H
        w2t = tl.load(w2 + nn[None, :] * H + hcol[:, None], mask=n_in[None, :] & h_in[:, None], other=0.0)
        bias2 = tl.load(b2 + nn, mask=n_in, other=0.0).to(tl.float32)
        h2 = tl.maximum(tl.dot(h1, w2t.to(tl.float32), input_precision=PRECISION) + bias2[None, :], 0.0,
                        propagate_nan=tl.PropagateNan.ALL)
        w3t = tl.load(w3 + ecol[None, :] * H + nn[:, None], mask=e_in[None, :] & n_in[:, None], other=0.0)
        acc3 = tl.dot(h2, w3t.to(tl.float32), acc3, input_precision=PRECISION)
    bias3 = tl.load(b3 + ecol, mask=e_in, other=0.0).to(tl.float32)
    return acc3 + bias3[None, :]


@triton.jit
def _predict_kernel(
    hist_ptr, h_su, h_st, h_sk,
    cursor_ptr, rows_ptr, valid_ptr, prob_ptr, perm_ptr,
    qw1, qb1, qw2, qb2, qw3, qb3,
    kw1, kb1, kw2, kb2, kw3, kb3,
    vw1, vb1, vw2, vb2, vw3, vb3,
    hw1, hb1, hw2, hb2, hw3, hb3,
    sqrt_e, eps, gain,
    T: tl.constexpr, K: tl.constexpr, H: tl.constexpr, E: tl.constexpr, HH: tl.constexpr,
    TP: tl.constexpr, BK: tl.constexpr, HP: tl.constexpr, BN: tl.constexpr, EP: tl.constexpr,
    HHP: tl.constexpr, KP: tl.constexpr, PRECISION: tl.constexpr, SORT: tl.constexpr, AMPLIFY: tl.constexpr,
):
    """One program per unit: window -> input transform -> normalisation -> Q/K/V MLPs ->
    attention -> head -> prob. The transform (reference.transform_window) is applied as the
    window is loaded; the ring itself is only read."""
    unit = tl.load(rows_ptr + tl.program_id(0))
    n_valid = tl.load(valid_ptr + unit)
    t = tl.arange(0, TP)
    row_in = t < T
    # chronological row t (oldest first) lives in slot (cursor + t) % T
    cursor = tl.load(cursor_ptr)
    slot = (cursor + t) % T
    slot = tl.where(slot < 0, slot + T, slot)
    row_ptrs = hist_ptr + unit * h_su + slot * h_st
    newest_slot = (cursor + T - 1) % T
    newest_slot = tl.where(newest_slot < 0, newest_slot + T, newest_slot)
    newest_ptr = hist_ptr + unit * h_su + newest_slot * h_st
    perm_row = perm_ptr + tl.program_id(0).to(tl.int64) * KP

    if SORT:
        # Rank order of the newest snapshot (reference.sort_by_newest): an argsort as one sort of
        # distinct int64 keys, an order-preserving integer image of the value in the high half and
        # the position in the low half, so ties keep position order (stable) by construction.
        p = tl.arange(0, KP)
        newest = tl.load(newest_ptr + p * h_sk, mask=p < K, other=0.0)
        newest = tl.where(newest == 0.0, 0.0, newest)  # -0.0 ties with 0.0, as in torch.sort
        bits = newest.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
        key = tl.where(p < n_valid, key, 0x7FFFFFFF)  # masked (and padding) positions last
        packed = tl.sort((key.to(tl.int64) << 32) | p.to(tl.int64))
        # The positions, in rank order, go through global scratch: the K loops below read them
        # chunk by chunk, and a register tensor cannot be sliced.
        tl.store(perm_row + p, packed.to(tl.int32))  # the low half: the position
        tl.debug_barrier()  # every thread's stores are visible to the whole block

    # Pass 1: per-snapshot sums over the valid positions, and whether the window is finite
    # (over every position, masked ones included, as the reference). Neither depends on the
    # order of the positions, which is all the sort changes: read in position order.
    total = tl.zeros([TP], dtype=tl.float32)
    bad = tl.zeros([TP], dtype=tl.int32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        inside = row_in[:, None] & (kk < K)[None, :]
        x = _load_window(row_ptrs, newest_ptr, h_sk, row_in, kk, kk < K, gain, AMPLIFY)
        finite = (x == x) & (tl.abs(x) < float("inf"))
        bad += tl.sum(tl.where(inside & ~finite, 1, 0), axis=1)
        total += tl.sum(tl.where(inside & (kk < n_valid)[None, :], x, 0.0), axis=1)
    count = tl.maximum(tl.minimum(n_valid, K), 1).to(tl.float32)
    mean = total / count
    # Pass 2: centred variance (two passes, as the reference: no cancellation for large means)
    sq = tl.zeros([TP], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        counted_k = (kk < K) & (kk < n_valid)
        counted = row_in[:, None] & counted_k[None, :]
        xv = _load_window(row_ptrs, newest_ptr, h_sk, row_in, kk, counted_k, gain, AMPLIFY)
        c = tl.where(counted, xv - mean[:, None], 0.0)
        sq += tl.sum(c * c, axis=1)
    # a snapshot whose mean or variance overflows float32 is bad data, as in the reference
    moments_ok = (tl.abs(mean) < float("inf")) & (sq < float("inf"))  # False for NaN too
    bad += tl.where(row_in & ~moments_ok, 1, 0)
    std = tl.sqrt_rn(sq / count + eps)
    std = tl.where(row_in, std, 1.0)

    keys = _window_mlp(row_ptrs, newest_ptr, perm_row, h_sk, row_in, mean, std, n_valid, gain,
                       kw1, kb1, kw2, kb2, kw3, kb3,
                       K, H, E, TP, BK, HP, BN, EP, PRECISION, SORT, AMPLIFY)
    values = _window_mlp(row_ptrs, newest_ptr, perm_row, h_sk, row_in, mean, std, n_valid, gain,
                         vw1, vb1, vw2, vb2, vw3, vb3,
                         K, H, E, TP, BK, HP, BN, EP, PRECISION, SORT, AMPLIFY)
    # The query MLP runs over the whole tile (tl.dot needs >= 16 rows); only the newest row is used.
    queries = _window_mlp(row_ptrs, newest_ptr, perm_row, h_sk, row_in, mean, std, n_valid, gain,
                          qw1, qb1, qw2, qb2, qw3, qb3,
                          K, H, E, TP, BK, HP, BN, EP, PRECISION, SORT, AMPLIFY)
    q = tl.sum(tl.where((t == T - 1)[:, None], queries, 0.0), axis=0)  # [EP]

    # attention over the T-1 older snapshots (softmax over time)
    is_kv = t < T - 1
    scores = tl.sum(keys * q[None, :], axis=1) / sqrt_e  # as the reference: divide by sqrt(E)
    scores = tl.where(is_kv, scores, float("-inf"))
    p = tl.exp(scores - tl.max(scores, axis=0))
    p = tl.where(is_kv, p, 0.0)
    att = p / tl.sum(p, axis=0)
    ctx = tl.sum(att[:, None] * values, axis=0)  # [EP]

    # head E -> HH -> HH -> 2, as broadcast products (too small for tl.dot)
    ecol = tl.arange(0, EP)
    j = tl.arange(0, HHP)
    j_in = j < HH
    w = tl.load(hw1 + j[:, None] * E + ecol[None, :], mask=j_in[:, None] & (ecol < E)[None, :], other=0.0)
    a1 = tl.sum(w.to(tl.float32) * ctx[None, :], axis=1) + tl.load(hb1 + j, mask=j_in, other=0.0).to(tl.float32)
    a1 = tl.maximum(a1, 0.0, propagate_nan=tl.PropagateNan.ALL)  # along axis 0
    w = tl.load(hw2 + j[None, :] * HH + j[:, None], mask=j_in[None, :] & j_in[:, None], other=0.0)  # W2^T
    a2 = tl.sum(w.to(tl.float32) * a1[:, None], axis=0) + tl.load(hb2 + j, mask=j_in, other=0.0).to(tl.float32)
    a2 = tl.maximum(a2, 0.0, propagate_nan=tl.PropagateNan.ALL)  # along axis 1
    o = tl.arange(0, 2)
    w = tl.load(hw3 + o[:, None] * HH + j[None, :], mask=j_in[None, :], other=0.0)
    logits = tl.sum(w.to(tl.float32) * a2[None, :], axis=1) + tl.load(hb3 + o).to(tl.float32)
    l0 = tl.sum(tl.where(o == 0, logits, 0.0), axis=0)
    l1 = tl.sum(tl.where(o == 1, logits, 0.0), axis=0)
    top = tl.maximum(l0, l1)
    e0 = tl.exp(l0 - top)
    e1 = tl.exp(l1 - top)
    prob = e1 / (e0 + e1)
    # never freeze on a non-finite window, nor on one whose normalisation overflowed (NaN)
    prob = tl.where((tl.sum(bad, axis=0) == 0) & (prob == prob), prob, 0.0)
    tl.store(prob_ptr + tl.program_id(0), prob)


@triton.jit
def _prefix_kernel(prob_ptr, out_ptr, R, threshold, BLOCK: tl.constexpr):
    """Index of the first probability below threshold (NaN counts as below), or R."""
    first = tl.zeros([], dtype=tl.int64) + R  # (R == 1 arrives as a constexpr: no R.to())
    for r0 in range(0, R, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        in_r = r < R
        p = tl.load(prob_ptr + r, mask=in_r, other=1.0)
        fail = in_r & ~(p >= threshold)
        first = tl.minimum(first, tl.min(tl.where(fail, r.to(tl.int64), first), axis=0))
    tl.store(out_ptr, first)


# predict's launch configurations, best first. Each computes the same function (only layer 3's
# fp32 summation order follows block_n), so every one gives the reference's decisions within
# fp32 rounding. With the shipped predictor (K=1024, H=256, E=64, T=30) and its input transform,
# compiled by Triton 3.8 (bench/results/kernel_arch_limits.md): the first needs 118,784 B of
# shared memory per block (119,808 on sm_90+), which fits sm_80/sm_90/sm_100 (163/227/227 KiB)
# and sm_75 (65,536 B there: exactly its limit) but not sm_86/sm_89/sm_120 (99 KiB); halving
# layer 2's output chunk (block_n 16) needs 75,776 B (76,800 on sm_120); the last, without
# software pipelining (49,152 B on sm_86), is for smaller devices still.
PREDICT_CONFIGS: Tuple[Dict[str, int], ...] = (
    dict(block_k=32, block_n=32, num_warps=8, num_stages=3),
    dict(block_k=32, block_n=16, num_warps=8, num_stages=3),
    dict(block_k=32, block_n=16, num_warps=8, num_stages=1),
)
# device -> index into PREDICT_CONFIGS of the first configuration that launched there. It only
# moves down (a configuration that ran out of resources is not tried again on that device), so
# an out-of-resources launch costs one failed compile per device and process (Triton caches
# compiled kernels on disk), never one per step.
_PREDICT_CONFIG_INDEX: Dict[torch.device, int] = {}


def _launch_fitting(launch, device: torch.device) -> None:
    """``launch(config)`` with the first of PREDICT_CONFIGS that does not run out of resources
    on ``device`` (Triton raises OutOfResources before the launch: nothing was written)."""
    index = _PREDICT_CONFIG_INDEX.get(device, 0)
    while True:
        try:
            launch(PREDICT_CONFIGS[index])
            return
        except KernelUnavailable as exc:
            if not _out_of_resources(exc) or index + 1 == len(PREDICT_CONFIGS):
                raise
            index += 1
            _PREDICT_CONFIG_INDEX[device] = index


def predict_config(device: torch.device) -> Dict[str, int]:
    """The launch configuration predict uses on ``device`` now (the first, before any launch)."""
    return dict(PREDICT_CONFIGS[_PREDICT_CONFIG_INDEX.get(torch.device(device), 0)])


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def _predictor_dims(weights: Sequence[Tensor]) -> Tuple[int, int, int, int]:
    """(K, H, E, HH) from the flat weight list, checking every shape against them."""
    if len(weights) != NUM_PREDICTOR_WEIGHTS:
        raise ValueError(f"predict expects {NUM_PREDICTOR_WEIGHTS} weight tensors (AttentionPredictor."
                         f"flat_weights()), got {len(weights)}")
    hidden, k = weights[0].shape
    embed = weights[4].shape[0]
    head_hidden = weights[WEIGHTS_PER_MLP * 3].shape[0]
    qkv = [(hidden, k), (hidden,), (hidden, hidden), (hidden,), (embed, hidden), (embed,)]
    head = [(head_hidden, embed), (head_hidden,), (head_hidden, head_hidden), (head_hidden,), (2, head_hidden), (2,)]
    expected = qkv * 3 + head
    for i, (w, shape) in enumerate(zip(weights, expected)):
        if tuple(w.shape) != shape:
            raise ValueError(f"predictor weight {i} has shape {tuple(w.shape)}, expected {shape}: the fused "
                             "kernel needs the Q, K and V MLPs to share one shape (K->H->H->E, head E->HH->HH->2)")
    return k, hidden, embed, head_hidden


def predict(
    history: Tensor,
    cursor: Tensor,
    rows: Tensor,
    valid: Tensor,
    weights: Sequence[Tensor],
    threshold: float,
    input_gain: float = 1.0,
    sort_by_newest: bool = False,
    *,
    out: Optional[Tuple[Tensor, Tensor]] = None,
    block_k: Optional[int] = None,
    block_n: Optional[int] = None,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    precision: str = "ieee",
) -> Tuple[Tensor, Tensor]:
    """Triton ``smartfrz::predict``: one program per unit, then a one-program prefix kernel.

    ``out=(prob [R] float32, prefix 0-dim int64)`` writes into given tensors (static buffers for
    CUDA graphs); otherwise new ones are returned. ``precision`` is tl.dot's input precision:
    "ieee" (fp32, what the op uses: within 1e-5 of the reference) or "tf32" (tensor cores on
    the GPU, ~1e-3; for measurement). ``input_gain`` and ``sort_by_newest``: the input
    transform (reference.transform_window), applied while the window is loaded; sorting takes a
    [R, next_pow2(K)] int32 scratch tensor for the rank order.

    Launch configuration: by default the first of ``PREDICT_CONFIGS`` that fits this device
    (chosen once per device, see there); ``block_k``, ``block_n``, ``num_warps`` or
    ``num_stages``, when given, fix it (the rest from the first configuration), with no fallback.
    """
    device = history.device
    _check_device("predict", device)
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    if history.dtype != torch.float32 or history.dim() != 3:
        raise TypeError(f"history must be a 3-D float32 [U, T, K] tensor, got {history.dim()}-D {history.dtype}")
    _check_index("rows", rows, torch.int64, 1, device)
    _check_index("valid", valid, torch.int64, 1, device)
    _check_index("cursor", cursor, torch.int64, 0, device)
    num_units, window, k = history.shape
    if valid.shape[0] != num_units:
        raise ValueError(f"valid has {valid.shape[0]} entries, history has {num_units} units")
    check_window_length(history)
    k_w, hidden, embed, head_hidden = _predictor_dims(weights)
    if k_w != k:
        raise ValueError(f"the predictor reads {k_w} sampled weights per snapshot, history holds {k}")
    weights = list(weights)
    for i, w in enumerate(weights):
        if w.dtype not in WEIGHT_DTYPES or w.device != device:
            raise TypeError(f"predictor weight {i} is {w.dtype} on {w.device}; the kernel takes "
                            f"float32/float16/bfloat16 weights on {device}")
        weights[i] = w.detach().contiguous()  # no copy for ordinary nn.Linear weights
    num_rows = rows.numel()
    if out is None:
        prob = torch.empty(num_rows, dtype=torch.float32, device=device)
        prefix = torch.empty((), dtype=torch.int64, device=device)
    else:
        prob, prefix = out
        if prob.shape != (num_rows,) or prob.dtype != torch.float32 or prefix.shape != () \
                or prefix.dtype != torch.int64 or prob.device != device or prefix.device != device:
            raise ValueError(f"out must be (float32 [{num_rows}], int64 0-dim) tensors on {device}")
    input_gain = check_input_gain(input_gain)
    sort_by_newest = bool(sort_by_newest)
    if num_rows > 0:
        kp = _pow2(k, 1)
        # the rank-order scratch (unused without sorting: any int32 pointer will do)
        perm = torch.empty((num_rows, kp) if sort_by_newest else (1,), dtype=torch.int32, device=device)
        given = dict(block_k=block_k, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
        given = {name: value for name, value in given.items() if value is not None}

        def launch(config: Dict[str, int]) -> None:
            _launch(
                _predict_kernel, (num_rows,), device,
                history, history.stride(0), history.stride(1), history.stride(2),
                cursor, rows, valid, prob, perm,
                *weights,
                float(math.sqrt(embed)), NORM_EPS, input_gain,
                T=window, K=k, H=hidden, E=embed, HH=head_hidden,
                TP=_pow2(window), BK=min(config["block_k"], _pow2(k)), HP=_pow2(hidden),
                BN=min(config["block_n"], _pow2(hidden)), EP=_pow2(embed), HHP=_pow2(head_hidden, 2), KP=kp,
                PRECISION=precision, SORT=sort_by_newest, AMPLIFY=input_gain != 1.0,
                num_warps=config["num_warps"], num_stages=config["num_stages"],
            )

        if given:
            launch({**PREDICT_CONFIGS[0], **given})
        else:
            _launch_fitting(launch, device)
    _launch(_prefix_kernel, (1,), device, prob, prefix, num_rows, float(threshold), BLOCK=256)
    return prob, prefix


# --------------------------------------------------------------------------------------------
# gather_rows: activation-cache rows read by index straight from pinned host memory


@triton.jit
def _gather_rows_kernel(src_ptr, index_ptr, out_ptr, num_rows, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = col < width
    slot = tl.load(index_ptr + row)
    in_range = (slot >= 0) & (slot < num_rows)
    words = tl.load(src_ptr + slot * width + col, mask=inside & in_range, other=0)
    tl.store(out_ptr + row.to(tl.int64) * width + col, words, mask=inside)


def _word_view(t: Tensor) -> Tensor:
    """``t`` (2-D, rows contiguous) as rows of the widest integer words its row bytes divide
    into: a row is copied as raw bits, whatever its dtype (fp32, bf16, fp8, scales)."""
    row_bytes = t.shape[1] * t.element_size()
    for word, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if row_bytes % size == 0 and t.data_ptr() % size == 0:
            return t.view(torch.uint8).view(word)
    return t.view(torch.uint8)


def gather_rows(source: Tensor, index: Tensor, *, block: int = 1024) -> Tensor:
    """``source[index]`` on ``index``'s GPU, read in place from ``source``, which may live in
    pinned host memory: CUDA maps pinned memory into the GPU's address space, so the kernel
    reads the rows over PCIe with no staging copy and no host work per row (the alternative,
    ``index_select`` into a pinned buffer then a copy, spends CPU time on every row).

    ``source``: ``[N, D]`` with contiguous rows, on the GPU or pinned (under the interpreter: the
    CPU); ``index``: int64 ``[R]`` on the GPU. An index outside ``[0, N)`` gives a row of zero
    bits rather than a fault (the device cannot raise; callers check indices on the host).
    """
    if source.dim() != 2 or source.stride(1) != 1 or source.stride(0) != source.shape[1]:
        raise ValueError(f"gather_rows: source must be a 2-D tensor with contiguous rows, got shape "
                         f"{tuple(source.shape)} and strides {source.stride()}")
    _check_device("gather_rows", index.device)
    _check_index("index", index, torch.int64, 1, index.device)
    if not INTERPRET and source.device != index.device and not source.is_pinned():
        raise ValueError(f"gather_rows: source is on {source.device} and not pinned, so the GPU cannot read it; "
                         "allocate it with pin_memory=True or move it to the GPU")
    out = torch.empty(index.numel(), source.shape[1], dtype=source.dtype, device=index.device)
    if index.numel() and source.shape[1]:
        words_in, words_out = _word_view(source), _word_view(out)
        width = words_in.shape[1]
        grid = (index.numel(), triton.cdiv(width, block))
        _launch(_gather_rows_kernel, grid, index.device, words_in, index, words_out, source.shape[0], width,
                BLOCK=block)
    return out


# --------------------------------------------------------------------------------------------
# cache_store / cache_load: activation-cache rows into fp32, bf16 or fp8 (e4m3, per-row scale)
# storage and back. The conversions to bf16 and fp8 are written out on the bits (round to
# nearest even, as torch converts), not left to Triton's casts: bit-exact with the reference on
# the GPU, and also in the CPU interpreter, whose bf16 and fp8 casts round otherwise.

_STORAGE_CODES: Dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2}
_ROW_DTYPE_CODES: Dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
ROW_DTYPES = tuple(_ROW_DTYPE_CODES)  # activation dtypes the cache kernels take
STORAGE_DTYPES = tuple(_STORAGE_CODES)  # storage the cache kernels take (float64 rows: the reference)


@triton.jit
def _bf16_bits(x):
    """fp32 -> bf16 bits (in a uint32): round to nearest even, NaN -> 0x7FC0, as torch."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded)


@triton.jit
def _bf16_value(bits):
    """bf16 bits (int32, low 16 bits) -> fp32, exactly."""
    return ((bits & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_bits(x):
    """fp32 within [-448, 448], or NaN -> float8_e4m3fn bits (in a uint32): round to nearest
    even, NaN -> 0x7F, as torch."""
    u = x.to(tl.uint32, bitcast=True)
    a = tl.abs(x)
    au = a.to(tl.uint32, bitcast=True)
    # normal (>= 2^-6): exponent and mantissa are contiguous, so rounding the fp32 mantissa to 3
    # bits carries into the exponent by itself; then rebias 127 -> 7
    normal = ((au + 0x7FFFF + ((au >> 20) & 1)) >> 20) - ((127 - 7) << 3)
    # subnormal: a / 2^-9 rounded to an integer (0..8) by the fp32 add's own rounding
    subnormal = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)
    code = tl.where(a >= 0.015625, normal, subnormal)
    return tl.where(x != x, 0x7F, ((u >> 24) & 0x80) | code)


@triton.jit
def _e4m3_value(bits):
    """float8_e4m3fn bits (int32, low 8 bits) -> fp32, exactly."""
    exponent = (bits >> 3) & 0xF
    mantissa = bits & 7
    normal = (((exponent + (127 - 7)) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    magnitude = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
    magnitude = tl.where((bits & 0x7F) == 0x7F, float("nan"), magnitude)
    # the sign as a bit, not as -magnitude: Triton before 3.8 negates a float as 0 - x, which
    # turns fp8 -0.0 (0x80) into +0.0, compiled and interpreted alike
    sign = (bits & 0x80).to(tl.uint32) << 24
    return (magnitude.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _cache_store_kernel(values_ptr, slots_ptr, data_ptr, scales_ptr, width,
                        STORAGE: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: ``values[row]`` into storage row ``slots[row]``. fp8: the row's
    largest finite magnitude maps to 448; a row holding NaN or inf is stored as NaN (scale NaN)."""
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    src = values_ptr + row.to(tl.int64) * width
    dst = data_ptr + slot * width
    if STORAGE == 2:
        amax = tl.zeros((), tl.float32)
        bad = tl.zeros((), tl.int32)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(src + cols, mask=cols < width, other=0.0).to(tl.float32)
            finite = tl.abs(x) < float("inf")  # false for inf and NaN
            bad = tl.maximum(bad, tl.max((~finite).to(tl.int32), 0))
            amax = tl.maximum(amax, tl.max(tl.where(finite, tl.abs(x), 0.0), 0))
        scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
        scale = tl.where(bad > 0, float("nan"), scale)
        tl.store(scales_ptr + slot, scale)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(src + cols, mask=cols < width, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
            q = tl.where(bad > 0, float("nan"), q)
            tl.store(dst + cols, _e4m3_bits(q).to(tl.uint8), mask=cols < width)
    else:
        tl.store(scales_ptr + slot, 1.0)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(src + cols, mask=cols < width, other=0.0).to(tl.float32)
            if STORAGE == 1:
                tl.store(dst + cols, _bf16_bits(x).to(tl.int16), mask=cols < width)
            else:
                tl.store(dst + cols, x, mask=cols < width)


@triton.jit
def _cache_load_kernel(data_ptr, scales_ptr, slots_ptr, out_ptr, width,
                       STORAGE: tl.constexpr, OUT: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (rows, column blocks): storage row ``slots[row]``, dequantised, as ``out[row]``."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    slot = tl.load(slots_ptr + row)
    raw = tl.load(data_ptr + slot * width + cols, mask=inside, other=0)
    if STORAGE == 2:
        x = _e4m3_value(raw.to(tl.int32)) * tl.load(scales_ptr + slot)
    elif STORAGE == 1:
        x = _bf16_value(raw.to(tl.int32))
    else:
        x = raw
    dst = out_ptr + row.to(tl.int64) * width + cols
    if OUT == 1:
        tl.store(dst, _bf16_bits(x).to(tl.int16), mask=inside)
    elif OUT == 2:
        tl.store(dst, x.to(tl.float16), mask=inside)
    else:
        tl.store(dst, x, mask=inside)


def _storage_view(data: Tensor) -> Tensor:
    """Storage as the kernels address it: fp32 as is, bf16 as int16 bits, fp8 as uint8 bits."""
    if data.dtype == torch.bfloat16:
        return data.view(torch.int16)
    return data.view(torch.uint8) if data.dtype == torch.float8_e4m3fn else data


def _check_storage(name: str, data: Tensor, scales: Tensor, slots: Tensor) -> None:
    _check_device(name, data.device)
    if data.dtype not in _STORAGE_CODES or data.dim() != 2 or not data.is_contiguous():
        raise TypeError(f"{name}: data must be a contiguous 2-D tensor of {list(_STORAGE_CODES)}, got "
                        f"{data.dim()}-D {data.dtype}")
    if scales.dtype != torch.float32 or scales.shape != data.shape[:1] or scales.device != data.device:
        raise TypeError(f"{name}: scales must be float32 [{data.shape[0]}] on {data.device}, got "
                        f"{scales.dtype} {tuple(scales.shape)} on {scales.device}")
    if slots.dtype != torch.int64 or slots.dim() != 1 or slots.device != data.device:
        raise TypeError(f"{name}: slots must be a 1-D int64 tensor on {data.device}, got {slots.dim()}-D "
                        f"{slots.dtype} on {slots.device}")


def cache_store(values: Tensor, slots: Tensor, data: Tensor, scales: Tensor, *, block: int = 1024) -> None:
    """Triton ``smartfrz::cache_store``: one launch, one program per row. ``slots`` must be
    distinct and inside ``[0, len(data))`` (the cache allocates them so; the device cannot raise)."""
    _check_storage("cache_store", data, scales, slots)
    if values.dim() != 2 or values.shape != (slots.numel(), data.shape[1]) or values.dtype not in _ROW_DTYPE_CODES:
        raise TypeError(f"cache_store: values must be [{slots.numel()}, {data.shape[1]}] rows of "
                        f"{list(_ROW_DTYPE_CODES)}, got {tuple(values.shape)} {values.dtype}")
    if values.device != data.device:
        raise ValueError(f"cache_store: values are on {values.device}, the storage on {data.device}")
    if slots.numel() == 0:
        return
    values = values.contiguous()
    _launch(_cache_store_kernel, (slots.numel(),), data.device, values, slots, _storage_view(data), scales,
            data.shape[1], STORAGE=_STORAGE_CODES[data.dtype],
            BLOCK=min(block, triton.next_power_of_2(max(1, data.shape[1]))))


def cache_load(data: Tensor, scales: Tensor, slots: Tensor, dtype: torch.dtype, *, block: int = 1024) -> Tensor:
    """Triton ``smartfrz::cache_load``: rows ``slots`` of ``data`` as ``[N, D]`` ``dtype`` (fp32,
    bf16, fp16), dequantised; grid (rows, column blocks). ``slots`` inside ``[0, len(data))``."""
    _check_storage("cache_load", data, scales, slots)
    if dtype not in _ROW_DTYPE_CODES:
        raise TypeError(f"cache_load: dtype must be one of {list(_ROW_DTYPE_CODES)}, got {dtype}")
    out = torch.empty(slots.numel(), data.shape[1], dtype=dtype, device=data.device)
    if slots.numel() and data.shape[1]:
        block = min(block, triton.next_power_of_2(data.shape[1]))
        target = out.view(torch.int16) if dtype == torch.bfloat16 else out
        _launch(
            _cache_load_kernel, (slots.numel(), triton.cdiv(data.shape[1], block)), data.device,
            _storage_view(data), scales, slots, target, data.shape[1],
            STORAGE=_STORAGE_CODES[data.dtype], OUT=_ROW_DTYPE_CODES[dtype], BLOCK=block)
    return out
