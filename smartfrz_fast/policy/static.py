"""Static freezing: a fixed prefix frozen at a fixed step."""

from __future__ import annotations

import warnings
from typing import Optional

from .base import FreezePolicy, PolicyContext, plain_number


class StaticFreeze(FreezePolicy):
    """Freeze the first ``num_units`` units once ``at_step`` optimizer steps are done::

        frozen(step) = num_units   if step >= at_step,   no decision before.

    ``decide`` is first called after step 1, so ``at_step`` 0 or 1 both freeze right after the
    first optimizer step. The classic "freeze all but the last k layers" baseline is
    ``StaticFreeze(L - k, at_step=1)``; the engine clamps ``num_units`` to its ``max_frozen``.
    """

    name = "static"
    deterministic_schedule = True  # same decision on every rank: no broadcast
    uses_total_steps = False  # a fixed step, whatever the run's length

    def __init__(self, num_units: int, at_step: int = 0) -> None:
        super().__init__()
        num_units, at_step = plain_number(num_units), plain_number(at_step)
        if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 0:
            raise ValueError(f"StaticFreeze: num_units must be an int >= 0, got {num_units!r}")
        if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 0:
            raise ValueError(f"StaticFreeze: at_step must be an int >= 0, got {at_step!r}")
        self.num_units = num_units
        self.at_step = at_step

    def bind(self, context: PolicyContext) -> None:
        super().bind(context)
        if self.num_units > context.num_units:
            raise ValueError(
                f"StaticFreeze: num_units={self.num_units} but the model has only "
                f"{context.num_units} freezable units"
            )
        if self.num_units > context.max_frozen:
            warnings.warn(
                f"StaticFreeze: num_units={self.num_units} exceeds the {context.max_frozen} units "
                "the engine may freeze; it will freeze only those.",
                stacklevel=2,
            )
        self._warn_if_never_in_run(max(1, self.at_step) + 1, f"it freezes after step {max(1, self.at_step)}",
                                   "Pass an at_step before the run's last step.")

    def decide(self, step: int, frozen: int) -> Optional[int]:
        if step >= self.at_step:
            return self.num_units
        return None

    def describe(self) -> str:
        return f"StaticFreeze(num_units={self.num_units}, at_step={self.at_step})"
