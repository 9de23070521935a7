"""The predictor's windows scored exactly as SmartFRZ scores them in use, and offline metrics.

All windows of a unit are scored at once: the Q/K/V MLPs run once per snapshot and every
window picks its 29 keys/values from those embeddings. Because the input normalisation is per
snapshot, this is exactly ``predictor_logits_ref`` applied to each window (tested), at ~1/25
of the cost.

``offline_metrics``: on recorded runs, per-window balanced accuracy against the runs' labels
(either source), and the policy replayed on the recording: units freeze front to back at the
first window whose probability clears the policy threshold; how often that is *before* the
labels allow (freezing early is what costs accuracy), and the FLOPs it would save.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from ..ops.reference import normalize_window, predictor_logits_ref, transform_window
from ..predictor.model import AttentionPredictor
from .labels import RunData

INPUT_GAIN = 30.0  # see ops.reference.amplify_deviation; recorded in the weights' provenance
SORT_BY_NEWEST = True  # see ops.reference.sort_by_newest; recorded too


def window_logits(model: AttentionPredictor, history: Tensor, valid: Tensor, ends: Tensor,
                  gain: float = INPUT_GAIN) -> Tensor:
    """Logits ``[U, E, 2]`` of the windows of raw snapshots ``history [U, S, K]`` that end at
    snapshots ``ends [E]``: exactly what SmartFRZ computes in use (amplify, normalise per
    snapshot, ``predictor_logits_ref``)."""
    t = model.config.window
    u = history.shape[0]
    index = ends[:, None] + torch.arange(1 - t, 1)  # [E, T]
    windows = transform_window(history[:, index], valid[:, None], gain, SORT_BY_NEWEST).flatten(0, 1)  # [U*E, T, K]
    valid = valid.repeat_interleave(len(ends))
    logits = predictor_logits_ref(normalize_window(windows, valid), model.flat_weights())
    return logits.view(u, len(ends), 2)


@torch.no_grad()
def all_window_logits(model: AttentionPredictor, run: RunData, gain: float = INPUT_GAIN, chunk: int = 16) -> Tensor:
    """Logits ``[U, S - T + 1, 2]`` of every window of a recorded run."""
    t = model.config.window
    ends = torch.arange(t - 1, run.history.shape[1])
    return torch.cat([window_logits(model, run.history, run.valid, ends[i:i + chunk], gain)
                      for i in range(0, len(ends), chunk)], 1)


@torch.no_grad()
def window_probabilities(model, runs: Sequence[RunData], gain: Optional[float] = None) -> Dict[str, Tensor]:
    """The predictor's "freezable" probability ``[U, W]`` for every window of every run."""
    provenance = getattr(model, "provenance", {})  # a loaded file: the transform it was trained with
    if gain is None:
        gain = float(provenance.get("input_gain", INPUT_GAIN))
    if bool(provenance.get("sort_by_newest", SORT_BY_NEWEST)) != SORT_BY_NEWEST:
        raise ValueError(f"this predictor was trained with sort_by_newest={provenance['sort_by_newest']}; "
                         f"the offline pipeline scores windows with sort_by_newest={SORT_BY_NEWEST}")
    return {r.name: torch.softmax(all_window_logits(model, r, gain), -1)[..., 1] for r in runs}


def replay(prob: Tensor, window: int, snapshots: int, policy_threshold: float = 0.5, patience: int = 1) -> Tensor:
    """The front-to-back policy replayed on window probabilities ``[U, W]``: ``[U]`` snapshot at
    which each unit froze (``snapshots``: never)."""
    pred = prob >= policy_threshold
    streak = torch.zeros_like(prob, dtype=torch.int64)
    for w in range(prob.shape[1]):
        streak[:, w] = (streak[:, w - 1] + 1 if w else 1) * pred[:, w]
    ready = streak >= patience
    frozen_at = torch.full((prob.shape[0],), snapshots, dtype=torch.int64)
    n = 0
    for w in range(prob.shape[1]):
        while n < prob.shape[0] and bool(ready[n, w]):
            frozen_at[n] = w + window - 1
            n += 1
    return frozen_at


def flops_saved_of_units(forward_flops: Sequence[int], frozen_at: Tensor, snapshots: int) -> float:
    """Share of the (non-head) units' training FLOPs saved when each unit freezes at
    ``frozen_at`` (snapshot index; its backward, about 2/3 of its work, stops)."""
    flops = torch.tensor(forward_flops, dtype=torch.float64)
    share = flops / flops.sum()
    return float((share * (1 - frozen_at.double().clamp_max(snapshots) / snapshots)).sum() * 2 / 3)


@torch.no_grad()
def offline_metrics(model, runs: Sequence[RunData], policy_threshold: float = 0.5, gain: Optional[float] = None,
                    patience: int = 1, probs: Optional[Dict[str, Tensor]] = None) -> Dict:
    """Per family of ``runs``. ``probs``: the predictor's ``[U, W]`` probabilities per run name,
    if already computed (``window_probabilities``), to replay several policy settings cheaply."""
    probs = probs or window_probabilities(model, runs, gain)
    t = model.config.window
    out: Dict[str, Dict] = {}
    for family in sorted({r.family for r in runs}):
        tp = tn = fp = fn = 0
        early, lead, units, sim_saved, label_saved = 0, [], 0, [], []
        for r in (r for r in runs if r.family == family):
            prob = probs[r.name]
            y = r.labels(t).bool()
            pred = prob >= policy_threshold
            tp += int((pred & y).sum()); tn += int((~pred & ~y).sum())
            fp += int((pred & ~y).sum()); fn += int((~pred & y).sum())
            s = r.snapshots
            frozen_at = replay(prob, t, s, policy_threshold, patience)
            label_prefix = r.prefix_points(t)  # [U] snapshot index
            early += int((frozen_at < label_prefix).sum())
            lead += ((label_prefix - frozen_at).clamp_min(0).float() / s).tolist()
            units += prob.shape[0]
            sim_saved.append(flops_saved_of_units(r.forward_flops, frozen_at, s))
            label_saved.append(flops_saved_of_units(r.forward_flops, label_prefix, s))
        tpr = tp / max(tp + fn, 1)
        tnr = tn / max(tn + fp, 1)
        out[family] = {
            "windows": tp + tn + fp + fn, "balanced_accuracy": round((tpr + tnr) / 2, 4),
            "precision": round(tp / max(tp + fp, 1), 4), "recall": round(tpr, 4),
            "units_frozen_before_label": f"{early}/{units}",
            "mean_early_lead_of_run": round(sum(lead) / max(len(lead), 1), 4),
            "replayed_flops_saved_of_units": round(sum(sim_saved) / len(sim_saved), 4),
            "label_oracle_flops_saved_of_units": round(sum(label_saved) / len(label_saved), 4),
        }
    return out
