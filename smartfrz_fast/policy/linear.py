"""Linear layer freezing, as MosaicML Composer's ``LayerFreezing`` algorithm."""

from __future__ import annotations

import math
from typing import Optional

from .base import FreezePolicy, PolicyContext, plain_number


def composer_freeze_schedule(current_duration: float, freeze_start: float, freeze_level: float) -> float:
    """Fraction of layers to freeze, as Composer's ``_freeze_schedule``."""
    if current_duration <= freeze_start:
        return 0.0
    total_freezing_time = 1.0 - freeze_start
    freezing_time_elapsed = current_duration - freeze_start
    freezing_time_elapsed_frac = freezing_time_elapsed / total_freezing_time
    return freeze_level * freezing_time_elapsed_frac


class LinearFreeze(FreezePolicy):
    """Composer-style linear freezing schedule (MosaicML Composer,
    ``composer/algorithms/layer_freezing/layer_freezing.py``: ``_freeze_schedule`` and
    ``freeze_layers``; Composer attributes the idea to FreezeOut and Raghu et al. 2017)::

        progress = step / total_steps
        fraction = 0                                                       if progress <= freeze_start
                 = freeze_level * (progress - freeze_start) / (1 - freeze_start)   otherwise
        frozen   = int(fraction * (L - 1))     # Composer: int(pct * len(flat_children[0:-1]))

    Composer never freezes the last layer, hence L - 1 (L = all units); with keep_trainable=1
    this equals the engine's max_frozen, and the engine clamps any larger value.

    Deviations: Composer evaluates the schedule at ``Event.EPOCH_END`` with the elapsed
    fraction of training; here it is evaluated after every ``interval`` optimizer steps
    (default 1: every step), with progress = step / total_steps. ``interval`` = steps per
    epoch reproduces Composer's epoch-end evaluation exactly. Progress is capped at 1 when a
    run goes past ``total_steps``.
    """

    name = "linear"
    deterministic_schedule = True  # same decision on every rank: no broadcast

    def __init__(self, freeze_start: float = 0.5, freeze_level: float = 1.0, interval: int = 1) -> None:
        super().__init__()
        freeze_start, freeze_level, interval = map(plain_number, (freeze_start, freeze_level, interval))
        if (
            isinstance(freeze_start, bool)
            or not isinstance(freeze_start, (int, float))
            or not (0.0 <= float(freeze_start) < 1.0)
        ):
            raise ValueError(f"LinearFreeze: freeze_start must be in [0, 1), got {freeze_start!r}")
        if (
            isinstance(freeze_level, bool)
            or not isinstance(freeze_level, (int, float))
            or not (0.0 <= float(freeze_level) <= 1.0)
        ):
            raise ValueError(f"LinearFreeze: freeze_level must be in [0, 1], got {freeze_level!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"LinearFreeze: interval must be a positive int, got {interval!r}")
        self.freeze_start = float(freeze_start)
        self.freeze_level = float(freeze_level)
        self.interval = interval

    def needs_total_steps(self) -> bool:
        return True

    def bind(self, context: PolicyContext) -> None:
        super().bind(context)
        total = self._require_total_steps()
        self._warn_if_never_in_run(self._first_freeze_step(total) + 1, f"its first freeze (freeze_start="
                                   f"{self.freeze_start:g}, freeze_level={self.freeze_level:g}, decisions every "
                                   f"{self.interval} steps, {context.num_units} units) comes late",
                                   "Pass an earlier freeze_start, a larger freeze_level or a smaller interval.")

    def _first_freeze_step(self, total: int) -> float:
        """The first decision step whose schedule freezes a unit (inf: none ever does)."""
        span = self.freeze_level * (self.context.num_units - 1)
        if span < 1:
            return math.inf  # even at the end the schedule freezes int(span) = 0 units
        step = math.ceil((self.freeze_start + (1 - self.freeze_start) / span) * total)
        step = max(self.interval, -(-step // self.interval) * self.interval)
        while self.frozen_at(step) < 1 and step <= total:  # float rounding at the exact point
            step += self.interval
        return step

    def frozen_at(self, step: int) -> int:
        """The schedule's frozen-prefix length after ``step`` optimizer steps."""
        assert self.context is not None, "bind() first"
        total = self._require_total_steps()
        progress = min(step / total, 1.0)
        fraction = composer_freeze_schedule(progress, self.freeze_start, self.freeze_level)
        return int(fraction * (self.context.num_units - 1))

    def decide(self, step: int, frozen: int) -> Optional[int]:
        if step % self.interval != 0:
            return None
        return self.frozen_at(step)

    def describe(self) -> str:
        extra = f", interval={self.interval}" if self.interval != 1 else ""
        return f"LinearFreeze(freeze_start={self.freeze_start:g}, freeze_level={self.freeze_level:g}{extra})"
