"""Finding a model's freezable units, in the order the forward pass runs them.

One traced forward pass (no grad, RNG and buffers restored afterwards, so the user's run is
untouched) records, for every trainable parameter, the first and last aten op that reads it,
and the FLOPs of every op. Layers are the modules that own parameters, ordered by first use
(not by ``named_modules()``, whose order is declaration order). A norm layer joins the layer
it follows. A parameter read again later in the pass (tied embeddings, a module called twice)
forbids the frozen prefix from ending between its first and last use.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

NORM_CLASS_MARKERS = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm", "SyncBatchNorm")


def is_norm_module(module: nn.Module) -> bool:
    """Norm layers: torch's own and any class whose name says so (LlamaRMSNorm, LayerNorm2d)."""
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return True
    return any(marker in type(module).__name__ for marker in NORM_CLASS_MARKERS)


DROPOUT_CLASS_MARKERS = ("Dropout", "DropPath", "DropBlock")


def is_dropout_module(module: nn.Module) -> bool:
    """Random regularisers without parameters: torch's dropouts and, by class name, DropPath
    (stochastic depth) and DropBlock."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return True
    if any(True for _ in module.children()) or any(True for _ in module.parameters()):
        return False  # only parameter-free leaves (not a model named "...Dropout...")
    return any(marker in type(module).__name__ for marker in DROPOUT_CLASS_MARKERS)


@dataclass
class Unit:
    """A freezable unit: one parameter-owning layer plus the norm layers that follow it."""

    index: int
    module_names: List[str]
    modules: List[nn.Module]
    param_names: List[str]
    parameters: List[nn.Parameter]
    forward_flops: int = 0
    norm_modules: List[nn.Module] = field(default_factory=list)
    # dropout modules whose every call falls in this unit's span of the forward pass (after
    # its first op, before the next unit's): put in eval with the unit when it freezes
    dropout_modules: List[nn.Module] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "+".join(n or "<root>" for n in self.module_names)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters)

    def __repr__(self) -> str:
        return f"Unit({self.index}, {self.name!r}, params={self.num_params}, flops={self.forward_flops})"


@dataclass
class UnitPlan:
    units: List[Unit]
    # allowed_cut[i]: the frozen prefix may be exactly the first i units (len = units + 1)
    allowed_cut: List[bool]
    untraced_parameters: List[str]  # trainable but not read by the traced forward pass
    total_forward_flops: int

    def largest_allowed_cut(self, at_most: int) -> int:
        for cut in range(min(at_most, len(self.units)), -1, -1):
            if self.allowed_cut[cut]:
                return cut
        return 0


class _ForwardTracer(TorchDispatchMode):
    """Records first/last op index of each watched tensor and the FLOPs of every op."""

    def __init__(self, watched: Dict[int, str]):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self._flop_registry = flop_registry
        self.watched = watched
        self.first_use: Dict[str, int] = {}
        self.last_use: Dict[str, int] = {}
        self.op_flops: List[int] = []
        self.module_calls: Dict[int, Tuple[int, int]] = {}  # id(module) -> (first, last) op index at call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op_index = len(self.op_flops)
        for leaf in tree_flatten((args, kwargs))[0]:
            name = self.watched.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if name is not None:
                self.first_use.setdefault(name, op_index)
                self.last_use[name] = op_index
        out = func(*args, **kwargs)
        count = self._flop_registry.get(func._overloadpacket)
        self.op_flops.append(int(count(*args, **kwargs, out_val=out)) if count else 0)
        return out


def _module_owners(model: nn.Module) -> Dict[int, List[Tuple[str, nn.Module, str]]]:
    """id(parameter) -> every (module name, module, attribute name) that registers it."""
    owners: Dict[int, List[Tuple[str, nn.Module, str]]] = {}
    seen_modules: Set[int] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module_name, module, attr))
    return owners


def _qualified(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def as_args(inputs: Any) -> Tuple[Any, ...]:
    """Example inputs as positional arguments: a tuple is the positional arguments, anything
    else (a tensor, a list, a dict) is the one positional argument."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run a look-only forward pass: the model's buffers (norm running statistics) and the RNG
    (CPU and the model's GPUs, e.g. dropout masks) are as before afterwards."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


def trace_forward(model: nn.Module, args: Sequence[Any], kwargs: Optional[Dict[str, Any]],
                  watched: Dict[int, str]) -> _ForwardTracer:
    """Run one forward pass under the tracer without changing the model or the RNG."""
    watched = dict(watched)  # grows below; the caller's map stays as it was
    tracer = _ForwardTracer(watched)
    # FSDP2 swaps each sharded parameter for an unsharded one while its module runs: watch
    # whatever tensor a module holds under a watched parameter's name when the module runs.
    names = {(id(m), attr): watched[id(p)] for m in model.modules()
             for attr, p in m._parameters.items() if p is not None and id(p) in watched}

    def watch_current(module, inputs):
        at = len(tracer.op_flops)
        tracer.module_calls[id(module)] = (tracer.module_calls.get(id(module), (at, at))[0], at)
        for attr, p in module._parameters.items():
            name = names.get((id(module), attr))
            if name is not None and p is not None:
                watched.setdefault(id(p), name)

    hooks = [m.register_forward_pre_hook(watch_current) for m in model.modules()]
    try:
        with preserved_state(model), torch.no_grad():
            with tracer:
                model(*args, **(kwargs or {}))
    except Exception as exc:  # the model's own error, plus what the engine was doing (3.11+)
        if hasattr(exc, "add_note"):
            exc.add_note(
                "SmartFreezer: this came from the model's forward pass on the inputs used to find its "
                "units: example_inputs (a tuple of positional inputs, or one tensor) and example_kwargs "
                "must be one batch the model accepts, on its device and in its dtype.")
        raise
    finally:
        for hook in hooks:
            hook.remove()
    return tracer


def discover_units(model: nn.Module, args: Sequence[Any], kwargs: Optional[Dict[str, Any]] = None) -> UnitPlan:
    owners = _module_owners(model)
    trainable: Dict[int, str] = {}
    params_by_name: Dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            trainable[id(param)] = name
            params_by_name[name] = param
    if not trainable:
        raise ValueError(
            "SmartFreezer: the model has no trainable parameters (none with requires_grad=True), "
            "so there is nothing to freeze. Pass the model you train, before freezing any of it."
        )
    tracer = trace_forward(model, args, kwargs, trainable)
    untraced = [name for name in trainable.values() if name not in tracer.first_use]

    # Layers: the owning module of each traced parameter, ordered by first use.
    layer_first_use: Dict[int, int] = {}
    layer_owner: Dict[int, Tuple[str, nn.Module]] = {}
    layer_params: Dict[int, List[str]] = {}
    for name, first in sorted(tracer.first_use.items(), key=lambda item: item[1]):
        module_name, module, _ = owners[id(params_by_name[name])][0]
        key = id(module)
        layer_first_use.setdefault(key, first)
        layer_owner[key] = (module_name, module)
        layer_params.setdefault(key, []).append(name)
    order = sorted(layer_first_use, key=layer_first_use.get)

    # Merge each norm layer into the layer it follows (the first one into the next).
    groups: List[List[int]] = []
    for key in order:
        if is_norm_module(layer_owner[key][1]) and groups:
            groups[-1].append(key)
        elif groups and all(is_norm_module(layer_owner[k][1]) for k in groups[-1]):
            groups[-1].append(key)  # a leading norm layer waits for the layer after it
        else:
            groups.append([key])

    op_starts = [layer_first_use[g[0]] for g in groups]
    # Each dropout goes to the unit whose span holds its last call (module calls are recorded
    # when they start): it turns off only once every call of it lies in the frozen prefix.
    dropouts_of: Dict[int, List[nn.Module]] = {}
    for module in model.modules():
        calls = tracer.module_calls.get(id(module))
        if calls is not None and is_dropout_module(module):
            owner = max((i for i, start in enumerate(op_starts) if start <= calls[1]), default=0)
            dropouts_of.setdefault(owner, []).append(module)
    units: List[Unit] = []
    for index, group in enumerate(groups):
        names = [n for key in group for n in layer_params[key]]
        start = 0 if index == 0 else op_starts[index]
        end = op_starts[index + 1] if index + 1 < len(groups) else len(tracer.op_flops)
        modules = [layer_owner[key][1] for key in group]
        units.append(Unit(
            index=index,
            module_names=[layer_owner[key][0] for key in group],
            modules=modules,
            param_names=names,
            parameters=[params_by_name[n] for n in names],
            forward_flops=sum(tracer.op_flops[start:end]),
            norm_modules=[m for m in modules if is_norm_module(m)],
            dropout_modules=dropouts_of.get(index, []),
        ))

    # A cut before unit i is allowed unless a parameter of an earlier unit is read again later.
    allowed = [True] * (len(units) + 1)
    for unit in units:
        for name in unit.param_names:
            last = tracer.last_use[name]
            spanned = [i for i in range(unit.index + 1, len(units)) if op_starts[i] <= last]
            for i in spanned:
                allowed[i] = False
            if spanned:
                shared_by = [_qualified(m, a) for m, _, a in owners[id(params_by_name[name])]]
                warnings.warn(
                    f"SmartFreezer: parameter {name!r} (registered as {', '.join(shared_by)}) is read "
                    f"by unit {unit.index} ({unit.name}) and again up to unit {spanned[-1]} "
                    f"({units[spanned[-1]].name}); these units freeze together, so the frozen "
                    "prefix never ends between them.",
                    stacklevel=3,
                )
    if untraced:
        warnings.warn(
            f"SmartFreezer: {len(untraced)} trainable parameter(s) were not used by the example "
            f"forward pass and are not managed (they keep training): {untraced[:5]}"
            f"{' ...' if len(untraced) > 5 else ''}",
            stacklevel=3,
        )
    return UnitPlan(units, allowed, untraced, sum(tracer.op_flops))
