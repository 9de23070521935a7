"""Step 2: CKA labels, and the recorded runs turned into training windows.

Rule: a unit is *freezable* from the first snapshot s at which its linear CKA against its own
representation at the end of training reached ``threshold`` and stayed there (every snapshot
from s to the end has CKA >= threshold). A window (T snapshots ending at s) is labelled 1 when
s is at or after that point. The last unit (the head, kept trainable by the engine) gets no
windows.

Default threshold 0.998, chosen in use: each zoo family's run retrained with the labels
themselves as the freeze schedule (``evaluate --label-oracle``, hindsight, no predictor) lost
1.90 points on average at 0.99, 1.24 at 0.995 and 0.94 at 0.998 (``docs/predictor.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch import Tensor

DEFAULT_THRESHOLD = 0.998
# A run whose network did not learn (test accuracy below this) has no meaningful "end of
# training" to label against; it is left out (and listed in the provenance).
MIN_ACCURACY = 0.2


def freeze_index(cka: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """``cka [U, S]`` -> ``[U]`` first snapshot from which CKA stays >= threshold (S if never)."""
    ok = cka >= threshold
    # stays ok to the end: reverse cumulative AND
    stays = torch.flip(torch.cumprod(torch.flip(ok, [1]).to(torch.int64), 1), [1]).bool()
    s = cka.shape[1]
    first = torch.where(stays, torch.arange(s).expand_as(stays), torch.full_like(stays, s, dtype=torch.int64))
    return first.min(1).values


def prefix_freeze_points(cka: Tensor, threshold: float, window: int = 1) -> Tensor:
    """``cka [U, S]`` -> ``[U]`` first snapshot at which the prefix ending at each unit may freeze:
    every unit in it has its label (a running max), and not before the first full window of
    ``window`` snapshots (the earliest a predictor can decide)."""
    return torch.cummax(freeze_index(cka, threshold).clamp_min(window - 1), 0).values


@dataclass
class RunData:
    """One recorded run, ready for training: its snapshots and per-unit CKA curves."""

    name: str
    family: str
    history: Tensor  # [U, S, K] float32 raw sampled weights, as the engine recorded them
    valid: Tensor  # [U] valid positions per unit
    cka: Tensor  # [U, S]
    units: List[str]
    forward_flops: List[int]

    def labels(self, threshold: float, window: int) -> Tensor:
        """``[U, S - window + 1]`` labels of the windows ending at snapshots window-1 .. S-1."""
        first = freeze_index(self.cka, threshold)
        ends = torch.arange(window - 1, self.cka.shape[1])
        return (ends[None, :] >= first[:, None]).float()


_RECORDING_FIELDS = {"name": str, "spec": dict, "units": list, "forward_flops": list, "valid": Tensor,
                     "history": Tensor, "cka": Tensor, "sample_every": int, "test_accuracy": float}


def load_recording(path: Path, fields: Sequence[str] = tuple(_RECORDING_FIELDS)) -> Dict:
    """A run recorded by ``collect.record_run``, loaded as data only (``weights_only=True``: a
    recording never runs code) and checked for the ``fields`` the caller reads and their shapes."""
    try:
        r = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable recorded run ({type(exc).__name__}: {exc}); record it again "
                         "with python -m smartfrz_fast.predictor.collect") from exc
    r = r if isinstance(r, dict) else {}
    wrong = [k for k in fields if not isinstance(r.get(k), _RECORDING_FIELDS[k]) or isinstance(r.get(k), bool)]
    if not wrong and "cka" in fields and (r["cka"].dim() != 2 or r["cka"].shape[1] < 1):
        wrong = ["cka (a [units, snapshots] tensor)"]
    if not wrong and "sample_every" in fields and r["sample_every"] < 1:
        wrong = ["sample_every (>= 1)"]
    if not wrong and "history" in fields:
        units = len(r["units"])
        if not (r["history"].dim() == 3 and r["history"].shape[0] == r["cka"].shape[0] == r["valid"].shape[0]
                == units == len(r["forward_flops"]) and "family" in r["spec"]):
            wrong = ["the shapes of history, cka, valid, units and forward_flops, or spec['family']"]
    if wrong:
        raise ValueError(f"{path} is not a recorded run of smartfrz_fast.predictor.collect: bad or missing {wrong}")
    return r


def load_runs(paths: Sequence[Path], drop_last_unit: bool = True, min_accuracy: float = MIN_ACCURACY,
              skipped: List[str] = None) -> List[RunData]:
    runs = []
    for path in paths:
        r = load_recording(path)
        if r["test_accuracy"] < min_accuracy:
            if skipped is not None:
                skipped.append(f"{r['name']} (accuracy {r['test_accuracy']:.3f})")
            continue
        hist, valid, cka = r["history"].float(), r["valid"], r["cka"].float()
        keep = slice(0, hist.shape[0] - 1) if drop_last_unit else slice(None)
        runs.append(RunData(
            name=r["name"], family=r["spec"]["family"],
            history=hist[keep], valid=valid[keep],
            cka=cka[keep], units=r["units"][keep], forward_flops=r["forward_flops"][keep],
        ))
    return runs


def label_summary(runs: Sequence[RunData], thresholds: Sequence[float]) -> Dict[str, Dict[float, float]]:
    """Per family: mean freeze point (fraction of the run) of the units, for each threshold."""
    out: Dict[str, Dict[float, float]] = {}
    for family in sorted({r.family for r in runs}):
        fam = [r for r in runs if r.family == family]
        out[family] = {}
        for t in thresholds:
            points = torch.cat([freeze_index(r.cka, t).float() / r.cka.shape[1] for r in fam])
            out[family][t] = float(points.mean())
    return out
