"""Per-unit learning-rate multipliers that leave the user's param groups alone.

A policy that sets each unit's lr (``manages_lr``: FreezeOut) needs one lr per unit, but the
user's optimizer has its own groups, and the user's lr scheduler (built before or after the
freezer) reads and writes exactly those groups. So the groups are split per unit only while
``optimizer.step()`` runs: a pre-step hook replaces them with one sub-group per (group, unit)
whose lr is the group's current lr (whatever the scheduler set) times the unit's factor, and a
post-step hook puts the user's groups back. Outside the step the optimizer, its ``state_dict``
and every scheduler see the groups they were built with.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
    for index, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if group.get("relative_step") or isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
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
                sub = {k: v for k, v in group.items() if k not in ("params", "param_names")}
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
        for sub, group in pairs:  # what the step itself wrote into a group (a few optimizers count there)
            for key, value in sub.items():
                if key not in _SPLIT_OWN and key not in _TRACING_FLAGS and group.get(key) is not value:
                    group[key] = value


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
