"""Keeping a frozen prefix a fixed function while the rest of the model trains.

Which modules a prefix of ``cut`` units contains comes from the traced forward pass
(``UnitPlan.eval_modules``): every module whose calls all lie in it runs in eval mode, whatever
its regulariser (dropout modules, torchvision's StochasticDepth, Hugging Face attention dropout
read from the attention module's ``training`` flag, any user module), and BatchNorm statistics
stop moving. A forward pre-hook sets the flag at every call, so ``model.train()`` cannot undo it
and ``model.eval()`` then ``model.train()`` leaves exactly the trainable modules in train mode.
Flags are set per module (not ``.eval()``, which recurses): a frozen module's child that is also
called after the prefix keeps its own flag.

A module called both inside and after the prefix (ALBERT's one layer called 12 times) runs its
first calls in eval and the rest with the flag the user set; a shared parameter that keeps
training (``shared_parameters="train"``) has the outputs of the module calls that read it inside
the prefix detached, so no gradient flows back through the frozen units. Calls are counted per
forward pass of the model (reset by a pre-hook on it); where a pass skips the model's own forward
(the activation cache runs blocks), the count wraps at the traced number of calls.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .units import UnitPlan


def engine_hook(fn):
    """Marks a hook as the engine's (the activation cache's trace check skips it)."""
    fn.engine_hook = True
    return fn


@engine_hook
def _force_eval(module: nn.Module, args) -> None:
    module.training = False


def _detached(output: Any) -> Any:
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, output)


class FrozenRegion:
    """The hooks that keep the first ``cut`` units of ``plan`` a fixed function of their input."""

    def __init__(self, root: nn.Module, plan: UnitPlan) -> None:
        self.root = root
        self.plan = plan
        self.cut = 0
        self.handles: List[Any] = []
        self._count: Dict[int, int] = {}  # calls of each counted module in this forward pass
        self._running: Dict[int, List[tuple]] = {}  # per module: (call number, flag to restore)

    def apply(self, cut: int) -> None:
        """Place the hooks for a frozen prefix of ``cut`` units (replacing the previous ones)."""
        self.remove()
        self.cut = cut
        always, partly = self.plan.eval_modules(cut)
        detach = self.plan.detached_calls(cut)
        for module in always:
            module.training = False
            self.handles.append(module.register_forward_pre_hook(_force_eval))
        counted = {id(m): n for m, n in partly.items()}  # id(module) -> leading calls in eval
        counted_detach: Dict[int, int] = {}  # id(module) -> leading calls detached
        for key, n in detach.items():
            module, _, calls = self.plan.module_calls[key]
            if n == len(calls):  # every call detached: no counting
                self.handles.append(module.register_forward_hook(engine_hook(lambda m, a, out: _detached(out))))
            else:
                counted.setdefault(key, 0)
                counted_detach[key] = n
        for key, eval_calls in counted.items():
            module, _, calls = self.plan.module_calls[key]
            self.handles.append(module.register_forward_pre_hook(self._enter_hook(len(calls), eval_calls)))
            self.handles.append(module.register_forward_hook(self._leave_hook(counted_detach.get(key, 0)),
                                                             always_call=True))
        if counted:
            self.handles.append(self.root.register_forward_pre_hook(engine_hook(lambda m, a: self._count.clear())))

    def _enter_hook(self, traced_calls: int, eval_calls: int):
        def enter(module, args):
            key = id(module)
            number = self._count.get(key, 0) % traced_calls
            self._count[key] = number + 1
            self._running.setdefault(key, []).append((number, module.training))
            if number < eval_calls:
                module.training = False
        return engine_hook(enter)

    def _leave_hook(self, detach_calls: int):
        def leave(module, args, output):
            number, flag = self._running[id(module)].pop()
            module.training = flag
            return _detached(output) if number < detach_calls else None
        return engine_hook(leave)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._count.clear()
        self._running.clear()
