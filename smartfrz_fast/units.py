"""Finding a model's freezable units, in the order the forward pass runs them.

One traced forward pass (no grad, RNG and buffers restored afterwards, so the user's run is
untouched) records, for every trainable parameter, the first and last aten op that reads it,
and the FLOPs of every op. Layers are the modules that own parameters, ordered by first use
(not by ``named_modules()``, whose order is declaration order). A norm layer joins the layer
it follows. A parameter read again later in the pass (tied embeddings, a module called twice)
is a *shared* parameter: where a frozen prefix ends between its first and last read, it either
freezes with the prefix (``shared_parameters="freeze"``) or keeps training from its later reads
while its reads inside the prefix pass no gradient (``"train"``): see docs/shared_parameters.md.
The same pass records every module call's span of ops, so that every module whose calls all lie
in a frozen prefix can be kept in eval mode (a frozen prefix is a fixed function).
"""

from __future__ import annotations

import bisect
import copy
import dis
import functools
import inspect
import itertools
import math
import types
import warnings
import weakref
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path

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


SHARED_PARAMETER_MODES = ("train", "freeze")


@dataclass
class Unit:
    """A freezable unit: one parameter-owning layer plus the norm layers that follow it, and any
    parameter first read inside its span whose module began earlier (BEiT's ``lambda_2``)."""

    index: int
    module_names: List[str]
    modules: List[nn.Module]
    param_names: List[str]
    parameters: List[nn.Parameter]
    forward_flops: int = 0
    # what its span's backward costs: twice its forward where every weight trains, less where some
    # require no grad (a LoRA base layer computes no weight gradient), 0 before the first trained op
    backward_flops: float = 0.0
    norm_modules: List[nn.Module] = field(default_factory=list)
    # dropout modules whose last call falls in this unit's span of the forward pass (after its
    # first op, before the next unit's); every module of that span goes to eval with the unit
    dropout_modules: List[nn.Module] = field(default_factory=list)
    # the module in whose call an attention op reads what this unit's weights produced (q, k,
    # v), "" for none: see _ForwardTracer's `attention_ops`
    attention: str = ""

    @property
    def name(self) -> str:
        return "+".join(n or "<root>" for n in self.module_names)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters)

    def __repr__(self) -> str:
        return f"Unit({self.index}, {self.name!r}, params={self.num_params}, flops={self.forward_flops})"


@dataclass
class SharedParameter:
    """A parameter read again after its own unit's span: tied embeddings (GPT-2's ``wte`` and
    ``lm_head``), T5's embedding read by encoder and decoder, ALBERT's layer called 12 times."""

    name: str
    parameter: nn.Parameter
    registered_as: List[str]  # every module attribute that holds it
    unit: int  # the unit that owns it (its first read)
    last_unit: int  # the unit in whose span its last read lies
    # (op index, innermost module call reading it as (id(module), call number), or None, op FLOPs)
    reads: List[Tuple[int, Optional[Tuple[int, int]], int]]


@dataclass
class UnitPlan:
    units: List[Unit]
    # allowed_cut[i]: the frozen prefix may be exactly the first i units (len = units + 1)
    allowed_cut: List[bool]
    untraced_parameters: List[str]  # trainable but not read by the traced forward pass
    total_forward_flops: int
    shared_parameters: str = "train"  # what a cut between a shared parameter's reads does to it
    shared: List[SharedParameter] = field(default_factory=list)
    # boundary[c]: first op index outside a frozen prefix of c units (len = units + 1)
    boundary: List[int] = field(default_factory=list)
    # id(module) -> (module, qualified name, [(first op, end op) of each call, in call order])
    module_calls: Dict[int, Tuple[nn.Module, str, List[Tuple[int, int]]]] = field(default_factory=dict)
    # why a cut is refused, for the cuts shared_parameters="train" cannot make
    refused_cuts: Dict[int, str] = field(default_factory=dict)
    # id(module) -> its descendants the traced forward never called (filled by eval_modules)
    _uncalled_descendants: Dict[int, List[nn.Module]] = field(default_factory=dict, repr=False, compare=False)
    total_backward_flops: float = 0.0  # the backward of one step (see Unit.backward_flops)
    # op index of the first read of a parameter, trainable or not (a stem the user froze is a
    # layer): the ops before it are the input's (an augmentation, a normalisation without weights)
    first_read: int = 0
    # outputs of the model that a head called before the last unit computes: (where in the
    # output, the head's last unit); frozen with the prefix, such an output stops learning
    head_outputs: List[Tuple[str, int]] = field(default_factory=list)

    def largest_allowed_cut(self, at_most: int) -> int:
        for cut in range(min(at_most, len(self.units)), -1, -1):
            if self.allowed_cut[cut]:
                return cut
        return 0

    # ------------------------------------------------------------------ what a cut means
    def frozen_calls(self, module_id: int, cut: int) -> int:
        """How many of a module's calls (leading ones) lie wholly inside a frozen prefix of ``cut``
        units."""
        if cut == 0:
            return 0
        calls = self.module_calls[module_id][2]
        return next((i for i, (_, end) in enumerate(calls) if end > self.boundary[cut]), len(calls))

    def split_shared(self, cut: int) -> List[SharedParameter]:
        """Shared parameters read both inside and after a frozen prefix of ``cut`` units."""
        if cut == 0:
            return []
        b = self.boundary[cut]
        return [s for s in self.shared if s.reads[0][0] < b <= s.reads[-1][0]]

    def still_training(self, cut: int) -> List[SharedParameter]:
        """Parameters of frozen units that keep training (``shared_parameters="train"``)."""
        return self.split_shared(cut) if self.shared_parameters == "train" else []

    def frozen_parameters(self, cut: int) -> List[Tuple[str, nn.Parameter]]:
        keep = {id(s.parameter) for s in self.still_training(cut)}
        return [(n, p) for u in self.units[:cut] for n, p in zip(u.param_names, u.parameters) if id(p) not in keep]

    def detached_calls(self, cut: int) -> Dict[int, int]:
        """id(module) -> number of its leading calls whose output is detached, so that a shared
        parameter that keeps training gets no gradient through the frozen prefix."""
        detach: Dict[int, int] = {}
        b = self.boundary[cut] if cut else 0
        for s in self.still_training(cut):
            for op, call, _ in s.reads:
                if op < b and call is not None:
                    detach[call[0]] = max(detach.get(call[0], 0), call[1] + 1)
        return detach

    def later_read_flops(self, cut: int) -> int:
        """Forward FLOPs of the ops after a frozen prefix that read a parameter it froze (their
        weight gradient, about as many FLOPs, is not computed either)."""
        if cut == 0 or self.shared_parameters != "freeze":
            return 0
        b = self.boundary[cut]
        return sum(flops for s in self.split_shared(cut) for op, _, flops in s.reads if op >= b)

    def input_side(self, module: nn.Module) -> bool:
        """A module whose every call comes before the first parameter read (an augmentation, an
        input's normalisation): the input's, never the frozen prefix's."""
        entry = self.module_calls.get(id(module))
        return entry is not None and entry[2][-1][1] <= self.first_read

    def eval_modules(self, cut: int) -> Tuple[List[nn.Module], Dict[nn.Module, int]]:
        """The modules a frozen prefix of ``cut`` units runs in eval mode: those whose every call
        lies in it (with their never-called descendants, e.g. an attention dropout read through
        its parent's flag), and, for a module also called after it (ALBERT's shared layer), the
        number of its leading calls to run in eval. Whatever a module's regulariser (dropout,
        stochastic depth, functional attention dropout gated by ``self.training``), eval turns it
        off; BatchNorm statistics stop moving."""
        if cut == 0:
            return [], {}
        always: Dict[int, nn.Module] = {}
        partly: Dict[nn.Module, int] = {}
        for key, (module, _, calls) in self.module_calls.items():
            if self.input_side(module):
                continue  # before every layer (an augmentation, an input's normalisation): not the prefix's
            n = self.frozen_calls(key, cut)
            if n == len(calls):
                always[key] = module
                for inner in self._uncalled_within(key, module):
                    always[id(inner)] = inner
            elif n:
                partly[module] = n
        for unit in self.units[:cut]:
            for module in unit.norm_modules:
                if module not in partly:
                    always[id(module)] = module
        return list(always.values()), partly

    def _uncalled_within(self, key: int, module: nn.Module) -> List[nn.Module]:
        """``module``'s descendants the traced forward never called, walked once per module (a
        walk at every freeze event cost O(depth x modules) on deeply nested models), but none
        inside one that holds a trainable parameter of no unit: an expert no token reached at
        set-up trains, in the model's mode (held in eval, its BatchNorm trained on running
        statistics that no longer moved)."""
        found = self._uncalled_descendants.get(key)
        if found is None:
            in_units = {id(p) for unit in self.units for p in unit.parameters}
            found = []
            pending = list(module.children())
            while pending:
                child = pending.pop()
                if id(child) in self.module_calls:
                    pending.extend(child.children())  # called: its own calls decide its mode
                elif not any(p.requires_grad and id(p) not in in_units for p in child.parameters()):
                    found.extend(m for m in child.modules() if id(m) not in self.module_calls)
            self._uncalled_descendants[key] = found
        return found


def _rnn_flops(input: Any, weights: Sequence[Any]) -> int:
    """Forward FLOPs of a recurrent layer's gate products: 2 per weight of every matrix, for
    every token (the input's rows; a packed sequence is one row per token). Every layer and
    direction runs over all tokens."""
    if not isinstance(input, torch.Tensor) or input.dim() == 0:
        return 0
    tokens = input.numel() // max(1, input.shape[-1])
    return 2 * tokens * sum(w.numel() for w in weights if isinstance(w, torch.Tensor) and w.dim() == 2)


def _attention_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    """q·kᵀ and the weights times v: 2·L·S·(E + Ev) per batch and head (as torch counts its CUDA
    attention kernels; grouped-query key heads serve several query heads)."""
    if not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (query, key, value)):
        return 0
    rows = query.numel() // (query.shape[-2] * query.shape[-1]) if query.numel() else 0
    return 2 * rows * query.shape[-2] * key.shape[-2] * (query.shape[-1] + value.shape[-1])


def _trilinear_flops(i1: Any, i2: Any, i3: Any, expand1: Sequence[int], expand2: Sequence[int],
                     expand3: Sequence[int], *args: Any, **kwargs: Any) -> int:
    """nn.Bilinear's op: a multiply-accumulate per element of the three inputs' broadcast shape,
    once each is unsqueezed at its ``expand`` dims (x1ᵢ·Wₒᵢⱼ·x2ⱼ for every output o, i and j)."""
    try:
        shapes = []
        for t, dims in ((i1, expand1), (i2, expand2), (i3, expand3)):
            for d in sorted(dims):
                t = t.unsqueeze(d)
            shapes.append(t.shape)
        return 2 * torch.Size(torch.broadcast_shapes(*shapes)).numel()
    except (RuntimeError, IndexError, TypeError, AttributeError):
        return 0


# Ops with a multiply-accumulate cost that torch's FLOP counter has no formula for (they counted
# 0 FLOPs): op name -> FLOPs from the op's arguments.
# - Fused recurrent kernels (0 FLOPs made an LSTM's units free: nothing to save by freezing
#   them). On the CPU, nn.LSTM runs oneDNN's one-layer kernel; on CUDA, LSTM, GRU and RNN run
#   cuDNN's, whose second argument lists every layer's and direction's weights.
# - On the CPU F.scaled_dot_product_attention runs its own flash kernel (nn.MultiheadAttention,
#   nn.TransformerEncoderLayer, timm's and Hugging Face's sdpa attention): its score and value
#   products counted nothing there, while on a GPU torch's formulas count them, so a
#   transformer's prefix shares (and SmartFRZ's min_flops_share test) differed by device.
_EXTRA_FLOP_FORMULAS = {
    "mkldnn_rnn_layer": lambda *a, **k: _rnn_flops(a[0], a[1:3]),  # (input, w_ih, w_hh, b_ih, b_hh, ...)
    "_cudnn_rnn": lambda *a, **k: _rnn_flops(a[0], a[1]),  # (input, weights, ...)
    "miopen_rnn": lambda *a, **k: _rnn_flops(a[0], a[1]),
    "_scaled_dot_product_flash_attention_for_cpu": _attention_flops,
    "_scaled_dot_product_fused_attention_overrideable": _attention_flops,
    "mv": lambda mat, vec, *a, **k: 2 * mat.numel(),
    "addmv": lambda bias, mat, vec, *a, **k: 2 * mat.numel(),
    "dot": lambda a, b, *rest, **k: 2 * a.numel(),
    "vdot": lambda a, b, *rest, **k: 2 * a.numel(),
    "_trilinear": _trilinear_flops,
}


def compiled_in_place(module: nn.Module) -> bool:
    """``module.compile()`` ran on it (as ``compile_blocks`` does): its calls run a compiled graph."""
    return getattr(module, "_compiled_call_impl", None) is not None


def marks_output_for_grad(hook: Any) -> bool:
    """Hugging Face's ``enable_input_require_grads`` hook (gradient checkpointing, adapters) on
    the input embeddings: it only sets ``requires_grad`` on their output."""
    return getattr(hook, "__name__", None) == "make_inputs_require_grads"


class _ForwardTracer(TorchDispatchMode):
    """Records every read of each watched tensor (and of its views), the innermost module call
    around it, the FLOPs of every op, and what its backward costs (``op_backward``)."""

    def __init__(self, watched: Dict[int, str], fixed: Optional[set] = None):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self._flop_registry = flop_registry
        self.watched = watched
        self.fixed = set(fixed or ())  # ids of parameters that require no grad (a LoRA base), and their views
        self.first_param_read: Optional[int] = None  # the first op reading any parameter, trainable or not
        self.reads: Dict[str, List[Tuple[int, Optional[Tuple[int, int]]]]] = {}
        # view id -> the reads that made it (a view of a view: each), withdrawn if it is written into
        self._view_reads: Dict[int, List[Tuple[int, Optional[Tuple[int, int]]]]] = {}
        self._first_fixed_read: Optional[int] = None  # the first op reading a parameter that does not train
        self.op_flops: List[int] = []
        # each op's backward in units of its forward: 2 (input and weight gradients), 1 where its
        # weight requires no grad (input gradient only; a trained bias beside it costs next to
        # nothing), 0 before the first trainable read (none)
        self.op_backward: List[float] = []
        self._trained_from: Optional[int] = None  # the first op that reads a trainable parameter
        self.module_calls: Dict[int, List[List[int]]] = {}  # id(module) -> [[first op, end op], ...]
        self.stack: List[Tuple[int, int]] = []  # the module calls running: (id(module), call number)
        self._views: List[torch.Tensor] = []  # kept alive: their ids stay theirs during the pass
        # Attention (see _op_kind) is found by each tensor's lineage: id -> (weakref, flags, the
        # ops of the layers that produced it). A tensor the pass did not make that is no
        # parameter or buffer is the batch (or something as variable).
        self._lineage: Dict[int, Tuple[Any, int, FrozenSet[int]]] = {}
        # each layer's op -> the ops of the layers that produced its input (LoRA's B <- A)
        self.inputs_of: Dict[int, FrozenSet[int]] = {}
        # each layer's op -> the last op that read a tensor it produced (any op: a gate's output
        # multiplied into the experts' is read there)
        self.read_by: Dict[int, int] = {}
        # each tensor the model returned: (where in the output, the ops of the layers that produced it)
        self.outputs: List[Tuple[str, FrozenSet[int]]] = []
        # each attention op: (the innermost module call around it but the model's own, or None,
        # and the ops of the layers that produced its operands: q, k and v's projections; a fused
        # MHA op itself)
        self.attention_ops: List[Tuple[Optional[Tuple[int, int]], FrozenSet[int]]] = []

    def mark(self, tensor: torch.Tensor, flags: int, producers: FrozenSet[int] = frozenset()) -> None:
        key, lineage = id(tensor), self._lineage

        def forget(ref, key=key):  # the tensor died: its entry goes (an RNN loop's states pile up)
            if lineage.get(key, (None,))[0] is ref:
                del lineage[key]
        # (it holds the map, not the tracer: the tracer, in no reference cycle, is freed with the
        # views of parameters it keeps, and so are the parameters of a model dropped later)

        try:
            self._lineage[key] = (weakref.ref(tensor, forget), flags, producers)
        except TypeError:  # not weakly referenceable: treated as the batch
            pass

    def _entry(self, tensor: torch.Tensor) -> Optional[Tuple[Any, int, FrozenSet[int]]]:
        """``tensor``'s lineage entry, or None (not marked, or an id reused by another tensor)."""
        entry = self._lineage.get(id(tensor))
        return entry if entry is not None and entry[0]() is tensor else None

    def lineage(self, tensor: torch.Tensor) -> Tuple[int, FrozenSet[int]]:
        """What ``tensor`` was computed from (``_FROM_BATCH`` / ``_FROM_WEIGHTS`` / ``_SOFTMAXED``
        flags) and the ops of the layers that produced it; a view also holds what was written
        into the tensor under it (a KV cache filled through another view of it)."""
        entry = self._entry(tensor)
        flags, producers = (_FROM_BATCH, frozenset()) if entry is None else entry[1:]
        base = None if tensor._base is None else self._entry(tensor._base)
        if base is not None:
            flags, producers = flags | base[1], _recent(producers | base[2])
        return flags, producers

    def _track(self, func, op_index: int, tensors: List[torch.Tensor], reads_weight: bool, out: Any) -> None:
        """Carry each output's lineage on from the op's operands, and note an attention op."""
        kind = _op_kind(func)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if kind == "shape-only":  # x.new_ones(...), torch.zeros_like(x): x's values do not go in
            for t in outputs:
                self.mark(t, 0)
            return
        operands = [self.lineage(t) for t in tensors]
        for _, producers in operands:
            for producer in producers:
                self.read_by[producer] = op_index
        both = [producers for flags, producers in operands if flags & _FROM_BOTH == _FROM_BOTH]
        call = self.stack[-1] if len(self.stack) > 1 else None
        if kind == "fused" and any(flags & _FROM_BATCH for flags, _ in operands):
            self.attention_ops.append((call, frozenset({op_index})))
        elif len(both) >= 2 and (kind == "attention" or kind == "product" and any(
                flags & _ATTENTION_WEIGHTS and flags & _FROM_BOTH == _FROM_BOTH for flags, _ in operands)):
            self.attention_ops.append((call, frozenset().union(*both)))
        flags, producers = 0, frozenset()
        for f, p in operands:
            flags |= f
            producers |= p
        # A layer's op (a matrix product or convolution with weights) makes a new representation,
        # that layer's; an elementwise op with weights (a bias, a norm's scale, a learned
        # temperature, a position table) adds its own layer to those it came from.
        weights = frozenset({op_index}) if reads_weight else frozenset()
        # weights computed from parameters (cast by autocast, parametrized) count as read by the
        # ops that read the parameters
        weights = weights.union(*(p for f, p in operands if f & _FROM_BOTH == _FROM_WEIGHTS))
        if weights and self.op_flops[op_index] > 0:
            self.inputs_of[op_index] = producers - weights
            producers = weights
            flags &= ~_PRODUCT_OF_TWO  # a layer's new representation (a state-space block's out-projection)
        else:
            producers = _recent(producers | weights)
        if kind == "softmax" and flags & _FROM_BOTH == _FROM_BOTH:
            flags |= _SOFTMAXED  # kept from here on: a layer over the heads may follow (talking heads)
        if kind == "product" and len(both) >= 2 and not _same_data(tensors):
            # scores q·kᵀ, or linear attention's kᵀ·v, until the next layer (a Gram matrix x·xᵀ of
            # second-order pooling or style features is none)
            flags |= _PRODUCT_OF_TWO
        for t in outputs:
            if t.is_floating_point() or t.is_complex():
                self.mark(t, flags, producers)
            else:  # indices, masks (an MoE's argmax routing): no gradient reaches the weights
                self.mark(t, flags & _FROM_BATCH)
        if func._schema.is_mutable:
            # written through a view (a KV cache filled by slice assignment): the tensor under
            # the view holds what was written too
            for t in outputs:
                base = t._base
                if base is not None:
                    base_flags, base_producers = self.lineage(base)
                    self.mark(base, base_flags | flags, _recent(base_producers | producers))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op_index = len(self.op_flops)
        call = self.stack[-1] if self.stack else None
        names: Dict[str, torch.Tensor] = {}
        fixed = None
        tensors = [leaf for leaf in tree_flatten((args, kwargs))[0] if isinstance(leaf, torch.Tensor)]
        written = _written_ids(func, args, kwargs)
        # ``p.data`` / ``p.detach()`` only names the parameter again (the alias is watched below),
        # and a write into the parameter reads nothing: weight clipping or a decay at the top of the
        # forward (``p.data.clamp_()``, under no_grad too) counted as every weight's first read, put
        # every unit's start there and its layer's FLOPs in the last unit (review98). A view's read
        # holds until the view is written into (``w[0] = 0``, ``w.view(-1).clamp_()``: review100)
        aliasing = func.overloadpacket in _ALIASING_OPS
        for leaf in tensors:
            name = self.watched.get(id(leaf))
            if name is not None and id(leaf) in written:
                for read in self._view_reads.pop(id(leaf), ()):
                    self._withdraw(name, read)
                continue
            if name is not None and name not in names:
                names[name] = leaf
                if not aliasing:
                    self.reads.setdefault(name, []).append((op_index, call))
            elif name is None and id(leaf) in self.fixed:
                fixed = leaf
        if names and not aliasing and self._trained_from is None:
            self._trained_from = op_index
        if fixed is not None and self._first_fixed_read is None:
            self._first_fixed_read = op_index
        if (names and not aliasing or fixed is not None) and self.first_param_read is None:
            self.first_param_read = op_index
        # a weight gradient costs about a forward only for a trained matrix or filter (a trained
        # bias beside a fixed weight, BitFit, costs next to nothing); the input gradient another
        if self._trained_from is None:
            self.op_backward.append(0.0)
        elif fixed is not None and not any(t.dim() >= 2 for t in names.values()):
            self.op_backward.append(1.0)
        else:
            self.op_backward.append(2.0)
        out = func(*args, **kwargs)
        keep = _KEEPING_DRAWS.get(func._overloadpacket.__name__)
        if keep is not None:  # every layer runs in the trace, whatever LayerDrop or DropPath draws
            fill_draw(out, keep, self.watched)
        count = self._flop_registry.get(func._overloadpacket)
        if count is not None:
            self.op_flops.append(int(count(*args, **kwargs, out_val=out)))
        else:
            formula = _EXTRA_FLOP_FORMULAS.get(func._overloadpacket.__name__)
            self.op_flops.append(int(formula(*args, **kwargs)) if formula is not None else 0)
        self._track(func, op_index, tensors, bool(names) or fixed is not None, out)
        views = [t for t in (out if func.is_view and isinstance(out, (tuple, list)) else (out,))
                 if isinstance(t, torch.Tensor)]  # (unbind, split, chunk: several views)
        if len(names) == 1 and views and all(_aliases(t, *names.values()) for t in views):
            # a view of a parameter (``weight.t()`` inside ``F.linear``): the op that reads the
            # view reads the parameter, and its FLOPs are the parameter's
            (name, base), = names.items()
            for t in views:
                self._views.append(t)
                self.watched[id(t)] = name
                if func.is_view and not aliasing:  # reads until a view is written into (above)
                    self._view_reads[id(t)] = [*self._view_reads.get(id(base), ()), (op_index, call)]
        elif not names and fixed is not None and isinstance(out, torch.Tensor) and _aliases(out, fixed):
            self._views.append(out)
            self.fixed.add(id(out))
        return out

    def _withdraw(self, name: str, read: Tuple[int, Optional[Tuple[int, int]]]) -> None:
        """A view's read of parameter ``name`` that turned out to be a write into it: no read, and
        where it was the first, the pass before the first real read trains nothing (review102:
        an input augmentation before it was taken for part of the frozen prefix)."""
        uses = self.reads.get(name)
        if uses is None or read not in uses:
            return
        uses.remove(read)
        if not uses:
            del self.reads[name]
        firsts = [u[0][0] for u in self.reads.values()]
        if self._trained_from == read[0]:
            self._trained_from = min(firsts, default=None)
            for op in range(read[0], len(self.op_backward) if self._trained_from is None else self._trained_from):
                self.op_backward[op] = 0.0
        if self.first_param_read == read[0]:
            fixed = [] if self._first_fixed_read is None else [self._first_fixed_read]
            self.first_param_read = min(firsts + fixed, default=None)

    def backward_flops(self, start: int, end: int) -> float:
        """What the backward of ops ``start:end`` costs (each op's FLOPs times ``op_backward``)."""
        return sum(f * b for f, b in zip(self.op_flops[start:end], self.op_backward[start:end]))

    def first_use(self, name: str) -> int:
        return self.reads[name][0][0]

    def last_use(self, name: str) -> int:
        return self.reads[name][-1][0]


# What a tensor was computed from (bit flags; parameters and buffers are what the model holds),
# whether it went through a softmax of such a tensor (attention weights), and whether it was
# computed, since the last layer, from a product of two such tensors (attention scores, however
# normalised: sigmoid, ReLU, a softmax written with exp; linear attention's kᵀ·v).
_FROM_BATCH, _FROM_WEIGHTS, _SOFTMAXED, _PRODUCT_OF_TWO = 1, 2, 4, 8
_FROM_BOTH = _FROM_BATCH | _FROM_WEIGHTS
_ATTENTION_WEIGHTS = _SOFTMAXED | _PRODUCT_OF_TWO
# ops that multiply two operands together (convolutions and RNN kernels, whose second operand is
# a weight, are not among them)
_PRODUCT_OPS = {"mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "mv", "dot", "vdot", "matmul", "einsum"}
# whole attention layers in one op (nn.MultiheadAttention's and nn.TransformerEncoderLayer's
# fast paths, taken on a model in eval mode): attention whenever the batch goes in
_FUSED_ATTENTION_MARKERS = ("multi_head_attention", "transformer_encoder_layer", "transformer_decoder")


# ops whose output holds none of their tensor inputs' values, only their shape or dtype
_SHAPE_ONLY_OPS = {"new_ones", "new_zeros", "new_empty", "new_full", "new_empty_strided", "ones_like",
                   "zeros_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like"}
# the most recent producing layers a tensor remembers: enough for attention's operands (a few
# projections and the elementwise layers after them), bounded for an RNN's state over a long loop
_PRODUCERS_KEPT = 8


# Random draws as the trace takes them: the value that keeps every layer and path. LayerDrop skips
# a layer where a uniform draw falls below its probability (a trace without that layer left its
# parameters out of every unit: Wav2Vec2's default LayerDrop of 0.1 skips one of 12 layers in
# most draws); stochastic depth and dropout keep what a Bernoulli draw of 1 keeps.
_KEEPING_DRAWS = {"rand": 0.999, "rand_like": 0.999, "bernoulli": 1, "bernoulli_": 1}


def fill_draw(out: Any, value: float, watched: Any = ()) -> None:
    """Set every tensor a random op returned to ``value``; never a parameter (a lazy layer's
    initialisation, run in the pass, keeps its draws) nor a watched one."""
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and id(t) not in watched:
            t.fill_(value)


def _recent(producers: FrozenSet[int]) -> FrozenSet[int]:
    return producers if len(producers) <= _PRODUCERS_KEPT else frozenset(sorted(producers)[-_PRODUCERS_KEPT:])


def _op_kind(func) -> Optional[str]:
    """How an op takes part in attention. Attention is a product of two tensors each computed
    from the batch and weights, one of them softmax weights (q·kᵀ -> softmax -> ·v, additive
    attention, a learned query's pooling) or itself made by such a product since the last layer
    (q·kᵀ -> sigmoid -> ·v; linear attention's q·(kᵀ·v)), or an attention kernel, or a whole fused
    layer. One product alone (CLIP's logits, Gram pooling, a state-space scan's ·C) is not."""
    name = func._overloadpacket.__name__
    if name in _SHAPE_ONLY_OPS:
        return "shape-only"
    if any(marker in name for marker in _FUSED_ATTENTION_MARKERS):
        return "fused"
    if "attention" in name:  # _scaled_dot_product_*, _flash_attention_forward: softmax inside
        return "attention"
    if name in _PRODUCT_OPS:
        return "product"
    if "softmax" in name and "log" not in name:
        return "softmax"
    return None


def _same_data(tensors: List[torch.Tensor]) -> bool:
    """Whether a product's operands are all one tensor's values (x and its transpose). Tensors
    with no memory of their own (meta: every address 0) are told apart by nothing: not the same,
    as ``_aliases`` holds them."""
    try:
        places = {(t.untyped_storage().data_ptr(), t.storage_offset()) for t in tensors if t.dim() >= 2}
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return False
    return len(places) == 1 and next(iter(places))[0] != 0


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() != 0
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return False


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


def _layer_of(model: nn.Module, module_name: str, module: nn.Module) -> Tuple[str, nn.Module]:
    """The layer a parameter belongs to: its registering module, except for a parametrization's
    own parameters (``weight_norm``'s ``original0/1``, registered by a ``ParametrizationList``
    under ``<layer>.parametrizations.<name>``), which belong to the layer it parametrizes (its
    weight and bias in one unit, not two)."""
    from torch.nn.utils.parametrize import ParametrizationList

    if isinstance(module, ParametrizationList):
        # "<layer>.parametrizations.<name>", or "parametrizations.<name>" on the model itself
        layer_name = module_name.rsplit(".parametrizations.", 1)[0] if ".parametrizations." in module_name else ""
        return layer_name, model.get_submodule(layer_name)
    return module_name, module


def _qualified(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def as_args(inputs: Any) -> Tuple[Any, ...]:
    """Example inputs as positional arguments: a tuple is the positional arguments, anything
    else (a tensor, a list, a dict, a NamedTuple such as a batch or a PackedSequence: splatted, its
    fields reached the forward as arguments of their own, review97) is the one positional argument."""
    return inputs if isinstance(inputs, tuple) and not hasattr(inputs, "_fields") else (inputs,)


def example_call(model: nn.Module, inputs: Any,
                 kwargs: Optional[Dict[str, Any]]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """``example_inputs`` and ``example_kwargs`` as the forward's (positional, keyword) inputs. A
    Mapping whose keys all name parameters of ``model.forward`` (a Hugging Face batch:
    ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``), or name some of them while the
    forward takes the rest as ``**kwargs`` (``output_hidden_states`` in transformers 5), is
    keyword inputs; anything else follows ``as_args`` (a dict that a forward takes whole stays
    one positional input)."""
    kwargs = dict(kwargs or {})
    if isinstance(inputs, Mapping) and inputs and _names_parameters(model, inputs):
        clash = sorted(set(inputs) & set(kwargs))
        if clash:
            raise ValueError(f"SmartFreezer: {clash} are given both in example_inputs (a dict of keyword inputs) "
                             "and in example_kwargs; give each input once.")
        return (), {**inputs, **kwargs}
    return as_args(inputs), kwargs


def forward_keywords(model: nn.Module) -> Optional[Tuple[Set[str], bool]]:
    """(the names ``model.forward`` takes as keywords, whether it takes any more as ``**kwargs``),
    or None where its signature cannot be read."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    named = {p.name for p in parameters
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return named, any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)


def _names_parameters(model: nn.Module, keys: Mapping) -> bool:
    taken = forward_keywords(model)
    if taken is None or not all(isinstance(k, str) for k in keys):
        return False
    named, takes_more = taken
    return all(k in named for k in keys) or (takes_more and any(k in named for k in keys))


def uninitialized(t: Any) -> bool:
    """A lazy layer's parameter or buffer not materialised yet (``nn.LazyLinear`` before its
    first forward): it has no values, and any tensor operation on it raises."""
    from torch.nn.parameter import UninitializedTensorMixin

    return isinstance(t, UninitializedTensorMixin)


def uninitialized_parameters(model: nn.Module) -> List[str]:
    """Names of the lazy layers' parameters and buffers not materialised yet (``nn.LazyLinear``
    before its first forward, which draws their initial values from torch's generator)."""
    return [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if uninitialized(t)]


def copy_model(model: nn.Module, who: str) -> nn.Module:
    """A deep copy of ``model`` for ``who`` to run on its own. A weight that a forward pre-hook
    computes from the layer's own tensors (``torch.nn.utils.prune``'s ``weight_orig * weight_mask``,
    the old ``weight_norm``) is kept as a plain attribute holding a graph's output, which
    ``copy.deepcopy`` refuses: it is copied detached (the copy's hook computes its own at each
    forward). A lazy layer not materialised yet has no values to copy: say which, and what to do."""
    lazy = uninitialized_parameters(model)
    if lazy:
        raise ValueError(
            f"{who} copies the model, and its lazy layers hold no values yet ({', '.join(lazy[:3])}): run one "
            "forward pass of the model, which materialises them, first. A lazy layer the forward never calls "
            "stays unmaterialised: remove it, or build it with its sizes (nn.Linear for nn.LazyLinear).")
    memo = {id(value): value.detach().clone() for module in model.modules() for value in vars(module).values()
            if isinstance(value, torch.Tensor) and value.grad_fn is not None}
    return copy.deepcopy(model, memo)


@contextmanager
def preserved_modes(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Each module's train/eval flag is as before afterwards (restored per module: ``.train()``
    recurses, and would not give back a child whose flag differed from its parent's)."""
    flags = {m: m.training for m in modules}
    try:
        yield
    finally:
        for m, training in flags.items():
            m.training = training


@contextmanager
def preserved_rngs(model: nn.Module, holders: Sequence[Any] = ()) -> Iterator[None]:
    """The random generators a forward pass may draw from are as before afterwards: torch's (CPU
    and the model's GPUs: dropout masks, LayerDrop), numpy's and Python's (SpecAugment's masks
    are drawn with numpy), and those the model's modules hold as attributes (an augmentation's
    own ``torch.Generator``, ``numpy.random.Generator`` or ``random.Random``, for draws that
    reproduce), and those ``holders`` keep (a dataset's own generator for its augmentation)."""
    import random
    import sys

    numpy = sys.modules.get("numpy")
    host = random.getstate(), numpy.random.get_state() if numpy is not None else None
    owned = _owned_generators(model, holders)
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(host[0])
        if numpy is not None:
            numpy.random.set_state(host[1])
        for generator, state in owned:
            _set_generator_state(generator, state)


def _generator_kinds() -> Tuple[type, ...]:
    """The random generators' classes: torch's, Python's Random, numpy's Generator and RandomState
    (numpy only where something imported it)."""
    import random
    import sys

    numpy = sys.modules.get("numpy")
    numpy_kinds = (numpy.random.Generator, numpy.random.RandomState) if numpy is not None else ()
    return (torch.Generator, random.Random) + numpy_kinds


def _generator_state(value: Any) -> Any:
    """The state of a random generator (one of `_generator_kinds`, subclasses too), or None for
    anything else (Python's SystemRandom has none)."""
    import random

    if not isinstance(value, _generator_kinds()):
        return None
    try:
        if isinstance(value, torch.Generator):
            return value.get_state()
        if isinstance(value, random.Random):
            return value.getstate()
        if hasattr(value, "bit_generator"):  # numpy's Generator
            return value.bit_generator.state
        return value.get_state()  # numpy's RandomState
    except NotImplementedError:  # SystemRandom: the operating system's entropy, nothing to put back
        return None


def _owned_generators(model: nn.Module, holders: Sequence[Any] = ()) -> List[Tuple[Any, Any]]:
    """(generator, state) for the generators the model's modules hold: as attributes, in their
    lists, tuples and dicts, or as attributes of a plain object they hold (an augmentation's);
    and those ``holders`` hold the same ways."""
    found, seen = [], set()

    def look(value: Any, depth: int) -> None:
        if isinstance(value, _PLAIN_VALUES) or isinstance(value, (torch.Tensor, nn.Module)) or id(value) in seen:
            return
        seen.add(id(value))
        state = _generator_state(value)
        if state is not None:
            found.append((value, state))
        elif depth < 2 and isinstance(value, (list, tuple)) and len(value) <= 64:
            for item in value:
                look(item, depth + 1)
        elif depth < 2 and isinstance(value, dict) and len(value) <= 64:
            for item in value.values():
                look(item, depth + 1)
        elif depth < 2 and _holds_settings(value):
            for item in vars(value).values():
                look(item, depth + 1)

    kinds = _generator_kinds()
    for module in model.modules():
        own = _torch_own(module)  # a generator set on it (a hook draws from it), not inside its values
        for key, value in vars(module).items():
            if key in _MODULE_INTERNALS:  # its parameters, buffers, children and hooks
                continue
            if isinstance(value, kinds) or not own:
                look(value, 0)
    for holder in holders:
        look(holder, 0)
    return found


_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _torch_own(module: nn.Module) -> bool:
    """A module of torch's own classes (nn.Linear, nn.LayerNorm, a parametrized nn.Linear; not a
    parametrized module of the user's, whose class torch makes): its forward changes no Python
    value of its own, so looks skip it (most of a model's modules: a look on 500 blocks of three
    took 20 ms with them, 7 without)."""
    return _torch_class(type(module))


@functools.lru_cache(maxsize=None)
def _torch_class(cls: type) -> bool:
    return all(c.__module__.startswith("torch.") or c is object for c in cls.__mro__)


def _set_generator_state(generator: Any, state: Any) -> None:
    import random

    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, random.Random):
        generator.setstate(state)
    elif hasattr(generator, "bit_generator"):
        generator.bit_generator.state = state
    else:
        generator.set_state(state)


@contextmanager
def host_draws_at(value: float) -> Iterator[None]:
    """Python's and numpy's uniform draws (``random.random``, ``random.uniform``,
    ``numpy.random.rand``, ``random``, ``random_sample``, ``uniform``) return ``value``, scaled to
    their range, meanwhile: LayerDrop written with them (older Hugging Face code: random.uniform) draws
    what the caller sets, as torch's draws do under the tracers."""
    import random
    import sys

    numpy = sys.modules.get("numpy")
    patches = [(random, "random", lambda: value), (random, "uniform", lambda a, b: a + value * (b - a))]
    if numpy is not None:
        def full(size=None):
            return value if size is None else numpy.full(size, value)

        patches += [(numpy.random, "rand", lambda *shape: full(shape or None)),
                    (numpy.random, "random", full), (numpy.random, "random_sample", full),
                    (numpy.random, "uniform", lambda low=0.0, high=1.0, size=None:
                     low + (high - low) * full(size))]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def seed_host_rngs(seed: int) -> None:
    """Seed Python's and numpy's global generators (``preserved_rngs`` puts them back)."""
    import random
    import sys

    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed)


_PLAIN_VALUES = (type(None), bool, int, float, complex, str)
_GONE = object()


def _plain(value: Any, depth: int = 0) -> bool:
    """A Python value a trace takes as a constant: a number, flag or string, or a small tuple,
    list or dict of them."""
    if isinstance(value, _PLAIN_VALUES):
        return True
    if depth < 2 and isinstance(value, (tuple, list)) and len(value) <= 64:
        return all(_plain(v, depth + 1) for v in value)
    if depth < 2 and isinstance(value, dict) and len(value) <= 64:
        return all(isinstance(k, _PLAIN_VALUES) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # a comparison that cannot say: changed
        return False


class PythonAttributes:
    """The Python state that ``modules`` keep as public attributes besides parameters, buffers and
    children, as it is now: plain values (numbers, flags, strings; small tuples, lists and dicts of
    them), tensors kept as plain attributes (a table cached beside its length, an EMA), lists
    and dicts of other things (a feature tap ``self.feats.append(h)``), and settings objects (by
    identity, their fields by value: ``m.cfg = Config(...)`` replaced whole). A torch.fx trace reads such
    a value once and keeps it as a constant of the graph: a temperature annealed each step, LoRA's
    ``scaling``, an adapter's on/off flag. ``changed()`` names those that differ now (a plain value
    by value; a list or dict of other things by its items' identity; a tensor by identity and
    version, so a write in place counts); ``restore()`` sets back those that did, a list or dict
    in place (several modules may share one the loop changes), a tensor's values through
    ``.data``. Modules of torch's own classes keep none that their forward changes: skipped."""

    def __init__(self, modules: Sequence[Tuple[str, nn.Module]] = ()) -> None:
        self._values = []
        self.holders: Dict[int, List[nn.Module]] = {}  # id(owner) -> the modules that hold it
        self._others: Dict[int, int] = {}  # id(owner) -> how many of its attributes are not watched
        for name, module in modules:
            if _torch_own(module):
                continue
            self._watch(name, module, module)
            for key, value in vars(module).items():  # a config object's fields (self.cfg.temperature)
                if not key.startswith("_") and id(value) in self.holders and value is not module:
                    self.holders[id(value)].append(module)  # one many modules hold (Hugging Face's): looked at once
                elif not key.startswith("_") and _holds_settings(value):
                    self._watch(f"{name}.{key}", value, module)

    def _watch(self, name: str, owner: Any, module: nn.Module) -> None:
        values = _watched_fields(owner)
        self._values.append((name, owner, values))
        self.holders[id(owner)] = [module]
        self._others[id(owner)] = len(vars(owner)) - len(values)

    def _differing(self) -> List[Tuple[str, Any, str, Any, Any]]:
        """(name, owner, key, value then, how it was kept) of what differs now, the attributes set
        for the first time too (value then ``_GONE``)."""
        found = []
        for name, owner, values in self._values:
            attributes = vars(owner)
            for key, (then, kept) in values.items():
                if _differs(attributes.get(key, _GONE), then, kept):
                    found.append((name, owner, key, then, kept))
            if len(attributes) != len(values) + self._others[id(owner)]:  # one set where there was none
                found += [(name, owner, key, _GONE, None) for key, value in attributes.items()
                          if key not in values and _watched(key, value, owner)]
        return found

    def changed(self) -> List[str]:
        """Names of the values that differ now, or were set for the first time (a trace may have
        read the default of ``getattr(self, "scale", 1.0)``)."""
        return [f"{name}.{key}" for name, _, key, _, _ in self._differing()]

    def writers(self, written_by: Optional[Dict[Tuple[int, str], List[nn.Module]]] = None) -> Dict[int, str]:
        """``{id(module): "'attribute'"}`` of the modules whose values differ now; a value rebound to
        an equal one does not count. A write into an object several modules hold (a state object
        blocks share) is each holder's, unless ``written_by`` (``SharedWrites``, a look that
        watched it) names the module that wrote it."""
        found: Dict[int, str] = {}
        for name, owner, key, then, kept in self._differing():
            if _rebound_to_equal(owner, key, then, kept):
                continue
            if written_by and (id(owner), key) in written_by:
                for module in written_by[(id(owner), key)]:
                    found.setdefault(id(module), repr(f"{name}.{key}"))
                continue
            holders = self.holders.get(id(owner), ())
            what = repr(f"{name}.{key}") + (
                ", of an object several modules hold (which of them writes it cannot be told)" if len(holders) > 1 else "")
            for module in holders:
                found.setdefault(id(module), what)
        return found

    def changed_values(self) -> List[Tuple[str, str]]:
        """(name of the holder, attribute) of each value that differs now or was set for the first
        time; a value rebound to an equal one does not count."""
        return [(name, key) for name, owner, key, then, kept in self._differing()
                if not _rebound_to_equal(owner, key, then, kept)]

    def shared_written(self) -> List[Any]:
        """The objects several modules hold that differ now (a context the blocks share)."""
        found = {id(owner): owner for _, owner, _, _, _ in self._differing() if len(self.holders.get(id(owner), ())) > 1}
        return list(found.values())

    def restore(self) -> None:
        for _, owner, key, then, kept in self._differing():
            if then is _GONE:  # `self.initialized = True` at a first forward: the real one sets it
                del owner.__dict__[key]
                continue
            owner.__dict__[key] = then
            kind = kept[0] if kept is not None else None
            if kind in ("copy", "items"):
                contents = copy.deepcopy(kept[1]) if kind == "copy" else kept[1]
                if isinstance(then, list):
                    then[:] = contents
                else:
                    then.clear()
                    then.update(contents)
            elif kind == "tensor" and kept[2] is not None and then._version != kept[1]:
                with torch.no_grad():  # through .data: its version stays (a saved graph may hold it)
                    if then.shape == kept[2].shape and then.dtype == kept[2].dtype:
                        then.data.copy_(kept[2])
                    else:
                        then.data = kept[2]


class SharedWrites:
    """During one look, which module writes into objects several modules hold (``owners``: a
    context the blocks share, which ``PythonAttributes.writers`` credits to every holder): hooks
    on every module keep the stack of forwards running, and a change of an owner's attribute seen
    at a hook event was made by the innermost forward running since the last one. It is credited
    to that module only where its forward's code sets the attribute (``self.ctx.gate = ...``);
    otherwise (a write in place, a helper function's, a module's ``.forward`` called directly,
    which runs no hooks) to every holder and that module, as without this look."""

    def __init__(self, model: nn.Module, owners: Sequence[Any], holders: Dict[int, List[nn.Module]]) -> None:
        self.owners, self.holders = list(owners), holders
        self.written_by: Dict[Tuple[int, str], List[nn.Module]] = {}
        self._running: List[nn.Module] = []
        self._nested: Set[Tuple[int, str]] = set()  # (id(owner), attribute) holding containers or objects
        self._last = [self._marks(owner) for owner in self.owners]
        self._handles: List[Any] = []
        for module in model.modules():
            try:
                self._handles.append(module.register_forward_pre_hook(self._enter))
                self._handles.append(module.register_forward_hook(self._leave, always_call=True))
            except Exception:  # noqa: BLE001 -- a scripted module takes no hooks: its writes credit its caller's holders
                pass

    def __enter__(self) -> "SharedWrites":
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        for key in self._nested:  # a write inside one is seen by no mark: every holder's, as without this look
            self.written_by.pop(key, None)

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._note()
        self._running.append(module)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self._note()
        if self._running and self._running[-1] is module:
            self._running.pop()

    def _marks(self, owner: Any) -> Dict[str, Tuple[Any, ...]]:
        marks = _attribute_marks(owner)
        self._nested.update((id(owner), key) for key, mark in marks.items() if mark[0] is _NESTED)
        return marks

    def _note(self) -> None:
        for index, owner in enumerate(self.owners):
            now = self._marks(owner)
            if now == self._last[index]:
                continue
            writer = self._running[-1] if self._running else None
            for key in {k for k in now.keys() | self._last[index].keys()
                        if k not in now or k not in self._last[index] or now[k] != self._last[index][k]}:
                credited = self.written_by.setdefault((id(owner), key), [])
                found = ([writer] if _stores_attribute(writer, key)
                         else [*self.holders.get(id(owner), ()), *([writer] if writer is not None else [])])
                credited.extend(m for m in found if all(m is not c for c in credited))
            self._last[index] = now


_NESTED = object()  # the mark of a list or dict that holds containers or objects


def _attribute_marks(owner: Any) -> Dict[str, Tuple[Any, ...]]:
    """A cheap mark of each public attribute's state, which a write changes: the object's identity
    and, a tensor's version, a list's or dict's items' marks, a plain value itself. A list or dict
    holding containers or objects (a write inside them changes no mark) is marked ``_NESTED``."""
    marks = {}
    for key, value in vars(owner).items():
        if key.startswith("_"):
            continue
        if isinstance(value, (list, dict)):
            items = [_value_mark(v) for v in itertools.islice(value.values() if isinstance(value, dict) else value, 256)]
            nested = len(value) > 256 or any(mark is None for mark in items)
            marks[key] = (_NESTED, id(value)) if nested else (id(value), len(value), tuple(items))
        else:
            marks[key] = _value_mark(value) or (id(value),)
    return marks


def _value_mark(value: Any) -> Optional[Tuple[Any, ...]]:
    """A tensor's identity and version, a plain value itself; None for anything else."""
    if isinstance(value, torch.Tensor):
        return (id(value), None if value.is_inference() else value._version)
    if isinstance(value, _PLAIN_VALUES) and not (isinstance(value, float) and math.isnan(value)):
        return (type(value), value)
    return None


def forward_codes(module: nn.Module) -> Optional[List[types.CodeType]]:
    """The code of a module's forward (under ``@torch.no_grad()`` too) and of the functions
    defined in it; None where it has none in Python."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    if code is None:
        return None
    codes, found = [code], []
    while codes:
        code = codes.pop()
        found.append(code)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return found


def _stores_attribute(module: Optional[nn.Module], key: str) -> bool:
    """Whether ``module``'s forward code sets an attribute named ``key`` (``obj.key = ...``)."""
    codes = forward_codes(module) if module is not None else None
    return any(key in _stored_names(code) for code in codes or ())


@functools.lru_cache(maxsize=1024)
def _stored_names(code: types.CodeType) -> FrozenSet[str]:
    return frozenset(op.argval for op in dis.get_instructions(code) if op.opname == "STORE_ATTR")


# lists and dicts of other things than plain values are compared item by item, up to this many
_MAX_ITEMS = 4096


def _watched_fields(owner: Any) -> Dict[str, Tuple[Any, Any]]:
    """``{key: (value, how it is kept)}`` of the attributes ``PythonAttributes`` watches: None for
    a plain value, ("copy", a deep copy) for a plain list or dict, ("items", a shallow copy) for a
    list or dict of other things, ("tensor", version, a copy of its values) for a tensor,
    ("object",) for a settings object (its fields are watched with it: replaced whole,
    ``m.cfg = Config(...)``)."""
    out = {}
    for key, value in vars(owner).items():
        kind = _watch_kind(key, value, owner)
        if kind == "tensor":
            out[key] = (value, _tensor_kept(value))
        elif kind == "copy":
            out[key] = (value, ("copy", copy.deepcopy(value)))
        elif kind == "items":
            out[key] = (value, ("items", list(value) if isinstance(value, list) else dict(value)))
        elif kind == "plain":
            out[key] = (value, None)
        elif kind == "object":
            out[key] = (value, ("object",))
    return out


# a tensor attribute's values are copied (to put back a write in place) up to this size; a larger
# one (a table kept as a plain attribute) is followed by identity and version only
_MAX_COPIED_BYTES = 1 << 24


def _tensor_kept(t: torch.Tensor) -> Tuple[Any, ...]:
    """("tensor", version, a copy of its values or None): an inference tensor (a table memoised
    under torch.inference_mode) has no version, and is followed by identity only."""
    if t.is_inference():
        return ("tensor", None, None)
    small = t.numel() * t.element_size() <= _MAX_COPIED_BYTES
    return ("tensor", t._version, t.detach().clone() if small else None)


def _rebound_to_equal(owner: Any, key: str, then: Any, kept: Any) -> bool:
    """`self.shape = list(x.shape)`: the same value in a new list."""
    return (kept is not None and kept[0] == "copy" and then is not _GONE
            and _same_value(vars(owner).get(key, _GONE), kept[1]))


def _differs(now: Any, then: Any, kept: Any) -> bool:
    kind = kept[0] if kept is not None else None
    if kind is None:
        return now is not then and not _same_value(now, then)
    if now is not then:  # a list, dict or tensor rebound (`self.shape = list(x.shape)`: writers() tells)
        return True
    if kind == "tensor":
        return kept[1] is not None and now._version != kept[1]
    if kind == "object":
        return False
    if kind == "copy":
        return not _same_value(now, kept[1])
    items = kept[1]
    if len(now) != len(items):
        return True
    if isinstance(now, list):
        return any(a is not b for a, b in zip(now, items))
    return now.keys() != items.keys() or any(now[k] is not v for k, v in items.items())


def _watched(key: str, value: Any, owner: Any) -> bool:
    return _watch_kind(key, value, owner) is not None


def _watch_kind(key: str, value: Any, owner: Any) -> Optional[str]:
    """How a public attribute is watched: "plain" (a number, flag, string, or a small tuple of
    them), "copy" (a plain list or dict), "tensor", "items" (a list or dict of other things, up to
    ``_MAX_ITEMS`` items), "object" (a module's settings object); None: not watched (private
    names, a module's ``training``, anything else)."""
    if key.startswith("_") or (key == "training" and isinstance(owner, nn.Module)):
        return None
    if isinstance(value, torch.Tensor):
        return "tensor"
    if _plain(value):
        return "copy" if isinstance(value, (list, dict)) else "plain"
    if isinstance(value, (list, dict)):
        return "items" if len(value) <= _MAX_ITEMS else None
    return "object" if isinstance(owner, nn.Module) and _holds_settings(value) else None


def _holds_settings(value: Any) -> bool:
    """A plain object of settings or state (a dataclass, a Namespace, an augmentation object):
    not a tensor, module, function, method or class, with a ``__dict__`` of at most a few hundred
    fields."""
    attributes = getattr(value, "__dict__", None)
    return (isinstance(attributes, dict) and len(attributes) <= 256
            and not isinstance(value, (torch.Tensor, nn.Module, type, types.FunctionType, types.MethodType,
                                       types.BuiltinFunctionType, functools.partial)))


_ALIASING_OPS = (torch.ops.aten.detach, torch.ops.aten.alias)


def _written_ids(func, args, kwargs) -> set:
    """ids of the tensors an op writes into (its schema's mutable arguments)."""
    if not func._schema.is_mutable:
        return set()
    written = set()
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            written.update(id(t) for t in (value if isinstance(value, (list, tuple)) else (value,))
                           if isinstance(t, torch.Tensor))
    return written


# model -> the parameters its forward was seen writing into (the set-up's trace): the looks that
# run it again (the cache's checks) copy those and put them back
_WRITTEN_PARAMETERS: "weakref.WeakKeyDictionary[nn.Module, List[nn.Parameter]]" = weakref.WeakKeyDictionary()


def _rebound(p: nn.Parameter, data: torch.Tensor) -> bool:
    """Whether ``p`` holds other storage, or another shape, than ``data`` (its ``.data`` before a
    forward that rebinds it: ``self.weight.data = ...``)."""
    return p.data.untyped_storage().data_ptr() != data.untyped_storage().data_ptr() or p.shape != data.shape


class ParameterWrites(TorchDispatchMode):
    """Keeps a copy of each parameter an op writes into, taken before its first write: a forward
    that updates a parameter in place (a VQ-VAE codebook kept as a parameter, a decay under
    ``no_grad``, ``nn.Embedding(max_norm=...)``'s renorm of the rows it looks up) changed the
    model at the freezer's set-up and at every look of the cache (review98: 0.22 and 3.4).
    Only written parameters are copied. A dispatch mode: only where compiled modules run eagerly
    meanwhile (``compiled_modules_run_eagerly``; under a dispatch mode dynamo skips a compiled
    block's code for good), as in the set-up's trace, whose findings the later looks use
    (``_WRITTEN_PARAMETERS``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.by_storage: Dict[int, List[nn.Parameter]] = {}
        for p in dict.fromkeys(model.parameters()):
            if uninitialized(p) or p.numel() == 0:  # a lazy layer's (torch's or one's own, filled by
                continue                            # the pass): materialised as it would be without it
            try:
                if p.layout == torch.strided and not p.is_meta and type(p.data) is torch.Tensor:
                    self.by_storage.setdefault(p.untyped_storage().data_ptr(), []).append(p)
            except (RuntimeError, NotImplementedError, ValueError):  # a tensor subclass without plain storage
                pass
        self.saved: Dict[int, Tuple[nn.Parameter, torch.Tensor]] = {}
        # the storage each held before: a forward may also rebind it (``self.weight.data = ...``)
        self.bound = [(p, p.data) for ps in self.by_storage.values() for p in ps]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.by_storage and func._schema.is_mutable:
            written = _written_ids(func, args, kwargs)
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and id(t) in written and t.layout == torch.strided:
                    try:
                        storage = t.untyped_storage().data_ptr()
                    except (RuntimeError, NotImplementedError, ValueError):  # a tensor subclass (review100)
                        continue
                    for p in self.by_storage.get(storage, ()):
                        if id(p) not in self.saved:
                            self.saved[id(p)] = (p, p.detach().clone())
        return func(*args, **kwargs)

    def touched(self) -> List[nn.Parameter]:
        """The parameters the pass wrote into or rebound."""
        rebound = [p for p, data in self.bound
                   if _rebound(p, data)]
        return list({id(p): p for p in [*(p for p, _ in self.saved.values()), *rebound]}.values())

    def put_back(self) -> None:
        """Values and storage as before, through ``.data`` (the version counter stays)."""
        with torch.no_grad():
            for p, data in self.bound:
                if _rebound(p, data):
                    p.data = data
            for p, values in self.saved.values():
                p.data.copy_(values)


def _note_new_writes(model: nn.Module, params: List[nn.Parameter]) -> None:
    """Parameters a look's forward wrote in place that the set-up did not see written (a decay the
    loop switches on later, review102): this look's write stays (it cannot be undone), said once;
    the later looks put them back."""
    if not params:
        return
    _WRITTEN_PARAMETERS.setdefault(model, []).extend(params)
    names = {id(p): n for n, p in model.named_parameters()}
    warnings.warn(f"SmartFreezer: the model's forward wrote parameter(s) {[names.get(id(p), '?') for p in params][:3]} in "
                  "place during a pass the freezer or the activation cache runs to look at the model, which the set-up's "
                  "pass did not write: that write ran once more than your loop runs it. Later looks put it back. Such "
                  "updates belong after optimizer.step(), outside the forward.", stacklevel=3)


@contextmanager
def preserved_state(model: nn.Module, rngs: bool = True, new_writes: bool = True) -> Iterator[None]:
    """Run a look-only forward pass: the model's buffers (norm running statistics, observers),
    parameters its forward writes into (as the set-up's trace found them: ``ParameterWrites``;
    ``new_writes``: warn of others), the plain Python values its modules keep
    (``PythonAttributes``: a step counter) and the random generators (``preserved_rngs``;
    ``rngs=False``: they move on, for looks that compare two passes to find random ops) are as
    before afterwards.

    A buffer is put back only where the pass changed it, and through ``.data``, which leaves its
    version counter alone: a graph built before the pass may have saved it (a GAN's discriminator
    run on the fake batch before the cached real one: BatchNorm saves its running statistics), and
    a bumped version failed that graph's backward. One the pass resized (an observer's statistics,
    empty until the first forward) gets its old shape back; one it replaced, its old tensor."""
    saved = [(module, name, b, b.detach().clone())  # a lazy layer the pass does not run holds no values yet
             for module in model.modules() for name, b in module._buffers.items()
             if b is not None and not uninitialized(b)]
    attributes = PythonAttributes([(name, m) for name, m in model.named_modules()])  # `self.calls += 1`
    # the parameters the set-up saw the forward write into (a decay, an EMA codebook), by value;
    # the others' version counters, to see a write the set-up did not (one switched on later)
    written = [(p, p.data, p.detach().clone()) for p in _WRITTEN_PARAMETERS.get(model, ())]
    known = {id(p) for p, _, _ in written}
    versions = [(p, p._version) for p in dict.fromkeys(model.parameters()) if id(p) not in known and not uninitialized(p)]
    try:
        # and autocast's cast cache off: a look under no_grad inside the user's autocast left casts
        # of trainable weights without grad_fn there, which the training forward then took (review99)
        with preserved_rngs(model) if rngs else nullcontext(), uncached_autocast():
            yield
    finally:
        with torch.no_grad():
            for p, data, values in written:
                if _rebound(p, data):
                    p.data = data  # a forward that rebinds it (``self.weight.data = ...``)
                p.data.copy_(values)
        if new_writes:  # (the set-up's pass watches its writes itself: ParameterWrites)
            _note_new_writes(model, [p for p, version in versions if p._version != version])
        if attributes.changed():
            attributes.restore()
        with torch.no_grad():
            for module, name, original, values in saved:
                if module._buffers.get(name) is not original:
                    module._buffers[name] = original
                if original.is_meta:
                    continue  # no values
                if original.layout != torch.strided or original.shape != values.shape:
                    original.data = values  # a sparse buffer (a graph's adjacency) has no torch.equal
                elif not torch.equal(original, values):
                    original.data.copy_(values)


@contextmanager
def uncached_autocast() -> Iterator[None]:
    """Autocast without its cast cache meanwhile: with it, a layer called twice reads its
    parameter once (the second call takes the cached low-precision copy), and a tracer would not
    see the parameter shared (a freezer set up in an AMP loop froze such a layer whole)."""
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


@contextmanager
def unfused_transformer_layers() -> Iterator[None]:
    """``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` run op by op meanwhile, as
    they do in training. In eval mode without gradients (a freezer set up after an evaluation,
    or at a validation forward) they take a fused fast path: one op with no FLOP formula, so
    their units counted as free, and one op reading two units' weights, so they looked shared."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    enabled = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(enabled)


@contextmanager
def compiled_modules_run_eagerly(model: nn.Module) -> Iterator[None]:
    """Modules compiled in place (``module.compile()``, as ``compile_blocks`` does) run their
    eager forward meanwhile, and so do functions compiled with ``torch.compile`` (a fused
    activation called in a forward: torch's ``set_stance("force_eager")``). Run under a dispatch
    mode (the tracers here), a compiled block or function is not compiled, and dynamo marks its
    code to be skipped for the rest of the process: what the user compiled would silently run
    eagerly ever after."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if compiled_in_place(m)]
    for m, _ in compiled:
        m._compiled_call_impl = None
    set_stance = getattr(torch.compiler, "set_stance", None)
    try:
        with set_stance("force_eager") if set_stance is not None else nullcontext():
            yield
    finally:
        for m, impl in compiled:
            m._compiled_call_impl = impl


@contextmanager
def flex_attention_traceable() -> Iterator[None]:
    """FlexAttention runs under the tracer as its dense reference (the ops of attention, which the
    tracer sees; the trace runs once, without gradients). It is a higher-order op, which a
    dispatch mode needs a rule for ("no rule registered for HigherOrderOperator"), and called
    eagerly it compiles itself, which dynamo refuses under a dispatch mode: meanwhile it is run
    as its own debug switch runs it, uncompiled. Nothing happens for a model that never imported
    it."""
    import sys

    module = sys.modules.get("torch.nn.attention.flex_attention")
    hop = getattr(sys.modules.get("torch._higher_order_ops.flex_attention"), "flex_attention", None)
    if module is None or hop is None or not hasattr(module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG"):
        yield
        return
    if _ForwardTracer not in hop.python_key_table:
        from torch._higher_order_ops.flex_attention import sdpa_dense

        @hop.py_impl(_ForwardTracer)
        def _dense(mode, *args, **kwargs):
            with mode:
                return sdpa_dense(*args, **kwargs)

    debug = module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
            yield
    finally:
        module._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = debug


def trace_forward(model: nn.Module, args: Sequence[Any], kwargs: Optional[Dict[str, Any]],
                  watched: Dict[int, str], fixed: Optional[set] = None) -> _ForwardTracer:
    """Run one forward pass under the tracer without changing the model or the RNG."""
    watched = dict(watched)  # grows below; the caller's map stays as it was
    tracer = _ForwardTracer(watched, fixed)
    # FSDP2 swaps each sharded parameter for an unsharded one while its module runs: watch
    # whatever tensor a module, or one below it, holds under a watched parameter's name when the
    # module runs (below it too: nn.MultiheadAttention reads its out_proj's weight, never calls it).
    names = {(id(m), attr): watched[id(p)] for m in model.modules()
             for attr, p in m._parameters.items() if p is not None and id(p) in watched}

    for p in model.parameters():
        tracer.mark(p, _FROM_WEIGHTS)
    for b in model.buffers():
        tracer.mark(b, 0)  # fixed by the model, as a constant

    def enter(module, inputs):
        calls = tracer.module_calls.setdefault(id(module), [])
        calls.append([len(tracer.op_flops), -1])
        tracer.stack.append((id(module), len(calls) - 1))
        for holder in module.modules():
            for attr, p in holder._parameters.items():
                if p is not None and tracer.lineage(p)[0] == _FROM_BATCH:  # FSDP2's unsharded parameter
                    tracer.mark(p, _FROM_WEIGHTS)
                name = names.get((id(holder), attr))
                if name is not None and p is not None:
                    watched.setdefault(id(p), name)

    def leave(module, inputs, output):
        if tracer.stack and tracer.stack[-1][0] == id(module):
            _, number = tracer.stack.pop()
            tracer.module_calls[id(module)][number][1] = len(tracer.op_flops)

    hooks = [m.register_forward_pre_hook(enter) for m in model.modules()]
    hooks += [m.register_forward_hook(leave, always_call=True) for m in model.modules()]
    writes = ParameterWrites(model)
    try:
        with preserved_state(model, new_writes=False), torch.no_grad(), uncached_autocast(), \
                unfused_transformer_layers(), host_draws_at(_KEEPING_DRAWS["rand"]):
            with compiled_modules_run_eagerly(model), flex_attention_traceable(), writes, tracer:
                tracer.outputs = [(path, tracer.lineage(t)[1]) for path, t in _output_tensors(model(*args, **(kwargs or {})))
                                  if t.is_floating_point()]
    except Exception as exc:  # the model's own error, plus what the engine was doing
        note = ("SmartFreezer: this came from the model's forward pass on the inputs used to find its "
                "units: example_inputs (a tuple of positional inputs, or one tensor) or a dict of keyword "
                "inputs, and example_kwargs, must be one batch the model accepts, on its device and in "
                "its dtype.")
        if len(args) == 1 and hasattr(args[0], "_fields") and isinstance(args[0], tuple):
            note += (f" A NamedTuple ({type(args[0]).__name__}) is one input (since 2026-12-07); for its fields as "
                     "positional inputs pass tuple(batch).")
        elif len(args) >= 2 and not kwargs and isinstance(args[-1], torch.Tensor) and \
                not args[-1].is_floating_point() and args[-1].dim() <= 1:
            note += (" If the last input is the batch's labels (example_inputs=next(iter(loader)) passes the "
                     "whole batch), pass next(iter(loader))[0], the model's inputs.")
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        else:  # Python 3.10: no exception notes; said beside it
            warnings.warn(note, stacklevel=2)
        raise
    finally:
        _WRITTEN_PARAMETERS[model] = writes.touched()
        writes.put_back()
        for hook in hooks:
            hook.remove()
    return tracer


def discover_units(model: nn.Module, args: Sequence[Any], kwargs: Optional[Dict[str, Any]] = None,
                   shared_parameters: str = "train") -> UnitPlan:
    if shared_parameters not in SHARED_PARAMETER_MODES:
        raise ValueError(f"shared_parameters must be one of {SHARED_PARAMETER_MODES}, got {shared_parameters!r}")
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
    tracer = trace_forward(model, args, kwargs, trainable,
                           fixed={id(p) for p in model.parameters() if not p.requires_grad})
    untraced = [name for name in trainable.values() if name not in tracer.reads]
    if not tracer.reads:
        raise ValueError(
            f"SmartFreezer: the forward pass used to find the units read none of the model's {len(trainable)} "
            "trainable parameters, so there is no layer to freeze. A forward through "
            "torch.func.functional_call with a parameter dict of copies or detached tensors (per-sample "
            "gradients with vmap, MAML) reads those, not the model's own: pass example_inputs= (one "
            "batch) to SmartFreezer so that set-up runs an ordinary forward of the model.")

    # Layers: the owning module of each traced parameter, ordered by first use.
    layer_first_use: Dict[int, int] = {}
    layer_owner: Dict[int, Tuple[str, nn.Module]] = {}
    layer_params: Dict[int, List[str]] = {}
    for name in sorted(tracer.reads, key=tracer.first_use):
        module_name, module = _layer_of(model, *owners[id(params_by_name[name])][0][:2])
        key = id(module)
        layer_first_use.setdefault(key, tracer.first_use(name))
        layer_owner[key] = (module_name, module)
        layer_params.setdefault(key, []).append(name)
    order = sorted(layer_first_use, key=layer_first_use.get)

    # Merge each norm layer into the layer it follows (the first one into the next), except one
    # inside the layer read next, which joins that one: a QAT ConvBn2d reads its `bn` first (to
    # fold it into the conv's weight), and its norm went to the conv before it.
    groups: List[List[int]] = []
    for at, key in enumerate(order):
        inside_next = at + 1 < len(order) and layer_owner[order[at + 1]][0] != "" and \
            layer_owner[key][0].startswith(layer_owner[order[at + 1]][0] + ".")
        if is_norm_module(layer_owner[key][1]) and groups and not inside_next:
            groups[-1].append(key)
        elif groups and all(is_norm_module(layer_owner[k][1]) for k in groups[-1]):
            groups[-1].append(key)  # a leading norm layer waits for the layer after it
        else:
            groups.append([key])

    op_starts = [layer_first_use[g[0]] for g in groups]
    num_ops = len(tracer.op_flops)

    def unit_at(op: int) -> int:  # the unit in whose span an op lies (ops before unit 0: unit 0)
        # op_starts ascend (groups follow `order`): a binary search, set-up reads every parameter op
        return max(0, bisect.bisect_right(op_starts, op) - 1)

    names_of = {id(m): n for n, m in model.named_modules()}
    module_calls = {key: (m, names_of.get(key, type(m).__name__), [(a, max(a, b)) for a, b in tracer.module_calls[key]])
                    for m in model.modules() for key in [id(m)] if key in tracer.module_calls}
    # Each dropout goes to the unit whose span holds the end of its last call: it turns off only
    # once every call of it lies in the frozen prefix.
    dropouts_of: Dict[int, List[nn.Module]] = {}
    for module, _, calls in module_calls.values():
        if is_dropout_module(module):
            dropouts_of.setdefault(unit_at(max(calls[-1][0], calls[-1][1] - 1)), []).append(module)
    # Each parameter joins the unit in whose span its first read lies. That is its layer's unit,
    # except for one its module reads only after other layers ran (CLIP's `proj` and
    # `logit_scale` on the module that also holds the class token, BEiT's `lambda_2` after the
    # MLP, an nn.ParameterList of every layer's weight): it joins that later unit, so that it
    # never freezes while layers read before it still train.
    members: List[List[str]] = [[] for _ in groups]
    late: List[List[str]] = [[] for _ in groups]
    for index, group in enumerate(groups):
        for name in (n for key in group for n in layer_params[key]):
            at = unit_at(tracer.first_use(name))
            if op_starts[at] == op_starts[index]:  # first read by the op that starts its own unit (a
                at = index  # fused op reading two layers' weights, MHA's fast path): it stays
            (members if at == index else late)[at].append(name)
    # Attention: a unit takes part if its weights produce an operand of an attention op (the
    # query, key and value projections; an MHA's in- and out-projections, read by its fused op)
    params_at: Dict[int, List[str]] = {}
    for name, reads in tracer.reads.items():
        for op, _ in reads:
            params_at.setdefault(op, []).append(name)
    unit_index_of = {name: index for index in range(len(groups)) for name in members[index] + late[index]}
    attention_of: Dict[int, str] = {}
    for call, producers in tracer.attention_ops:
        where = (names_of.get(call[0]) if call else "") or "<root>"
        for op in sorted(_producers_within(tracer, producers, call)):
            for name in params_at.get(op, []):
                attention_of.setdefault(unit_index_of[name], where)
    units: List[Unit] = []
    for index, group in enumerate(groups):
        names = members[index] + sorted(late[index], key=tracer.first_use)
        start = 0 if index == 0 else op_starts[index]
        end = op_starts[index + 1] if index + 1 < len(groups) else num_ops
        modules = [layer_owner[key][1] for key in group]
        units.append(Unit(
            index=index,
            module_names=[layer_owner[key][0] for key in group],
            modules=modules,
            param_names=names,
            parameters=[params_by_name[n] for n in names],
            forward_flops=sum(tracer.op_flops[start:end]),
            backward_flops=tracer.backward_flops(start, end),
            norm_modules=[m for m in modules if is_norm_module(m)],
            dropout_modules=dropouts_of.get(index, []),
            attention=attention_of.get(index, ""),
        ))

    # Shared parameters: read again after their own unit's span.
    unit_of = {n: u.index for u in units for n in u.param_names}
    shared = []
    for name, reads in tracer.reads.items():
        last_unit = unit_at(reads[-1][0])
        if last_unit > unit_of[name]:
            shared.append(SharedParameter(
                name, params_by_name[name], [_qualified(m, a) for m, _, a in owners[id(params_by_name[name])]],
                unit_of[name], last_unit, [(op, call, tracer.op_flops[op]) for op, call in reads]))
    shared.sort(key=lambda s: (s.unit, s.reads[0][0]))
    plan = UnitPlan(units, [True] * (len(units) + 1), untraced, sum(tracer.op_flops), shared_parameters, shared,
                    [0] + op_starts[1:] + [num_ops], module_calls,
                    total_backward_flops=tracer.backward_flops(0, num_ops),
                    first_read=min(op_starts[0], tracer.first_param_read if tracer.first_param_read is not None
                                   else op_starts[0]))

    plan.head_outputs = _head_outputs(tracer, unit_at, len(units), plan.boundary)

    if shared_parameters == "train":
        # A shared parameter keeps training past a cut only if its every read inside the prefix
        # happens in a module call that ends there: that call's output is then detached.
        for cut in range(1, len(units) + 1):
            for s in plan.split_shared(cut):
                bad = next(((op, call) for op, call, _ in s.reads if op < plan.boundary[cut] and (
                    call is None or module_calls[call[0]][2][call[1]][1] > plan.boundary[cut])), None)
                if bad is not None:
                    where = module_calls[bad[1][0]][1] if bad[1] is not None else "no module call"
                    plan.allowed_cut[cut] = False
                    plan.refused_cuts[cut] = (
                        f"{s.name!r} is read inside the prefix by {where or '<root>'}, whose call goes on "
                        "past the cut, so its reads there cannot be cut off from the gradient")
                    break
    if untraced:
        warnings.warn(
            f"SmartFreezer: {len(untraced)} trainable parameter(s) were not used by the example "
            f"forward pass and are not managed (they keep training): {untraced[:5]}"
            f"{' ...' if len(untraced) > 5 else ''}",
            stacklevel=3,
        )
    return plan


def _output_tensors(output: Any, depth: int = 0) -> List[Tuple[str, torch.Tensor]]:
    """The tensors in a model's output, each with where it is (``[0]``, ``['logits']``,
    ``.logits`` of a dataclass pytree does not know); by position where a pytree node of the
    output names no keys (one registered without them)."""
    try:
        leaves = [(keystr(path), leaf) for path, leaf in tree_flatten_with_path(output)[0]]
    except ValueError:
        leaves = [(f" leaf {index}", leaf) for index, leaf in enumerate(tree_flatten(output)[0])]
    found = []
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            found.append((path, leaf))
        elif _holds_settings(leaf) and depth < 3:  # a dataclass or plain object of outputs (review98)
            found += [(f"{path}.{name}{inner}", t) for name, value in vars(leaf).items()
                      for inner, t in _output_tensors(value, depth + 1)]
    return found


def _head_outputs(tracer: _ForwardTracer, unit_at: Callable[[int], int], num_units: int,
                  boundary: List[int]) -> List[Tuple[str, int]]:
    """Outputs made by a head called before the last unit, off a trunk that goes on (a multi-task
    net's first task, an auxiliary classifier): the last layer producing the output feeds no later
    unit, no output combines it with a later unit's (two towers scored against each other in the
    model), and some layer before it feeds a later unit (two towers returned apart, scored in the
    loss, are none: review81). An output a trunk layer makes (features returned beside the logits)
    feeds later units, and is none; so is a gate's, multiplied into the experts' outputs."""
    read_until = tracer.read_by
    last_unit = {path: max(map(unit_at, producers)) for path, producers in tracer.outputs if producers}
    # an output whose last ops read no trained weight (a BYOL target network the user froze, run
    # first: its ops lay in unit 0's span, review98) is no head of the freezer's units
    trained = {op for uses in tracer.reads.values() for op, _ in uses}
    heads = []
    for path, producers in tracer.outputs:
        if not producers or last_unit[path] >= num_units - 1 or not producers & trained:
            continue
        head = last_unit[path]
        after = boundary[head + 1]
        feeds_later = any(read_until.get(op, -1) >= after for op in producers if unit_at(op) == head)
        combined = any(other & producers and last_unit[path_] > head for path_, other in tracer.outputs if other)
        trunk_goes_on = any(last >= after for op, last in read_until.items() if op < after)
        if not feeds_later and not combined and trunk_goes_on:
            heads.append((path, head))
    return heads


def _producers_within(tracer: _ForwardTracer, producers: FrozenSet[int], call: Optional[Tuple[int, int]]) -> Set[int]:
    """``producers`` and the layers before them inside the attention module's call (LoRA's A
    before its B, DeepSeek's ``q_a_proj`` before ``q_b_proj``), not the layers that made the
    module's input. Without a module around the attention (the model's own forward), only
    ``producers``."""
    found = set(producers)
    if call is None:
        return found
    first, end = tracer.module_calls[call[0]][call[1]]
    end = len(tracer.op_flops) if end < 0 else end
    todo = list(producers)
    while todo:
        for op in tracer.inputs_of.get(todo.pop(), ()):
            if first <= op < end and op not in found:
                found.add(op)
                todo.append(op)
    return found


def shared_groups(shared: Sequence[SharedParameter]) -> List[List[SharedParameter]]:
    """Shared parameters whose spans of units overlap, grouped (ALBERT's shared layer: one group,
    tied input/output embeddings: one group), for one message per group."""
    groups: List[List[SharedParameter]] = []
    for s in sorted(shared, key=lambda s: s.unit):
        if groups and s.unit <= max(t.last_unit for t in groups[-1]):
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def describe_shared(group: Sequence[SharedParameter], units: Sequence[Unit], limit: int = 2) -> str:
    """``'transformer.wte.weight' (also lm_head.weight), read from unit 0 (transformer.wte) to
    unit 17 (...)`` for a group of shared parameters."""
    def one(s: SharedParameter) -> str:
        others = [r for r in s.registered_as if r != s.name]
        return repr(s.name) + (f" (also {', '.join(others)})" if others else "")

    names = ", ".join(one(s) for s in group[:limit])
    if len(group) > limit:
        names += f" and {len(group) - limit} more"
    first, last = min(s.unit for s in group), max(s.last_unit for s in group)
    return (f"{names}, read from unit {first} ({units[first].name}) to unit {last} "
            f"({units[last].name}),")
