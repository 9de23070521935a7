"""Where a training step's time goes, per freezable unit, and what freezing saves.

    python -m smartfrz_fast.profile                       # the demo's CNN on the embedded digits
    python -m smartfrz_fast.profile --model pkg.mod:make_net --input-shape 3,32,32 --batch-size 256

Measured on a *copy* of the model (the user's weights, gradients and BatchNorm statistics are
left untouched), with the engine's own unit discovery (``units.discover_units``):

1. **Per unit**: forward and backward time of every unit, and the bytes it saves for backward.
   Forward boundaries are forward pre-hooks on each unit's first module; backward boundaries are
   gradient hooks on each unit's input (they fire once the backward of that unit and of
   everything after it is done). Time between boundaries belongs to the unit that precedes it
   in forward order (activations, pooling, the loss go to the unit before them), as in
   ``discover_units``'s FLOP count. Timers: ``time.perf_counter`` on the CPU, CUDA events on a
   GPU; ``repeats`` steps after ``warmup``, median.
2. **Ceiling**: the step time measured with the first n units frozen by the engine's own freeze
   action (``SmartFreezer.freeze_to``), for each n, against an unfrozen copy whose steps are
   interleaved with it (so drift of a shared machine hits both alike), beside the estimate
   that sums the prefix's per-unit backward times and its share of the optimizer step.
3. **Overhead**: host time of ``freezer.step()`` per step for each policy, and of the gradient
   norm hook AutoFreeze adds to ``optimizer.step()``; each run's time saved, measured and
   predicted from the ceiling (time-weighted over its freeze timeline, ``achieved_saving``).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial, wraps
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .engine import FreezeEvent, SmartFreezer
from .policy.base import FreezePolicy
from .units import (Unit, copy_model, discover_units, example_call, preserved_modes, preserved_rngs,
                    preserved_state)

LossFn = Callable[[Any], Tensor]
OptimizerFactory = Callable[[Any], torch.optim.Optimizer]
POLICY_NAMES = ("freezeout", "autofreeze", "linear", "static", "smartfrz")


# ---------------------------------------------------------------------------------- helpers
class _Clock:
    """perf_counter on the CPU; CUDA events (read after one synchronize) on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def default_loss(output: Any) -> Tensor:
    """The sum, over the output's floating tensors that carry a gradient (tuples, dicts, Hugging
    Face outputs), of cross-entropy for ``[batch, classes]`` ones (labels ``arange(batch) %
    classes``, no RNG used) and a mean square for others. Every output counts, so the whole
    graph is timed with nothing frozen, and one a frozen prefix made (features returned before
    the logits) drops out once it carries no gradient: the first tensor alone failed that
    backward, and the first one with a gradient measured another loss per prefix (review88,
    review89)."""
    tensors = [t for t in _tensors(output) if t.is_floating_point()]
    if not tensors:
        raise TypeError(f"the model returned no floating tensor ({type(output).__name__}); pass loss_fn=...")
    return sum(_one_loss(t) for t in ([t for t in tensors if t.requires_grad] or tensors))


def _one_loss(out: Tensor) -> Tensor:
    if out.dim() == 2 and out.shape[1] > 1:
        labels = torch.arange(out.shape[0], device=out.device) % out.shape[1]
        return F.cross_entropy(out.float(), labels)
    return out.float().square().mean()


def _tensors(value: Any) -> List[Tensor]:
    """The tensors of a model's output, in order (tuples, lists, dicts, Hugging Face outputs)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _half_iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _train_step(model, args, kwargs, loss_fn, optimizer) -> None:
    loss_fn(model(*args, **kwargs)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def _storage_key(t: Tensor) -> Optional[Tuple[int, int]]:
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except Exception:  # tensors without storage (subclasses, sparse): not counted
        return None


class _SavedBytes:
    """Bytes of the distinct storages autograd saves for backward (parameters excluded),
    attributed to the unit running when each is first saved."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.seen: set = set()
        self.current = 0
        self.by_unit: Dict[int, int] = {}

    def pack(self, t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key is not None and key[0] not in self.param_ptrs and key not in self.seen:
            self.seen.add(key)
            self.by_unit[self.current] = self.by_unit.get(self.current, 0) + key[1]
        return t

    @property
    def total(self) -> int:
        return sum(self.by_unit.values())


def _saved_activation_bytes(model, args, kwargs, loss_fn) -> int:
    """Bytes saved for backward by one forward pass of ``model`` (its frozen prefix saves none)."""
    counter = _SavedBytes(list(model.parameters()))
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        loss = loss_fn(model(*args, **kwargs))
    del loss
    return counter.total


# ---------------------------------------------------------------------------------- per unit
@dataclass
class UnitProfile:
    index: int
    name: str
    num_params: int
    forward_flops: int
    forward_ms: float  # median over the timed steps
    backward_ms: float
    activation_bytes: int  # saved for backward during this unit's forward span
    param_bytes: int
    grad_bytes: int  # gradients of its parameters (freed by freezing)
    optimizer_state_bytes: int  # freed by freezing
    # the unit whose time includes this one's, where its own cannot be told apart (shown "(in i)")
    forward_in: Optional[int] = None
    backward_in: Optional[int] = None

    @property
    def backward_merged(self) -> bool:
        return self.backward_in is not None


@dataclass
class StepBreakdown:
    step_ms: float
    forward_ms: float
    backward_ms: float
    optimizer_ms: float
    repeats: int


class _UnitTimer:
    """Forward pre-hooks on each unit's first module mark the forward boundaries and put a
    gradient hook on the unit's input, which marks its backward boundary. A unit whose first
    module encloses an earlier unit's (the model itself, for a parameter held on it) starts
    before that unit: it gets no hook, and its time counts with the unit before."""

    def __init__(self, units: Sequence[Unit], clock: _Clock, counter: Optional[_SavedBytes] = None):
        self.clock = clock
        self.counter = counter
        self.handles = []
        for u in units:
            inner = set(map(id, u.modules[0].modules()))
            if u.index and any(id(e.modules[0]) in inner for e in units[:u.index]):
                continue
            self.handles.append(u.modules[0].register_forward_pre_hook(partial(self._enter, u.index),
                                                                        with_kwargs=True))
        self.reset()

    def reset(self) -> None:
        self.forward: Dict[int, Any] = {}
        self.backward: Dict[int, Any] = {}

    def _enter(self, index: int, module, args, kwargs) -> None:
        if index in self.forward:  # a module called again later in the pass: first call counts
            return
        self.forward[index] = self.clock.mark()
        if self.counter is not None:
            self.counter.current = index
        if index > 0 and torch.is_grad_enabled():
            x = _first_grad_tensor(list(args) + list(kwargs.values()))
            if x is not None:
                x.register_hook(partial(self._grad_ready, index))

    def _grad_ready(self, index: int, grad) -> None:
        self.backward.setdefault(index, self.clock.mark())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _forward_spans(starts: List[Optional[float]], end: float) -> Tuple[List[float], List[Optional[int]]]:
    """Each unit's forward time from its start (ms from the forward's start; unit 0 at 0), and
    for a unit with no usable start (its first module never called, as nn.MultiheadAttention
    never calls its out_proj, or called out of order) the unit whose time includes it: the one
    before."""
    times, within = [0.0] * len(starts), [None] * len(starts)
    owner = 0
    for u in range(1, len(starts)):
        if starts[u] is None or starts[u] < starts[owner]:
            within[u] = owner
        else:
            owner = u
    owners = [u for u in range(len(starts)) if within[u] is None] + [len(starts)]
    for a, b in zip(owners, owners[1:]):
        times[a] = (end if b == len(starts) else starts[b]) - starts[a]
    return times, within


def _backward_spans(ready: List[Optional[float]], end: float) -> Tuple[List[float], List[Optional[int]]]:
    """Each unit's backward time from the moments its input's gradient was ready (ms from the
    backward's start; unit 0's is the backward's end), and for a unit whose own time cannot be
    told apart the unit whose time includes it: the one before where its input needs no
    gradient, the next one after where its gradient was ready before a later unit's (units that
    read one input, as q, k and v or a residual block's shortcut do: the input's gradient is
    complete only after all of them)."""
    n = len(ready)
    bound: List[float] = [end] + [0.0] * n
    kind: List[Optional[str]] = [None] * n
    for u in range(n - 1, 0, -1):
        if ready[u] is None:
            bound[u], kind[u] = bound[u + 1], "before"
        elif ready[u] < bound[u + 1]:
            bound[u], kind[u] = bound[u + 1], "after"
        else:
            bound[u] = ready[u]
    times = [bound[u] - bound[u + 1] for u in range(n)]
    owners = [u for u in range(n) if kind[u] is None]
    within = [None if k is None else (max(o for o in owners if o < u) if k == "before" else
                                      min(o for o in owners if o > u)) for u, k in enumerate(kind)]
    return times, within


def _first_grad_tensor(args) -> Optional[Tensor]:
    for a in args:
        if isinstance(a, Tensor) and a.requires_grad:
            return a
        if isinstance(a, (list, tuple)):
            found = _first_grad_tensor(a)
            if found is not None:
                return found
    return None


def _unmanaged_copy(model: nn.Module) -> nn.Module:
    """A copy to measure on, of a model no freezer manages: a frozen prefix would hide its units
    (fewer rows, numbered otherwise than the freezer's, so ``achieved_saving`` would price the
    freezer's prefixes with other units' rows)."""
    from .guards import managed_part

    if managed_part(model) is not None:
        raise ValueError("profiling measures what freezing each prefix of the unfrozen model saves, and a "
                         "SmartFreezer manages this model: profile it before building the freezer (or a copy made "
                         "before), or call freezer.close() and profile a fresh model.")
    return copy_model(model, "profiling")


def _keeps_random_streams(fn: Callable) -> Callable:
    """A measurement leaves torch's, numpy's, Python's and the model's own generators as they were:
    the training steps it times draw dropout masks, and a run profiled first would otherwise see
    other draws than the same run unprofiled."""
    @wraps(fn)
    def measured(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with preserved_rngs(model):
            return fn(model, *args, **kwargs)
    return measured


@_keeps_random_streams
def profile_units(
    model: nn.Module,
    inputs: Any,
    *,
    kwargs: Optional[Dict[str, Any]] = None,
    loss_fn: LossFn = default_loss,
    optimizer_factory: OptimizerFactory = _sgd,
    repeats: int = 20,
    warmup: int = 3,
) -> Tuple[List[UnitProfile], StepBreakdown]:
    """Per-unit forward/backward time (median of ``repeats`` steps) and memory, on a copy."""
    _check_counts(repeats, warmup)
    work = _unmanaged_copy(model).train()
    args, kwargs = example_call(model, inputs, kwargs)
    optimizer = optimizer_factory(work.parameters())
    plan = discover_units(work, args, kwargs)
    units = plan.units
    clock = _Clock(_device_of(work))
    n = len(units)

    timer = _UnitTimer(units, clock)
    fwd: List[List[float]] = [[] for _ in range(n)]
    bwd: List[List[float]] = [[] for _ in range(n)]
    forward_in: List[Optional[int]] = [None] * n
    backward_in: List[Optional[int]] = [None] * n
    parts: Dict[str, List[float]] = {"step": [], "forward": [], "backward": [], "optimizer": []}
    try:
        for i in range(warmup + repeats):
            timer.reset()
            t0 = clock.mark()
            loss = loss_fn(work(*args, **kwargs))
            t1 = clock.mark()
            loss.backward()
            t2 = clock.mark()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = clock.mark()
            clock.sync()
            if i < warmup:
                continue
            for name, a, b in (("step", t0, t3), ("forward", t0, t1), ("backward", t1, t2), ("optimizer", t2, t3)):
                parts[name].append(clock.ms(a, b))
            starts = [0.0] + [None if timer.forward.get(u) is None else clock.ms(t0, timer.forward[u])
                              for u in range(1, n)]
            times, forward_in = _forward_spans(starts, clock.ms(t0, t1))
            for u in range(n):
                fwd[u].append(times[u])
            # a unit with no usable start has no usable input either
            ready = [None] + [None if timer.backward.get(u) is None or forward_in[u] is not None
                              else clock.ms(t1, timer.backward[u]) for u in range(1, n)]
            times, backward_in = _backward_spans(ready, clock.ms(t1, t2))
            for u in range(n):
                bwd[u].append(times[u])
        # memory: one untimed pass counting saved tensors per unit, then the optimizer state
        counter = _SavedBytes(list(work.parameters()))
        timer.counter = counter
        timer.reset()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            loss = loss_fn(work(*args, **kwargs))
        del loss
    finally:
        timer.remove()
    rows, before = [], set()
    for u in units:
        # what freezing it frees: the parameters the freeze of the next prefix takes out (a tied
        # embedding keeps training, and keeps its gradient and state, until its last reader freezes)
        frozen = plan.frozen_parameters(u.index + 1)
        freed = [p for _, p in frozen if id(p) not in before]
        before = {id(p) for _, p in frozen}
        state = [v for p in freed for v in optimizer.state.get(p, {}).values()]
        rows.append(UnitProfile(
            index=u.index, name=u.name, num_params=u.num_params, forward_flops=u.forward_flops,
            forward_ms=_median(fwd[u.index]), backward_ms=_median(bwd[u.index]),
            activation_bytes=counter.by_unit.get(u.index, 0), param_bytes=_tensor_bytes(u.parameters),
            grad_bytes=_tensor_bytes(freed), optimizer_state_bytes=_tensor_bytes(state),
            forward_in=forward_in[u.index], backward_in=backward_in[u.index],
        ))
    breakdown = StepBreakdown(_median(parts["step"]), _median(parts["forward"]), _median(parts["backward"]),
                              _median(parts["optimizer"]), repeats)
    return rows, breakdown


def _check_counts(repeats: int, warmup: int) -> None:
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")


def _check_keep_trainable(keep_trainable: int) -> None:
    if keep_trainable < 1:
        raise ValueError(f"keep_trainable must be at least 1, got {keep_trainable}: with every unit frozen a "
                         "training step has no backward to measure")


# ---------------------------------------------------------------------------------- ceiling
@dataclass
class PrefixRow:
    num_frozen: int
    last_frozen: str  # name of the last frozen unit ("-" for none)
    step_ms: float  # median step time with the prefix frozen
    full_ms: float  # median step time of the interleaved unfrozen copy
    estimated_saved_ms: float  # sum of the prefix's per-unit backward + its optimizer share
    activation_bytes: int  # saved for backward by the whole step with this prefix frozen
    peak_bytes: Optional[int] = None  # CUDA only: peak allocated memory during the step
    ratio: float = 1.0  # median over paired steps of (frozen step / unfrozen step): drift-robust
    # half the interquartile range of those ratios: this row's own noise (a loaded machine moves
    # single rows by tens of percent, which the median alone does not show)
    ratio_spread: float = 0.0

    @property
    def saved_ms(self) -> float:
        return self.full_ms * (1.0 - self.ratio)

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.ratio


@_keeps_random_streams
def profile_prefixes(
    model: nn.Module,
    inputs: Any,
    *,
    kwargs: Optional[Dict[str, Any]] = None,
    loss_fn: LossFn = default_loss,
    optimizer_factory: OptimizerFactory = _sgd,
    units: Optional[Sequence[UnitProfile]] = None,
    optimizer_ms: float = 0.0,
    keep_trainable: int = 1,
    repeats: int = 20,
    warmup: int = 3,
) -> List[PrefixRow]:
    """Step time with the first n units frozen (by ``SmartFreezer.freeze_to``), for every n
    the engine allows, each against an unfrozen copy stepped alternately with it."""
    _check_counts(repeats, warmup)
    _check_keep_trainable(keep_trainable)
    from .policy import StaticFreeze

    args, kwargs = example_call(model, inputs, kwargs)
    ref = _unmanaged_copy(model).train()
    ref_opt = optimizer_factory(ref.parameters())
    work = copy_model(model, "profiling").train()  # (checked just above)
    opt = optimizer_factory(work.parameters())
    # the policy is never consulted (no freezer.step()): freeze_to does the freezing
    freezer = SmartFreezer(work, opt, policy=StaticFreeze(0), example_inputs=args, example_kwargs=kwargs,
                           keep_trainable=keep_trainable)
    device = _device_of(work)
    clock = _Clock(device)
    total_params = sum(u.num_params for u in freezer.units) or 1
    rows: List[PrefixRow] = []
    try:
        for target in range(freezer.max_frozen + 1):
            n = freezer.freeze_to(target)
            if rows and n == rows[-1].num_frozen:
                continue  # a cut the engine does not allow (shared parameters)
            activations = _saved_activation_bytes(work, args, kwargs, loss_fn)
            if clock.cuda:
                torch.cuda.reset_peak_memory_stats(device)
            marks = []
            for i in range(warmup + repeats):
                a = clock.mark()
                _train_step(ref, args, kwargs, loss_fn, ref_opt)
                b = clock.mark()
                _train_step(work, args, kwargs, loss_fn, opt)
                c = clock.mark()
                if i >= warmup:
                    marks.append((a, b, c))
            clock.sync()
            estimate = 0.0
            if units is not None:
                frozen = sum(p.numel() for _, p in freezer.plan.frozen_parameters(n))  # not what still trains
                estimate = sum(u.backward_ms for u in units[:n]) + optimizer_ms * frozen / total_params
            rows.append(PrefixRow(
                num_frozen=n, last_frozen=freezer.units[n - 1].name if n else "-",
                step_ms=_median([clock.ms(b, c) for _, b, c in marks]),
                full_ms=_median([clock.ms(a, b) for a, b, _ in marks]),
                ratio=_median(ratios := [clock.ms(b, c) / max(clock.ms(a, b), 1e-9) for a, b, c in marks]),
                ratio_spread=_half_iqr(ratios),
                estimated_saved_ms=estimate, activation_bytes=activations,
                peak_bytes=torch.cuda.max_memory_allocated(device) if clock.cuda else None,
            ))
    finally:
        freezer.close()
    return rows


# ---------------------------------------------------------------------------------- run saving
@dataclass
class RunSaving:
    steps: int
    full_ms: float  # the run's predicted time with nothing frozen
    run_ms: float  # predicted time with the run's freeze timeline
    steps_by_frozen: Dict[int, int]

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.run_ms / self.full_ms if self.full_ms > 0 else 0.0


def achieved_saving(
    timeline: Union[SmartFreezer, Sequence[FreezeEvent]],
    step_ms: Union[Sequence[PrefixRow], Mapping[int, float]],
    total_steps: Optional[int] = None,
) -> RunSaving:
    """Time-weighted saving of a run: each step costs the measured step time of the prefix
    frozen during it (a freeze recorded at step s first saves in step s + 1, as in
    ``SmartFreezer.training_flops_saved``). ``step_ms``: ``profile_prefixes`` rows (each n
    costs its paired ratio to the unfrozen step, times the median unfrozen step) or a mapping
    {frozen units: ms}; an unmeasured n uses the nearest measured n below it."""
    if isinstance(timeline, SmartFreezer):
        total_steps = timeline.step_count if total_steps is None else total_steps
        timeline = timeline.timeline
    if total_steps is None or total_steps < 0:
        raise ValueError("achieved_saving needs total_steps (>= 0) when given a list of events")
    if isinstance(step_ms, Mapping):
        table = dict(step_ms)
    else:
        full = _median([r.full_ms for r in step_ms])
        table = {r.num_frozen: full * (r.ratio if r.num_frozen else 1.0) for r in step_ms}
    if 0 not in table:
        raise ValueError("step_ms must include the step time with nothing frozen (key 0)")

    def cost(n: int) -> float:
        return table[max(k for k in table if k <= n)]

    counts: Dict[int, int] = {}
    level, since = 0, 0
    for event in timeline:
        at = min(event.step, total_steps)
        counts[level] = counts.get(level, 0) + max(0, at - since)
        level, since = event.num_frozen, max(since, at)
    counts[level] = counts.get(level, 0) + max(0, total_steps - since)
    counts = {k: v for k, v in counts.items() if v}
    return RunSaving(total_steps, cost(0) * total_steps, sum(cost(k) * v for k, v in counts.items()), counts)


# ---------------------------------------------------------------------------------- overhead
def make_policy(name: str, total_steps: int, num_freezable: int, smartfrz_weights: Optional[str] = None) -> FreezePolicy:
    """The demo's setting of each policy; ``smartfrz`` with the shipped predictor unless
    ``smartfrz_weights`` names another."""
    if name != "smartfrz":
        from .demo import build_policy

        return build_policy(name, total_steps, num_freezable)
    from .policy import SmartFRZ

    return SmartFRZ(weights=smartfrz_weights)


@dataclass
class OverheadRow:
    policy: str
    steps: int
    step_us_median: float  # host time of freezer.step()
    step_us_mean: float
    step_us_max: float
    hook_us_median: Optional[float]  # grad-norm hook inside optimizer.step() (gradient policies)
    train_step_ms: float  # median training step (forward, backward, optimizer) of this run
    run_ms: float  # the whole run, the freezer's set-up and freezer.step() included
    num_frozen: int  # at the end of the run
    timeline: List[FreezeEvent] = field(default_factory=list)
    flops_saved: float = 0.0  # the engine's estimate for the run
    device_us_median: Optional[float] = None  # CUDA: device time of freezer.step()


@_keeps_random_streams
def profile_overhead(
    model: nn.Module,
    inputs: Any,
    *,
    kwargs: Optional[Dict[str, Any]] = None,
    policies: Sequence[str] = POLICY_NAMES,
    loss_fn: LossFn = default_loss,
    optimizer_factory: OptimizerFactory = _sgd,
    steps: int = 60,
    warmup: int = 3,
    smartfrz_weights: Optional[str] = None,
    keep_trainable: int = 1,
) -> Tuple[OverheadRow, List[OverheadRow]]:
    """Train a fresh copy for ``steps`` steps without a freezer, then under each policy (with
    ``total_steps=steps``, so schedules run their course, and ``keep_trainable`` as the
    freezer's), timing ``freezer.step()``."""
    _check_counts(steps, warmup)
    _check_keep_trainable(keep_trainable)
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICY_NAMES)}")
    args, kwargs = example_call(model, inputs, kwargs)
    num_units = len(discover_units(_unmanaged_copy(model), args, kwargs).units)
    baseline = _overhead_run(model, args, kwargs, None, loss_fn, optimizer_factory, steps, warmup, keep_trainable)
    rows = []
    for name in policies:
        policy = make_policy(name, steps, max(1, num_units - keep_trainable), smartfrz_weights)
        rows.append(_overhead_run(model, args, kwargs, policy, loss_fn, optimizer_factory, steps, warmup,
                                  keep_trainable))
    return baseline, rows


def _overhead_run(model, args, kwargs, policy, loss_fn, optimizer_factory, steps, warmup,
                  keep_trainable) -> OverheadRow:
    work = copy_model(model, "profiling").train()  # profile_overhead checked that no freezer manages it
    opt = optimizer_factory(work.parameters())
    for _ in range(warmup):  # before the freezer exists: one-time set-up costs stay out of the run
        _train_step(work, args, kwargs, loss_fn, opt)
    clock = _Clock(_device_of(work))
    hook_marks: List[float] = []
    handles = [opt.register_step_post_hook(lambda o, a, k: hook_marks.append(time.perf_counter()))]
    freezer = None
    start = time.perf_counter()  # the freezer's set-up is part of the user's run, as its steps are
    if policy is not None:
        freezer = SmartFreezer(work, opt, policy=policy, example_inputs=args, example_kwargs=kwargs,
                               total_steps=steps, keep_trainable=keep_trainable)
    # post-step hooks run in the order registered: these two marks bracket the freezer's own
    # (the gradient-norm hook reads each step's gradients after the step)
    handles.append(opt.register_step_post_hook(lambda o, a, k: hook_marks.append(time.perf_counter())))
    host, device, train, hooks = [], [], [], []
    for _ in range(steps):
        hook_marks.clear()
        a = clock.mark()
        _train_step(work, args, kwargs, loss_fn, opt)
        b = clock.mark()
        if len(hook_marks) == 2:
            hooks.append((hook_marks[1] - hook_marks[0]) * 1e6)
        if freezer is not None:
            h0 = time.perf_counter()
            freezer.step()
            host.append((time.perf_counter() - h0) * 1e6)
        c = clock.mark()
        clock.sync()
        train.append(clock.ms(a, b))
        if freezer is not None and clock.cuda:
            device.append(clock.ms(b, c) * 1e3)
    run_ms = (time.perf_counter() - start) * 1e3
    for h in handles:
        h.remove()
    row = OverheadRow(
        policy=policy.name if policy is not None else "none", steps=steps,
        step_us_median=_median(host), step_us_mean=statistics.fmean(host) if host else float("nan"),
        step_us_max=max(host) if host else float("nan"),
        hook_us_median=_median(hooks) if freezer is not None and freezer.policy.needs_gradients else None,
        train_step_ms=_median(train), run_ms=run_ms,
        num_frozen=freezer.num_frozen if freezer is not None else 0,
        timeline=list(freezer.timeline) if freezer is not None else [],
        flops_saved=freezer.training_flops_saved() if freezer is not None else 0.0,
        device_us_median=_median(device) if device else None,
    )
    if freezer is not None:
        freezer.close()
    return row


# ---------------------------------------------------------------------------------- report
@dataclass
class Profile:
    """Everything ``profile_model`` measured, and ``format()`` for the printed tables."""

    title: str
    units: List[UnitProfile]
    breakdown: StepBreakdown
    prefixes: List[PrefixRow]
    baseline: Optional[OverheadRow] = None
    overheads: List[OverheadRow] = field(default_factory=list)

    def derived(self, row: OverheadRow) -> Dict[str, Optional[float]]:
        """The overhead table's computed columns for one policy's row: the freezer's share of a
        step (the mean of ``freezer.step()``, as the run pays it: SmartFRZ's predictor runs at
        one step in several, which the median leaves out; and its gradient-norm hook), the run's
        wall time saved against the run without a freezer, and the ceiling's time-weighted
        saving for its timeline."""
        return {"share_of_step": (row.step_us_mean + (row.hook_us_median or 0.0)) / 1e3 / row.train_step_ms,
                "run_saved": 1 - row.run_ms / self.baseline.run_ms if self.baseline is not None else None,
                "ceiling_saved": (achieved_saving(row.timeline, self.prefixes, row.steps).saved_fraction
                                  if self.prefixes else None)}

    def to_dict(self) -> Dict[str, Any]:
        """Every number, the overhead table's computed columns included (``derived``)."""
        out = asdict(self)
        for row, entry in zip(self.overheads, out["overheads"]):
            entry.update(self.derived(row))
        return out

    def format(self) -> str:
        return "\n".join(_format_profile(self))


@_keeps_random_streams
def profile_model(
    model: nn.Module,
    inputs: Any,
    *,
    kwargs: Optional[Dict[str, Any]] = None,
    loss_fn: LossFn = default_loss,
    optimizer_factory: OptimizerFactory = _sgd,
    repeats: int = 20,
    warmup: int = 3,
    keep_trainable: int = 1,
    policies: Sequence[str] = POLICY_NAMES,
    overhead_steps: int = 60,
    smartfrz_weights: Optional[str] = None,
    title: Optional[str] = None,
) -> Profile:
    """Per-unit profile, freezing ceiling and per-policy engine overhead (``policies=()`` skips
    the overhead runs). The model itself is not modified: every measurement runs on copies."""
    _check_keep_trainable(keep_trainable)  # before any measurement
    common = dict(kwargs=kwargs, loss_fn=loss_fn, optimizer_factory=optimizer_factory)
    units, breakdown = profile_units(model, inputs, repeats=repeats, warmup=warmup, **common)
    prefixes = profile_prefixes(model, inputs, units=units, optimizer_ms=breakdown.optimizer_ms,
                                keep_trainable=keep_trainable, repeats=repeats, warmup=warmup, **common)
    baseline, overheads = None, []
    if policies:
        baseline, overheads = profile_overhead(model, inputs, policies=policies, steps=overhead_steps,
                                               warmup=warmup, smartfrz_weights=smartfrz_weights,
                                               keep_trainable=keep_trainable, **common)
    return Profile(title or type(model).__name__, units, breakdown, prefixes, baseline, overheads)


def _mb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 2] + ".."


def _format_profile(p: Profile) -> List[str]:
    b = p.breakdown
    w = max([12] + [min(28, len(u.name)) for u in p.units])
    out = [p.title, "",
           f"Training step: {b.step_ms:.2f} ms (median of {b.repeats}): forward {b.forward_ms:.2f}, "
           f"backward {b.backward_ms:.2f}, optimizer step {b.optimizer_ms:.2f}", "",
           "Per unit (median ms; activ. = bytes saved for backward; grad+opt = gradient and optimizer "
           "state freed by freezing it)",
           f"  {'#':>3} {'unit':<{w}} {'params':>9} {'fwd MFLOP':>10} {'fwd ms':>8} {'bwd ms':>8} "
           f"{'activ. MB':>9} {'grad+opt MB':>11}"]
    for u in p.units:
        fwd = f"{u.forward_ms:8.2f}" if u.forward_in is None else f"{'(in ' + str(u.forward_in) + ')':>8}"
        bwd = f"{u.backward_ms:8.2f}" if u.backward_in is None else f"{'(in ' + str(u.backward_in) + ')':>8}"
        out.append(f"  {u.index:>3} {_short(u.name, w):<{w}} {u.num_params:>9,} {u.forward_flops / 1e6:>10.1f} "
                   f"{fwd} {bwd} {_mb(u.activation_bytes):>9} "
                   f"{_mb(u.grad_bytes + u.optimizer_state_bytes):>11}")
    fsum, bsum = sum(u.forward_ms for u in p.units), sum(u.backward_ms for u in p.units)
    out.append(f"  {'':>3} {'sum':<{w}} {'':>9} {'':>10} {fsum:>8.2f} {bsum:>8.2f}")
    out += ["", "Ceiling: first n units frozen, measured against an unfrozen copy stepped alternately (saved: "
                "median of the paired step ratios, +- half their interquartile range: that row's noise; row 0 "
                "freezes nothing); est. = sum of their bwd ms + optimizer share",
            f"  {'n':>3} {'last frozen':<{w}} {'step ms':>8} {'full ms':>8} {'saved ms':>9} {'saved':>6} {'+-':>6} "
            f"{'est. saved ms':>13} {'activ. MB':>9}" + (f" {'peak MB':>8}" if p.prefixes and p.prefixes[0].peak_bytes is not None else "")]
    for r in p.prefixes:
        peak = f" {_mb(r.peak_bytes):>8}" if r.peak_bytes is not None else ""
        out.append(f"  {r.num_frozen:>3} {_short(r.last_frozen, w):<{w}} {r.step_ms:>8.2f} {r.full_ms:>8.2f} "
                   f"{r.saved_ms:>9.2f} {r.saved_fraction:>6.1%} {r.ratio_spread:>6.1%} {r.estimated_saved_ms:>13.2f} "
                   f"{_mb(r.activation_bytes):>9}{peak}")
    if p.overheads:
        base = p.baseline
        steps = p.overheads[0].steps
        out += ["", f"Engine overhead and time saved per policy ({steps}-step runs, total_steps={steps}; "
                    f"freezer.step() host time in us; run saved: measured vs the run without freezer, set-up included, "
                    f"ceiling: time-weighted from the table above)",
                f"  {'policy':<11} {'median us':>9} {'mean us':>8} {'max us':>8} {'hook us':>7} "
                f"{'% of step':>9} {'frozen':>6} {'run saved':>9} {'ceiling':>7} {'FLOPs':>6}"]
        if base is not None:
            out.append(f"  {'none':<11} {'-':>9} {'-':>8} {'-':>8} {'-':>7} {'-':>9} {0:>6} "
                       f"{'-':>9} {'-':>7} {'-':>6}   (median step {base.train_step_ms:.2f} ms, run {base.run_ms / 1e3:.2f} s)")
        for r in p.overheads:
            hook = f"{r.hook_us_median:7.1f}" if r.hook_us_median is not None else f"{'-':>7}"
            d = p.derived(r)
            share = d["share_of_step"]
            saved = f"{d['run_saved']:.1%}" if d["run_saved"] is not None else "-"
            ceiling = f"{d['ceiling_saved']:.1%}" if d["ceiling_saved"] is not None else "-"
            flops = f"{r.flops_saved:.1%}"
            out.append(f"  {r.policy:<11} {r.step_us_median:>9.1f} {r.step_us_mean:>8.1f} {r.step_us_max:>8.1f} {hook} "
                       f"{share:>9.2%} {r.num_frozen:>6} {saved:>9} {ceiling:>7} {flops:>6}")
        if any(r.device_us_median is not None for r in p.overheads):
            out.append("  device time of freezer.step() (CUDA events, median us): " + ", ".join(
                f"{r.policy} {r.device_us_median:.1f}" for r in p.overheads if r.device_us_median is not None))
    return out


# ---------------------------------------------------------------------------------- CLI
def _load_factory(spec: str) -> Callable[[], nn.Module]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must look like 'package.module:factory', got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current folder import
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {spec}: cannot import {module_name!r} ({exc}); run from the folder "
                         "that holds it or add it to PYTHONPATH") from exc
    except Exception as exc:  # the user's module failed while importing
        raise ValueError(f"--model {spec}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"--model {spec}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"--model {spec}: {attr!r} is not callable (give a class or a function "
                         "that returns an nn.Module)")
    return factory


def _check_forward(model: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> None:
    """One forward on two samples in eval mode, then one on the batch in train mode (no statistics
    kept), so that a batch the model cannot take (a batch of one under BatchNorm, token ids past the
    vocabulary) is said in the CLI's own terms before any measurement (review88: tracebacks)."""
    hint = (f" (int64 inputs are token ids drawn from [0, --input-high {args.input_high}): pass the model's "
            "vocabulary size)" if args.input_dtype == "int64" else "")
    with preserved_modes(model.modules()), torch.no_grad():
        try:
            model.eval()(x[:2])
        except Exception as exc:
            raise ValueError(f"--model {args.model} cannot take a batch of --input-shape {args.input_shape} "
                             f"({args.input_dtype}): {type(exc).__name__}: {exc}{hint}") from exc
        try:  # in train mode too, on the whole batch: BatchNorm refuses a batch of one sample there
            with preserved_state(model):
                model.train()(x)
        except Exception as exc:
            raise ValueError(f"--model {args.model} cannot train on a batch of --batch-size {x.shape[0]}: "
                             f"{type(exc).__name__}: {exc}. Pass a larger --batch-size (BatchNorm needs two "
                             "samples or more)" if x.shape[0] == 1 else f"--model {args.model} cannot train on "
                             f"this batch: {type(exc).__name__}: {exc}{hint}") from exc


def _finite_or_null(value: Any) -> Any:
    """``value`` with its non-finite floats as None: JSON has no NaN (JavaScript's parser
    refused the file, review88)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _parse_shape(text: str) -> Tuple[int, ...]:
    try:  # 3,32,32 or 3x32x32; every part a number ("3,x" is no shape)
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"--input-shape must be positive integers like 3,32,32 (one sample, no batch "
                         f"dimension), got {text!r}")
    return shape


OPTIMIZERS = {
    "sgd": _sgd,
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3),
}


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "python -m smartfrz_fast.profile") -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Profile a model's training step per freezable unit, measure what freezing "
                    "each prefix saves, and the freezing engine's own overhead per policy. "
                    "Without --model: the demo's CNN on a batch of the embedded digits.")
    p.add_argument("--model", help="module:factory returning the nn.Module (e.g. mypkg.nets:resnet18)")
    p.add_argument("--input-shape", help="shape of ONE input sample, e.g. 3,32,32 (required with --model)")
    p.add_argument("--input-dtype", choices=("float32", "float16", "bfloat16", "int64"), default="float32")
    p.add_argument("--input-high", type=int, default=1000, help="int64 inputs are drawn from [0, this) (token ids)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default 128; quick: 32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per measurement (default 10; quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; quick: 1)")
    p.add_argument("--keep-trainable", type=int, default=1, help="last units never frozen (default 1)")
    p.add_argument("--policies", default=",".join(POLICY_NAMES),
                   help=f"comma list for the overhead runs, or 'none' (default: {','.join(POLICY_NAMES)})")
    p.add_argument("--overhead-steps", type=int, default=None, help="steps per policy run (default 40; quick: 35)")
    p.add_argument("--smartfrz-weights", default=None,
                   help="SmartFRZ predictor weights for its run (default: the shipped ones)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny settings, for smoke tests (numbers not meaningful)")
    args = p.parse_args(argv)
    for key, (full, quick) in {"batch_size": (128, 32), "repeats": (10, 3), "warmup": (2, 1),
                               "overhead_steps": (40, 35)}.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    for key in ("batch_size", "repeats", "overhead_steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.keep_trainable < 1:
        p.error("--keep-trainable must be at least 1: with every unit frozen a training step has no backward "
                "to measure")
    if args.model and not args.input_shape:
        p.error("--model needs --input-shape (one sample's shape, e.g. 3,32,32)")
    given = [f"--{k.replace('_', '-')}" for k, default in (("input_shape", None), ("input_dtype", "float32"),
                                                             ("input_high", 1000)) if getattr(args, k) != default]
    if given and not args.model:  # silently profiling the demo instead would mislead
        p.error(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --model "
                "(without it the demo's CNN is profiled)")
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            p.error(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: its folder does not exist (checked now, not after the measurements)")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.input_high < 1:
        p.error("--input-high must be at least 1: int64 inputs (token ids) are drawn from [0, --input-high)")
    return args


def _demo_batch(batch_size: int, seed: int, quick: bool):
    from .data import load_digits_dataset
    from .demo import DEFAULT_BLOCKS, QUICK_BLOCKS, DigitNet

    size = 12 if quick else 16
    x, _, _, _ = load_digits_dataset(num_samples=batch_size, seed=seed, image_size=size, return_tensors=True)
    torch.manual_seed(seed)
    model = DigitNet(QUICK_BLOCKS if quick else DEFAULT_BLOCKS)
    return model, x[:batch_size], f"demo DigitNet on {batch_size} digits of {size}x{size}"


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m smartfrz_fast.profile") -> int:
    args = parse_args(argv, prog)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is available to this torch; use --device cpu", file=sys.stderr)
        return 2
    policies = [] if args.policies.strip().lower() == "none" else [s.strip() for s in args.policies.split(",") if s.strip()]
    bad = [s for s in policies if s not in POLICY_NAMES]
    if bad:
        print(f"--policies: unknown {bad}; choose from {', '.join(POLICY_NAMES)} or 'none'", file=sys.stderr)
        return 2
    if "smartfrz" in policies:  # bad weights (--smartfrz-weights, $SMARTFRZ_PREDICTOR): say so now, not
        # after the other measurements
        from .predictor import PredictorWeightsError, load_predictor

        try:
            load_predictor(args.smartfrz_weights)
        except PredictorWeightsError as exc:
            given = "--smartfrz-weights" if args.smartfrz_weights is not None else "SmartFRZ weights"
            print(f"{given}: {exc}", file=sys.stderr)
            return 2
    try:
        if args.model:
            factory = _load_factory(args.model)
            shape = _parse_shape(args.input_shape)
            torch.manual_seed(args.seed)
            try:
                model = factory()
            except Exception as exc:
                raise ValueError(f"--model {args.model}: calling it raised {type(exc).__name__}: {exc} (the factory "
                                 "must build the model with no arguments)") from exc
            if not isinstance(model, nn.Module):
                raise ValueError(f"--model {args.model} returned {type(model).__name__}, not an nn.Module")
            if not any(p.requires_grad for p in model.parameters()):
                raise ValueError(f"--model {args.model} has no trainable parameters (none with requires_grad=True): "
                                 "there is nothing to train or freeze")
            dtype = getattr(torch, args.input_dtype)
            g = torch.Generator().manual_seed(args.seed)
            try:
                if dtype == torch.int64:
                    x = torch.randint(0, args.input_high, (args.batch_size, *shape), generator=g)
                else:
                    x = torch.randn((args.batch_size, *shape), generator=g).to(dtype)
            except (RuntimeError, MemoryError) as exc:  # a shape too large to allocate
                raise ValueError(f"a batch of --batch-size {args.batch_size} samples of --input-shape "
                                 f"{args.input_shape} cannot be made ({type(exc).__name__}: {str(exc)[:200]}): pass "
                                 "a smaller batch or sample shape") from exc
            what = f"{args.model} on a random batch {tuple(x.shape)} {args.input_dtype}"
        else:
            model, x, what = _demo_batch(args.batch_size, args.seed, args.quick)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, x = model.to(device), x.to(device)
    if args.model:
        try:
            _check_forward(model, x, args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores")
    title = (f"smartfrz_fast profile: {what}; {where}; torch {torch.__version__}; optimizer {args.optimizer}; "
             f"{time.strftime('%Y-%m-%d')}")
    print(title + "\n(measuring...)", file=sys.stderr, flush=True)
    result = profile_model(model, x, optimizer_factory=OPTIMIZERS[args.optimizer], repeats=args.repeats,
                           warmup=args.warmup, keep_trainable=args.keep_trainable, policies=policies,
                           overhead_steps=args.overhead_steps, smartfrz_weights=args.smartfrz_weights,
                           title=title)
    print(result.format())
    if args.quick:
        print("\n(--quick: tiny settings for smoke tests; the numbers are not meaningful)")
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as f:  # NaN (not measured) as null: strict JSON
            json.dump(_finite_or_null(result.to_dict()), f, indent=1, default=str, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
