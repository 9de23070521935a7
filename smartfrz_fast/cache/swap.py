"""Running a frozen prefix from cached rows by module swap: the model's own forward runs, and
while the cache serves a batch its frozen blocks are swapped for stand-ins.

One recorded forward pass (eval, no grad, RNG and buffers restored) lists every module call in
the order the calls *end*, with the first use of every parameter (aten ops seen by a dispatch
mode), and the data flow op by op (which ops made each op's inputs). A cut is a module ``C``
called once whose output holds the batch dimension; cutting after ``C`` is allowed when every
parameter read before ``C`` ends is frozen (a shared weight that keeps training from the head's
side would make the cached rows stale). Serving a batch cut after ``C``:

- the outermost module calls that end before ``C`` starts, none of whose ops the forward after
  ``C`` needs (``S``; followed op by op, ``SwapChain._needed_ops``), return a placeholder of their
  recorded output structure (their input when it has the output's shape, else zeros); later
  calls of them, after ``C``, run for real;
- ``C`` returns the cached rows in the structure the real ``C`` returned (a tensor, a tuple, a
  Hugging Face output) and constants recorded with the rows;
- everything else (embedding sums, masks, rotary tables, the trainable suffix) runs as the
  model's forward has it, in the model's mode.

Rows are computed by running the model in eval mode without grad until ``C`` returns (the rest
of the forward is skipped). Each cut is checked on a few samples of the first batch before it
is used: the swapped forward must reproduce the real model's output. Where a frozen block's
output is read by something other than what follows it (a U-Net skip, an encoder read by each
decoder layer), the check fails and the cache cuts earlier, saying why.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import itertools
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..units import (compiled_modules_run_eagerly, fill_draw, host_draws_at, preserved_modes, preserved_state,
                     seed_host_rngs, uncached_autocast, uninitialized)

SWAP = "module swap"  # the chain's ``how``: the model's own forward runs, every hook with it
CHECK_SAMPLES = 4  # samples of the first batch that a cut is checked on
MAX_CHECKS = 24  # cuts tried (most work skipped first) per freeze before the cache says none fits


NOT_REPRODUCIBLE = ("the model is not deterministic in eval mode: two forward passes on the same samples "
                    "differ (a random op that eval mode does not turn off), so no cached row could match it")


def buffers_now(model: nn.Module) -> Dict[str, Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers() if not uninitialized(b)}


def not_reproducible(model: nn.Module, before: Dict[str, Tensor]) -> str:
    """NOT_REPRODUCIBLE, naming the buffers a forward pass in eval mode wrote since ``before``
    (a statistic updated without a ``self.training`` guard, not a random op, is then the cause)."""
    written = _buffers_written(model, before)
    if not written:
        return NOT_REPRODUCIBLE
    return (f"the model's forward pass writes buffer{'s' * (len(written) > 1)} "
            f"{', '.join(written[:3])}{' and others' if len(written) > 3 else ''} even in eval mode (an update "
            "without an `if self.training:` guard: a running statistic, a step counter), and the cache cannot "
            "tell whether the writes belong to the frozen prefix, which cached rows skip (review98: a counter "
            "that changed no output). Guard that update with `if self.training:`, or keep its module after "
            "the frozen prefix")


def _buffers_written(model: nn.Module, before: Dict[str, Tensor]) -> List[str]:
    return [name for name, b in model.named_buffers() if name in before and not torch.equal(b, before[name])]


class CutNotReached(RuntimeError):
    """This batch's forward left the recorded path before the cut (an early exit, a loop that
    halts sooner, a branch): a module the recording called only after the cut was about to run,
    the forward ended with the cut's block not run, or reached it without running a block the
    rows stand in for. Raised before any module after the cut ran."""


class UntracedCall(CutNotReached):
    """A module the recorded forward did not call, and whose parameters train, ran before the
    cut (a branch of the model's own code): a cached row cannot stand in for what it computed
    (raised by the chain's guard)."""


class _Stop(BaseException):
    """Ends a forward pass once the cut's output is known (BaseException: a model's own
    ``except Exception`` does not swallow it)."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output


@dataclass
class Call:
    """One module call of the recorded forward pass."""

    name: str
    module: nn.Module
    start: int  # aten op count when the call began / ended
    end: int
    depth: int
    spec: Any = None  # pytree spec of the output
    # per leaf: ("row", shape[1:], dtype) | ("const", shape, dtype) | ("nested", dtype) | ("value", v)
    leaves: List[Any] = field(default_factory=list)
    out_ids: Set[int] = field(default_factory=set)  # ids of the output's tensors
    escapes_after: int = -1  # latest start of a later call, or op + 1, that reads a tensor it returned
    calls_of_module: int = 1
    made_ops: Set[int] = field(default_factory=set)  # the ops that made the tensors it returned
    returns_input: bool = False  # returns a tensor it was given (unchanged, or changed in place)
    returns_packed: bool = False  # returns a PackedSequence (alone or in a tuple: an RNN's output)


@dataclass
class DataFlow:
    """The recorded pass op by op (``_OpRecorder``): the ops that made each op's tensor inputs,
    and those that made the model's output."""

    op_inputs: List[Tuple[int, ...]]
    output_makers: Tuple[int, ...]
    host_reads: Tuple[int, ...] = ()  # ops whose values went to Python (`.item()`, `if t:`, `.tolist()`): control flow


class _OpRecorder(TorchDispatchMode):
    """Counts aten ops, notes the first op reading each watched parameter, and records the data
    flow op by op: ``op_inputs[i]``, the ops that made op ``i``'s tensor inputs (an in-place op,
    or a write into a view, remakes the tensor it writes), and ``read_returned[call]``, the last
    op reading a tensor that module call returned. A cut's stand-ins are then exactly the calls
    none of whose ops the rest of the forward needs (``SwapChain._needed_ops``), followed through
    functional ops (``F.relu(block(x))``, a head's ``h[:, 0]``), tensors a module keeps on
    ``self`` and residual adds alike; a module only passed a tensor it never reads (a rotary
    embedding given the hidden states for their dtype) needs nothing of it."""

    def __init__(self, watched: Dict[int, nn.Parameter]):
        super().__init__()
        self.count = 0
        self.watched = watched
        self.first_use: Dict[int, int] = {}
        self.made_at: Dict[int, int] = {}  # id(tensor) -> the op that made it (live tensors ops made)
        self.op_inputs: List[Tuple[int, ...]] = []
        self.returned_by: Dict[int, Set[int]] = {}  # id(tensor) -> the calls that returned this very tensor
        self.read_returned: Dict[int, int] = {}  # call index -> last op reading a tensor it returned
        self.written: Dict[int, int] = {}  # storage address -> the last op that wrote into it in place
        # ops that returned a Python number (`.item()`, `if t:`, torch.equal) or a shape made from
        # values (`nonzero()`), and reads no op shows (`.tolist()`)
        self.host_reads: List[int] = []

    def _made(self, t: Tensor, op: int) -> None:
        if id(t) not in self.made_at:
            # held weakly: a tensor the model keeps (a rotary table, a KV cache) does not keep the
            # recording; a dead tensor's id may come back, so its entries go with it
            weakref.finalize(t, _forget, weakref.ref(self), id(t)).atexit = False
        self.made_at[id(t)] = op

    def returned(self, call: int, tensors: Sequence[Tensor]) -> None:
        for t in tensors:
            self.returned_by.setdefault(id(t), set()).add(call)

    def _reads(self, inputs: Sequence[Tensor]) -> List[int]:
        """Notes that the next op reads ``inputs``; returns the ops that made them."""
        makers = []
        for t in inputs:
            if id(t) in self.watched and id(t) not in self.first_use:
                self.first_use[id(t)] = self.count
            made = self.made_at.get(id(t), -1)
            if made >= 0:
                makers.append(made)
            # written in place since it was made, through it or another view of its storage
            # (buf[:, :16] = h): reading it reads that write too
            write = self.written.get(_storage(t), -1)
            if write > made:
                makers.append(write)
            for call in self.returned_by.get(id(t), ()):
                self.read_returned[call] = self.count
        return makers

    def read_into_python(self, t: Tensor) -> None:
        """A read of ``t``'s values that no aten op shows (``.tolist()``, ``.numpy()``), as an op
        of its own."""
        self.op_inputs.append(tuple(set(self._reads([t]))))
        self.host_reads.append(self.count)
        self.count += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, Tensor)]
        makers = self._reads(inputs)
        op = self.count
        self.count += 1
        out = func(*args, **(kwargs or {}))
        if isinstance(out, (bool, int, float, complex)) or _shape_from_values(func, args):
            self.host_reads.append(op)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            if not any(t is i for i in inputs):
                self._made(t, op)
            elif _writes(func):  # in place (add_, copy_ into a view, out=)
                self._made(t, op)
                self.written[_storage(t)] = op
            # else an op that returns its input as it is (lift_fresh, alias): still what made it
        self.op_inputs.append(tuple(set(makers)))
        return out


def _shape_from_values(func, args) -> bool:
    """The op's output shape depends on its input's values (``nonzero()``, a boolean mask, a
    ``unique()``): Python code may read that shape (``if idx.shape[0] == 0``)."""
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is torch.ops.aten.index.Tensor:  # tagged for its boolean form only
        return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return True


@contextmanager
def _values_read_into_python(recorder: _OpRecorder) -> Iterator[None]:
    """Tells the recorder of reads that run no aten op (``.tolist()``, ``.numpy()``, numpy's
    ``__array__``): a halting test so written steers the forward as ``.item()`` does. The methods
    are wrapped while it records, not watched by a TorchFunctionMode: an active one turns torch's
    fast paths off (TransformerEncoder's), and the recording would take another path."""
    saved = {name: Tensor.__dict__.get(name) for name in ("tolist", "numpy", "__array__")}

    def wrapped(original):
        def read(self, *args, **kwargs):
            recorder.read_into_python(self)
            return original(self, *args, **kwargs)
        return read

    for name in saved:
        setattr(Tensor, name, wrapped(getattr(Tensor, name)))
    try:
        yield
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(Tensor, name)  # inherited from torch._C.TensorBase
            else:
                setattr(Tensor, name, method)


def _forget(recorder: "weakref.ref[_OpRecorder]", key: int) -> None:
    recorder = recorder()
    if recorder is not None:
        recorder.made_at.pop(key, None)
        recorder.returned_by.pop(key, None)


_WRITES: Dict[Any, bool] = {}


def _writes(func) -> bool:
    """The aten op writes into one of its arguments (its schema marks it ``a!``)."""
    if func not in _WRITES:
        _WRITES[func] = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
    return _WRITES[func]


def _storage(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, nested: no plain storage
        return -1


def _varies(value: Any) -> bool:
    """A non-tensor output leaf that could carry data computed from the batch: a number or a
    flag (not None, a string, a type), which the op graph cannot follow."""
    return isinstance(value, (int, float, complex, bool))


def _within(inner: Call, outer: Call) -> bool:
    """``inner`` is ``outer`` or a call made inside it (op counts alone cannot tell a call with
    no ops at a sibling's edge from a child: the depth can)."""
    return inner is outer or (outer.start <= inner.start and inner.end <= outer.end and inner.depth > outer.depth)


def _describe_leaf(leaf: Any, batch: int):
    if isinstance(leaf, Tensor) and leaf.is_nested:
        # nn.TransformerEncoder's layers pass a nested tensor on in eval under a padding mask: no
        # fixed shape to serve rows of, nor a placeholder to stand in with (the call runs)
        return ("nested", leaf.dtype)
    if isinstance(leaf, Tensor):
        if leaf.dim() > 0 and leaf.shape[0] == batch:
            return ("row", tuple(leaf.shape[1:]), leaf.dtype)
        return ("const", tuple(leaf.shape), leaf.dtype)
    return ("value", leaf)


# How far holds_tensors looks into an object: levels of attributes and containers, and items in
# all, plain ones included (a vocabulary of a million words passed to forward costs no more).
# What lies beyond is taken to hold none: such an object is data, not a layer's output.
_LOOK_DEPTH, _LOOK_ITEMS = 8, 10_000
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def object_fields(value: Any) -> List[Any]:
    """The attribute values of an object pytree does not take apart: its ``__dict__``'s and its
    ``__slots__``' (an object with slots has no ``__dict__``, or keeps only some fields there)."""
    attributes = getattr(value, "__dict__", None)
    fields = list(attributes.values()) if isinstance(attributes, dict) else []
    for cls in type(value).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):  # a slot may be unset
                fields.append(getattr(value, slot))
    return fields


def holds_tensors(value: Any) -> bool:
    """An object pytree does not take apart (a plain dataclass, transformers' DynamicCache) that
    carries tensors inside: in its attributes (``__dict__`` or ``__slots__``) or the lists,
    tuples, sets, deques, dicts and objects they hold, up to ``_LOOK_DEPTH`` levels down and
    ``_LOOK_ITEMS`` items in all, cycles included. A module is no such object: its parameters are
    not the call's data."""
    seen: Set[int] = set()
    todo = [(value, 0)]
    budget = _LOOK_ITEMS
    while todo and budget > 0:
        item, depth = todo.pop()
        budget -= 1
        if isinstance(item, Tensor):
            return depth > 0
        if isinstance(item, _PLAIN) or isinstance(item, nn.Module) or id(item) in seen or depth >= _LOOK_DEPTH:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            inside = item.values()
        elif isinstance(item, (list, tuple, set, frozenset, collections.deque)):
            inside = item
        else:
            inside = object_fields(item)
        todo.extend((x, depth + 1) for x in itertools.islice(inside, budget))
    return False


def record_calls(model: nn.Module, args: tuple, kwargs: dict, batch: int
                 ) -> Tuple[List[Call], Dict[int, int], DataFlow, Any]:
    """Every module call of one forward pass (eval, no grad), the first aten op reading each
    parameter, the pass's data flow op by op, and the model's output."""
    names: Dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    params = {id(p): p for p in model.parameters()}
    counter = _OpRecorder(params)
    calls: List[Call] = []
    stack: List[Tuple[nn.Module, int, Any]] = []
    keep: List[Any] = []  # recorded tensors stay alive, so their ids stay unique
    readers: List[Tuple[int, Set[int]]] = []  # (start, ids of the tensors a call reads)
    count_of: Dict[int, int] = {}

    def pre(module, a, kw):
        leaves = [t for t in tree_flatten((a, kw))[0] if isinstance(t, Tensor)]
        keep.extend(leaves)
        readers.append((counter.count, {id(t) for t in leaves}))
        stack.append((module, counter.count, {id(t) for t in leaves}))
        count_of[id(module)] = count_of.get(id(module), 0) + 1

    def post(module, a, kw, out):
        _, start, given = stack.pop()
        leaves, spec = tree_flatten(out)
        keep.append(out)
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        counter.returned(len(calls), tensors)
        calls.append(Call(names.get(id(module), "?"), module, start, counter.count, len(stack), spec,
                          [_describe_leaf(x, batch) for x in leaves], {id(x) for x in tensors},
                          made_ops={counter.made_at[id(x)] for x in tensors if id(x) in counter.made_at},
                          returns_input=any(id(x) in given for x in tensors),
                          returns_packed=any(isinstance(o, nn.utils.rnn.PackedSequence)
                                             for o in (out, *(out if isinstance(out, (tuple, list)) else ())))))

    hooks = []
    for module in model.modules():
        hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with preserved_modes(model.modules()), preserved_state(model), torch.no_grad(), uncached_autocast(), \
                compiled_modules_run_eagerly(model), counter, _values_read_into_python(counter):
            model.eval()
            output = model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    final = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor)]
    final_ids = {id(t) for t in final}
    for i, call in enumerate(calls):
        call.calls_of_module = count_of[id(call.module)]
        for start, ids in readers:
            if start >= call.end and call.out_ids & ids:
                call.escapes_after = max(call.escapes_after, start)
        if counter.read_returned.get(i, -1) >= call.end:  # an op at index r: as a call starting at r + 1
            call.escapes_after = max(call.escapes_after, counter.read_returned[i] + 1)
        if call.out_ids & final_ids:
            call.escapes_after = max(call.escapes_after, counter.count)
    flow = DataFlow(counter.op_inputs, tuple({counter.made_at[id(t)] for t in final if id(t) in counter.made_at}),
                    tuple(counter.host_reads))
    return calls, counter.first_use, flow, output


def _callers(calls: List[Call]) -> List[int]:
    """Each recorded call's caller (its index; -1 for the outermost). Calls are recorded as they
    end, so in reverse a caller comes before its callees, and the last call met one level up is
    the caller."""
    callers, open_at_depth = [-1] * len(calls), []  # open_at_depth[d]: the call open at depth d
    for i in range(len(calls) - 1, -1, -1):
        depth = calls[i].depth
        del open_at_depth[depth:]
        open_at_depth.extend([-1] * (depth - len(open_at_depth)))  # never in a recorded tree
        if depth:
            callers[i] = open_at_depth[depth - 1]
        open_at_depth.append(i)
    return callers


def _param_names(model: nn.Module) -> Dict[int, List[str]]:
    out: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


class SwapChain:
    """A ``BlockChain`` look-alike for the activation cache (see the module docstring). Block
    ``k`` is the cut after candidate call ``k``; its parameters are those first read since the
    previous candidate ended, so "the first ``k`` blocks are frozen" means every parameter read
    before candidate ``k-1`` ends is frozen. A final block holds the rest of the model."""

    how = SWAP
    bind = None
    side_inputs: Tuple[str, ...] = ()

    def __init__(self, model: nn.Module, calls: List[Call], first_use: Dict[int, int], flow: DataFlow, sample,
                 batch: int):
        from .split import Block, _ParamHolder

        self.model = model
        self.flow = flow
        self.sample = sample  # Inputs: a few samples of the first batch, to check cuts on
        self.all_calls = calls
        self._ends = [c.end for c in calls]  # non-decreasing: calls are recorded as they end
        self._caller = _callers(calls)
        # _in_calls_before[op]: how many ops before it ran inside a module call below the model
        # (the most a cut's stand-ins can skip; ops the forward runs itself are never skipped)
        inside = [0] * len(flow.op_inputs)
        for call in calls:
            if call.depth == 1:
                inside[call.start:call.end] = [1] * (call.end - call.start)
        self._in_calls_before = [0, *itertools.accumulate(inside)]
        self.candidates = [c for c in calls if c.depth > 0 and c.calls_of_module == 1
                           and any(leaf[0] == "row" for leaf in c.leaves)
                           and not any(leaf[0] == "nested" for leaf in c.leaves)]
        # calls whose output hides its tensors inside an object pytree does not know: no cut
        self.opaque = [c for c in calls if c.depth > 0 and c.calls_of_module == 1
                       and any(leaf[0] == "value" and holds_tensors(leaf[1]) for leaf in c.leaves)]
        params = {id(p): p for p in model.parameters()}
        order = sorted(first_use.items(), key=lambda item: item[1])
        self.names = _param_names(model)
        self.blocks = []
        taken, ran = 0, 0
        by_start = sorted((c for c in calls if c.depth > 0), key=lambda c: c.start)
        opened = 0
        for call in self.candidates:
            own = []
            while taken < len(order) and order[taken][1] < call.end:
                own.append(params[order[taken][0]])
                taken += 1
            # the calls that end in this stretch (calls are recorded in the order they end): the
            # ones a cut after it skips or stands in for (their hooks would not run right)
            runs = []
            while ran < len(calls) and calls[ran].end <= call.end:
                runs.append(calls[ran].module)
                ran += 1
            # only the parameters first read in this stretch: a container candidate ending later
            # must not count its (earlier) children's parameters again
            # the calls that start in this stretch and end after it (a hooked block around C)
            enters = []
            while opened < len(by_start) and by_start[opened].start < call.end:
                if by_start[opened].end > call.end:
                    enters.append(by_start[opened].module)
                opened += 1
            self.blocks.append(Block(call.name, None, [_ParamHolder(*own)], needs_inputs=True, runs=runs,
                                     enters=enters))
        rest = [params[pid] for pid, _ in order[taken:]]
        self.blocks.append(Block("rest", None, [_ParamHolder(*rest)], needs_inputs=True))
        self._guarded: List[Any] = []  # hook handles of the guard on modules the recording did not call
        self._before_cut = False  # the guard's switch: on while a forward has not passed the cut
        self.untraced_note = self._place_untraced(model, calls, {pid for pid, _ in order}, params)
        self.checked: Dict[int, Optional[str]] = {}  # cut (blocks before it) -> None if it works, else why
        self._random: Dict[int, Optional[str]] = {}  # cut -> why its prefix is drawn at random, or None
        self._dropout_in_prefix: Dict[int, str] = {}  # cut -> note: dropout the cached rows leave out
        self._dropout_warned = False
        self.consts: Dict[int, List[Any]] = {}  # cut -> recorded non-per-sample leaves of C's output
        self.values: Dict[int, List[Any]] = {}  # cut -> the non-tensor leaves of C's output, last computed
        self.note: Optional[str] = None  # why the cut is shallower than the frozen prefix
        self._skipped: Dict[int, int] = {}
        self._chosen: Dict[int, List[Call]] = {}
        self._needed: Dict[int, Tuple[Optional[str], List[int]]] = {}
        self._after: Dict[int, Set[int]] = {}  # cut -> _called_after
        self._guard_key = -1 - id(self)  # its key in GLOBAL_PRE_HOOKS while it serves or makes rows
        self._recorded = {id(c.module) for c in calls}
        self._own = {id(m) for m in model.modules()}
        self.passed_over: Optional[str] = None  # as BlockChain's
        # (op, end of the innermost module call below the model around it, or of the pass) per
        # value the recorded pass read into Python
        self._host_reads = [(op, min((call.end for call in calls if call.depth > 0 and call.start <= op < call.end),
                                     default=len(flow.op_inputs) + 1)) for op in flow.host_reads]

    def __len__(self) -> int:
        return len(self.blocks)

    def _place_untraced(self, model: nn.Module, calls: List[Call], read: Set[int],
                        params: Dict[int, nn.Parameter]) -> Optional[str]:
        """Parameters the recorded forward never read (an expert no token was routed to, a
        module called only on some batches) may be read on other batches. One owned by a module
        inside a recorded call is placed in the block of the candidate that ends with that
        call, so it stops the cut there while it trains. One whose module the recording never
        entered (called by the model itself, on some batches) cannot be placed: a guard on that
        module raises ``UntracedCall`` if it runs before the cut. Returns why no cut is possible
        (such a parameter owned by the model itself), else None."""
        from .split import _ParamHolder

        untraced = [p for pid, p in params.items() if pid not in read]
        if not untraced:
            return None
        contents: Dict[int, Set[int]] = {}  # id(call) -> ids of the modules it contains, on demand

        def inside(call: Call, module: nn.Module) -> bool:
            if id(call) not in contents:
                contents[id(call)] = {id(m) for m in call.module.modules()}
            return id(module) in contents[id(call)]

        owners = {}
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), module)
        unplaced = []
        for p in untraced:
            owner = owners.get(id(p), model)
            # the innermost recorded call around the owner (calls are in the order they end)
            around = next((c for c in calls if c.depth > 0 and inside(c, owner)), None)
            block = None if around is None else next(
                (k for k, cand in enumerate(self.candidates) if cand.end >= around.end), None)
            if block is None:
                unplaced.append(owner)
                continue
            self.blocks[block].modules.append(_ParamHolder(p))  # in no block before: none was read
        if any(owner is model for owner in unplaced):
            return (f"{type(model).__name__} owns a parameter that the recorded forward did not read, so the "
                    "module swap cannot tell where it is read; pass blocks= to cache")
        me = self
        names = {id(m): name for name, m in model.named_modules()}

        def guard(module, args):
            if me._before_cut and any(p.requires_grad for p in module.parameters(recurse=False)):
                raise UntracedCall(f"module {names.get(id(module), type(module).__name__)}, which the recorded "
                                   "forward did not call and whose parameters train, ran before the cached cut on "
                                   "this batch: a cached row cannot stand in for it")

        from ..frozen import engine_hook
        self._guarded = [m.register_forward_pre_hook(engine_hook(guard)) for m in dict.fromkeys(unplaced)]
        return None

    def release(self) -> None:
        """Remove the guard's hooks from the model (the chain is no longer used)."""
        for handle in self._guarded:
            handle.remove()
        self._guarded = []

    # ------------------------------------------------------------------ choosing the cut
    def usable_cut(self, frozen: int) -> int:
        """The cut ``<= frozen`` that skips the most of the forward pass (aten ops of the swapped
        calls) among those that pass their check; 0 if none does."""
        self.note = None
        if self.untraced_note is not None:
            if frozen:
                self.note = self.untraced_note
            return 0
        refused: Dict[int, str] = {}  # cut -> why not: implausible (filled as the ranking goes) or failed
        tried, first_failure, random_from = 0, None, None
        for cut in self._ranked_cuts(frozen, refused):
            if random_from is not None and cut >= random_from[0]:
                self.checked.setdefault(cut, random_from[1])  # its prefix holds the draw too
            if cut not in self.checked:
                if tried >= MAX_CHECKS:
                    break
                tried += 1
                self.checked[cut] = self._check(cut)
                if self._random.get(cut) is not None and random_from is None:
                    random_from = self._first_random_cut(cut)
            why = self.checked[cut]
            if why is None:
                # the deepest cut refused, checked or not (a head reading x[:, 0] hides it), and the
                # deepest of each other kind (activation checkpointing beside a residual)
                deeper, kinds = [], set()
                # a block that hands its input on (an Identity, an in-place activation) inside a
                # block the prefix ends in is not what stops the cut where deeper cuts that pass
                # skip less (review90: a residual reads that block's input); one closing a residual
                # of the model's own forward is (review101)
                ranked_below = any(c not in refused for c in range(cut + 1, frozen + 1))
                prefix_end = self.candidates[frozen - 1].end
                for c in sorted((c for c in refused if c > cut), reverse=True):
                    if ranked_below and self.candidates[c - 1].returns_input and \
                            self._inside_a_call_past(self.candidates[c - 1], prefix_end):
                        continue
                    kind = next((k for k in _REFUSAL_KINDS if k in refused[c]), "")
                    if kind not in kinds:
                        kinds.add(kind)
                        deeper.append(refused[c])
                if ranked_below and not deeper:
                    deeper.append("the cuts deeper skip no more of the forward pass (the layers after them still "
                                  "read what came before them, as a residual reads its block's input)")
                opaque = self._opaque_note(after=self.candidates[cut - 1].end)
                notes = [f"not cut deeper: {'; nor: '.join(deeper)}{opaque}"] if deeper else []
                if opaque and not deeper:  # a frozen block around C returns an object: no cut after it
                    notes = [f"not cut deeper: {opaque[2:]}"]
                if self._dropout_in_prefix.get(cut):
                    notes.append(self._dropout_in_prefix[cut])
                    if not self._dropout_warned:
                        self._dropout_warned = True
                        warnings.warn(f"ActivationCache: {self._dropout_in_prefix[cut]}", stacklevel=6)
                self.note = "; ".join(notes) or None
                return cut
            refused[cut] = why
            first_failure = first_failure or why
        if frozen:
            implausible = refused[max(refused)] if refused and first_failure is None else None
            self.note = (f"no frozen block's output can stand in for the frozen prefix: "
                         f"{first_failure or implausible or 'not checked'}"
                         f"{' (gave up after %d checks)' % MAX_CHECKS if tried >= MAX_CHECKS else ''}"
                         f"{self._opaque_note()}")
        return 0

    def _ranked_cuts(self, frozen: int, refused: Dict[int, str]) -> Iterator[int]:
        """The plausible cuts ``<= frozen``, the most forward ops skipped first (the deeper on a
        tie); each implausible one goes into ``refused`` as it is met. Lazily, best first: a cut
        skips at most its block's ops and those run inside module calls before the block (its
        stand-ins), so only cuts whose bound beats the best counted so far are counted. Counting
        every cut (each a walk over the recorded calls) took 76 s at a thousand layers. Every cut
        deeper than the one yielded has met its plausibility check by then (its bound is higher)."""
        heap = [(-self._most_skipped(cut), -cut, False) for cut in range(1, frozen + 1)]
        heapq.heapify(heap)
        while heap:
            _, neg_cut, counted = heapq.heappop(heap)
            cut = -neg_cut
            if counted:
                yield cut
                continue
            why = self._plausible(cut)
            if why is None:
                heapq.heappush(heap, (-self._skipped_ops(cut), neg_cut, True))
            else:
                refused[cut] = why

    def _first_random_cut(self, cut: int) -> Tuple[int, str]:
        """The shallowest cut whose prefix's output is drawn at random, found by bisection below
        ``cut`` (one is: each deeper prefix holds the draw too), and why. Wav2Vec2 draws its
        time mask right after its feature projection: its cuts, one by one from the deepest,
        gave up after MAX_CHECKS before reaching the projection."""
        low, high = 1, cut  # high: random; cuts below low: not
        while low < high:
            middle = (low + high) // 2
            if self._random_in_training(middle) is None:
                low = middle + 1
            else:
                high = middle
        return high, self._random_in_training(high)

    def _inside_a_call_past(self, c: Call, end: int) -> bool:
        """Whether ``c`` runs inside a module call that goes on past op ``end``."""
        return any(0 < call.depth < c.depth and call.start <= c.start and call.end > end for call in self.all_calls)

    def _opaque_note(self, after: int = -1) -> str:
        """Why a frozen module whose output would make a cut (one ending after op ``after``) is
        none: it returns an object (a plain dataclass) whose tensors the cache cannot take out
        and put back."""
        for call in (c for c in self.opaque if c.end > after):
            params = list(call.module.parameters())
            if params and not any(p.requires_grad for p in params):
                kind = type(next(leaf[1] for leaf in call.leaves if leaf[0] == "value" and holds_tensors(leaf[1])))
                fix = ("pass use_cache=False to training forwards (a key-value cache serves generation, not "
                       "training)" if "Cache" in kind.__name__ else "return a tuple or dict, or register "
                       f"{kind.__name__} with torch.utils._pytree.register_dataclass")
                return (f"; frozen module {call.name!r} is no cut because it returns a {kind.__name__}, an object "
                        f"whose tensors the cache cannot take apart: {fix}")
        return ""

    def _most_skipped(self, cut: int) -> int:
        """An upper bound of ``_skipped_ops(cut)``, non-decreasing in ``cut``: the ops run inside
        module calls up to the block's end (the block is such a call)."""
        return self._in_calls_before[self.candidates[cut - 1].end]

    def _skipped_ops(self, cut: int) -> int:
        if cut not in self._skipped:
            c = self.candidates[cut - 1]
            self._skipped[cut] = c.end - c.start + sum(s.end - s.start for s in self._stand_ins(cut))
        return self._skipped[cut]

    def _plausible(self, cut: int) -> Optional[str]:
        c = self.candidates[cut - 1]
        rows = [leaf for leaf in c.leaves if leaf[0] == "row"]
        if len({leaf[2] for leaf in rows}) > 1:
            return f"{c.name} returns per-sample tensors of several dtypes"
        if c.returns_input:
            # the forward may read that tensor after C by another name, which a served row does not
            # replace (and a change C made in place would be missing from it)
            if c.returns_packed:
                # review99: "as eval-mode dropout" sent users looking for a dropout
                return (f"{c.name} returns a PackedSequence, which passes on the batch_sizes it was given and has no "
                        "batch dimension: put pack_padded_sequence, the RNN and pad_packed_sequence(total_length=...) "
                        "in one module of your own to cache after it")
            return f"{c.name} returns a tensor it was given (unchanged, as eval-mode dropout, or changed in place)"
        return self._needed_ops(cut)[0]

    def _needed_ops(self, cut: int) -> Tuple[Optional[str], List[int]]:
        """The ops before C that the forward after C needs, sorted (every op after C runs; the
        ops that made what they read, and what those read, back to C's output, which the cache
        serves, or the model's inputs), or why the cut cannot work: a tensor made inside C other
        than its output is read after it (kept on the module: the cache skips C), or nothing
        reads C's output."""
        if cut in self._needed:
            return self._needed[cut]
        c, flow = self.candidates[cut - 1], self.flow
        needed: Set[int] = set()
        pending = list(flow.output_makers)
        for op in range(c.end, len(flow.op_inputs)):
            pending.extend(flow.op_inputs[op])
        for op, within in self._host_reads:
            # a value read into Python before C may steer the forward (a halting test); one read
            # inside a call that ends before C (a block's own guard, an MoE's routing) steers only
            # that call, whose output is the stand-in's or the row's
            if op < c.start and within > c.start:
                pending.extend(flow.op_inputs[op])
        serves = c.escapes_after >= 0  # a later call takes C's output as it is
        why = None
        while pending:
            op = pending.pop()
            if op in needed or op >= c.end:
                continue
            if op >= c.start:  # made inside C
                if op in c.made_ops:
                    serves = True
                    continue
                why = (f"a tensor {c.name} makes besides its output is read after it (kept on the module?); "
                       "a cut after it would leave it stale")
                break
            needed.add(op)
            pending.extend(flow.op_inputs[op])
        if why is None and not serves:
            why = f"nothing after {c.name} reads its output"
        self._needed[cut] = (why, sorted(needed))
        return self._needed[cut]

    def _stand_ins(self, cut: int) -> List[Call]:
        """Outermost calls that end before C starts none of whose ops the rest needs."""
        if cut not in self._chosen:
            self._chosen[cut] = self._find_stand_ins(cut)
        return self._chosen[cut]

    def _find_stand_ins(self, cut: int) -> List[Call]:
        c = self.candidates[cut - 1]
        needed = self._needed_ops(cut)[1]
        chosen: List[Call] = []
        covered: Set[int] = set()  # the chosen calls and the calls made inside them
        # callers come before their callees in reverse recording order; calls ending after C
        # starts are no stand-ins, nor do they cover one
        for i in range(bisect.bisect_right(self._ends, c.start) - 1, -1, -1):
            call = self.all_calls[i]
            if self._caller[i] in covered:
                covered.add(i)
                continue  # inside a stand-in already
            if call.depth == 0 or call.end == call.start or _within(call, c):
                continue  # the model; a call of no op (it skips nothing: it runs, reading what it reads)
            if call.escapes_after > c.end or call.calls_of_module > 1:
                continue  # read after C, or a module also called elsewhere (a shared embedding): runs
            if any(kind[0] == "value" and _varies(kind[1]) for kind in call.leaves):
                continue  # returns a number (lengths.tolist()): a placeholder would be the recorded one
            if any(kind[0] == "nested" for kind in call.leaves):
                continue  # returns a nested tensor: no placeholder can take its place
            first = bisect.bisect_left(needed, call.start)
            if first < len(needed) and needed[first] < call.end:
                continue  # the forward after C needs one of its ops (a residual, a tensor kept on self)
            chosen.append(call)
            covered.add(i)
        return chosen

    def _check(self, cut: int) -> Optional[str]:
        """None if the swapped forward reproduces the model on the recorded samples."""
        c = self.candidates[cut - 1]
        inputs = self.sample
        try:
            with preserved_modes(self.model.modules()), preserved_state(self.model), torch.no_grad():
                self.model.eval()
                # each pass from the same state, buffers and Python values (a trainable head's own
                # step counter or running statistic moved between them, and the model was taken for
                # nondeterministic), and the same generators: a draw after C (a VAE's sampling)
                # draws the same in each, where one before C shifts the served pass's draws
                with preserved_state(self.model):
                    expected = self.model(*inputs.args, **inputs.kwargs)
                with preserved_state(self.model):
                    before = buffers_now(self.model)
                    rows = self.rows(inputs, cut)
                    if _buffers_written(self.model, before):  # by the blocks a cached row would skip
                        return not_reproducible(self.model, before)
                with preserved_state(self.model):
                    got = self.serve(inputs, cut, rows)
                if not _all_outputs_match(expected, got):
                    # the generators moving on: the rows drawn at random (a draw before C), or not
                    # reproducible at all, else the served pass misses something of the skipped blocks
                    with preserved_state(self.model, rngs=False):
                        drawn = [self.rows(inputs, cut) for _ in range(2)]
                    with preserved_state(self.model, rngs=False):
                        again = self.model(*inputs.args, **inputs.kwargs)
                    if not _all_outputs_match(*drawn) or not _all_outputs_match(expected, again):
                        return NOT_REPRODUCIBLE
        except Exception as exc:
            return f"the model fails with {c.name} swapped ({type(exc).__name__}: {exc})"
        if not _all_outputs_match(expected, got):
            if _all_outputs_match(_without_key_value_caches(expected), _without_key_value_caches(got)):
                # transformers 5's layers fill the model's cache in place and return no part of it (review85)
                return (f"the model returns a key-value cache (use_cache=True, the default of decoder configs), which "
                        f"holds the keys and values of every layer, those {c.name}'s cached output would skip too: "
                        "pass use_cache=False to training forwards (model.config.use_cache = False; a key-value "
                        "cache serves generation, not training) to cut here")
            return (f"the model's output changes when {c.name}'s output is served from the cache and the "
                    "blocks before it are skipped, so something after it also reads the output of a block "
                    "before it (a residual or skip connection, an encoder read by a decoder)")
        return (self._random_in_training(cut) or self._inside_checkpoint(cut) or self._consts_vary(inputs, cut)
                or self._differs_served_in_training(cut))

    def _differs_served_in_training(self, cut: int) -> Optional[str]:
        """Why the swapped forward does not reproduce the model in the modes of training (draws
        fixed, dropout off), where the check above ran in eval: code that runs only in training
        and reads a module the cut stands in for (an auxiliary head on an early layer, deep
        supervision) would get its placeholder."""
        c = self.candidates[cut - 1]
        for extreme in (0, 1):  # at one of them a random mask (stochastic depth) keeps that code
            outputs = []
            try:
                with preserved_modes(self.model.modules()), preserved_state(self.model), torch.no_grad(), \
                        compiled_modules_run_eagerly(self.model):
                    for serve in (False, True):
                        self._training_modes(cut)
                        rows = self.rows(self.sample, cut) if serve else None
                        # each from the same buffers: a training forward writes some that its
                        # output reads (spectral norm's power iteration)
                        with _DropoutOff(), draws_at(extreme), preserved_state(self.model):
                            outputs.append(self.serve(self.sample, cut, rows) if serve
                                           else self.model(*self.sample.args, **self.sample.kwargs))
            except Exception as exc:
                return f"the model fails in training with {c.name} swapped ({type(exc).__name__}: {exc})"
            if not _all_outputs_match(*outputs):
                return (f"in training, the model's output changes when {c.name}'s output is served: code that "
                        "runs only in training (an auxiliary head, deep supervision) reads a module the cut skips")
        return None

    def _training_modes(self, cut: int):
        """The modes of training for a check of cut ``cut``: the model's own (train, where it was
        set up from an evaluation), the frozen blocks' modules in eval, as the engine holds them."""
        if not self.model.training:
            self.model.train()
        for b in self.blocks[:cut]:
            for root in (b.runs or b.modules):
                for m in root.modules():
                    m.training = False

    def _inside_checkpoint(self, cut: int) -> Optional[str]:
        """Why C cannot be cut after: activation checkpointing (``torch.utils.checkpoint``, a
        Hugging Face model's ``gradient_checkpointing_enable()``, a model's own checkpointing
        ``autograd.Function``) recomputes, in backward, a call that holds C and more: the
        recomputation runs without the cache's stand-ins, on their placeholders (a
        ``CheckpointError``, or with ``use_reentrant=True`` no gradient for the rest of the
        model). A checkpointed call that is C's own (timm's and older Hugging Face's per-block
        checkpoints) recomputes nothing: C's output needs no gradient. Found on one forward pass
        with gradients, in the modes of training (checkpointing runs only then)."""
        c = self.candidates[cut - 1]
        regions = _CheckpointRegions()
        calls = [0]
        within: Dict[int, List[int]] = {}  # region -> the module calls (numbers) started inside it
        span: Dict[str, Any] = {}

        def pre(module, args):
            calls[0] += 1
            for region in regions.open:
                within.setdefault(region, []).append(calls[0])
            if module is c.module and "start" not in span:
                span["start"], span["regions"] = calls[0], list(regions.open)

        def post(module, args, out):
            if module is c.module and "end" not in span:
                span["end"] = calls[0]  # C and the calls inside it: numbers start..end

        handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
                   torch.nn.modules.module.register_module_forward_hook(post)]
        try:
            with preserved_modes(self.model.modules()), preserved_state(self.model), torch.enable_grad(), \
                    compiled_modules_run_eagerly(self.model), regions:
                self._training_modes(cut)
                self.model(*self.sample.args, **self.sample.kwargs)
        except Exception:  # the training-mode forward itself is checked elsewhere (its draws)
            return None
        finally:
            for h in handles:
                h.remove()
        if "end" in span and any(not span["start"] <= n <= span["end"]
                                 for region in span["regions"] for n in within.get(region, ())):
            return (f"{c.name} runs inside a call that activation checkpointing recomputes in backward, where a "
                    "cached row cannot stand in; the cache cuts at the checkpointed layer's boundary instead")
        return None

    def _random_in_training(self, cut: int) -> Optional[str]:
        if cut not in self._random:
            self._random[cut] = self._draws_change_the_prefix(cut)
        return self._random[cut]

    def _draws_change_the_prefix(self, cut: int) -> Optional[str]:
        """Why C's output cannot be cached: in training it is drawn at random. Rows are made in
        eval mode, but a module around the frozen blocks keeps training, and a random op of its
        own between them (SpecAugment's time mask, LayerDrop's draw) changes the prefix's output
        every step; a cached row would serve one draw, or none, for ever. Run up to C twice in
        the modes of training (the frozen blocks in eval, as the engine holds them) with every
        random draw at its lowest and then its highest value (torch's, and Python's and numpy's
        uniform draws), the other numpy and Python draws seeded apart (SpecAugment draws its spans
        with numpy): an output that differs depends on a draw.
        A draw that changes nothing (a LayerDrop probability of 0) keeps the cut. Dropout is off
        meanwhile: the frozen prefix runs without it, functional dropout in a module around it
        included (docs/activation_cache.md)."""
        c = self.candidates[cut - 1]
        outputs, dropout_off = [], _DropoutOff()
        try:
            with preserved_modes(self.model.modules()), preserved_state(self.model), \
                    torch.no_grad(), compiled_modules_run_eagerly(self.model):
                self._training_modes(cut)
                for extreme in (0, 1):
                    with dropout_off, draws_at(extreme):
                        outputs.append(self._output_of(c, self.sample))  # _NOT_RUN: LayerDrop drew C
        except Exception as exc:  # a draw at an extreme the model cannot take (a permutation)
            return (f"the frozen prefix up to {c.name} fails in training with its random draws fixed "
                    f"({type(exc).__name__}: {exc}), so its output may be drawn at random")
        if any(out is _NOT_RUN for out in outputs) or not _all_outputs_match(*outputs):
            return (f"in training, the frozen prefix's output up to {c.name} is drawn at random (a random op "
                    "in a module around the frozen blocks that keeps training, such as SpecAugment's time mask "
                    "or LayerDrop): a cached row would serve one draw for ever, so the cache cannot cut there")
        try:
            with preserved_modes(self.model.modules()), preserved_state(self.model), torch.no_grad(), \
                    compiled_modules_run_eagerly(self.model):
                self.model.eval()
                made = self._output_of(c, self.sample)  # as rows() makes them
        except Exception as exc:
            return f"the frozen prefix up to {c.name} fails in eval mode ({type(exc).__name__}: {exc})"
        if made is _NOT_RUN or not _all_outputs_match(outputs[0], made):
            return (f"in training, the frozen prefix's output up to {c.name} differs from eval mode's, where cached "
                    "rows are made: a module around the frozen blocks that keeps training computes otherwise in "
                    "training (an `if self.training:` branch in its forward, a mask or noise of its own), so "
                    "the cache cannot cut there")
        if dropout_off.active:
            self._dropout_in_prefix[cut] = (
                f"the frozen prefix up to {c.name} applies dropout in training outside the modules the engine holds "
                "in eval (functional dropout in a module around the frozen blocks, as the encoders of BART and "
                "Whisper apply after their embeddings): cached rows are made without it, so training with the "
                "cache differs from training without it by that dropout (docs/activation_cache.md)")
        return None

    def _consts_vary(self, inputs, cut: int) -> Optional[str]:
        """Why C's output cannot be served: a tensor in it that is not one row per sample (the
        cache serves such a "constant" as recorded once) changes with the batch, as an LSTM's
        ``(h_n, c_n)``, whose batch is dimension 1, does. Checked on the recorded samples, the
        first alone and the last alone: the same shapes and values each time, or refused."""
        from .core import _batch_size, _index_inputs

        c = self.candidates[cut - 1]
        if not any(kind[0] == "const" or (kind[0] == "value" and _varies(kind[1])) for kind in c.leaves):
            return None
        n = _batch_size(inputs)
        seen, values = [], []
        try:
            with preserved_state(self.model):
                for index in (torch.arange(n), torch.arange(1), torch.arange(n - 1, n)):
                    self.rows(_index_inputs(inputs, index, n), cut)
                    seen.append(self.consts[cut])
                    values.append(self.values[cut])
        except Exception as exc:
            return f"the model fails on part of the recorded samples ({type(exc).__name__}: {exc})"
        recorded = [kind[1] for kind in c.leaves if kind[0] == "value"]
        if any(v != recorded for v in values):
            # served as recorded: a number computed from the batch (a mean, a count) would be stale
            return (f"{c.name} returns a Python value that changes with the batch (a number computed from it); "
                    "the cache serves it as recorded once, so it cannot cut there: return it as a tensor")
        for consts in seen[1:]:
            for a, b in zip(seen[0], consts):
                if a.shape != b.shape or not torch.equal(a, b):
                    return (f"{c.name} returns a tensor of shape {tuple(a.shape)} that is not one row per sample "
                            "yet changes with the batch (the batch in another dimension than the first, as an "
                            "LSTM's (h_n, c_n)); the cache stores one row per sample, so it cannot cut there")
        return None

    # ------------------------------------------------------------------ running
    def run(self, inputs, start: int = 0, stop: Optional[int] = None, h: Any = None) -> Any:
        if start == 0:
            return self.rows(inputs, stop)
        if stop is not None and stop != len(self.blocks):
            raise NotImplementedError("the module-swap chain runs a prefix or the rest, nothing between")
        return self.serve(inputs, start, h)

    def rows(self, inputs, cut: int) -> Tensor:
        """C's output for every sample of ``inputs``, packed one row per sample: the model runs
        in eval mode without grad up to C, and stops there."""
        c = self.candidates[cut - 1]
        with preserved_modes(self.model.modules()), torch.no_grad():
            self.model.eval()
            out = self._output_of(c, inputs, cut)
        if out is _NOT_RUN:
            raise CutNotReached(self._not_reached(c))
        leaves, _ = tree_flatten(out)
        rows = [x for x, kind in zip(leaves, c.leaves) if kind[0] == "row"]
        self.consts[cut] = [x for x, kind in zip(leaves, c.leaves) if kind[0] == "const"]
        self.values[cut] = [x for x, kind in zip(leaves, c.leaves) if kind[0] == "value"]
        if len(rows) == 1:
            return rows[0]
        return torch.cat([r.reshape(r.shape[0], -1) for r in rows], 1)

    def _output_of(self, c: Call, inputs, cut: Optional[int] = None) -> Any:
        """C's output on ``inputs``: the model runs in the modes it is in up to C and stops there;
        ``_NOT_RUN`` where the pass never called C (LayerDrop drew it). With the ``cut`` the rows
        are made for, ``CutNotReached`` where the pass reached C on another path than the
        recording's (a block the served forward stands in for did not run: a row made so would
        stand in for the recorded path on other batches)."""
        expected = {id(call.module) for call in self._stand_ins(cut)} if cut is not None else set()
        ran: Set[int] = set()

        def note(module, args):
            if id(module) in expected:
                ran.add(id(module))
            elif ran and self._never_ran(module):  # inside the prefix, a module it never ran
                raise CutNotReached(self._not_reached(c, skipped=True))

        def stop(module, a, out):
            if cut is not None and ran != expected:
                raise CutNotReached(self._not_reached(c, skipped=True))
            raise _Stop(out)

        handle = c.module.register_forward_hook(stop)
        self._before_cut = True
        if expected:
            GLOBAL_PRE_HOOKS[self._guard_key] = note
        try:
            self.model(*inputs.args, **inputs.kwargs)
        except _Stop as s:
            return s.output
        finally:
            GLOBAL_PRE_HOOKS.pop(self._guard_key, None)
            self._before_cut = False
            handle.remove()
        return _NOT_RUN

    def _unpack(self, c: Call, cut: int, h: Tensor) -> Any:
        rows = [kind for kind in c.leaves if kind[0] == "row"]
        consts = iter(self.consts[cut])
        offset, leaves = 0, []
        for kind in c.leaves:
            if kind[0] == "row":
                if len(rows) == 1:
                    leaves.append(h)
                else:
                    n = int(torch.Size(kind[1]).numel())
                    leaves.append(h[:, offset:offset + n].reshape(h.shape[0], *kind[1]))
                    offset += n
            elif kind[0] == "const":
                leaves.append(next(consts))
            else:
                leaves.append(kind[1])
        return tree_unflatten(leaves, c.spec)

    def _never_ran(self, module: nn.Module) -> bool:
        """Whether a call of ``module`` leaves the recorded path: a module of the model that the
        recorded forward never called. A module outside the model that holds no tensors is a
        function the forward calls (transformers' hub-kernel ``apply_rotary_pos_emb``, one
        ``nn.Module`` every attention layer calls), which the recording, hooked on the model's own
        modules, never sees: it was taken for a branch and no cut past an attention held
        (review85). Its Python values (a scale the loop anneals) are watched with the prefix's
        (``ActivationCache._check_values``); tensors of its own are not."""
        if id(module) in self._recorded:
            return False
        return id(module) in self._own or any(True for _ in itertools.chain(module.parameters(), module.buffers()))

    def _not_reached(self, c: Call, skipped: bool = False) -> str:
        how = (f"took another path to {c.name}, the block the cached rows stand in for, than the recorded forward "
               "(it skipped a block that ran there, or ran a module that did not)" if skipped else
               f"did not reach {c.name}, the block the cached rows stand in for")
        return (f"this batch's forward {how} (its path depends on the data: an early exit, a loop that halts "
                "sooner, a branch), so the whole model runs for it")

    def _called_after(self, cut: int) -> Set[int]:
        """Modules every recorded call of which starts after C ends: one of them about to run
        before C was served means the forward left the recorded path (``CutNotReached``)."""
        if cut not in self._after:
            c = self.candidates[cut - 1]
            first: Dict[int, int] = {}
            for call in self.all_calls:
                first[id(call.module)] = min(first.get(id(call.module), call.start), call.start)
            self._after[cut] = {m for m, start in first.items() if start >= c.end}
        return self._after[cut]

    def serve(self, inputs, cut: int, h: Tensor) -> Any:
        """The model's forward with C returning ``h`` and the stand-ins returning placeholders.
        ``CutNotReached`` where this batch's forward leaves the recorded path before C (checked
        before each module call until C is served: nothing after the cut has run then)."""
        c = self.candidates[cut - 1]
        if cut not in self.consts:  # rows came from a checkpoint: record C's constants once
            self.rows(_first_sample(inputs), cut)
        batch = h.shape[0]
        served = [False]
        after = self._called_after(cut)
        stand_ins = self._stand_ins(cut)
        stood_in: Set[int] = set()  # the stand-ins called before C: all of them, on the recorded path

        def not_past_the_cut(module, args):
            if served[0]:
                return
            if id(module) in after:
                raise CutNotReached(self._not_reached(c))
            if stood_in and self._never_ran(module):  # inside the prefix, a module it never ran
                raise CutNotReached(self._not_reached(c, skipped=True))
        given = {id(t) for t in tree_flatten((inputs.args, inputs.kwargs))[0] if isinstance(t, Tensor)}
        value = self._unpack(c, cut, h)
        patched = []

        def stand_in(call: Call):
            real = call.module.forward

            def forward(*a, **kw):
                if served[0]:
                    return real(*a, **kw)
                stood_in.add(id(call.module))
                return _placeholder(call, batch, a, given)
            return forward

        def serve_c(*a, **kw):
            if served[0]:
                return real_c(*a, **kw)
            if len(stood_in) != len(stand_ins):  # a branch skipped a block the rows stand in for
                raise CutNotReached(self._not_reached(c, skipped=True))
            served[0] = True
            self._before_cut = False
            GLOBAL_PRE_HOOKS.pop(self._guard_key, None)  # the calls after C run without it
            return value

        real_c = c.module.forward
        try:
            for call in stand_ins:
                patched.append((call.module, call.module.__dict__.get("forward", _MISSING)))
                call.module.forward = stand_in(call)
            patched.append((c.module, c.module.__dict__.get("forward", _MISSING)))
            c.module.forward = serve_c
            self._before_cut = True
            # a global pre-hook until C is served, set in torch's table directly: a registration
            # would move torch's hook counter at every step, and the cache reads it as a hook placed
            GLOBAL_PRE_HOOKS[self._guard_key] = not_past_the_cut
            out = self.model(*inputs.args, **inputs.kwargs)
            if not served[0]:  # the forward ended without C: an early exit before the cut
                raise CutNotReached(self._not_reached(c))
            return out
        finally:
            GLOBAL_PRE_HOOKS.pop(self._guard_key, None)
            self._before_cut = False
            for module, old in reversed(patched):
                if old is _MISSING:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = old


_MISSING = object()
_NOT_RUN = object()
# torch's table of global forward pre-hooks (register_module_forward_pre_hook's), where a chain's
# guard takes a negative key of its own (torch's count up from 0)
GLOBAL_PRE_HOOKS = torch.nn.modules.module._global_forward_pre_hooks


class _CheckpointRegions:
    """While entered, ``open`` lists the checkpointed calls running, outermost first (ids): every
    ``autograd.Function`` (reentrant ``torch.utils.checkpoint``, a model's own checkpointing
    function) and non-reentrant ``torch.utils.checkpoint``, wrapped for the time."""

    def __init__(self) -> None:
        self.open: List[int] = []
        self._count = 0

    def _enter(self) -> None:
        self._count += 1
        self.open.append(self._count)

    def __enter__(self):
        import torch.utils.checkpoint as checkpoint
        from torch.autograd.function import Function

        regions = self
        self._saved = (Function.__dict__["apply"], checkpoint._checkpoint_without_reentrant_generator)
        apply, generator = self._saved[0].__func__, self._saved[1]

        def function_apply(cls, *args, **kwargs):
            regions._enter()
            try:
                return apply(cls, *args, **kwargs)
            finally:
                regions.open.pop()

        def without_reentrant(*args, **kwargs):
            inner = generator(*args, **kwargs)
            next(inner)
            regions._enter()
            try:
                yield
            finally:
                regions.open.pop()
            next(inner, None)

        Function.apply = classmethod(function_apply)
        checkpoint._checkpoint_without_reentrant_generator = without_reentrant
        return self

    def __exit__(self, *exc):
        import torch.utils.checkpoint as checkpoint
        from torch.autograd.function import Function

        Function.apply, checkpoint._checkpoint_without_reentrant_generator = self._saved
        return False


class _DropoutOff(TorchFunctionMode):
    """Functional dropout returns its input, and attention kernels drop nothing (as in eval
    mode), whatever their ``training`` flag or ``dropout_p``; ``active`` counts the calls that
    would have dropped something."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUTS:  # (input, p, training or train, ...)
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", kwargs.get("train", True))
            self.active += bool(training and p)
            return args[0] if args else kwargs["input"]
        if func is F.scaled_dot_product_attention:
            if len(args) > 4:  # (query, key, value, attn_mask, dropout_p, ...)
                self.active += bool(args[4])
                args = (*args[:4], 0.0, *args[5:])
            else:
                self.active += bool(kwargs.get("dropout_p", 0.0))
                kwargs = {**kwargs, "dropout_p": 0.0}
        return func(*args, **kwargs)


_REFUSAL_KINDS = ("activation checkpointing", "drawn at random", "differs from eval mode")


_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
             torch.dropout, torch.feature_dropout, torch.alpha_dropout, torch.feature_alpha_dropout}


@contextmanager
def draws_at(extreme: int) -> Iterator[None]:
    """Every random draw at its lowest (0) or highest (1) value meanwhile: torch's
    (``_RandomDrawsAt``) and Python's and numpy's uniform ones (``host_draws_at``), their other
    draws seeded by ``extreme`` (``preserved_rngs`` puts the generators back)."""
    seed_host_rngs(extreme)
    with _RandomDrawsAt(extreme), host_draws_at(extreme):
        yield


class _RandomDrawsAt(TorchDispatchMode):
    """Every random draw (rand, randn, bernoulli, randperm...; not an op that only may drop
    out, as an attention kernel) returns ``value`` in every element."""

    def __init__(self, value: int) -> None:
        super().__init__()
        self.value = value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket.__name__ in _DRAWS:
            fill_draw(out, self.value)
        return out


_DRAWS = {"rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
          "bernoulli_", "normal", "normal_", "uniform", "uniform_", "multinomial", "exponential_", "geometric_",
          "cauchy_", "log_normal_", "random_", "poisson", "native_dropout"}


def _all_leaves(tree: Any, seen: Optional[Set[int]] = None) -> List[Any]:
    """``tree``'s leaves, and those of the objects among them that pytree does not take apart but
    that carry tensors (a plain dataclass): compared as leaves, any two such objects matched. An
    object met again (a node linked to its parent) is one leaf the second time."""
    seen = set() if seen is None else seen
    out = []
    for leaf in tree_flatten(tree)[0]:
        if id(leaf) not in seen and holds_tensors(leaf):
            seen.add(id(leaf))
            out += _all_leaves([list(x) if isinstance(x, (set, frozenset)) else x for x in object_fields(leaf)], seen)
        else:
            out.append(leaf)
    return out


def tensor_trees_match(a: Any, b: Any, equal_nan: bool = False) -> bool:
    """The same structure of outputs, every tensor of the same shape and close (rtol 1e-4)."""
    la, lb = _all_leaves(a), _all_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, Tensor) != isinstance(y, Tensor):
            return False
        if isinstance(x, Tensor) and (x.shape != y.shape or not torch.allclose(
                x.float(), y.float(), rtol=1e-4, atol=1e-5, equal_nan=equal_nan)):
            return False
    return True


def _without_key_value_caches(output: Any) -> Any:
    """``output`` with the key-value caches among its leaves (transformers' ``DynamicCache``) as None."""
    leaves, spec = tree_flatten(output)
    return tree_unflatten([None if type(x).__name__.endswith("Cache") else x for x in leaves], spec)


def _all_outputs_match(a: Any, b: Any) -> bool:
    """Every tensor of the output, not only the logits: a user who asks for every layer's
    hidden states must not get placeholders for the frozen ones."""
    return tensor_trees_match(a, b, equal_nan=True)


def _placeholder(call: Call, batch: int, args: tuple, given: Set[int]) -> Any:
    """A stand-in's output: the recorded structure, its input where that has the output's
    shape (free; never one of the user's input tensors, which the model might change in
    place), else zeros."""
    leaves = []
    first = args[0] if args and isinstance(args[0], Tensor) else None
    for kind in call.leaves:
        if kind[0] == "row":
            shape = (batch, *kind[1])
            if first is not None and tuple(first.shape) == shape and first.dtype == kind[2] and id(first) not in given:
                leaves.append(first)
            else:
                device = first.device if first is not None else next(
                    (p.device for p in call.module.parameters()), torch.device("cpu"))
                leaves.append(torch.zeros(shape, dtype=kind[2], device=device))
        elif kind[0] == "const":
            device = first.device if first is not None else torch.device("cpu")
            leaves.append(torch.zeros(kind[1], dtype=kind[2], device=device))
        else:
            leaves.append(kind[1])
    return tree_unflatten(leaves, call.spec)


def _first_sample(inputs):
    from .core import _batch_size, _index_inputs

    return _index_inputs(inputs, torch.arange(1), _batch_size(inputs))


def _tuple_of_rows(tree: Any, batch: int) -> bool:
    """A tuple of ``batch`` plain numbers in ``tree`` (lengths from ``zip(*batch)``)."""
    if isinstance(tree, tuple) and len(tree) == batch > 1 and all(isinstance(v, (int, float)) for v in tree):
        return True
    children = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return any(_tuple_of_rows(child, batch) for child in children)


def swap_chain(model: nn.Module, inputs) -> Tuple[Optional[SwapChain], str]:
    """The module-swap chain of ``model`` recorded on a few samples of ``inputs``, or None and why."""
    from .core import _batch_size, _index_inputs

    batch = _batch_size(inputs)
    n = min(batch, CHECK_SAMPLES)
    sample = _index_inputs(inputs, torch.arange(n), batch)
    sample.memo = {}
    try:
        calls, first_use, flow, _ = record_calls(model, sample.args, sample.kwargs, n)
    except Exception as exc:
        hint = ""
        if _tuple_of_rows((inputs.args, inputs.kwargs), batch):
            hint = (f"; a tuple of {batch} numbers among the inputs, as many as the batch's samples, is taken for a "
                    "setting (a size) and not split with the batch: pass per-sample values such as lengths as one "
                    "tensor")
        return None, f"recording the module calls failed ({type(exc).__name__}: {exc}){hint}"
    chain = SwapChain(model, calls, first_use, flow, sample, n)
    if not chain.candidates:
        return None, f"no module of {type(model).__name__} is called once with an output holding the batch dimension"
    return chain, chain.how
