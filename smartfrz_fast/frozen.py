"""Keeping a frozen prefix a fixed function while the rest of the model trains.

Which modules a prefix of ``cut`` units contains comes from the traced forward pass
(``UnitPlan.eval_modules``): every module whose calls all lie in it runs in eval mode, whatever
its regulariser (dropout modules, torchvision's StochasticDepth, Hugging Face attention dropout
read from the attention module's ``training`` flag, any user module), and BatchNorm statistics
stop moving. A forward pre-hook sets the flag at every call, so ``model.train()`` cannot undo it
and ``model.eval()`` then ``model.train()`` leaves exactly the trainable modules in train mode.
Flags are set per module (not ``.eval()``, which recurses): a frozen module's child that is also
called after the prefix keeps its own flag. Torch's own modules whose forward never reads the flag
(``MODE_BLIND``: Linear, Conv, LayerNorm, activations, pooling, containers; exact classes) get it
once and no hook: a hook per module per forward was the prefix's main cost on deep models, and
their flag changes nothing (``model.train()`` may set it back to True). The hooks are
``EngineHook``s: copies of the model (deepcopy, pickle, EMA, ``AveragedModel``) get inert ones.

A module called both inside and after the prefix (ALBERT's one layer called 12 times) runs its
first calls in eval and the rest with the flag the user set; a shared parameter that keeps training
(``shared_parameters="train"``) has the outputs of the module calls that read it inside the prefix
detached, so no gradient flows back through the frozen units (where a call's input needs a
gradient, as in adversarial training, the call reads a detached view of the parameter instead, and
its input gets its gradient). A call lies in the prefix if the model's forward has not yet entered
a trainable unit's first module call (pre-hooks on those modules: a loop in the prefix may run more
or fewer turns than traced; compiled, the hooks run in the graph). Where that cannot tell (a
container around the cut, the activation cache running blocks outside the model's forward), calls
are counted per forward pass of the model (reset by a pre-hook on it), and a call beyond the traced
ones lies after the prefix; where a pass skips the model's own forward, the count wraps at the
traced number of calls. A call that activation checkpointing recomputes in the backward pass is one
after the prefix (the prefix's calls pass no gradient, so they are never recomputed).
"""

from __future__ import annotations

import bisect
import dataclasses
import sys
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .units import UnitPlan, forward_codes


class EngineHook:
    """A hook the engine places on the user's model.

    Marked as the engine's (the activation cache's check for hooks a chain would skip looks only
    at the user's), and inert in copies of the model: ``copy.deepcopy``, ``torch.save(model)``,
    ``AveragedModel`` and EMA copies get a hook that does nothing in its place. The original acts
    for one freezer, on the original's modules (a copy kept forcing eval, so ``update_bn``
    could not re-estimate its frozen BatchNorms, and ``close()`` could not reach it); and hooks
    made of lambdas cannot be pickled."""

    engine_hook = True
    __slots__ = ("fn",)

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __reduce__(self):
        return (_inert_hook_factory, ())


def remove_handles(handles: List[Any]) -> None:
    """Remove every hook in ``handles`` and empty the list (in place: a ``weakref.finalize``
    holds the same list, to remove them when their owner is dropped without close())."""
    for handle in handles:
        handle.remove()
    handles.clear()


def held_weakly(method: Callable) -> Callable:
    """``method`` as a hook or callback that holds its object weakly (and does nothing once the
    object is gone). An optimizer outlives a freezer its user drops (a sweep's trial, a phase
    built inside a function), and a cache's storage its cache: a strong hook kept the freezer
    open, its model hooks acting, and made a cycle that only Python's collector freed (device
    memory included)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = ref()
        return None if bound is None else bound(*args, **kwargs)

    return call


def _inert_hook(*args, **kwargs) -> None:
    """What a copy of the model holds in place of an engine hook."""
    return None


_inert_hook.engine_hook = True


def _inert_hook_factory() -> Callable:
    return _inert_hook


def engine_hook(fn: Callable) -> EngineHook:
    """``fn`` as the engine's hook (``EngineHook``)."""
    return EngineHook(fn)


def _torch_modules(*names: str) -> frozenset:
    return frozenset(getattr(nn, name) for name in names if hasattr(nn, name))  # RMSNorm: torch >= 2.4


# Torch classes whose forward ignores ``training`` (tests/test_frozen_region.py reads their source).
MODE_BLIND = _torch_modules(
    "Linear", "Bilinear", "Identity", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
    "ConvTranspose3d", "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm", "Embedding", "EmbeddingBag",
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh",
    "Hardtanh", "Hardswish", "Hardsigmoid", "Softplus", "Softsign", "Softmax", "LogSoftmax", "GLU", "Tanhshrink",
    "Threshold", "LogSigmoid", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d",
    "AdaptiveMaxPool3d", "Flatten", "Unflatten", "Upsample", "PixelShuffle", "PixelUnshuffle", "ZeroPad2d",
    "ConstantPad1d", "ConstantPad2d", "ConstantPad3d", "ReflectionPad1d", "ReflectionPad2d", "ReplicationPad1d",
    "ReplicationPad2d", "Sequential", "ModuleList", "ModuleDict")


def mode_blind(module: nn.Module) -> bool:
    """True for a module whose call cannot read its ``training`` flag: an exact torch class in
    ``MODE_BLIND`` (a subclass may override forward) with no forward hook but the engine's (the
    old-style ``spectral_norm``'s pre-hook runs a power iteration in train mode, a DropConnect
    pre-hook draws masks: set to eval once, such a layer went back to train at ``model.train()``)."""
    return type(module) in MODE_BLIND and not _has_user_hooks(module)


def _has_user_hooks(module: nn.Module) -> bool:
    """A forward (pre-)hook on ``module`` that is not the engine's: it may read the mode."""
    return any(not getattr(hook, "engine_hook", False)
               for hooks in (module._forward_pre_hooks, module._forward_hooks) for hook in hooks.values())


def reads_its_mode(module: nn.Module) -> bool:
    """Whether putting ``module`` in eval may change what it computes: not ``mode_blind``, and
    its forward's code (with the functions defined in it) names ``training``, or a hook of
    the user's may read it. A forward that reads the flag only through a helper method is
    missed: for messages, never for what the engine holds in eval."""
    if mode_blind(module):
        return False
    if _has_user_hooks(module):
        return True
    codes = forward_codes(module)
    return codes is None or any("training" in code.co_names for code in codes)


@engine_hook
def _force_eval(module: nn.Module, args) -> None:
    if getattr(module, "momentum", 0.1) is None and reestimating_statistics(module):
        # update_bn's pass: in the model's mode (train; Lightning's pass sets none, and a flag this
        # hook set to eval at an earlier forward of the epoch stays)
        root = _root_of.get(module)
        module.training = root().training if root is not None and root() is not None else True
        return
    _reestimated.pop(module, None)
    module.training = False


# a frozen norm layer's running_mean (its id and version) when it froze (FrozenRegion.apply)
_statistics_version: "weakref.WeakKeyDictionary[nn.Module, Tuple[int, int]]" = weakref.WeakKeyDictionary()
# the model a frozen norm layer belongs to (FrozenRegion.apply)
_root_of: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
# frozen norm layers whose statistics ``update_bn`` is re-estimating now
_reestimated: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _written_state(t: torch.Tensor) -> Tuple[int, int]:
    return id(t), t._version


def reestimating_statistics(module: nn.Module) -> bool:
    """``torch.optim.swa_utils.update_bn`` on the live model (Lightning's StochasticWeightAveraging
    runs it at the end of training) resets every BatchNorm's running statistics (momentum=None,
    nothing tracked) and re-estimates them in train mode. Held in eval, a frozen one kept them
    reset (mean 0, variance 1) and the model evaluated wrong: it runs in the pass's mode until its
    momentum is back. A host read only when the statistics were written since the freeze (not at
    every forward)."""
    if module in _reestimated:
        return True
    mean = getattr(module, "running_mean", None)
    if not isinstance(mean, torch.Tensor) or _statistics_version.get(module, _written_state(mean)) == _written_state(mean):
        return False
    _statistics_version[module] = _written_state(mean)  # written (or replaced: Lightning's reset) since: look once
    tracked = getattr(module, "num_batches_tracked", None)
    if not isinstance(tracked, torch.Tensor) or int(tracked) != 0:
        return False
    _reestimated[module] = True
    return True


def _in_checkpoint_forward() -> bool:
    """Inside the forward of a non-reentrant ``torch.utils.checkpoint``: its saved-tensor hooks
    are the innermost (a private torch API: anything unexpected counts as no)."""
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except Exception:  # noqa: BLE001
        return False
    return hooks is not None and getattr(hooks[0], "__module__", "") == "torch.utils.checkpoint"


def _detached(output: Any) -> Any:
    """``output`` with every tensor detached: through containers, Hugging Face outputs and plain
    dataclasses (pytree treats an unregistered dataclass as a leaf and would pass it through)."""
    return tree_map(_detached_leaf, output)


def _detached_leaf(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _detached(getattr(x, f.name))
                                         for f in dataclasses.fields(x) if f.init})
    return x


def _compiled_graphs_see_hooks() -> None:
    """torch.compile reuses a graph traced before these hooks were placed unless its graphs guard
    on module hooks, which they do not by default (``skip_nnmodule_hook_guards``): a shared
    parameter's reads in the prefix went on passing it gradient (measured: 0.5 off, as if nothing
    froze). Turn those guards on (later graphs then recompile by themselves when the hooks
    change), and if this process compiled a graph already, drop the graphs compiled without them:
    once per process. torch.optim imports dynamo: being imported is no sign of a compile."""
    dynamo = sys.modules.get("torch._dynamo")
    config = getattr(dynamo, "config", None)
    if not getattr(config, "skip_nnmodule_hook_guards", False):
        return
    config.skip_nnmodule_hook_guards = False
    counters = getattr(getattr(dynamo, "utils", None), "counters", None)
    if counters is None or counters["stats"]["unique_graphs"]:
        dynamo.reset()


# How many trainable units tell that a forward has left the frozen prefix: the first, and the next
# ones in case LayerDrop skips it (three in a row at a drop rate of 0.1: one step in a thousand)
_ENTRY_UNITS = 3


class FrozenRegion:
    """The hooks that keep the first ``cut`` units of ``plan`` a fixed function of their input."""

    def end_statistics_reestimation(self) -> None:
        """A frozen norm layer of the user's own with ``momentum=None``, recalibrated by hand (its
        statistics reset), never gets a momentum back: its re-estimation ends at the next training
        step, and it runs in eval again (it had stayed in train mode for good)."""
        if _reestimated:
            for module in self.always:
                _reestimated.pop(module, None)

    def __init__(self, root: nn.Module, plan: UnitPlan) -> None:
        self.root = root
        self.plan = plan
        self.cut = 0
        self.handles: List[Any] = []
        self.always: List[nn.Module] = []  # modules run in eval at every call
        self._nested_off: List[nn.Module] = []  # TransformerEncoders kept off nested tensors (apply)
        self.partly: Dict[nn.Module, int] = {}  # modules run in eval at their leading calls
        self.counted: Dict[int, nn.Module] = {}  # modules whose calls are numbered per forward pass
        self._count: Dict[int, int] = {}  # calls of each counted module in this forward pass
        self._skipped: Dict[int, int] = {}  # calls the next model forward skips (start_after)
        self._running: Dict[int, List[tuple]] = {}  # per module: (call number, flag to restore)
        self._in_root_forward = False  # inside the model's own forward (not the cache's blocks)
        # Where the model's forward passes the prefix's end: the modules whose first call starts
        # one of the first trainable units (a layer skipped on this step, LayerDrop or an MoE
        # expert no token went to, leaves the next one to tell it)
        self._entries: List[nn.Module] = []
        self._past_boundary = False  # this forward entered one of them
        self._warned_checkpoint: set = set()  # ids of modules warned about (_warn_checkpoint)
        self._warned_past: set = set()  # ids of modules warned about (_warn_if_past_boundary)

    def apply(self, cut: int) -> List[nn.Module]:
        """Place the hooks for a frozen prefix of ``cut`` units (replacing the previous ones).
        Returns the modules it took out of train mode."""
        self.remove()
        self.cut = cut
        always, partly = self.plan.eval_modules(cut)
        self.always, self.partly = always, partly
        held = {id(m) for m in (*always, *partly)}
        for encoder in self.root.modules():
            # torch's encoder turns a padded batch into a nested tensor when its first layer is in
            # eval mode, and a later layer still training then fails on it ("MultiheadAttention
            # does not support NestedTensor outside of its fast path"); without freezing, training
            # never took that path (and its padded positions' outputs stay as they were)
            if isinstance(encoder, nn.TransformerEncoder) and getattr(encoder, "use_nested_tensor", False) \
                    and len(encoder.layers) and id(encoder.layers[0]) in held:
                encoder.use_nested_tensor = False
                self._nested_off.append(encoder)
        detach = self.plan.detached_calls(cut)
        switched = []
        for module in always:
            if module.training:  # (nn.Module's __setattr__ is slow: most flags are set already)
                module.training = False
                switched.append(module)
            mean = getattr(module, "running_mean", None)
            if isinstance(mean, torch.Tensor) and module not in _statistics_version:
                _statistics_version[module] = _written_state(mean)
                _root_of[module] = weakref.ref(self.root)
            if not mode_blind(module):  # first: the user's own pre-hooks see the module in eval
                self.handles.append(module.register_forward_pre_hook(_force_eval, prepend=True))
        # id(module) -> leading calls in eval (a module that never reads its mode needs no hook)
        counted = {id(m): n for m, n in partly.items() if not mode_blind(m)}
        for key in detach:
            counted.setdefault(key, 0)
        shared = self._shared_reads(cut, detach)
        self.counted = {key: self.plan.module_calls[key][0] for key in counted}
        looped = self._looped_frozen(always)
        self._entries = self._unit_entries(cut) if counted or looped else []
        for key, eval_calls in counted.items():
            module, _, calls = self.plan.module_calls[key]
            # A module whose traced calls each end before the prefix's end or start after it (a
            # dropout, not a container around the cut; a call with no ops, a dropout traced in
            # eval mode, may do both) has its calls told by where the pass is: a loop in the
            # prefix may run more or fewer turns than traced.
            frozen, end_of_prefix = self.plan.frozen_calls(key, cut), self.plan.boundary[cut]
            by_place = (bool(self._entries) and detach.get(key, 0) in (0, frozen)
                        and all(end <= end_of_prefix or first >= end_of_prefix for first, end in calls)
                        and sum(end <= end_of_prefix for _, end in calls) == frozen)
            self.handles.append(module.register_forward_pre_hook(
                self._enter_hook(len(calls), eval_calls, detach.get(key, 0), shared.get(key, []), by_place),
                with_kwargs=True, prepend=True))
            self.handles.append(module.register_forward_hook(self._leave_hook(), always_call=True))
        for module in self._entries:
            self.handles.append(module.register_forward_pre_hook(engine_hook(self._pass_boundary), prepend=True))
        for module in looped if self._entries else ():
            self.handles.append(module.register_forward_pre_hook(engine_hook(self._warn_if_past_boundary)))
        if counted or (looped and self._entries):
            self.handles.append(self.root.register_forward_pre_hook(engine_hook(self._enter_root)))
            self.handles.append(self.root.register_forward_hook(engine_hook(self._leave_root), always_call=True))
            _compiled_graphs_see_hooks()
        return switched

    def _looped_frozen(self, always: List[nn.Module]) -> List[nn.Module]:
        """Frozen modules with parameters called several times, all in the prefix, by the traced
        forward (a layer shared by the turns of a loop): a batch that calls one after the prefix
        reads frozen weights where the set-up batch showed none (warned, where the first
        trainable unit has an entry module to tell it)."""
        return [m for m in always if len(self.plan.module_calls.get(id(m), (None, None, ()))[2]) > 1
                and next(m.parameters(recurse=False), None) is not None]

    def _warn_if_past_boundary(self, module, args) -> None:
        if self._in_root_forward and self._past_boundary and id(module) not in self._warned_past:
            self._warned_past.add(id(module))
            warnings.warn(
                f"SmartFreezer: {self._name_of(module)!r} ({type(module).__name__}) froze because every call of it in the set-up "
                "forward lay in the frozen prefix, but this batch calls it after the prefix too (a loop that runs "
                "longer than in the set-up batch): those calls read its frozen weights, and it gets no gradient "
                "from them. Pass example_inputs that take the longest path training takes (the most turns of the "
                "loop), so that the freezer sees where it is read.", stacklevel=3)

    def start_after(self, calls: Dict[int, int], through_root: bool = False) -> None:
        """The next pass skips calls that made ``calls[id(module)]`` calls of the counted modules
        (the activation cache serving the frozen prefix's rows): the calls it makes are numbered
        after those (from 0, a dropout shared by the prefix and the trainable layers ran its
        trainable calls in eval on every cached step). ``through_root``: the pass runs the
        model's own forward (the module swap), which starts the count there."""
        if through_root:
            self._skipped = dict(calls)
        else:
            self._count = dict(calls)
            self._in_root_forward = False

    def _unit_entries(self, cut: int) -> List[nn.Module]:
        """The modules whose first call holds the first op of one of the ``_ENTRY_UNITS`` units
        after a frozen prefix of ``cut`` units (the innermost such call, but the model's own):
        entering one means the prefix is over. Left out: a call that starts before the prefix's
        end and runs other module calls there (a block whose own forward reads a layer scale
        after its frozen sub-layers), and a module called before (its count would depend on the
        prefix's loops). None where the first trainable unit has no such module: calls are then
        told by number."""
        plan = self.plan
        # ascending: the first op of each of the first trainable units (further ones could be
        # called inside the prefix on a path the trace did not take: an early-exit head)
        starts = plan.boundary[cut:min(len(plan.units), cut + _ENTRY_UNITS)]
        innermost: List[Optional[tuple]] = [None] * len(starts)
        calls = [(first, end, module, number) for module, _, module_calls in plan.module_calls.values()
                 if module is not self.root for number, (first, end) in enumerate(module_calls)]
        for first, end, module, number in calls:
            for i in range(bisect.bisect_left(starts, first), bisect.bisect_left(starts, end)):
                if innermost[i] is None or end - first < innermost[i][1] - innermost[i][0]:
                    innermost[i] = (first, end, module, number)
        prefix_end = plan.boundary[cut]
        entries: Dict[int, nn.Module] = {}
        for op, call in zip(starts, innermost):
            usable = call is not None and call[3] == 0
            if usable and call[0] < prefix_end:  # no other module call in its part of the prefix
                usable = not any(call[0] <= first < prefix_end and not first <= op < end
                                 for first, end, module, _ in calls if module is not call[2])
            if usable:
                entries[id(call[2])] = call[2]
            elif not entries and op == prefix_end:  # the first trainable unit's
                return []
        return list(entries.values())

    def _enter_root(self, module, args) -> None:
        self._count, self._skipped = self._skipped, {}
        self._in_root_forward = True
        self._past_boundary = False

    def _pass_boundary(self, module, args) -> None:
        if self._in_root_forward:
            self._past_boundary = True

    def _leave_root(self, module, args, output) -> None:
        self._in_root_forward = False

    def _shared_reads(self, cut: int, detach: Dict[int, int]) -> Dict[int, List[tuple]]:
        """id(module) -> (owner module, attribute) of every registration of the shared
        parameters that keep training and that its detached calls read."""
        out: Dict[int, List[tuple]] = {}
        for s in self.plan.still_training(cut):
            for key in {call[0] for _, call, _ in s.reads if call is not None and call[0] in detach}:
                for path in s.registered_as:
                    owner, _, attr = path.rpartition(".")
                    out.setdefault(key, []).append((self.root.get_submodule(owner), attr))
        return out

    def _enter_hook(self, traced_calls: int, eval_calls: int, detach_calls: int, shared: List[tuple],
                    by_place: bool = False):
        def enter(module, args, kwargs):
            key = id(module)
            if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
                # activation checkpointing recomputes the call in the backward pass: only calls
                # after the prefix are recomputed (the prefix's pass no gradient), unless one
                # checkpointed segment holds calls on both sides (warned in the forward, below)
                number = traced_calls
            else:
                # numbered from the start of the model's forward: a call beyond the traced ones
                # (a loop run more often than traced) lies after the prefix; a pass that skips
                # the model's forward (the activation cache running blocks) wraps at the traced count
                count = self._count.get(key, 0)
                number = count if self._in_root_forward else count % traced_calls
                self._count[key] = number + 1
                if by_place and self._in_root_forward:
                    # before the first trainable layer ran: in the prefix, whatever its number
                    # (an encoder's loop run for a longer or shorter sequence than traced)
                    number = traced_calls if self._past_boundary else 0
            # a detached call passes no gradient to the shared parameter it reads, nor to its
            # input; where the input needs one (adversarial training, an input-gradient penalty),
            # the call reads a detached view of the parameter instead
            swapped = None
            if number < detach_calls and shared and torch.is_grad_enabled() and any(
                    isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten((args, kwargs))[0]):
                swapped = [(owner, attr, owner._parameters[attr]) for owner, attr in shared]
                for owner, attr, param in swapped:
                    owner._parameters[attr] = param.detach()
            self._running.setdefault(key, []).append((number < detach_calls, module.training, swapped, module))
            if number < eval_calls:
                module.training = False
                if (key not in self._warned_checkpoint and torch.is_grad_enabled()
                        and not torch.compiler.is_compiling() and _in_checkpoint_forward()):
                    self._warn_checkpoint(module)
        return engine_hook(enter)

    def _name_of(self, module: nn.Module) -> str:
        return next((n for n, m in self.root.named_modules() if m is module), type(module).__name__)

    def _warn_checkpoint(self, module: nn.Module) -> None:
        self._warned_checkpoint.add(id(module))
        warnings.warn(
            f"SmartFreezer: {self._name_of(module)!r} ({type(module).__name__}) is called both in the frozen prefix and after it, and "
            "this call, in the prefix, runs inside torch.utils.checkpoint: if the backward pass recomputes that "
            "segment, it runs the call as one after the prefix (in train mode), and the gradients differ from "
            "training without checkpointing. Checkpoint only code after the frozen prefix, or give each call its "
            "own module (one dropout per sub-layer).", stacklevel=3)

    def _leave_hook(self):
        def leave(module, args, output):
            detach, flag, swapped, _ = self._running[id(module)].pop()
            module.training = flag
            if swapped is not None:
                for owner, attr, param in swapped:
                    owner._parameters[attr] = param
                return None
            return _detached(output) if detach else None
        return engine_hook(leave)

    def remove(self) -> None:
        # calls under way (a dropped freezer's finalizer can run inside a forward): undone as their
        # leave hooks would have, or a module would stay in eval and a shared weight detached
        for calls in self._running.values():
            for _, flag, swapped, module in reversed(calls):
                module.training = flag
                for owner, attr, param in swapped or ():
                    owner._parameters[attr] = param
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for encoder in self._nested_off:
            encoder.use_nested_tensor = True
        self._nested_off = []
        self.counted = {}
        self._count.clear()
        self._skipped = {}
        self._running.clear()
        self._in_root_forward = False
        self._entries = []
