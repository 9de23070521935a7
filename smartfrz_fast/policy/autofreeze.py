"""AutoFreeze (Liu, Agarwal, Venkataraman 2021): freeze on the gradient-norm change percentile."""

from __future__ import annotations

import warnings

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from .base import Decision, FreezePolicy, PolicyContext, plain_number


class AutoFreeze(FreezePolicy):
    """AutoFreeze: freeze the leading units whose gradient norm has stopped changing
    (Liu, Agarwal, Venkataraman 2021, "AutoFreeze: Automatically Freezing Model Blocks to
    Accelerate Fine-tuning", arXiv:2102.01386; reference code github.com/YuhanLiu11/AutoFreeze,
    ``freeze_intermediate_e2e_lr.py``, training loop).

    Rule, for each evaluation interval k of ``interval`` optimizer steps::

        G_i(k)  = gradient norm of unit i accumulated over interval k
        r_i(k)  = |G_i(k-1) - G_i(k)| / G_i(k-1)     (0 where G_i(k) == G_i(k-1) == 0; unbounded
                                                      where only one of them is 0)
        thr     = percentile({r_i(k) : i >= frozen}, percentile)   (np.percentile, linear)
        frozen' = first i >= frozen with r_i(k) >= thr   (units before it are frozen)

    i.e. an active unit is freezable when its gradient-norm change is below the
    ``percentile``-th percentile of the active units' changes, and units freeze front to back:
    the first active unit that is still changing blocks every unit after it. The first interval
    only records G(1); the first decision is made at the end of the second interval.
    Interval: ``interval`` steps, or (default, as the reference's ``--num_intervals``)
    ``total_steps // num_intervals``. Interval k ends after optimizer step k * interval.

    Deviation (accumulated quantity): the reference sums the gradient *tensors* of every
    parameter over the interval and takes the L1 norm of that sum per layer. The engine hands
    policies only per-unit squared gradient norms of each step (an interval sum of gradient
    tensors would cost a second copy of the model's parameters), so G_i(k) here is the sum over
    the interval's steps of the per-step L2 gradient norm ``sqrt(sum g^2)``, divided by the
    number of those steps. r_i is a relative change, so a constant factor (L1 vs. L2 scale)
    cancels; what differs is that gradient directions that cancel within an interval do not
    shrink G. Steps whose gradient norm is not finite (skipped by a GradScaler) are left out of
    the sum and of the count: with a plain sum, an interval with 4 of 10 steps skipped compared
    sums over 6 and 10 steps, every ratio came out near 0.6 and the ranking reversed.
    A unit with no gradient in an interval after one with (a branch no batch of it used) is not
    converged: it counts as changing without bound (it read as the most converged, and froze).
    A unit with none in either (one the user froze, a branch never used) counts as converged, as
    in the reference: counting it as changing would block every unit after it for the run.

    Never where nothing is left to save: with ``total_steps`` known, no decision is made at an
    interval end inside the last interval of the run (a freeze at the final step saves
    nothing; the reference can freeze there). The intervals still roll over, so the state is
    the same as without the guard.

    Other details: a unit whose G went from 0 to positive counts as changing without bound;
    the reference's quirk that skips the first boundary when ``interval == 1`` is not copied.
    Accumulators stay on the parameters' device; ``decide`` returns a 0-dim int64 tensor on
    that device at interval ends (no host sync at all) and None otherwise.
    """

    name = "autofreeze"
    needs_gradients = True

    def __init__(
        self, interval: Optional[int] = None, percentile: float = 50.0, num_intervals: int = 10
    ) -> None:
        super().__init__()
        interval, percentile, num_intervals = map(plain_number, (interval, percentile, num_intervals))
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, int) or interval < 1
        ):
            raise ValueError(
                f"AutoFreeze: interval must be a positive int (optimizer steps) or None, got {interval!r}"
            )
        if (
            isinstance(percentile, bool)
            or not isinstance(percentile, (int, float))
            or not (0.0 < float(percentile) < 100.0)
        ):
            raise ValueError(f"AutoFreeze: percentile must be in (0, 100), got {percentile!r}")
        if float(percentile) < 1.0:  # a fraction where a percentile was meant: almost never freezes
            warnings.warn(f"AutoFreeze: percentile={percentile!r} is on a 0-100 scale (the median is 50, the "
                          f"default), so this is the {percentile}th percentile: a unit freezes only when its "
                          "gradient changed less than almost every other's. Pass percentile=100 * fraction if "
                          "a fraction was meant.", UserWarning, stacklevel=2)
        if isinstance(num_intervals, bool) or not isinstance(num_intervals, int) or num_intervals < 1:
            raise ValueError(f"AutoFreeze: num_intervals must be a positive int, got {num_intervals!r}")
        self.interval_arg = interval
        self.percentile = float(percentile)
        self.num_intervals = num_intervals
        self.interval: Optional[int] = interval
        self._acc: Optional[Tensor] = None  # [units] float32, this interval's sum of norms
        self._counted: Optional[Tensor] = None  # [units] float32, this interval's steps with a finite norm
        self._prev: Optional[Tensor] = None  # [units] float32, last interval's sums
        self._steps_in_interval = 0
        self._evaluations = 0  # interval ends seen
        self.last_ratios: Optional[Tensor] = None  # r(k) of the latest decision, for reports
        self.last_decision_step: Optional[int] = None  # set by bind() from total_steps
        self._pending_state: Optional[Dict[str, Any]] = None

    _without_total_steps = " (or give AutoFreeze an interval=<steps between decisions>)"

    def needs_total_steps(self) -> bool:
        return self.interval_arg is None  # its intervals are a share of the run

    def bind(self, context: PolicyContext) -> None:
        super().bind(context)
        if context.num_units < 1:
            raise ValueError("AutoFreeze: the model has no freezable units")
        if self.interval_arg is None:
            total = self._require_total_steps()
            self.interval = max(1, total // self.num_intervals)
        self._acc = torch.zeros(context.num_units, dtype=torch.float32, device=context.device)
        self._counted = torch.zeros_like(self._acc)
        self._prev = None
        self._steps_in_interval = 0
        self._evaluations = 0
        # the last step whose decision still leaves a full interval of training to save
        total = context.total_steps
        self.last_decision_step = total - self.interval if total else None
        # the first decision ends the second interval, and none comes in the run's last interval
        self._warn_if_never_in_run(3 * self.interval, f"its first decision that still saves something needs 3 "
                                   f"intervals of {self.interval} steps (step {3 * self.interval})",
                                   "Use a shorter interval (num_intervals >= 3).")
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def observe_gradients(self, step: int, unit_grad_sq_norms: Tensor) -> None:
        assert self._acc is not None, "bind() first"
        sq = unit_grad_sq_norms.to(device=self._acc.device, dtype=torch.float32)
        norms = sq.sqrt()
        finite = torch.isfinite(norms)
        self._acc.add_(torch.where(finite, norms, torch.zeros_like(norms)))
        self._counted.add_(finite.to(torch.float32))
        self._steps_in_interval += 1

    def decides_at(self, step: int) -> bool:
        # interval ends after the first one (the first only records G(1)): same on every rank
        assert self.interval is not None, "bind() first"
        return step % self.interval == 0 and self._evaluations >= 1 and self._saves_something(step)

    def _saves_something(self, step: int) -> bool:
        return self.last_decision_step is None or step <= self.last_decision_step

    def decide(self, step: int, frozen: int) -> Optional[Decision]:
        assert self._acc is not None and self.interval is not None, "bind() first"
        if step % self.interval != 0:
            return None
        cur = self._acc / self._counted.clamp(min=1.0)  # the mean over the steps that counted
        self._acc.zero_()
        self._counted.zero_()
        self._steps_in_interval = 0
        self._evaluations += 1
        prev, self._prev = self._prev, cur
        if prev is None or not self._saves_something(step):
            return None
        big = torch.finfo(torch.float32).max  # "changing without bound", finite for quantile
        safe_prev = torch.where(prev > 0, prev, torch.ones_like(prev))
        ratio = torch.where(prev > 0, (prev - cur).abs() / safe_prev, torch.full_like(prev, big))
        # no gradient in this interval after some in the last (a branch these batches did not use): not
        # converged; none in either (a unit the user froze, a branch never used): nothing to wait for
        ratio = torch.where(cur > 0, ratio, torch.where(prev > 0, torch.full_like(ratio, big), torch.zeros_like(ratio)))
        self.last_ratios = ratio
        frozen = max(0, int(frozen))
        active = ratio[frozen:]
        if active.numel() == 0:
            return None
        thr = torch.quantile(active, self.percentile / 100.0)  # numpy's default 'linear'
        below = (active < thr).to(torch.int64)
        leading = torch.cumprod(below, dim=0).sum()
        return leading + frozen

    def state_dict(self) -> Dict[str, Any]:
        return {
            "interval": self.interval,
            "acc": None if self._acc is None else self._acc.clone(),
            "counted": None if self._counted is None else self._counted.clone(),
            "prev": None if self._prev is None else self._prev.clone(),
            "steps_in_interval": self._steps_in_interval,
            "evaluations": self._evaluations,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        expected = {"interval", "acc", "prev", "steps_in_interval", "evaluations"}
        if set(state) - {"counted"} != expected:  # "counted": absent from checkpoints of before
            raise ValueError(f"AutoFreeze: state keys {sorted(state)} differ from {sorted(expected)}")
        if self.context is None:  # restored before the engine bound us: apply at bind()
            self._pending_state = dict(state)
            return
        if state["interval"] != self.interval:
            derived = (f" (total_steps={self.context.total_steps} // num_intervals={self.num_intervals}: the "
                       "run's length changed?)" if self.interval_arg is None else "")
            raise ValueError(
                f"AutoFreeze: checkpoint was made with interval={state['interval']}, this run has "
                f"interval={self.interval}{derived}. Construct AutoFreeze with interval={state['interval']} to resume "
                "it on its intervals."
            )
        n = self.context.num_units
        device = self.context.device
        for key in ("acc", "prev", "counted"):  # accumulated gradient norms, step counts: finite, >= 0, one per unit
            t = state.get(key)
            if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point() and tuple(t.shape) == (n,)
                                      and bool((torch.isfinite(t) & (t >= 0)).all())):
                what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"AutoFreeze: state '{key}' is {what}; expected float ({n},) finite norms >= 0 (one "
                                 "per unit): the checkpoint is corrupt or from another model.")
        for key in ("steps_in_interval", "evaluations"):
            v = state[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"AutoFreeze: state '{key}'={v!r} is not a count >= 0: the checkpoint is corrupt.")
        self._acc = (
            torch.zeros(n, dtype=torch.float32, device=device)
            if state["acc"] is None
            else state["acc"].to(device=device, dtype=torch.float32).clone()
        )
        self._prev = None if state["prev"] is None else state["prev"].to(device=device, dtype=torch.float32).clone()
        counted = state.get("counted")
        if counted is None:  # a checkpoint of before: sums over whole intervals; prev as a mean now
            counted = torch.full((n,), float(state["steps_in_interval"]))
            if self._prev is not None:
                self._prev = self._prev / self.interval
        self._counted = counted.to(device=device, dtype=torch.float32).clone()
        self._steps_in_interval = int(state["steps_in_interval"])
        self._evaluations = int(state["evaluations"])

    def describe(self) -> str:
        if self.interval_arg is None:
            iv = f"interval=total_steps//{self.num_intervals}"
            if self.interval is not None:
                iv += f"={self.interval}"
        else:
            iv = f"interval={self.interval}"
        return f"AutoFreeze({iv}, percentile={self.percentile:g})"
