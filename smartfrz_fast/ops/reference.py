"""Pure-PyTorch references of every op: the specification, and the CPU fallback.

Each function here defines what its op computes. Kernels (C++ in csrc/, Triton and CUDA
later) are tested against these on random inputs; nothing here is tuned for speed.

Conventions shared by the ops (see ``smartfrz_fast.history`` for who builds these tensors):

- ``history``: float32 ``[U, T, K]`` ring buffer, U units, T snapshots, K sampled weights.
- ``cursor``: int64 0-dim tensor, the number of snapshots taken so far; the next snapshot
  goes to slot ``cursor % T`` and the newest one sits in slot ``(cursor - 1) % T``.
- ``source_ids``: int32 ``[U, K]``, index into the list of source tensors, -1 where a unit
  has fewer than K weights (masked; the valid positions of a unit come first).
- ``offsets``: int64 ``[U, K]``, element offset from the source tensor's first element,
  strides already applied (so non-contiguous parameters are read where they live).
- ``valid``: int64 ``[U]``, number of valid (unmasked) positions of each unit.
- ``rows``: int64 ``[R]``, the units (rows of ``history``) an op works on, in order.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

# Layout of the predictor's flat weight list: Q, K, V and head MLPs, three Linear layers
# each, weight then bias. ``predictor.model.AttentionPredictor.flat_weights`` produces it.
PREDICTOR_MLPS = ("query", "key", "value", "head")
WEIGHTS_PER_MLP = 6
NUM_PREDICTOR_WEIGHTS = len(PREDICTOR_MLPS) * WEIGHTS_PER_MLP
NORM_EPS = 1e-8


def _strided_span(t: Tensor) -> Tensor:
    """A 1-D view of every element ``t`` can address, so that offsets index its storage."""
    if t.numel() == 0:
        return t.new_empty(0)
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.as_strided((span,), (1,))


HISTORY_SOURCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def gather_history_ref(
    sources: Sequence[Tensor],
    source_ids: Tensor,
    offsets: Tensor,
    rows: Tensor,
    cursor: Tensor,
    history: Tensor,
) -> None:
    """Write the sampled weights of units ``rows`` into slot ``cursor % T`` of ``history``."""
    bad = next((s for s in sources if s.dtype not in HISTORY_SOURCE_DTYPES), None)
    if bad is not None:  # as the kernels refuse it (an int8 tensor was read as numbers)
        raise TypeError(f"gather_history: a source has dtype {bad.dtype}; supported: float32, float16, bfloat16, "
                        "float64")
    slot = int(cursor) % history.shape[1]
    ids, offsets = source_ids[rows].flatten().long(), offsets[rows].flatten()
    values = torch.zeros(ids.shape[0], dtype=history.dtype, device=history.device)  # masked (-1): 0
    # the positions grouped by source, one host read: a mask per source over every position was
    # quadratic in depth (963 ms a snapshot at 400 units, the C++ gather 7 ms; review105)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids + 1, minlength=len(sources) + 1).tolist()
    start = counts[0]
    for source, count in zip(sources, counts[1:]):
        if count:
            at = order[start:start + count]
            values[at] = _strided_span(source.detach())[offsets[at]].to(history.dtype)
        start += count
    history[rows, slot] = values.view(rows.shape[0], source_ids.shape[1])


def chronological_window(history: Tensor, cursor: Tensor, rows: Tensor) -> Tensor:
    """``[R, T, K]`` window of ``rows``, oldest snapshot first, newest last."""
    t = history.shape[1]
    order = (torch.arange(t, device=history.device) + cursor) % t
    return history[rows][:, order]


def normalize_window(window: Tensor, valid: Tensor) -> Tensor:
    """Standardise each snapshot over its unit's valid positions; masked positions become 0.

    Per-snapshot statistics (not per-window) hide the weights' scale from the predictor and
    keep an old snapshot's normalised value fixed while the window slides, which lets a fast
    path cache the key/value embeddings of old snapshots.
    """
    mask, mean, var = window_moments(window, valid)
    return (window - mean) * mask / torch.sqrt(var + NORM_EPS)


def window_moments(window: Tensor, valid: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(mask [R, 1, K], mean [R, T, 1], variance [R, T, 1])`` of each snapshot over its
    unit's valid positions (two passes: no cancellation for large means)."""
    k = window.shape[-1]
    mask = (torch.arange(k, device=window.device) < valid[:, None]).to(window.dtype)[:, None, :]
    count = mask.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (window * mask).sum(-1, keepdim=True) / count
    centered = (window - mean) * mask
    return mask, mean, (centered * centered).sum(-1, keepdim=True) / count


def sort_by_newest(history: Tensor, newest: Tensor, valid: Tensor) -> Tensor:
    """Reorder each unit's K positions by the newest snapshot's value (ascending, masked
    positions kept last), the same order for every snapshot of the window.

    The sampled positions are an arbitrary draw, and a predictor fed them in draw order learns
    the zoo's units by heart (measured: it fits the training families and stays at chance on
    held-out ones). In rank order every unit looks alike and only the dynamics differ.
    Ties are stable: equal newest values (-0.0 equals 0.0) keep their position order, here and
    in the Triton kernel. ``history [..., T, K]``, ``newest [..., 1, K]``, ``valid``
    broadcastable to ``[...]``.
    """
    k = history.shape[-1]
    masked = torch.arange(k, device=history.device) >= valid[..., None, None]
    key = torch.where(masked, torch.full_like(newest, float("inf")), newest)
    order = torch.argsort(key, dim=-1, stable=True).expand_as(history)
    return torch.gather(history, -1, order)


def amplify_deviation(history: Tensor, newest: Tensor, gain: float) -> Tensor:
    """Each snapshot's deviation from the newest one, ``gain`` times larger (newest unchanged).

    Consecutive snapshots of a layer are near-identical after per-snapshot standardisation
    (correlation 0.99-0.9999 over a window, measured on the zoo), so the op's normalisation alone
    leaves the predictor to resolve differences of 1e-3 (a predictor trained that way stayed at
    chance). Amplifying the deviation first keeps the normalisation as it is, and stays
    scale-free (affine in the unit's own weights). ``history [U, T, K]``, ``newest [U, 1, K]``.
    """
    return newest + gain * (history - newest)


def check_input_gain(gain: float) -> float:
    """``gain`` as a float, or a clear error: a non-finite gain would make every window
    non-finite, and the predictor would silently never freeze anything."""
    gain = float(gain)
    if not math.isfinite(gain):
        raise ValueError(f"input_gain must be a finite number (the predictor's provenance gives it), got {gain}")
    return gain


def transform_window(window: Tensor, valid: Tensor, gain: float = 1.0, sort: bool = False) -> Tensor:
    """The predictor's input transform on chronological windows ``[..., T, K]`` (newest last):
    ``sort_by_newest`` if ``sort``, then ``amplify_deviation`` by ``gain`` (skipped at 1, where
    it is the identity). The predict op applies it before its normalisation.
    """
    if sort:
        window = sort_by_newest(window, window[..., -1:, :], valid)
    if check_input_gain(gain) != 1.0:
        window = amplify_deviation(window, window[..., -1:, :], gain)
    return window


def _mlp(x: Tensor, weights: Sequence[Tensor]) -> Tensor:
    w1, b1, w2, b2, w3, b3 = weights
    x = torch.relu(torch.nn.functional.linear(x, w1, b1))
    x = torch.relu(torch.nn.functional.linear(x, w2, b2))
    return torch.nn.functional.linear(x, w3, b3)


def predictor_logits_ref(normalized: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """SmartFRZ attention predictor on normalised windows ``[N, T, K]`` -> logits ``[N, 2]``.

    The query comes from the newest snapshot, keys and values from the T-1 older ones; the
    attention has no positional term, so the keys' order does not matter.
    """
    if len(weights) != NUM_PREDICTOR_WEIGHTS:
        raise ValueError(f"predictor expects {NUM_PREDICTOR_WEIGHTS} weight tensors, got {len(weights)}")
    wq, wk, wv, wh = (weights[i * WEIGHTS_PER_MLP:(i + 1) * WEIGHTS_PER_MLP] for i in range(4))
    query = _mlp(normalized[:, -1], wq)  # [N, D]
    keys = _mlp(normalized[:, :-1], wk)  # [N, T-1, D]
    values = _mlp(normalized[:, :-1], wv)  # [N, T-1, D]
    scores = torch.einsum("nd,ntd->nt", query, keys) / math.sqrt(query.shape[-1])
    attention = torch.softmax(scores, dim=-1)
    context = torch.einsum("nt,ntd->nd", attention, values)
    return _mlp(context, wh)


def freezable_prefix(prob: Tensor, threshold: float) -> Tensor:
    """Number of leading entries of ``prob`` at or above ``threshold`` (int64, 0-dim)."""
    ok = (prob >= threshold).to(torch.int64)
    return torch.cumprod(ok, 0).sum()


def check_window_length(history: Tensor) -> None:
    """Every predict backend's first check: with no key, every window would read the same."""
    if history.shape[1] < 2:
        raise ValueError(f"predict needs a window of at least 2 snapshots (1 query + keys), history has "
                         f"{history.shape[1]}")


def predict_ref(
    history: Tensor,
    cursor: Tensor,
    rows: Tensor,
    valid: Tensor,
    weights: Sequence[Tensor],
    threshold: float,
    input_gain: float = 1.0,
    sort_by_newest: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Freeze probability of each unit in ``rows`` and the freezable prefix length.

    Each window goes through ``transform_window(window, valid, input_gain, sort_by_newest)``
    (the input transform the predictor was trained with; the identity at the defaults), then
    the per-snapshot normalisation. A unit whose transformed window holds a NaN or inf, or
    whose snapshot mean or variance overflows float32 (weights beyond ~1e19), gets probability
    0: it never freezes on bad data. So does a NaN probability (NaN predictor weights).
    """
    check_window_length(history)
    window = transform_window(chronological_window(history, cursor, rows), valid[rows], input_gain, sort_by_newest)
    finite = torch.isfinite(window).flatten(1).all(1)
    window = torch.where(finite[:, None, None], window, torch.zeros_like(window))
    _, mean, var = window_moments(window, valid[rows])
    finite &= (torch.isfinite(mean) & torch.isfinite(var)).flatten(1).all(1)
    normalized = normalize_window(window, valid[rows])
    logits = predictor_logits_ref(normalized, [w.to(normalized.dtype) for w in weights])
    prob = torch.softmax(logits.float(), dim=-1)[:, 1]
    prob = torch.where(finite & ~prob.isnan(), prob, torch.zeros_like(prob))
    return prob, freezable_prefix(prob, threshold)



# ---------------------------------------------------------------------------------------------
# Activation cache storage (smartfrz::cache_store / smartfrz::cache_load).
#
# ``data`` is ``[C, D]`` (C cache rows of D elements) in float64, float32, bfloat16 or float8_e4m3fn;
# ``scales`` is float32 ``[C]``: the per-row scale of fp8 rows (1 for the other dtypes);
# ``slots`` is int64 ``[N]``, the cache row of each of the N values/outputs.

FP8_MAX = 448.0  # largest finite float8_e4m3fn
CACHE_STORAGE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float8_e4m3fn)


def cache_store_ref(values: Tensor, slots: Tensor, data: Tensor, scales: Tensor) -> None:
    """Write ``values[i]`` (any float dtype, ``[N, D]``) into row ``slots[i]`` of ``data``.

    fp8 rows are scaled so that the row's largest magnitude maps to 448 (a zero row keeps
    scale 1); a row holding NaN or inf is stored as NaN, so it can never load as a finite lie.
    """
    if data.dtype == torch.float64:  # exact for every float input, float64 included
        data[slots] = values.detach().to(torch.float64)
        scales[slots] = 1.0
        return
    rows = values.detach().to(torch.float32)
    if data.dtype == torch.float8_e4m3fn:
        amax = rows.abs().amax(1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        scale = torch.where(torch.isfinite(amax), scale, torch.full_like(amax, float("nan")))
        data[slots] = (rows / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(data.dtype)
        scales[slots] = scale
    else:
        data[slots] = rows.to(data.dtype)
        scales[slots] = 1.0


def cache_load_ref(data: Tensor, scales: Tensor, slots: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows ``slots`` of ``data`` as ``[N, D]`` in ``dtype`` (fp8 rows times their scale)."""
    if data.dtype == torch.float64:
        return data[slots].to(dtype)
    rows = data[slots].to(torch.float32)
    if data.dtype == torch.float8_e4m3fn:
        rows = rows * scales[slots][:, None]
    return rows.to(dtype)
