"""Per-unit learning-rate multipliers that leave the user's param groups alone.

A policy that sets each unit's lr (``manages_lr``: FreezeOut) needs one lr per unit, but the
user's optimizer has its own groups, and the user's lr scheduler (built before or after the
freezer) reads and writes exactly those groups. So the groups are split per unit only while
``optimizer.step()`` runs: a pre-step hook replaces them with one sub-group per (group, unit)
whose lr is the group's current lr (whatever the scheduler set) times the unit's factor, and
the step's end puts the user's groups back, with what the step wrote into them. Outside the step
the optimizer, its ``state_dict`` and every scheduler see the groups they were built with.
"""

from __future__ import annotations

import inspect
import numbers
import types
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

_SPLIT_OWN = ("params", "param_names", "lr")  # the keys a sub-group sets itself; the rest are the group's
# flags a step never writes itself, which torch.compile sets on the groups it traces
# (capturable=True on a CPU Adam group made its next step raise): not copied back
_TRACING_FLAGS = ("capturable", "differentiable")


def _check_scalable(optimizer: torch.optim.Optimizer) -> None:
    """A clear error, at set-up, for groups whose lr a factor cannot scale: Adafactor's default
    (``lr=None, relative_step=True``: Hugging Face's and timm's) computes its own step size and
    never reads the group's lr, so FreezeOut's annealing would do nothing (and ``None * factor``
    raised inside the first step)."""
    if isinstance(optimizer, torch.optim.Rprop):  # (review91: full-size steps up to the freeze)
        raise ValueError("FreezeOut anneals each unit's learning rate, and Rprop reads its groups' lr at its first "
                         "step only (its step sizes adapt on their own from there), so the annealing would do "
                         "nothing. Use another optimizer with FreezeOut, or another policy.")
    for index, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if group.get("relative_step") or isinstance(lr, bool) or not isinstance(lr, (numbers.Real, torch.Tensor)):
            what = "computes its own step size (relative_step=True)" if group.get("relative_step") else f"has lr={lr!r}"
            raise ValueError(
                f"FreezeOut anneals each unit's learning rate, and group {index} of {type(optimizer).__name__} {what}, "
                "which no factor can scale. Give the optimizer a learning rate it follows (Adafactor: lr=1e-3, "
                "relative_step=False, scale_parameter=False, warmup_init=False), or use another policy.")


class UnitLRScaler:
    """Scale each unit's lr by ``factors()[unit]`` during every step of ``optimizers``;
    ``unit_of_param()`` gives the unit whose factor each parameter takes (by ``id``)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], unit_of_param: Callable[[], Dict[int, int]],
                 factors: Callable[[], Optional[List[float]]]) -> None:
        self._unit_of_param = unit_of_param
        self._factors = factors
        # per optimizer, while its step runs: its own groups and the (sub-group, group) pairs
        self._split: Dict[int, Tuple[List[dict], List[Tuple[dict, dict]]]] = {}
        self.hooks = []
        for opt in optimizers:
            _check_scalable(opt)
        for opt in optimizers:
            self.hooks.append(opt.register_step_pre_hook(self._before_step))
            self.hooks.append(_UntilStepEnds(opt.register_step_post_hook(self._after_step), self, id(opt)))
            self.hooks.append(_GroupsBackWhenStepRaises.wrap(opt, self))

    def _before_step(self, optimizer, args, kwargs) -> None:
        self._after_step(optimizer, args, kwargs)  # a step that raised left its groups split
        factors = self._factors()
        if factors is None:
            return
        own = list(optimizer.param_groups)
        unit_of_param = self._unit_of_param()  # read each step: parameters may have been replaced
        pairs = []
        for group in own:
            buckets: Dict[int, list] = {}
            for p in group["params"]:
                buckets.setdefault(unit_of_param.get(id(p), -1), []).append(p)
            names = group.get("param_names")  # a group built from named_parameters(): its names split too
            name_of = dict(zip(map(id, group["params"]), names)) if names and len(names) == len(group["params"]) else None
            for unit, params in buckets.items():
                # a tensor the step changes in place (timm Lamb's group['step'].add_(1)) is each
                # sub-group's own: shared, it advanced once per unit per step
                sub = {k: v.clone() if isinstance(v, torch.Tensor) and k not in _SPLIT_OWN else v
                       for k, v in group.items() if k not in ("params", "param_names")}
                sub["params"] = params
                if name_of is not None:
                    sub["param_names"] = [name_of[id(p)] for p in params]
                if unit >= 0:  # parameters of no unit keep the group's lr
                    sub["lr"] = group["lr"] * float(factors[unit])
                pairs.append((sub, group))
        self._split[id(optimizer)] = (own, pairs)
        optimizer.param_groups[:] = [sub for sub, _ in pairs]

    def _after_step(self, optimizer, args, kwargs) -> None:
        split = self._split.pop(id(optimizer), None)
        if split is None:
            return
        own, pairs = split
        optimizer.param_groups[:] = own
        # a group's tensor changed in place (a step count): a value of a sub-group that changed it
        # (those that did agree: each stepped once), chosen on the device, with no host read
        changed: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = {}
        for sub, group in pairs:  # what the step itself wrote into a group (a few optimizers count there)
            for key, value in sub.items():
                if key in _SPLIT_OWN or key in _TRACING_FLAGS:
                    continue
                mine = group.get(key)
                if isinstance(mine, torch.Tensor) and isinstance(value, torch.Tensor) and value.shape == mine.shape:
                    _, chosen = changed.get((id(group), key), (mine, mine))
                    changed[(id(group), key)] = (mine, torch.where(value != mine, value.to(mine.dtype), chosen))
                elif mine is not value:
                    group[key] = value
        for mine, chosen in changed.values():
            mine.copy_(chosen)  # in place: whoever holds the user's tensor sees the count


class _UntilStepEnds:
    """The post-step hook's handle. Removed while its optimizer's step runs (a freezer dropped
    mid-step, by Python's collector), the hook stays: it puts the user's groups back when the
    step ends, and is inert after (``factors()`` is None without a freezer). Removed at once,
    the optimizer kept the per-unit groups for good, and the user's lr scheduler no longer
    reached the lrs it steps with. (A hook cannot remove itself: torch iterates the hooks.)"""

    def __init__(self, handle, scaler: UnitLRScaler, optimizer_id: int) -> None:
        self.handle, self.scaler, self.optimizer_id = handle, scaler, optimizer_id

    def remove(self) -> None:
        if self.optimizer_id not in self.scaler._split:
            self.handle.remove()


class _GroupsBackWhenStepRaises:
    """``optimizer.step`` wrapped so that a step that raises (a closure's out-of-memory error,
    caught by the loop and the batch skipped) puts the user's groups back too: torch runs no
    post-step hook then, and until the next step the user's lr scheduler stepped the per-unit
    groups (its update lost), and an ``optimizer.state_dict()`` saved them (a checkpoint that no
    optimizer loads). It holds the optimizer weakly (dropped, it goes at once), answers
    ``__func__`` as torch's lr schedulers expect of ``optimizer.step`` and the step's signature
    as GradScaler reads it of a fused optimizer's, copies and pickles as
    the plain step, is undone by ``remove()`` (``close()``) where it is still outermost, and is
    inert once its scaler is gone."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: UnitLRScaler) -> None:
        inner = optimizer.step
        # the step it wraps, never holding the optimizer: the class's step (or another bound
        # method) unbound, or a scheduler's wrapper (which holds it weakly)
        self.inner_unbound = isinstance(inner, types.MethodType) and inner.__self__ is optimizer
        self.inner = inner.__func__ if self.inner_unbound else inner
        self.optimizer = weakref.ref(optimizer)
        self.scaler = weakref.ref(scaler)
        self.__name__ = "step"
        if getattr(inner, "_wrapped_by_lr_sched", False):
            # a scheduler built before wrapped the step to note that it ran (it still does, inside):
            # without the mark, its first step() warns that optimizer.step() was overridden
            self._wrapped_by_lr_sched = True

    @classmethod
    def wrap(cls, optimizer: torch.optim.Optimizer, scaler: UnitLRScaler) -> "_GroupsBackWhenStepRaises":
        wrapper = cls(optimizer, scaler)
        optimizer.step = wrapper
        return wrapper

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._step(self.optimizer(), *args, **kwargs)

    def _step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.inner(optimizer, *args, **kwargs) if self.inner_unbound else self.inner(*args, **kwargs)
        finally:
            scaler = self.scaler()
            if scaler is not None and id(optimizer) in scaler._split:
                scaler._after_step(optimizer, args, kwargs)

    @property
    def __func__(self) -> Any:  # a scheduler built later wraps func.__get__(optimizer)
        return self

    @property
    def __signature__(self) -> inspect.Signature:  # GradScaler reads a fused optimizer's step's
        signature = inspect.signature(self.inner)
        if self.inner_unbound:  # without the optimizer, as bound
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        return signature

    def __get__(self, optimizer: Any, owner: Any = None) -> Any:
        return self if optimizer is None else types.MethodType(self._step, optimizer)

    def __reduce__(self) -> Any:  # torch.save(optimizer), copy.deepcopy(optimizer): the class's step
        return _class_step, (self.optimizer(),)

    def remove(self) -> None:
        optimizer = self.optimizer()
        if optimizer is not None and optimizer.__dict__.get("step") is self:
            if self.inner_unbound and self.inner is type(optimizer).step:
                del optimizer.step  # the class's own step again
            else:
                optimizer.step = types.MethodType(self.inner, optimizer) if self.inner_unbound else self.inner


def _class_step(optimizer: torch.optim.Optimizer) -> Any:
    return types.MethodType(type(optimizer).step, optimizer)
