"""SmartFRZ (Li et al., ICLR 2023): an attention predictor reads each unit's weight history.

Every ``evaluate_every`` steps, once every active unit's window is full, one ``smartfrz::predict``
call scores all active units on their device and returns the freezable prefix length as a
device tensor; the engine applies it a step later without stalling the training stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from .base import Decision, FreezePolicy, PolicyContext

# The predictor was trained on runs snapshotted this many times from start to end, so its
# 30-snapshot window spans a quarter of a run; in use the engine is asked for the same pace.
SNAPSHOTS_PER_RUN = 120
# A unit freezes once the predictor called it freezable this many evaluations in a row (the
# engine never unfreezes, so patience > 1 trades savings for fewer early freezes). Default 1:
# the leave-one-family-out replay on the zoo picked it (docs/predictor.md, "Policy settings").
DEFAULT_PATIENCE = 1


def snapshot_interval(total_steps: int, snapshots: int = SNAPSHOTS_PER_RUN) -> int:
    """Steps between weight snapshots for a run of ``total_steps`` optimizer steps."""
    return max(1, int(total_steps) // snapshots)


class SmartFRZ(FreezePolicy):
    name = "smartfrz"
    needs_history = True

    def __init__(self, weights: Optional[Union[str, Path]] = None, threshold: float = 0.5,
                 evaluate_every: Optional[int] = None, patience: int = DEFAULT_PATIENCE):
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ValueError(f"SmartFRZ threshold is a probability in (0, 1), got {threshold!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"SmartFRZ patience is a number of evaluations >= 1, got {patience!r}")
        if evaluate_every is not None and (isinstance(evaluate_every, bool) or not isinstance(evaluate_every, int)
                                           or evaluate_every < 1):
            raise ValueError(f"SmartFRZ evaluate_every is a number of steps >= 1, or None, got {evaluate_every!r}")
        from ..predictor import load_predictor

        # Loaded now, so that missing or corrupt weights fail before training starts.
        self.predictor = load_predictor(weights)
        self.threshold = threshold
        self.evaluate_every = evaluate_every
        self.patience = patience
        self.last_probabilities: Optional[torch.Tensor] = None
        self._evaluated_at = -1  # history.count at the last evaluation
        # [U] int32 on the device: evaluations in a row each unit was called freezable
        self._streak: Optional[torch.Tensor] = None

    @staticmethod
    def sample_every_for(total_steps: Optional[int]) -> int:
        """The engine's snapshot interval when the user gives none: the pace the predictor
        was trained at (``SNAPSHOTS_PER_RUN`` per run); every step without ``total_steps``."""
        return 1 if not total_steps else snapshot_interval(total_steps)

    def state_dict(self) -> Dict[str, Any]:
        # which snapshot was scored last (a resumed run must not score it again) and the streaks
        streak = None if self._streak is None else self._streak.detach().cpu().clone()  # a copy, not a view
        return {"evaluated_at": self._evaluated_at, "streak": streak}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        # checked whole before anything changes: a wrong-shape streak would fail at the next step
        if not isinstance(state, dict) or set(state) - {"evaluated_at", "streak"}:
            raise ValueError(f"SmartFRZ: policy state {state!r:.80} is not SmartFRZ.state_dict()'s "
                             "{'evaluated_at', 'streak'}")
        evaluated_at, streak = state.get("evaluated_at", -1), state.get("streak")
        if isinstance(evaluated_at, bool) or not isinstance(evaluated_at, int) or evaluated_at < -1:
            raise ValueError(f"SmartFRZ: policy state evaluated_at={evaluated_at!r} is not a snapshot count (>= -1)")
        units = self.context.num_units if self.context is not None else None
        if streak is not None and not (isinstance(streak, torch.Tensor) and streak.dtype == torch.int32
                                       and streak.dim() == 1 and (units is None or streak.numel() == units)
                                       and bool((streak >= 0).all())):
            what = (f"{streak.dtype} {tuple(streak.shape)}" if isinstance(streak, torch.Tensor)
                    else type(streak).__name__)
            raise ValueError(f"SmartFRZ: policy state streak is {what}; expected int32 ({units},) counts >= 0 "
                             "(one per unit): the checkpoint is corrupt or from another model.")
        self._evaluated_at = evaluated_at
        self._streak = None if streak is None else streak.clone()

    def bind(self, context: PolicyContext) -> None:
        super().bind(context)
        config = self.predictor.config
        history = context.history
        if (history.sample_size, history.window) != (config.sample_size, config.window):
            raise ValueError(
                f"the SmartFRZ predictor was trained on windows of {config.window} snapshots of "
                f"{config.sample_size} weights; the engine records {history.window} x "
                f"{history.sample_size}. Construct SmartFreezer with window={config.window}, "
                f"sample_size={config.sample_size}."
            )
        self.predictor.to(context.device)
        self._weights = [w.detach() for w in self.predictor.flat_weights()]
        # the input transform the weights were trained with (1: none; see amplify_deviation)
        self.input_gain = float(self.predictor.provenance.get("input_gain", 1.0))
        self.sort_inputs = bool(self.predictor.provenance.get("sort_by_newest", False))

    def decides_at(self, step: int) -> bool:
        # from what every rank shares (step, history.count): under DDP rank 0 broadcasts only here
        history = self.context.history
        if not history.full:
            return False
        if self.evaluate_every is None:
            return history.count != self._evaluated_at
        return step % self.evaluate_every == 0

    def decide(self, step: int, frozen: int) -> Optional[Decision]:
        history = self.context.history
        if not history.full or history.rows.numel() == 0:
            return None
        if self.evaluate_every is None:  # default: once per new snapshot
            if history.count == self._evaluated_at:
                return None
            self._evaluated_at = history.count
        elif step % self.evaluate_every:
            return None
        from .. import ops

        # the op applies the input transform of training while it reads each window (fused on CUDA)
        prob, prefix = ops.predict(history.history, history.cursor, history.rows, history.valid,
                                   self._weights, self.threshold, self.input_gain, self.sort_inputs)
        self.last_probabilities = prob
        if self.patience == 1:
            return prefix + history.first_active
        # device ops only (no host sync): count the evaluations in a row each active unit cleared
        # the threshold, and freeze the leading run of units that did so `patience` times
        if self._streak is None or self._streak.device != prob.device:
            streak = torch.zeros(history.history.shape[0], dtype=torch.int32, device=prob.device)
            self._streak = streak if self._streak is None else self._streak.to(prob.device)
        rows = history.rows
        streak = torch.where(prob >= self.threshold, self._streak.index_select(0, rows) + 1, 0).to(torch.int32)
        self._streak.index_copy_(0, rows, streak)
        ready = (streak >= self.patience).to(torch.int64)
        return torch.cumprod(ready, 0).sum() + history.first_active

    def describe(self) -> str:
        return (f"SmartFRZ(threshold={self.threshold}, patience={self.patience}, evaluate_every={self.evaluate_every}, "
                f"window={self.predictor.config.window}, K={self.predictor.config.sample_size})")
