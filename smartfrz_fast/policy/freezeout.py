"""FreezeOut (Brock, Lim, Ritchie, Weston 2017): a fixed per-layer freeze schedule."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional

from .base import FreezePolicy, PolicyContext, plain_number

_SCALE_FNS: Dict[str, Callable[[float], float]] = {
    "linear": lambda x: x,
    "squared": lambda x: x**2,
    "cubic": lambda x: x**3,
}


def _counted_units(context: PolicyContext) -> int:
    """The units up to and including the last one that is not of single numbers (all of them
    where every unit is)."""
    counted = context.num_units
    while counted > 1 and context.units[counted - 1].single_numbers:
        counted -= 1
    return counted


class FreezeOut(FreezePolicy):
    """FreezeOut: anneal each unit's learning rate to zero on its own cosine schedule, then
    freeze it (Brock et al. 2017, "FreezeOut: Accelerate Training by Progressively Freezing
    Layers", arXiv:1706.04983; reference code github.com/ajbrock/FreezeOut, ``densenet.py``
    ``DenseNet.__init__`` / ``update_lr`` and ``utils.scale_fn``).

    Formulas (L units, index i = 0..L-1, N = ``total_steps``, j = optimizer steps already done,
    i.e. j = 0 for the first step, as the reference's iteration counter ``self.j``)::

        t_i    = scale_fn(t0 + (1 - t0) * i / (L - 1))      scale_fn: x, x**2 or x**3
        max_j  = t_i * N                                      (reference: epochs*1000*t_i)
        lr_i0  = lr / t_i if scale_lr else lr
        lr_i(j) = 0.5 * lr_i0 * (1 + cos(pi * j / max_j))     while j <= max_j
        unit i is frozen for every step j > max_j             (reference: ``if self.j > m.max_j``)

    As in the reference, ``t0`` is the *unscaled* value (cubic with t0=0.8 freezes the first
    unit at 0.512 of training) and the last unit has t = 1, so it is never frozen.

    Default ``t0=0.8`` (cubic): the setting the paper recommends for the cubic schedule and
    the one the demo and ``docs/predictor.md`` compare with; with ``t0=0.5`` the first unit
    froze at 12.5 % of the run and lost 3.6-11 points on held-out jobs (issue 16).

    Learning rate: the factor multiplies whatever lr the optimizer's group holds at that step,
    i.e. the user's lr *after* the user's scheduler. The engine applies it inside
    ``optimizer.step()`` only (``policy/unit_lr.py``), so the user's param groups, the
    optimizer's ``state_dict`` and any ``torch.optim.lr_scheduler`` (built before or after the
    freezer) are untouched. With a constant lr this is the reference exactly; with a schedule
    the unit's lr is the schedule times its FreezeOut cosine (e.g. warm-up, then FreezeOut's
    annealing). Leave out a cosine schedule of your own unless you want the product.

    Conventions in this engine: ``lr_factors(j)`` returns ``lr_i(j) / lr`` for the step after
    ``j`` steps (0 for units past their freeze point); ``decide(step)``, called after ``step``
    steps, returns ``#{i : step > t_i * N}`` -- the next step has j = step, so unit i trains on
    steps j = 0 .. floor(t_i * N) (the last of them at lr 0 when t_i*N is an integer, exactly as
    in the reference) and is frozen by the decision made after step ``floor(t_i * N) + 1``
    (1-based), see ``freeze_steps``. t_i is non-decreasing in i, so this is always a prefix.

    Deviations: (1) iterations are the engine's optimizer steps and ``total_steps`` replaces
    the reference's hard-coded ``epochs * 1000`` iterations. (2) L == 1 uses t = 1 (the
    reference divides by L - 1 = 0). (3) Units the engine keeps trainable (``keep_trainable``
    > 1) follow the same schedule: their lr reaches 0 at t_i * N and stays 0, but they are
    never removed from the backward pass. (4) Steps beyond ``total_steps`` get lr factor 0 for
    every unit (the reference's cosine never runs past its own end). (5) Trailing units of
    single numbers (a learned temperature after the head), which the engine does not count
    among those it keeps trainable, take t = 1, and L counts the units before them: the head
    keeps t = 1. (6) An optimizer that computes its own step size (Adafactor's default
    ``relative_step=True``, ``lr=None``) has no lr to anneal: refused at set-up.
    """

    name = "freezeout"
    manages_lr = True
    deterministic_schedule = True  # same decision on every rank: no broadcast

    def __init__(self, t0: float = 0.8, spacing: str = "cubic", scale_lr: bool = True) -> None:
        super().__init__()
        t0 = plain_number(t0)
        if isinstance(t0, bool) or not isinstance(t0, (int, float)) or not (0.0 < float(t0) <= 1.0):
            raise ValueError(f"FreezeOut: t0 must be a number in (0, 1], got {t0!r}")
        if spacing not in _SCALE_FNS:
            raise ValueError(
                f"FreezeOut: unknown spacing {spacing!r}; choose one of {sorted(_SCALE_FNS)}"
            )
        if not isinstance(scale_lr, bool):
            raise ValueError(f"FreezeOut: scale_lr must be True or False, got {scale_lr!r}")
        self.t0 = float(t0)
        self.spacing = spacing
        self.scale_lr = scale_lr
        first = _SCALE_FNS[spacing](self.t0)
        if scale_lr and first < 0.01:  # the reference's formula, unchanged: but say what it does
            warnings.warn(f"FreezeOut(t0={t0}, spacing={spacing!r}): the first unit trains for {100 * first:.3g} % of "
                          f"the run at {1 / first:.3g}x the learning rate (scale_lr=True divides it by t_i): its "
                          "weights may blow up before it freezes. The paper recommends t0=0.8 with cubic spacing (the "
                          "default); or pass scale_lr=False.", UserWarning, stacklevel=2)
        self.freeze_times: List[float] = []  # t_i, fraction of training
        self._max_j: List[float] = []  # t_i * total_steps
        self._lr0: List[float] = []  # initial lr multiplier per unit

    @staticmethod
    def schedule(num_units: int, t0: float, spacing: str) -> List[float]:
        """t_i for ``num_units`` units (the reference's ``lr_ratio``)."""
        fn = _SCALE_FNS[spacing]
        if num_units == 1:
            return [fn(1.0)]
        return [fn(t0 + (1.0 - t0) * float(i) / (num_units - 1)) for i in range(num_units)]

    def needs_total_steps(self) -> bool:
        return True

    def bind(self, context: PolicyContext) -> None:
        super().bind(context)
        if context.num_units < 1:
            raise ValueError("FreezeOut: the model has no freezable units")
        total = self._require_total_steps()
        # over the units up to the last one the engine keeps training by count: units of single
        # numbers after it (a temperature, CLIP's logit_scale) are not counted as kept, and on a
        # schedule over them too the real head's lr reached 0 at 0.81 of the run
        scheduled = _counted_units(context)
        self.freeze_times = self.schedule(scheduled, self.t0, self.spacing) + [1.0] * (context.num_units - scheduled)
        self._max_j = [t * total for t in self.freeze_times]
        self._lr0 = [(1.0 / t) if self.scale_lr else 1.0 for t in self.freeze_times]
        first = math.floor(self._max_j[0]) + 1  # the step after which decide() first includes unit 0
        self._warn_if_never_in_run(first + 1, f"its first unit freezes after step {first}", "Pass a smaller t0.")

    @property
    def freeze_steps(self) -> List[Optional[int]]:
        """Per unit: the 1-based step after which ``decide`` first includes it (None: never
        within ``total_steps``)."""
        assert self.context is not None, "bind() first"
        total = self.context.total_steps
        out: List[Optional[int]] = []
        for max_j in self._max_j:
            s = math.floor(max_j) + 1
            out.append(s if s <= total else None)  # decide() is called for steps 1..total
        return out

    def lr_factors(self, step: int) -> Optional[List[float]]:
        factors = []
        for max_j, lr0 in zip(self._max_j, self._lr0):
            if step > max_j:
                factors.append(0.0)
            else:
                factors.append(0.5 * lr0 * (1.0 + math.cos(math.pi * step / max_j)))
        return factors

    def decide(self, step: int, frozen: int) -> Optional[int]:
        count = 0
        for max_j in self._max_j:  # non-decreasing, so the count is a prefix
            if step > max_j:
                count += 1
            else:
                break
        return count

    def describe(self) -> str:
        return f"FreezeOut(t0={self.t0:g}, spacing={self.spacing}, scale_lr={self.scale_lr})"
