"""The predict op on the CPU, computed as ``reference.predict_ref`` defines it, in fewer passes.

Both make each window with the reference's ``chronological_window`` and ``transform_window``.
The reference then computes its moments twice (``normalize_window`` again) in passes that copy
it, and runs the key and value MLPs' first layers, the op's main cost, as two batched products
over a strided view. Here the window is normalised in place, and those two first layers are one
matrix product over a contiguous ``[R * (T - 1), K]`` matrix. Measured side by side on this CPU
(1 thread, windows of 30 x 1024, the shipped predictor's transform; bench/bench_history_ops.py
rows "cpu fused passes", and alternating processes): 1.3-1.9x faster than the reference at 20,
54 and 102 units (102: 64-80 ms against 87-126 ms: the reference's time moves by 40 % from one
process to the next, this path's little). What remains is those products (about 40 MFLOP per
unit): the predictor's cost.
Tested against the reference on random inputs (tests/test_ops.py).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

from .reference import (NORM_EPS, NUM_PREDICTOR_WEIGHTS, WEIGHTS_PER_MLP, check_window_length, chronological_window,
                        freezable_prefix, transform_window)


def predict_cpu(
    history: Tensor,
    cursor: Tensor,
    rows: Tensor,
    valid: Tensor,
    weights: Sequence[Tensor],
    threshold: float,
    input_gain: float = 1.0,
    sort_by_newest_snapshot: bool = False,
) -> Tuple[Tensor, Tensor]:
    """``reference.predict_ref``, within float32 rounding (the sums run in another order)."""
    check_window_length(history)
    if len(weights) != NUM_PREDICTOR_WEIGHTS:
        raise ValueError(f"predictor expects {NUM_PREDICTOR_WEIGHTS} weight tensors, got {len(weights)}")
    k = history.shape[2]
    valid = valid[rows]
    # a copy of its own (advanced indexing), oldest snapshot first: normalised in place below
    window = transform_window(chronological_window(history, cursor, rows), valid, input_gain, sort_by_newest_snapshot)
    finite = torch.isfinite(window).flatten(1).all(1)  # masked positions too, as the reference
    if not bool(finite.all()):
        window = torch.where(finite[:, None, None], window, torch.zeros_like(window))
    mask = (torch.arange(k, device=window.device) < valid[:, None]).to(window.dtype)[:, None, :]
    count = mask.sum(-1, keepdim=True).clamp_min(1.0)
    mean = window.mul_(mask).sum(-1, keepdim=True) / count
    centered = window.sub_(mean).mul_(mask)
    var = (centered * centered).sum(-1, keepdim=True) / count
    finite &= (torch.isfinite(mean) & torch.isfinite(var)).flatten(1).all(1)
    normalized = centered.div_(torch.sqrt(var + NORM_EPS))
    logits = _logits(normalized, [w.to(normalized.dtype) for w in weights])
    prob = torch.softmax(logits.float(), dim=-1)[:, 1]
    prob = torch.where(finite & ~prob.isnan(), prob, torch.zeros_like(prob))
    return prob, freezable_prefix(prob, threshold)


def _logits(normalized: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """``reference.predictor_logits_ref``: the key and value MLPs' first layers in one product."""
    wq, wk, wv, wh = (weights[i * WEIGHTS_PER_MLP:(i + 1) * WEIGHTS_PER_MLP] for i in range(4))
    n, t, k = normalized.shape
    older = normalized[:, :-1].reshape(n * (t - 1), k)
    # (joined at every call, 0.35 ms: kept between calls, they were served stale when the weights
    # changed without a new version, and freed storage comes back at the same address, review108)
    hidden = torch.relu(torch.addmm(torch.cat([wk[1], wv[1]]), older, torch.cat([wk[0], wv[0]]).t()))
    width = wk[0].shape[0]
    keys = _last_layers(hidden[:, :width], wk)
    values = _last_layers(hidden[:, width:], wv)
    keys, values = keys.view(n, t - 1, keys.shape[-1]), values.view(n, t - 1, values.shape[-1])
    query = _last_layers(torch.relu(torch.nn.functional.linear(normalized[:, -1], wq[0], wq[1])), wq)
    scores = torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1) / math.sqrt(query.shape[-1])
    context = torch.bmm(torch.softmax(scores, dim=-1).unsqueeze(1), values).squeeze(1)
    hidden = torch.relu(torch.nn.functional.linear(context, wh[0], wh[1]))
    return _last_layers(hidden, wh)


def _last_layers(hidden: Tensor, weights: Sequence[Tensor]) -> Tensor:
    """An MLP of ``reference._mlp`` after its first layer (ReLU applied)."""
    hidden = torch.relu(torch.nn.functional.linear(hidden, weights[2], weights[3]))
    return torch.nn.functional.linear(hidden, weights[4], weights[5])
