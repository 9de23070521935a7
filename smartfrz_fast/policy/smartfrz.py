"""SmartFRZ (Li et al., ICLR 2023): an attention predictor reads each unit's weight history.

Every ``evaluate_every`` steps, once every active unit's window is full, one ``smartfrz::predict``
call scores all active units on their device and returns the freezable prefix length as a
device tensor; the engine applies it a step later without stalling the training stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .base import Decision, FreezePolicy, PolicyContext


class SmartFRZ(FreezePolicy):
    name = "smartfrz"
    needs_history = True

    def __init__(self, weights: Optional[Union[str, Path]] = None, threshold: float = 0.5,
                 evaluate_every: int = 10):
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"SmartFRZ threshold is a probability in (0, 1), got {threshold}")
        if evaluate_every < 1:
            raise ValueError(f"SmartFRZ evaluate_every must be >= 1, got {evaluate_every}")
        from ..predictor import load_predictor

        # Loaded now, so that missing or corrupt weights fail before training starts.
        self.predictor = load_predictor(weights)
        self.threshold = threshold
        self.evaluate_every = evaluate_every
        self.last_probabilities: Optional[torch.Tensor] = None

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

    def decide(self, step: int, frozen: int) -> Optional[Decision]:
        history = self.context.history
        if step % self.evaluate_every or not history.full or history.rows.numel() == 0:
            return None
        from .. import ops

        prob, prefix = ops.predict(history.history, history.cursor, history.rows, history.valid,
                                   self._weights, self.threshold)
        self.last_probabilities = prob
        return prefix + history.first_active

    def describe(self) -> str:
        return (f"SmartFRZ(threshold={self.threshold}, evaluate_every={self.evaluate_every}, "
                f"window={self.predictor.config.window}, K={self.predictor.config.sample_size})")
