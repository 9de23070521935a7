"""What changes around a SmartFreezer after set-up, and misuse of it, noticed at no per-step cost.

torch reports the events that matter through global hooks, so ``SmartFreezer.step()`` only reads
a flag and a counter:

- a parameter or submodule registered on one of the model's modules (``module.weight =
  nn.Parameter(...)``, ``model.load_state_dict(sd, assign=True)``, a block appended): the
  freezer re-reads the model before the next optimizer step or ``step()``. Parameters replaced
  by ones of the same shape, dtype, device and layout are adopted (``SmartFreezer._resync``);
  any other change of structure is refused with the fix (a new SmartFreezer).
- every optimizer step: the freezer counts its optimizers' steps (``step()`` called twice per
  optimizer step, or never, warns once), and adopts an optimizer that holds the model's
  parameters but is not its own (one re-created mid-run) before that optimizer's first step:
  frozen parameters leave it and a per-unit lr schedule is applied to it
  (``SmartFreezer._adopt_optimizer``). Optimizers that only wrap the freezer's (accelerate's
  AcceleratedOptimizer shares its param_groups; Lookahead or ZeRO step theirs inside their own
  step) are recognised as the same optimizer.

Deleting a module (``del model[3]``) calls no hook: ``SmartFreezer.state_dict()`` re-reads the
model in full to catch that at the latest at the next checkpoint.

A model is claimed by one live, unclosed freezer at a time (``claim``).
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

# step() calls without an optimizer step in between, before the warning: a GradScaler skips
# optimizer steps on inf gradients (about 10-17 at the start of fp16 training), which is fine;
# step() twice per optimizer step makes every second call such a one.
UNMATCHED_STEPS_WARN = 20
# optimizer steps (per optimizer of the freezer) with step() never called, before the warning
NEVER_STEPPED_WARN = 100

_GUARDS: List["weakref.ref[Guard]"] = []
_HANDLES: List[Any] = []
_CLAIMS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def warn_in_every_run(message: str, stacklevel: int) -> None:
    """``warnings.warn(message, stacklevel=stacklevel)`` without Python's registry of warnings
    already shown from one line: a freezer's or cache's once-per-run warning shows again in the
    next run of a sweep or a re-run notebook cell (its words are the same). Filters still apply."""
    try:
        frame = sys._getframe(stacklevel)  # 1: the caller, as warnings.warn counts
    except ValueError:
        warnings.warn(message, stacklevel=2)
        return
    # no module_globals (as warnings.warn): with them Python reads the line from the module's
    # loader, and code run by exec() under another file's loader raised IndexError here
    warnings.warn_explicit(message, UserWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"), registry=None)


def user_stacklevel() -> int:
    """The ``stacklevel`` (as ``warnings.warn`` counts it, from the caller of this function) of
    the first frame outside this package and torch: the user's line, whether the freezer was set
    up in its constructor or at the model's first forward pass (through torch's hooks)."""
    import os

    inside = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


# ---------------------------------------------------------------------- one model, one freezer
def managing_freezer(module: nn.Module) -> Tuple[Optional[nn.Module], Any]:
    """(``module`` or the first of its submodules that a live, unclosed freezer manages, that
    freezer); (None, None) if none is (a freezer claims every module of its model, so a parent's
    freezer counts too)."""
    for m in module.modules():
        ref = _CLAIMS.get(m)
        other = ref() if ref is not None else None
        if other is not None and not other._closed:
            return m, other
    return None, None


def managed_part(module: nn.Module) -> Optional[nn.Module]:
    """The part of ``module`` that a live, unclosed freezer manages, or None."""
    return managing_freezer(module)[0]


def check_unclaimed(module: nn.Module) -> None:
    """Raise if a live, unclosed freezer already manages ``module``, a submodule or a parent of it."""
    if managed_part(module) is None:
        return
    # a freezer dropped unclosed may live on only in a reference cycle: collected now, it lets go
    import gc

    gc.collect()
    m = managed_part(module)
    if m is not None:
        where = "this model" if m is module else f"a part of this model ({type(m).__name__})"
        raise RuntimeError(
            f"SmartFreezer: {where} is already managed by another SmartFreezer that is still open: two "
            "freezers would each freeze, remove from the optimizer and count steps on their own. Call "
            "close() on the first one before building another (with a new policy object), or keep "
            "using the first; SmartFreezer.of(model) returns it where you do not hold it yourself. "
            "A SmartFreezeCallback of an earlier "
            "fit()/train() holds one: pass that callback again, or call its freezer.close() first "
            "(frozen layers stay frozen).")


def claim(freezer: Any, module: nn.Module) -> None:
    ref = weakref.ref(freezer)
    for m in module.modules():
        _CLAIMS[m] = ref


def release(freezer: Any) -> None:
    for m, ref in list(_CLAIMS.items()):
        if ref() is freezer:
            del _CLAIMS[m]


# ---------------------------------------------------------------------- global hooks
# The hooks run at every optimizer step and parameter registration of the process: plain loops.
def _outside_the_trace(hook):
    """``hook`` run eagerly where torch.compile(optimizer.step) traces it: traced, its loop over
    ``_GUARDS`` was read by position, and a freezer of an earlier run collected meanwhile made
    dynamo's lookup fail (IndexError, review84). Dynamo is imported by then."""
    @functools.wraps(hook)
    def run(*args):
        if torch.compiler.is_compiling():
            from torch._dynamo import disable

            return disable(hook)(*args)
        return hook(*args)
    return run


@_outside_the_trace
def _before_optimizer_step(optimizer, args, kwargs) -> None:
    for ref in _GUARDS:
        guard = ref()
        if guard is not None:
            guard.before_optimizer_step(optimizer)


@_outside_the_trace
def _after_optimizer_step(optimizer, args, kwargs) -> None:
    for ref in _GUARDS:
        guard = ref()
        if guard is not None and guard.inside is optimizer:
            guard.after_optimizer_step(optimizer)


def _on_registration(module, name, value) -> None:
    for ref in _GUARDS:
        guard = ref()
        if guard is not None and id(module) in guard.module_ids:
            guard.changed = True


def _install() -> None:
    if _HANDLES:
        return
    from torch.nn.modules import module as module_hooks
    from torch.optim import optimizer as optimizer_hooks

    _HANDLES.extend([
        optimizer_hooks.register_optimizer_step_pre_hook(_before_optimizer_step),
        optimizer_hooks.register_optimizer_step_post_hook(_after_optimizer_step),
        module_hooks.register_module_parameter_registration_hook(_on_registration),
        module_hooks.register_module_module_registration_hook(_on_registration),
    ])


def _forget(ref: "weakref.ref[Guard]") -> None:
    """A guard closed, or collected with a freezer nobody closed: its hooks' loops lose it."""
    if _GUARDS is None:  # interpreter shutdown: the module's globals are gone already
        return
    if ref in _GUARDS:
        _GUARDS.remove(ref)
    _uninstall_if_unused()


def _uninstall_if_unused() -> None:
    if not _GUARDS:
        for handle in _HANDLES:
            handle.remove()
        _HANDLES.clear()


def shares_param_groups(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    """One optimizer wraps the other (SAM, Lookahead, accelerate's AcceleratedOptimizer): the
    same param groups, as one list or group by group."""
    try:
        ga, gb = a.param_groups, b.param_groups
    except AttributeError:  # a wrapper part-built
        return False
    return ga is gb or (len(ga) == len(gb) > 0 and all(x is y for x, y in zip(ga, gb)))


# ---------------------------------------------------------------------- structure
def model_layout(module: nn.Module) -> Tuple[Dict[str, nn.Module], Dict[str, nn.Parameter]]:
    """Every module and parameter of ``module`` by qualified name (shared ones under every name)."""
    modules = dict(module.named_modules(remove_duplicate=False))
    params = dict(module.named_parameters(remove_duplicate=False))
    return modules, params


class ContainerChildren:
    """The children of each module of a model that has any, as they were at set-up;
    ``changed()`` says whether an edit that no registration hook saw changed them since:
    ``insert``, ``pop`` or ``del`` on an ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict``
    (``insert`` writes ``_modules`` directly, the others go through ``delattr``), or a layer
    swapped by writing its parent's ``_modules`` (``torch.ao.quantization.prepare_qat(...,
    inplace=True)``, libraries that replace layers in place). A list comparison per module with
    children (identity first, in C: about 20 us on EfficientNet-B0)."""

    __slots__ = ("_children",)

    def __init__(self, module: Optional[nn.Module] = None) -> None:
        parents = () if module is None else (m for m in module.modules() if m._modules)
        self._children = [(m._modules, list(m._modules.values())) for m in parents]

    def changed(self) -> bool:
        for children, then in self._children:
            if list(children.values()) != then:
                return True
        return False


def describe_change(old: Tuple[Dict[str, nn.Module], Dict[str, Any]],
                    new: Tuple[Dict[str, nn.Module], Dict[str, Any]], in_units: set) -> Optional[str]:
    """What changed in the model's structure that the freezer cannot follow (None: nothing, or
    only parameter objects). A module without parameters that no unit names (an activation, a
    hook holder) may come and go: it cannot change what freezes."""
    (old_modules, old_params), (new_modules, new_params) = old, new

    def matters(m: nn.Module) -> bool:
        return id(m) in in_units or any(True for _ in m.parameters())

    # by identity: an insert into an nn.Sequential moves the names of the modules after it
    old_names: Dict[int, List[str]] = {}
    for n, m in old_modules.items():
        old_names.setdefault(id(m), []).append(n)
    new_ids = {id(m) for m in new_modules.values()}
    replaced = [n for n, m in old_modules.items() if id(m) not in new_ids and n in new_modules
                and id(new_modules[n]) not in old_names and (matters(m) or matters(new_modules[n]))]
    added = [n for n, m in new_modules.items() if id(m) not in old_names and n not in replaced and matters(m)]
    removed = [n for n, m in old_modules.items() if id(m) not in new_ids and n not in replaced and matters(m)]
    renamed = [f"{old_names[id(m)][0]} now {n}" for n, m in new_modules.items()
               if id(m) in old_names and n not in old_names[id(m)] and matters(m)]
    added_params = [n for n in new_params if n not in old_params]
    removed_params = [n for n in old_params if n not in new_params]
    found = []
    for what, names in (("module(s) added", added), ("module(s) removed", removed), ("module(s) replaced", replaced),
                        ("module(s) moved to another name", renamed),
                        ("parameter(s) added", added_params), ("parameter(s) removed", removed_params)):
        if names:
            found.append(f"{what}: {names[:3]}{' ...' if len(names) > 3 else ''}")
    return "; ".join(found[:2]) or None


def same_layout(old: torch.Tensor, new: torch.Tensor) -> bool:
    """``new`` can take ``old``'s place. Strides may differ (a checkpoint saved channels_last,
    loaded with assign=True): the history re-addresses its positions at the next snapshot."""
    return (old.shape == new.shape and old.dtype == new.dtype and old.device == new.device
            and type(old) is type(new))


# ---------------------------------------------------------------------- one freezer's watch
class Guard:
    """Watches one freezer's model and optimizers through the global hooks (held weakly both
    ways: a freezer nobody holds is collected as before)."""

    def __init__(self, freezer: Any) -> None:
        self._freezer = weakref.ref(freezer)
        self.layout = model_layout(freezer.module)
        self.module_ids = {id(m) for m in self.layout[0].values()}
        self.containers = ContainerChildren(freezer.module)
        self.changed = False  # a registration on one of the model's modules since the last look
        self.optimizer_steps = 0  # steps of the freezer's optimizers since its last step()
        self.unmatched = 0  # step() calls with no optimizer step since the previous call
        self.inside: Optional[torch.optim.Optimizer] = None  # the freezer's optimizer mid-step
        self._unrelated: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
        self._replaced: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
        self._warned = set()
        self._group_sizes: Dict[int, Tuple[int, ...]] = {}  # id(optimizer) -> params per group, last look
        self._ref = weakref.ref(self, _forget)
        _GUARDS.append(self._ref)
        _install()

    def close(self) -> None:
        self.module_ids, self.layout, self.containers = set(), ({}, {}), ContainerChildren()
        _forget(self._ref)

    def model_changed(self) -> bool:
        """A module was added, removed or replaced since the last resync (by torch's hooks, or by an
        edit that calls none: `insert`/`pop`/`del` on a container, a write to `_modules`)."""
        return self.changed or self.containers.changed()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn_in_every_run(message, stacklevel=4)

    # -------------------------------------------------------------- events
    def before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        freezer = self._freezer()
        if freezer is None or freezer._closed or freezer.plan is None:
            return
        if optimizer in freezer.optimizers:  # identity: optimizers do not define __eq__
            if freezer._owed_from_checkpoint and (freezer._forward_since_owed
                                                  or self.optimizer_steps >= len(freezer.optimizers)
                                                  or id(optimizer) in freezer._stepped):
                # a training forward since the resume, or every optimizer, or this one, stepped in
                # the saved iteration: a new one began
                freezer._catch_up_owed_step()
            if self.model_changed():
                freezer._resync()
            sizes = tuple(len(g["params"]) for g in optimizer.param_groups)
            if self._group_sizes.get(id(optimizer)) != sizes:
                # add_param_group (or a group edited) since the last step: a frozen parameter the
                # user switched back on and added would train in this very step, before step()
                # freezes it again (a look per change, not per step)
                freezer._check_prefix_still_frozen()
                self._group_sizes[id(optimizer)] = tuple(len(g["params"]) for g in optimizer.param_groups)
            self._count(freezer, optimizer)
            return
        if self.inside is not None or optimizer in self._unrelated:
            return  # an optimizer stepped inside one of the freezer's (a wrapper's inner one)
        if any(shares_param_groups(optimizer, own) for own in freezer.optimizers):
            self._unrelated.add(optimizer)  # a wrapper sharing the groups of one of the freezer's
            freezer._note_wrapper(optimizer)
            return
        # another model's optimizer (this process trains several) is none of this freezer's business,
        # even when this freezer's model changed
        model_params = {id(p) for p in freezer.module.parameters()}
        if not any(id(p) in model_params for g in optimizer.param_groups for p in g["params"]):
            self._unrelated.add(optimizer)
            return
        if self.model_changed():  # first: the optimizer may hold parameters that
            # replaced the units' ones
            freezer._resync()
        held = [p for g in optimizer.param_groups for p in g["params"] if id(p) in freezer._unit_of_param]
        if not held:
            self._unrelated.add(optimizer)
            return
        if optimizer in self._replaced:
            raise RuntimeError(
                "SmartFreezer: two optimizers step the model's parameters, and the freezer was given only one "
                "of them (it took the other for a re-created one, whose predecessor stops stepping). Freezing "
                "removes parameters from the freezer's optimizers only: pass every optimizer, "
                "SmartFreezer(model, [opt_a, opt_b], ...).")
        self._replaced.update(freezer._adopt_optimizer(optimizer))
        self._count(freezer, optimizer)

    def _count(self, freezer: Any, optimizer: torch.optim.Optimizer) -> None:
        self.inside = optimizer
        self.optimizer_steps += 1
        freezer._stepped.add(id(optimizer))
        # never stepped and nothing frozen by hand (freeze_to needs no step(): profile.py drives it so)
        if (self.optimizer_steps == NEVER_STEPPED_WARN * len(freezer.optimizers) and freezer.step_count == 0
                and not freezer.timeline):
            self.warn_once("never", (
                f"SmartFreezer: the optimizer has stepped {NEVER_STEPPED_WARN} times and SmartFreezer.step() "
                "was never called: the policy never runs, nothing freezes. Call freezer.step() once after "
                "each optimizer.step()."))

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The freezer's optimizer's step ended (one that raised never gets here: it trained
        nothing the freezer counts)."""
        self.inside = None
        freezer = self._freezer()
        if freezer is not None and not freezer._closed and freezer.plan is not None:
            freezer._note_units_trained(optimizer)

    def on_freezer_step(self, freezer: Any) -> None:
        # no optimizer step is under way now: one that raised (out of memory in Adam's first step,
        # caught by the loop) never ran the post-step hook, and a re-created optimizer would have
        # been taken for one stepped inside it for ever, never followed
        self.inside = None
        if self.model_changed():
            freezer._resync()
        if self.optimizer_steps == 0:
            self.unmatched += 1
            if self.unmatched >= UNMATCHED_STEPS_WARN and 3 * self.unmatched >= freezer.step_count:
                self.warn_once("unmatched", (
                    f"SmartFreezer.step() was called {self.unmatched} times of {freezer.step_count} with no "
                    "optimizer step since the previous call: call it once after each optimizer.step(), not "
                    "per micro-batch or twice per step (schedules count these calls: a schedule called twice "
                    "per step runs at double speed). A GradScaler skipping a few steps is harmless."))
        self.optimizer_steps = 0
