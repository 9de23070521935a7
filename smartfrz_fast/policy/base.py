"""The interface every freezing policy implements, and what the engine tells it.

A policy only decides *how many* leading units may be frozen; the engine does the freezing
(optimizer, norm layers, history, checkpoints) the same way for every policy, enforces that
freezing is monotone and front-to-back, and never freezes the units it must keep trainable.
"""

from __future__ import annotations

import numbers
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

# A decision: the desired frozen-prefix length in units, as an int or as a 0-dim int64 tensor
# that may still be on its way from the GPU (the engine reads it without stalling).
Decision = Union[int, Tensor]


def plain_number(value: Any) -> Any:
    """A numpy or other registered integer / real scalar as Python's int / float (knobs read from
    a config or computed with numpy); anything else, bools included, unchanged for the caller's
    check to refuse or take."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def check_decision(policy: "FreezePolicy", decision: Any, step: int, num_units: int) -> Optional[Decision]:
    """``decision`` if it is one the engine can apply (None, an int in ``[0, num_units]``, or a
    one-element integer tensor, whose value is checked here on the CPU and when applied on a
    GPU), else a clear error naming the policy: silently truncating 2.7 or ignoring -3 would
    run a policy other than the one written."""
    if decision is None:
        return None
    name = type(policy).__name__
    if isinstance(decision, Tensor):
        if decision.numel() != 1 or decision.dtype.is_floating_point or decision.dtype.is_complex \
                or decision.dtype == torch.bool:
            raise TypeError(
                f"{name}.decide returned a {decision.dtype} tensor of shape {tuple(decision.shape)} at step {step}: "
                "a decision is a frozen-prefix length, an int or a one-element integer tensor (or None).")
        if decision.device.type == "cpu":
            check_prefix_length(policy, int(decision), step, num_units)
        return decision
    try:
        if isinstance(decision, bool):
            raise TypeError
        value = operator.index(decision)
    except TypeError:
        raise TypeError(
            f"{name}.decide returned {decision!r} ({type(decision).__name__}) at step {step}: a decision is a "
            "frozen-prefix length, an int or a one-element integer tensor (or None for no decision).") from None
    check_prefix_length(policy, value, step, num_units)
    return value


def check_prefix_length(policy: "FreezePolicy", value: int, step: int, num_units: int) -> None:
    if not 0 <= value <= num_units:
        raise ValueError(
            f"{type(policy).__name__}.decide returned {value} at step {step}: a frozen-prefix length is a number "
            f"of leading units from 0 to {num_units} (the model's units). Return None for no decision.")


@dataclass(frozen=True)
class UnitInfo:
    """What a policy may know of one freezable unit."""

    index: int
    name: str
    num_params: int
    forward_flops: int
    # the unit's modules' names in the model ("" for the model itself); ``name`` joins them
    # with "+", which a module's own name may contain
    module_names: Tuple[str, ...] = ()
    # what freezing it saves of a step's backward (about twice forward_flops; less where its
    # weights require no grad, as a LoRA base layer's); None: unknown, take forward_flops
    backward_flops: Optional[float] = None
    # the module in whose call an attention op reads what this unit's weights produced (q, k,
    # v), "" for none
    attention: str = ""
    # only parameters of single numbers (a temperature, CLIP's logit_scale): not counted among
    # the units the engine keeps trainable (keep_trainable)
    single_numbers: bool = False


@dataclass
class PolicyContext:
    """Handed to ``FreezePolicy.bind`` once the engine knows the model's units."""

    units: Sequence[UnitInfo]
    total_steps: Optional[int]
    device: torch.device
    max_frozen: int  # the engine never freezes more leading units than this
    history: Any = None  # ``WeightHistory`` when the policy sets ``needs_history``
    model: Any = None  # the module the freezer manages (a policy that holds a model checks it is this one)

    @property
    def num_units(self) -> int:
        return len(self.units)


class FreezePolicy:
    """Base class: override ``decide`` and, where the policy needs them, the hooks below."""

    name = "policy"
    needs_history = False  # the engine keeps a weight-history ring buffer for this policy
    needs_gradients = False  # the engine calls ``observe_gradients`` with each optimizer step's gradients
    manages_lr = False  # the engine scales each unit's lr by ``lr_factors`` inside optimizer.step()
    # Its schedule or pace follows the freezer's total_steps: the engine warns when a run goes
    # past it or resumes with another one. False for a policy that never reads it.
    uses_total_steps = True
    # Decisions depend only on the step (a schedule): under DDP every rank computes the same
    # one, so the engine broadcasts nothing. False: rank 0's decision is broadcast at the
    # steps where ``decides_at`` is true.
    deterministic_schedule = False
    # It holds the model it was built on (Egeria's copies): it cannot serve another model, and a
    # copy of it (a trainer callback's template for model_init's new models) would not either.
    holds_model = False

    def __init__(self) -> None:
        self.context: Optional[PolicyContext] = None

    def bind(self, context: PolicyContext) -> None:
        """Called once, when the engine has found the units. Raise here on a bad configuration."""
        self.context = context

    def decide(self, step: int, frozen: int) -> Optional[Decision]:
        """After optimizer step number ``step`` (1-based): the desired frozen-prefix length,
        or None for no decision now. ``frozen`` is the current frozen-prefix length."""
        raise NotImplementedError

    def decides_at(self, step: int) -> bool:
        """Whether ``decide(step, ...)`` may return a decision (called just before it). Under
        DDP rank 0's decision is broadcast exactly at these steps, so the answer must come from
        what every rank shares (the step, counters advanced every step, ``history.count``),
        never from rank-local data. Default: every step (one small broadcast per step)."""
        return True

    def wants_snapshots(self) -> bool:
        """Whether the engine should still take weight-history snapshots (only asked when
        ``needs_history``): False once no decision can come from them. From what every rank
        shares, like ``decides_at`` (under FSDP2 a snapshot is a collective)."""
        return True

    def close(self) -> None:
        """Release what the policy holds (threads, model copies); ``SmartFreezer.close()`` calls it."""

    def observe_gradients(self, step: int, unit_grad_sq_norms: Tensor) -> None:
        """Per-unit sum of squared gradient entries (float32 ``[units]``, on the parameters'
        device) of the optimizer steps since the last call (read right after each step, so that
        a backward inside ``optimizer.step(closure)`` counts). Only called when ``needs_gradients``."""

    def lr_factors(self, step: int) -> Optional[List[float]]:
        """Per-unit multiplier of the lr its param group holds (the user's, as the user's lr
        scheduler set it) for the optimizer step after ``step`` (0 before the first); called
        at the start of that ``optimizer.step()``. Only called when ``manages_lr``."""
        return None

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but was given {sorted(state)}")

    def describe(self) -> str:
        """One line for reports: the policy and its settings (the same before and after ``bind``:
        a checkpoint and the lab compare it)."""
        return self.name

    def report_lines(self) -> List[str]:
        """What the freezer's report adds about this policy on the model it is bound to."""
        return []

    def cost_advice(self) -> str:
        """What to do when the policy's work in ``freezer.step()`` outweighs the training it
        saves (the engine's policy-cost warning ends with it)."""
        return ("Use a schedule policy (LinearFreeze: about 0.1 ms per step); python -m smartfrz_fast.profile "
                "measures the overhead on your model.")

    # Helpers shared by the schedule-based policies.
    def _warn_if_never_in_run(self, first_step: float, how: str, fix: str) -> None:
        """Warn when the first step that could train with a unit frozen lies past ``total_steps``
        (settings that never act in this run: accepted silently before). A freeze decided after
        step s takes effect from step s + 1: one decided after the last step saves nothing."""
        total = self.context.total_steps if self.context is not None else None
        if total and first_step > total:
            warnings.warn(f"{self.describe()}: {how}, and no step of the run's {total} trains after it, so it will "
                          f"never freeze in this run. {fix}", UserWarning, stacklevel=4)

    _without_total_steps = ""  # another way to run without total_steps, where there is one

    def needs_total_steps(self) -> bool:
        """Whether this policy, as configured, cannot run without the freezer's ``total_steps``
        (checked when the freezer is built, not first at set-up inside the training loop)."""
        return False

    def check_total_steps(self, total_steps: Optional[int]) -> None:
        if self.needs_total_steps():
            self._total_steps_given(total_steps)

    def _total_steps_given(self, total_steps: Optional[int]) -> int:
        if total_steps is None or total_steps <= 0:
            # the other way applies only where this configuration is why total_steps is needed
            # (a subclass given interval= that still asks for total_steps has no other way)
            other_way = self._without_total_steps if self.needs_total_steps() else ""
            raise ValueError(
                f"{type(self).__name__} follows a schedule over the whole run: pass "
                f"total_steps=<number of optimizer steps> to SmartFreezer{other_way}."
            )
        return total_steps

    def _require_total_steps(self) -> int:
        """The run's ``total_steps`` (a policy of the user's calling it needs it whatever its
        ``needs_total_steps`` says)."""
        assert self.context is not None, "bind() first"
        return self._total_steps_given(self.context.total_steps)
