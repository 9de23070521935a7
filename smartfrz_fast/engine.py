"""The freezing engine: units, history, policy and the freeze action, behind ``SmartFreezer``.

Usage (after ``optimizer.step()`` each iteration)::

    freezer = SmartFreezer(model, optimizer, policy=FreezeOut(), example_inputs=(x,), total_steps=n)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        freezer.step()

Freezing is monotone and front-to-back. Freezing a unit turns off ``requires_grad``, drops
its gradients, removes its parameters from every optimizer group and deletes their optimizer
state (the memory is released), and keeps its norm layers and the dropout inside its span of
the forward pass in eval mode even after ``model.train()`` (every module whose calls all lie in
the frozen prefix, whatever its regulariser: ``frozen.FrozenRegion``). With the input needing no
grad, autograd then records nothing for the frozen prefix: its backward pass is gone. A shared
parameter (tied embeddings) read both inside and after the prefix keeps training from its later
reads or freezes with the prefix: ``shared_parameters``, docs/shared_parameters.md.
"""

from __future__ import annotations

import copy
import numbers
import operator
import re
import time
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from . import guards
from .frozen import engine_hook, held_weakly, reads_its_mode, remove_handles
from .policy.base import Decision, FreezePolicy, PolicyContext, UnitInfo, check_decision, check_prefix_length
from .units import (SHARED_PARAMETER_MODES, Unit, UnitPlan, describe_shared, discover_units, example_call,
                    marks_output_for_grad, shared_groups, uninitialized, uninitialized_parameters)

STATE_FORMAT = "smartfrz_fast.SmartFreezer"
STATE_VERSION = 1
_STATE_KEYS = ("signature", "settings", "policy", "policy_state", "step", "num_frozen", "timeline", "pending",
               "history")
# what happens to shared parameters a frozen prefix splits, per shared_parameters mode
_SHARED_FATE = {
    "train": "keep training from their reads after the frozen prefix; their reads inside it pass no gradient",
    "freeze": "froze with the prefix; their reads after it use them frozen and do not train them",
}

_CALLED_AGAIN = (" A module reading them is called again after the frozen prefix (an encoder applied to a second view "
                 "in one forward, as in SimCLR or BYOL): that call runs in the model's mode, its norm layers in train "
                 "mode, unlike the frozen first call. To freeze such an encoder as one, call it once on the views "
                 "concatenated (torch.cat) or once per view from your loop.")


class SettingsMismatch(ValueError):
    """A checkpoint made with other freezer settings; ``saved`` holds the checkpoint's values of
    those that differ (the trainer integrations name them as their callback's arguments)."""

    def __init__(self, message: str, saved: Dict[str, Any]) -> None:
        super().__init__(message)
        self.saved = saved



@dataclass(frozen=True)
class FreezeEvent:
    """One change of the frozen prefix."""

    step: int
    num_frozen: int
    unit_names: Tuple[str, ...]  # the units newly frozen at this step
    frozen_param_fraction: float  # of the managed parameters
    frozen_flops_fraction: float  # of a training step's FLOPs (forward + backward), now skipped


def _uncompiled(name: str) -> str:
    """A unit or parameter name without torch.compile's "_orig_mod." (a freezer on the compiled
    wrapper named them so before it managed the module inside)."""
    return "+".join(part[len("_orig_mod."):] if part.startswith("_orig_mod.") else part for part in name.split("+"))


def _name_prefix_added(saved, mine) -> Optional[str]:
    """How the checkpoint's parameter names differ from this model's where one side's are the
    other's with one prefix added ("net.0.weight" for "0.weight"), shapes equal, the longer side
    maybe holding more (a LightningModule's own parameters beside its ``net``); else None.
    ``saved`` and ``mine``: ``_signature()``'s [(unit name, [(name, shape)])]."""
    names_saved = {name: tuple(shape) for _, params in saved for name, shape in params}
    names_mine = {name: tuple(shape) for _, params in mine for name, shape in params}
    for short, long, where in ((names_mine, names_saved, "in the checkpoint"),
                               (names_saved, names_mine, "in this model")):
        if not short:
            continue
        first = next(iter(short))
        for candidate in long:
            prefix = candidate[:len(candidate) - len(first)]
            if (candidate.endswith(first) and prefix.endswith(".")
                    and all(long.get(prefix + name) == shape for name, shape in short.items())):
                more = " (which holds more besides)" if len(long) > len(short) else ""
                return f"with the prefix {prefix!r} {where}{more} and without it in the other"
    return None


def _compiled_inner(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile(model)`` wrapper (an OptimizedModule), else ``model``
    (named, not imported: importing dynamo is slow)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else model


def _as_optimizers(optimizer) -> Tuple[List[torch.optim.Optimizer], List[torch.optim.Optimizer]]:
    """(the optimizers that do the updates, the wrappers around them): each given wrapper is
    followed to its inner optimizer (``_unwrapped``), and one given twice (a wrapper and its
    inner optimizer) counts once."""
    given = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    inner: List[torch.optim.Optimizer] = []
    wrappers: List[torch.optim.Optimizer] = []
    for opt in given:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"SmartFreezer expects torch.optim.Optimizer(s), got {type(opt).__name__}")
        chain = _unwrapped(opt)
        for member in chain:
            _check_optimizer_can_lose_parameters(member)
        if all(o is not chain[-1] for o in inner):
            inner.append(chain[-1])
        wrappers += [w for w in chain[:-1] if all(o is not w for o in wrappers)]
    return inner, wrappers


def _learning_rate_is_0(lr: Any) -> bool:
    """A group's learning rate is exactly 0 (a warm-up holding a backbone still): a number of any
    kind (numpy's float32 from a schedule table too, a one-element numpy array) or a one-element
    tensor on the host. One on an accelerator is never read (that would wait for the device), nor
    under torch.compile."""
    if isinstance(lr, Tensor):
        if lr.device.type != "cpu" or lr.numel() != 1 or torch.compiler.is_compiling():
            return False
        return float(lr) == 0
    if type(lr).__module__ == "numpy" and getattr(lr, "size", 0) == 1:  # a 0-d or one-element array
        lr = lr.item()
    return isinstance(lr, numbers.Real) and not isinstance(lr, bool) and lr == 0


def _unwrapped(optimizer: torch.optim.Optimizer) -> List[torch.optim.Optimizer]:
    """``optimizer`` and the optimizers it wraps, outermost first: an attribute that is an
    optimizer over the same param groups (SAM's ``base_optimizer``, Lookahead's, accelerate's
    ``AcceleratedOptimizer.optimizer``). The innermost one steps exactly once per training step
    whichever of the wrapper's methods the loop calls (SAM's ``first_step``/``second_step``
    never call the wrapper's ``step``), so the freezer follows its steps; the wrappers' own
    state (SAM's ``old_p``, Lookahead's slow weights) is deleted with the inner one's."""
    chain = [optimizer]
    while True:
        outer = chain[-1]
        inner = next((value for value in getattr(outer, "__dict__", {}).values()
                      if isinstance(value, torch.optim.Optimizer) and all(value is not c for c in chain)
                      and guards.shares_param_groups(value, outer)), None)
        if inner is None:
            return chain
        chain.append(inner)


def _check_optimizer_can_lose_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Freezing takes parameters (and their state) out of the optimizer. LBFGS keeps one state
    for all its parameters, on the first, and needs exactly one param group: a freeze would
    strand that state on a frozen parameter (``state_dict()`` then fails) and a per-unit lr
    split would trip its one-group assertion."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("SmartFreezer cannot freeze parameters out of torch.optim.LBFGS: it keeps one state for "
                         "all its parameters (on the first) and one param group. Train with a first-order "
                         "optimizer (SGD, Adam, AdamW, ...) to freeze layers; to finish a run with L-BFGS, close() "
                         "the freezer first (frozen layers stay frozen) and build L-BFGS over the parameters that "
                         "still require grad.")
    if type(optimizer).__name__ == "ZeroRedundancyOptimizer":  # by name: no torch.distributed import
        raise ValueError("SmartFreezer cannot freeze parameters out of ZeroRedundancyOptimizer: each rank's inner "
                         "optimizer holds a fixed partition of the parameters and their state, which a freeze "
                         "cannot take apart (state left on frozen parameters, a failing state_dict(), FreezeOut's "
                         "per-unit lrs refused). To shard optimizer state, use FSDP2 (fully_shard) with a plain "
                         "optimizer (docs/integrations/ddp_fsdp.md); or DDP with a plain optimizer.")


def _check_policy_free(policy: FreezePolicy) -> None:
    """A policy object serves one freezer: it keeps that run's state (context, schedule,
    counters, pending decisions), which a second freezer would share and corrupt."""
    owner = getattr(policy, "_serves", None)
    if owner is not None and owner() is not None:
        raise ValueError(
            f"SmartFreezer: this {type(policy).__name__} object already serves another SmartFreezer, and a "
            "policy keeps its run's state (units, schedule, counters). Give each freezer its own policy "
            f"object: a new {type(policy).__name__}(...) per freezer.")


def _checked_int(name: str, value: Any, minimum: Optional[int], optional: bool = False) -> Optional[int]:
    """``value`` as an int (numpy ints too), or a clear error: a float or a string here would
    otherwise run a subtly different schedule or fail deep inside a policy."""
    if value is None and optional:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"SmartFreezer: {name} must be an int{' or None' if optional else ''}, "
                        f"got {value!r} ({type(value).__name__})") from None
    if minimum is not None and number < minimum:
        what = {"total_steps": " (the number of optimizer steps in the run)"}.get(name, "")
        raise ValueError(f"SmartFreezer: {name} must be >= {minimum}{what}, got {number}")
    return number


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _single_numbers(unit: Unit) -> bool:
    return all(p.numel() <= 1 for p in unit.parameters)


def _max_frozen(units: Sequence[Unit], keep_trainable: int) -> int:
    """The longest prefix that may freeze: all but the last ``keep_trainable`` units, not
    counting units of single numbers among them (a two-tower model's last unit is CLIP's
    ``logit_scale``: kept alone, both towers and their projections froze)."""
    end, kept = len(units), 0
    while end > 0 and kept < keep_trainable:
        end -= 1
        if not _single_numbers(units[end]):
            kept += 1
    return end


def _give_back_frozen(module: nn.Module, taken: "weakref.WeakKeyDictionary", optimizers: Optional[Sequence] = None) -> None:
    """The frozen parameters go back to their places in the groups of the freezer's optimizers
    (default: every live one it took from; no state: it was deleted), each removal undone from
    the last. Frozen with requires_grad=False, they get no gradient, so an optimizer steps over
    them; set requires_grad=True and they train again. Called by close(), and when a freezer is
    dropped unclosed while its optimizer lives on."""
    current = dict(module.named_parameters(remove_duplicate=False))
    for opt in list(taken.keys()) if optimizers is None else optimizers:
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        for removal in reversed(taken.get(opt, [])):
            for group, position, name, opt_name in sorted(removal, key=lambda entry: entry[1]):
                param = current.get(name)
                if param is not None and id(param) not in held and group < len(opt.param_groups):
                    params, names = opt.param_groups[group]["params"], opt.param_groups[group].get("param_names")
                    if names is not None and len(names) == len(params):
                        names.insert(min(position, len(names)), name if opt_name is None else opt_name)
                    params.insert(min(position, len(params)), param)
                    held.add(id(param))
    taken.clear()


# the policy's share of the training time over a stretch of steps above which step() warns
POLICY_COST_SHARE = 0.2
POLICY_COST_STEPS = 50


def _all_finite(units: Sequence[Unit]) -> List[bool]:
    """Whether each unit's weights are all finite, with one host sync for all of them: the
    largest magnitude of a tensor is finite exactly when all of it is (amax propagates NaN), and
    cannot overflow as a sum would. A sync and an isfinite() copy per tensor cost 292 ms of a
    300 ms freeze of BERT-base's encoder on the CPU."""
    flags, device = [], None
    for unit in units:
        values = [_normable(p.detach()) for p in unit.parameters]  # (a sparse one's values may be none)
        finite = [v.abs().amax().isfinite() for v in values if v.numel()]
        device = device or (finite[0].device if finite else None)
        flags.append(torch.stack([t.to(device) for t in finite]).all() if finite else None)
    device = device or torch.device("cpu")
    return torch.stack([torch.ones((), dtype=torch.bool, device=device) if f is None else f.to(device)
                        for f in flags]).tolist() if flags else []


def _normable(grad: Tensor) -> Tensor:
    """A dense tensor with ``grad``'s norm: the local shard of an FSDP2 gradient (step() sums the
    ranks'), the summed values of a sparse one (``nn.Embedding(sparse=True)``)."""
    if hasattr(grad, "to_local"):
        grad = grad.to_local()
    return grad.coalesce().values() if grad.is_sparse else grad


def _user_frozen_modules(model: nn.Module, frozen_params: set) -> set:
    """ids of the modules with parameters, all of them frozen (``frozen_params``), and of every
    module inside them: what the user froze before the freezer was built."""
    found: set = set()
    for module in model.modules():  # parents before children
        if id(module) in found:
            continue
        params = [id(p) for p in module.parameters()]
        if params and all(p in frozen_params for p in params):
            found.update(id(m) for m in module.modules())
    return found


def _remove_params(optimizer: torch.optim.Optimizer, ids: set) -> List[Tuple[int, int, Tensor, Optional[str]]]:
    """Take these parameters out of the optimizer's groups and delete their state (a state
    entry left behind would break ``optimizer.state_dict()``), and their names from a group
    built from ``named_parameters()`` (its ``param_names``: left behind, a checkpoint labelled
    the remaining parameters' state with the frozen layers' names). Returns where each one was:
    (group, position in the group's list before this removal, parameter, its name there or None)."""
    taken = []
    for index, group in enumerate(optimizer.param_groups):
        params, names = group["params"], group.get("param_names")
        named = names is not None and len(names) == len(params)
        taken.extend((index, position, p, names[position] if named else None)
                     for position, p in enumerate(params) if id(p) in ids)
        if named:
            group["param_names"] = [n for n, p in zip(names, params) if id(p) not in ids]
        group["params"] = [p for p in params if id(p) not in ids]
    for p in [p for p in optimizer.state if id(p) in ids]:
        del optimizer.state[p]
    return taken


def _range(name: str):
    """A torch.profiler range (an NVTX range under ``torch.autograd.profiler.emit_nvtx``)
    around the engine's work. Gated: ``record_function`` costs ~9 us per range even with no
    profiler running (measured, torch 2.13 CPU), the check ~0.1 us."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return nullcontext()


class SmartFreezer:
    """Progressive front-to-back layer freezing for any PyTorch training loop.

    Args:
        model: the module being trained.
        optimizer: its optimizer, or a list of optimizers holding its parameters.
        policy: a ``FreezePolicy``; default the SmartFRZ attention predictor.
        example_inputs: inputs for one forward pass that finds the units: a tuple of positional
            inputs, a single tensor, or a dict of keyword inputs (a Hugging Face batch; a dict
            whose keys are not all parameters of ``model.forward`` is its one positional input).
            Without it, the units are found at the model's first forward; a model with lazy
            layers (``nn.LazyLinear``) not materialised yet is set up right after its first
            forward, which draws their weights as it would without the freezer.
        example_kwargs: keyword inputs for that pass (alone: a call with keyword inputs only).
        total_steps: number of optimizer steps in the run (schedule-based policies need it).
        sample_every: take a weight-history snapshot every this many steps. Default: the
            policy's choice (SmartFRZ: ``total_steps // 120``, the pace its predictor was
            trained at), else 1.
        window: snapshots per unit in the history (T).
        sample_size: sampled weights per unit (K).
        keep_trainable: this many last units never freeze (the head, by default). Units of
            single numbers after them (a learned temperature, CLIP's ``logit_scale``) do not
            count: they are no head, and stay trainable with the one before them.
        decision_delay: a decision the policy leaves on the GPU is applied this many steps
            later, by when its copy to the host has long finished (no stall, same every run).
        seed: seed of the sampled weight positions.
        process_group: distributed training (see ``smartfrz_fast.distributed``): every rank
            applies rank 0's decision, broadcast in this group at the steps where the policy
            ``decides_at`` (never for schedule policies, which agree by construction). None:
            the DDP wrapper's group, else the default group when torch.distributed runs more
            than one rank. False: no sync.
        shared_parameters: a parameter read both inside and after a frozen prefix (tied input
            and output embeddings, T5's shared embedding, a layer called several times).
            ``"train"`` (default): it keeps training from its reads after the prefix; its reads
            inside the prefix pass no gradient (their module calls' outputs are detached).
            ``"freeze"``: it freezes with the prefix, and its later reads (the LM head) use it
            frozen, which also saves their weight gradient and its optimizer state.
            docs/shared_parameters.md compares the two.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]],
        policy: Optional[FreezePolicy] = None,
        *,
        example_inputs: Any = None,
        example_kwargs: Optional[Dict[str, Any]] = None,
        total_steps: Optional[int] = None,
        sample_every: Optional[int] = None,
        window: int = 30,
        sample_size: int = 1024,
        keep_trainable: int = 1,
        decision_delay: int = 1,
        seed: int = 0,
        process_group: Any = None,
        shared_parameters: str = "train",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SmartFreezer expects an nn.Module, got {type(model).__name__}")
        total_steps = _checked_int("total_steps", total_steps, 1, optional=True)
        sample_every = _checked_int("sample_every", sample_every, 1, optional=True)
        window = _checked_int("window", window, 2)
        sample_size = _checked_int("sample_size", sample_size, 1)
        keep_trainable = _checked_int("keep_trainable", keep_trainable, 0)
        decision_delay = _checked_int("decision_delay", decision_delay, 0)
        seed = _checked_int("seed", seed, None)
        if shared_parameters not in SHARED_PARAMETER_MODES:
            raise ValueError(f"SmartFreezer: shared_parameters must be one of {SHARED_PARAMETER_MODES}, got "
                             f"{shared_parameters!r} (see docs/shared_parameters.md)")
        if policy is None:
            from .policy import SmartFRZ

            policy = SmartFRZ()
        if not isinstance(policy, FreezePolicy):
            raise TypeError(f"policy must be a FreezePolicy, got {type(policy).__name__}")
        _check_policy_free(policy)
        policy.check_total_steps(total_steps)  # now, not at the first forward inside the loop
        if sample_every is None:  # the policy's pace (SmartFRZ: that of its training), else 1
            chooser = getattr(policy, "sample_every_for", None)
            sample_every = chooser(total_steps) if chooser is not None else 1
        self.model = model
        # the optimizers whose steps the freezer follows, and (weakly) wrappers around them (_unwrapped)
        self.optimizers, wrappers = _as_optimizers(optimizer)
        self._wrappers: List["weakref.ref[torch.optim.Optimizer]"] = [weakref.ref(w) for w in wrappers]
        self.policy = policy
        self.total_steps = total_steps
        self.sample_every = sample_every
        self.window = window
        self.sample_size = sample_size
        self.keep_trainable = keep_trainable
        self.decision_delay = decision_delay
        self.seed = seed
        self.shared_parameters = shared_parameters

        self.step_count = 0
        self.num_frozen = 0
        self.timeline: List[FreezeEvent] = []
        self.plan: Optional[UnitPlan] = None
        self.history = None
        self._pending: List[Tuple[int, Tensor, Optional[Any]]] = []  # (apply at step, host tensor, event)
        self._grad_sq: Optional[Tensor] = None
        # ids of the optimizers that stepped since the last step() (a checkpoint saves them: one
        # stepping again after a resume began a new iteration)
        self._stepped: Set[int] = set()
        # resumed from a checkpoint taken between optimizer.step() and step(), until step() counts
        # that iteration (_catch_up_owed_step); a training forward of the model since the resume
        # (noted by a forward pre-hook, _owed_hook) and then an optimizer step show that the loop
        # went on to its next one
        self._owed_from_checkpoint = False
        self._forward_since_owed = False
        self._owed_hook = None
        self._after_step_checks: List[Callable] = []  # optimizer post-step hooks, re-created optimizers too
        self._grad_index_cache: Dict[Any, Tensor] = {}
        self._hooks: List[Any] = []
        # a freezer dropped without close() (built inside a function, a sweep, a re-run cell) is
        # freed at once (its optimizers' hooks hold it weakly: held_weakly): its hooks go with it, or
        # they would keep detaching reads and holding layers in eval in the user's later training
        weakref.finalize(self, remove_handles, self._hooks)
        self._first_forward_hook: Optional[Any] = None
        self._eval_hooks: List[Any] = []  # the frozen region's hooks, once set up
        self._region = None
        self._refused_warned = False
        self._refused: Optional[str] = None  # why the last freeze stopped short of what was asked
        self._nonfinite_warned = False
        self._nonfinite_statistics_warned = False
        self._freeze_listeners: List[Callable[[FreezeEvent, Sequence[Unit]], None]] = []
        self._change_listeners: List[Callable[[str, Any], None]] = []
        self._warned_past_total = False
        # the policy's host time in step() (snapshots, decisions) against the wall time between
        # step() calls, over the current stretch of POLICY_COST_STEPS steps (_note_policy_cost)
        self._policy_cost = [0.0, None, 0]  # [policy seconds, stretch start, steps]
        # [policy seconds, time, step, latest time] from the end of the first step() since built or
        # resumed to the end of the latest: report()
        self._policy_total = [0.0, None, 0, None]
        self._policy_cost_warned = False
        self._marked_for_grad_warned = False
        # what must stay frozen, refreshed after each freeze and parameter swap (None: stale)
        self._held: Optional[Tuple[List[Tuple[str, Tensor]], List[Tuple[str, Tensor]]]] = None
        self._refreeze_hook = None  # a forward pre-hook, once the user's code woke frozen parameters
        self._last_held: Dict[int, int] = {}  # unit -> last step it was seen held still by the user's code
        self._trained_this_step: set = set()  # units an optimizer step trained since the last step()
        # optimizer -> (its groups and their sizes, per group [(unit, [its parameters in the group])])
        self._units_of_groups: "weakref.WeakKeyDictionary[torch.optim.Optimizer, Tuple[Any, list]]" = \
            weakref.WeakKeyDictionary()
        # unit -> the step count before the first of its steps in a row that trained none of it
        self._idle_since: Dict[int, int] = {}
        # optimizer -> its removals of frozen parameters, each [(group, position, name)] (close() undoes them)
        self._taken: "weakref.WeakKeyDictionary[torch.optim.Optimizer, list]" = weakref.WeakKeyDictionary()
        self._frozen_by_user: set = set()  # ids of the parameters frozen when the freezer was set up
        self._user_frozen_modules: set = set()  # ids of the modules made only of those (_user_frozen_modules)
        self._guard: Optional[guards.Guard] = None  # made at set-up: watches the model and the optimizers
        self._closed = False
        self._loaded_at: Optional[int] = None  # the step of the checkpoint loaded into it, if any
        # Distributed: units live on the inner module; rank 0's decisions are broadcast.
        from . import distributed

        # torch.compile(model) (outside or inside DDP): the units are the compiled model's own. A
        # set-up traced through the compiled wrapper made dynamo skip the model's forward for the
        # rest of the process (it ran eagerly, silently), and named every unit "_orig_mod.*"
        self.module, self._dist_kind = distributed.unwrap(_compiled_inner(model))
        self.module = _compiled_inner(self.module)
        if self._dist_kind == "fsdp2" and policy.name == "egeria":
            raise ValueError(
                "SmartFreezer: Egeria does not run under FSDP2 yet: its int8 reference model copies the model's "
                "full weights, which FSDP2 shards across the ranks. Use Egeria under DDP (FreezableDDP), or "
                "another policy under FSDP2 (docs/integrations/ddp_fsdp.md).")
        self._process_group = process_group
        self._sync = None
        if self._dist_kind == "freezable_ddp":
            self.add_freeze_listener(lambda event, units: model.rewrap())

        guards.check_unclaimed(self.module)
        self._deferred_example: Optional[Tuple[Tuple[Any, ...], Optional[Dict[str, Any]]]] = None
        if (example_inputs is not None or example_kwargs is not None) and not uninitialized_parameters(self.module):
            # keyword inputs alone are a call too
            self._setup(*example_call(self.module, () if example_inputs is None else example_inputs, example_kwargs))
        else:  # lazy layers (nn.LazyLinear) are left for the user's own first forward to materialise:
            if example_inputs is not None or example_kwargs is not None:  # or a checkpoint's load
                self._deferred_example = example_call(
                    self.module, () if example_inputs is None else example_inputs, example_kwargs)
            self._place_first_forward_hook()
        guards.claim(self, self.module)  # last: a constructor that raised claims nothing

    # ------------------------------------------------------------------ set-up
    def _setup_on_first_forward(self, module, args, kwargs, defer_for_lazy: bool = True):
        if torch.compiler.is_compiling():
            # the first forward runs through torch.compile (dynamo is imported, then): find the units
            # eagerly, outside its trace, or dynamo skips the model's forward for good (runs eagerly)
            from torch._dynamo import disable

            return disable(self._setup_on_first_forward)(module, args, kwargs, defer_for_lazy)
        self._remove_first_forward_hook()  # set-up runs the model: the hook must not fire again
        if defer_for_lazy and uninitialized_parameters(self.module):
            # lazy layers: set-up's traced forward would draw their initial weights from torch's
            # generator and then put it back, and this forward would draw its dropout masks from the
            # same state again. Set up right after this forward, which materialises them as it would
            # without the freezer (nothing is frozen before set-up: nothing to do during it)
            self._first_forward_hook = self.model.register_forward_hook(
                engine_hook(self._setup_after_first_forward), with_kwargs=True)
            return None
        try:
            if self._dist_kind == "fsdp2":
                from . import distributed

                distributed.check_sharded_at_first_forward(self.module)
            self._setup(args, kwargs)
        except BaseException:
            # tried (and raised) again at the next forward, which would otherwise train with no
            # freezer while step() failed on the missing set-up
            self._place_first_forward_hook()
            raise

    def _setup_after_first_forward(self, module, args, kwargs, output):
        # a lazy layer this forward did not reach stays unmaterialised: set up anyway, as before
        self._setup_on_first_forward(module, args, kwargs, defer_for_lazy=False)

    def set_up_before_first_forward(self, args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]]) -> None:
        """Find the units now, on the first forward's inputs, where set-up waits for that forward:
        for a wrapper that runs the model itself and must not see set-up's traced forward inside
        its own pass (the activation cache recording the model's module calls)."""
        if self._first_forward_hook is not None:
            self._setup_on_first_forward(self.module, args, kwargs, defer_for_lazy=False)

    def _check_outer_ddp(self, module, args) -> None:
        """Refuse, at its first forward, a DistributedDataParallel built after the freezer around
        the module the freezer was given, under settings a freeze breaks: it failed at the first
        backward after the first freeze, with torch's "Expected to have finished reduction" that
        names neither (review83). A DDP given to the freezer is checked when it is built."""
        from torch.nn.parallel import DistributedDataParallel

        from . import distributed

        ddp = getattr(DistributedDataParallel, "_active_ddp_module", None)  # set during DDP's forward
        if ddp is None or not any(m is self.module for m in ddp.module.modules()):  # (or around a parent of it)
            return
        self._outer_ddp_hook.remove()
        distributed.check_ddp(ddp, where=" (built after the freezer, around the module it was given or a parent)")

    def _place_first_forward_hook(self) -> None:
        # kept apart from self._hooks: other code adds hooks there before the first forward
        self._first_forward_hook = self.model.register_forward_pre_hook(
            engine_hook(self._setup_on_first_forward), with_kwargs=True)

    def _remove_first_forward_hook(self) -> None:
        if self._first_forward_hook is not None:
            self._first_forward_hook.remove()
            self._first_forward_hook = None

    def _setup(self, args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]]) -> None:
        # the first forward may run under the user's inference_mode (a sanity check before
        # training): the engine's state made there would be inference tensors, which training
        # cannot update
        hooks_before = len(self._hooks)
        try:
            with torch.inference_mode(False):
                self._setup_now(args, kwargs)
            self._deferred_example = None  # set up: the example batch it kept is not needed
        except BaseException:
            # leave no half set-up behind: step() then says set-up is missing, and the model keeps no
            # hook of a freezer that was never made
            for hook in self._hooks[hooks_before:]:
                hook.remove()
            del self._hooks[hooks_before:]
            if self._region is not None:
                self._region.remove()
            self.plan, self._region, self.history, self._grad_sq, self._sync = None, None, None, None, None
            self._eval_hooks = []
            raise

    def _setup_now(self, args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]]) -> None:
        _check_policy_free(self.policy)  # again: set-up may come at the first forward
        meta = [n for n, p in self.module.named_parameters() if p.is_meta]
        if meta:
            raise ValueError(
                f"SmartFreezer: the model's parameters are on the 'meta' device (not materialised: "
                f"{meta[:3]}{' ...' if len(meta) > 3 else ''}). Build the freezer (and the optimizer) "
                "after model.to_empty(device=...) and the weights' initialisation or loading.")
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        if tensors and all(t.numel() == 0 for t in tensors):
            raise ValueError(
                "SmartFreezer: the inputs set-up runs the model on are empty (every tensor holds nothing: a batch of "
                "0 samples), so the units' FLOPs cannot be measured (every saving would read 0 %): pass "
                "example_inputs=<a batch with samples>, or let a training forward set the freezer up.")
        from . import distributed

        plan = discover_units(self.module, args, kwargs, shared_parameters=self.shared_parameters)
        if self._dist_kind == "fsdp2":
            distributed.reshard(self.module)  # the traced forward left the root's parameters unsharded
        self._check_optimizers(plan.units)
        max_frozen = _max_frozen(plan.units, self.keep_trainable)
        distributed.check_ddp_parts(self.module, {id(p) for u in plan.units[:max_frozen] for p in u.parameters})
        if self._dist_kind is None and max_frozen and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            # a DDP built after the freezer, around the module it was given, is seen at its forward
            self._outer_ddp_hook = self.module.register_forward_pre_hook(engine_hook(self._check_outer_ddp))
            self._hooks.append(self._outer_ddp_hook)
        self.plan = plan
        self._frozen_by_user = {id(p) for p in self.module.parameters() if not p.requires_grad}
        self._user_frozen_modules = _user_frozen_modules(self.module, self._frozen_by_user)
        from .frozen import FrozenRegion

        self._region = FrozenRegion(self.module, plan)
        self._eval_hooks = self._region.handles
        weakref.finalize(self, self._region.remove)  # dropped unclosed: see self._hooks
        # and its optimizers, if they live on, get the frozen parameters back, as from close()
        weakref.finalize(self, _give_back_frozen, self.module, self._taken).atexit = False
        if max_frozen == 0 and len(plan.units) == 1:
            warnings.warn(f"SmartFreezer: the model is one unit ({plan.units[0].name}), which trains its output: there "
                          "is nothing in front of it to freeze, so nothing will ever freeze.", stacklevel=3)
        elif max_frozen == 0:
            # the largest keep_trainable that leaves a unit to freeze (units of single numbers, a
            # gate or a temperature, are not counted as kept: with only those, 0)
            fewer = next(k for k in range(self.keep_trainable - 1, -1, -1) if _max_frozen(plan.units, k) > 0)
            numbers = " (units of single numbers, gates or temperatures, are not counted as kept ones)" \
                if any(_single_numbers(u) for u in plan.units) else ""
            warnings.warn(
                f"SmartFreezer: keep_trainable={self.keep_trainable} keeps all {len(plan.units)} of the "
                f"model's freezable units trainable{numbers}, so nothing will ever freeze. Lower keep_trainable "
                f"(at most {fewer} leaves a unit to freeze).", stacklevel=3)
        self._map_parameters_to_units()
        if self.policy.needs_history:
            from .history import WeightHistory

            self.history = WeightHistory(plan.units, sample_size=self.sample_size, window=self.window, seed=self.seed)
        device = plan.units[0].parameters[0].device
        from . import distributed

        self._sync = distributed.make_sync(self.model, self._dist_kind, self._process_group, device)
        if self._sync is not None:
            self._check_ranks_agree(plan)
        self.policy.bind(PolicyContext(
            units=[UnitInfo(u.index, u.name, u.num_params, u.forward_flops, tuple(u.module_names), u.backward_flops,
                            u.attention, _single_numbers(u)) for u in plan.units],
            total_steps=self.total_steps,
            device=device,
            max_frozen=max_frozen,
            history=self.history,
            model=self.module,
        ))
        if self.policy.needs_gradients:
            self._grad_sq = torch.zeros(len(plan.units), dtype=torch.float32, device=device)
            for opt in self.optimizers:
                # after the step: with optimizer.step(closure) (Lightning) the backward runs inside
                # it, so a pre-hook would read the previous step's gradients (none after a resume)
                self._hooks.append(opt.register_step_post_hook(held_weakly(self._accumulate_grad_norms)))
        if self.policy.manages_lr:
            self._scale_unit_lrs(self.optimizers)
        from .compile import check_grads_after_freeze

        check_grads_after_freeze(self)  # reentrant checkpointing over the prefix would train nothing
        wrappers = [w for w in (ref() for ref in self._wrappers)  # SAM's own load_state_dict: checked too
                    if w is not None and hasattr(w, "_optimizer_load_state_dict_pre_hooks")]
        for opt in self.optimizers + wrappers:
            self._hooks.append(opt.register_load_state_dict_pre_hook(held_weakly(self._check_optimizer_load_order)))
        self.policy._serves = weakref.ref(self)
        self._guard = guards.Guard(self)

    def _check_ranks_agree(self, plan: UnitPlan) -> None:
        """Every rank must count the same run: the same units, total_steps, policy and settings.
        Ranks given other ones (shards of different lengths counted per rank) freeze at other
        steps: DDP then averages a frozen rank's zeros into the others' gradients, and a rewrap
        or a broadcast waits for ranks that never come."""
        policy = re.sub(r"cuda:\d+", "cuda", self.policy.describe())  # Egeria's reference device is the rank's own
        settings = (f"total_steps={self.total_steps}, policy={policy}, sample_every={self.sample_every}, "
                    f"window={self.window}, sample_size={self.sample_size}, keep_trainable={self.keep_trainable}, "
                    f"decision_delay={self.decision_delay}, seed={self.seed}, "
                    f"shared_parameters={self.shared_parameters!r}, {len(plan.units)} units")
        if not self._sync.same_on_every_rank(settings + repr([u.name for u in plan.units])):
            raise ValueError(
                f"SmartFreezer: the ranks were given different settings (rank {self._sync.rank}: {settings}). "
                "Every rank must build its freezer alike, or they freeze at different steps and training hangs "
                "or diverges: the same model, policy and settings, and the same total_steps (every rank runs the "
                "same number of optimizer steps: DistributedSampler, or shards cut to the shortest one).")

    def _check_optimizers(self, units: Sequence[Unit]) -> None:
        held = {id(p) for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [name for u in units for name, p in zip(u.param_names, u.parameters) if id(p) not in held]
        if missing:
            raise ValueError(
                f"SmartFreezer: the optimizer does not hold {len(missing)} of the model's trainable "
                f"parameters ({missing[:4]}{' ...' if len(missing) > 4 else ''}). Pass the optimizer "
                "(or list of optimizers) that trains this model, built after the model's parameters "
                "were created. Layers meant to stay as they are (a backbone under a head fine-tuned alone): "
                "requires_grad_(False) on them before building the freezer, which then leaves them out."
            )

    def _scale_unit_lrs(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Each unit's lr scaled inside ``optimizer.step()`` by the policy's factor; outside the
        step the groups stay the user's, so lr schedulers built before or after keep working."""
        from .policy.unit_lr import UnitLRScaler

        me = weakref.ref(self)  # the optimizers' hooks hold the freezer weakly, as held_weakly's

        def factors() -> Optional[List[float]]:
            freezer = me()
            return None if freezer is None else freezer.policy.lr_factors(freezer.step_count)

        def unit_of_param() -> Dict[int, int]:
            freezer = me()
            return {} if freezer is None else freezer._lr_unit_of_param

        self._hooks += UnitLRScaler(optimizers, unit_of_param, factors).hooks

    def _map_parameters_to_units(self) -> None:
        """``_unit_of_param``: each parameter's unit (by id). ``_lr_unit_of_param``: the unit
        whose lr factor it takes, the same except for a shared parameter that keeps training
        after its unit freezes (``shared_parameters="train"``: a tied embedding read again by
        the LM head), which takes the factor of its last read's unit."""
        self._unit_of_param = {id(p): u.index for u in self.plan.units for p in u.parameters}
        self._lr_unit_of_param = dict(self._unit_of_param)
        self._units_of_groups.clear()
        if self.shared_parameters == "train":
            for shared in self.plan.shared:
                self._lr_unit_of_param[id(shared.parameter)] = shared.last_unit

    def _accumulate_grad_norms(self, optimizer, args, kwargs) -> None:
        params, units = [], []  # (the guard noted the step in _stepped as it began)
        for group in optimizer.param_groups:
            for p in group["params"]:
                unit = self._unit_of_param.get(id(p))
                if unit is not None and p.grad is not None:
                    params.append(p)
                    units.append(unit)
        if not params:
            return
        key = (id(optimizer), tuple(units))
        index = self._grad_index_cache.get(key)
        if index is None:  # built once per layout, not per step: no host-to-device copy
            index = torch.tensor(units, device=self._grad_sq.device)
            self._grad_index_cache[key] = index
        with _range("smartfrz::grad_norms"):
            # FSDP2: each rank norms its own shards; step() sums them over the ranks.
            grads = [_normable(p.grad) for p in params]
            norms = torch._foreach_norm(grads)
            self._grad_sq.index_add_(0, index, torch.stack(norms).float().pow(2))

    def _observed_grad_sq(self) -> Tensor:
        """The step's squared gradient norm per unit, NaN for the units of an optimizer that did not
        step (a GradScaler skipped it on inf gradients): no gradient observed is not a gradient of
        norm 0. With several optimizers one may be skipped alone (an overflow in the backbone's)."""
        skipped = [o for o in self.optimizers if id(o) not in self._stepped]
        if not skipped:
            return self._grad_sq
        if len(skipped) == len(self.optimizers):
            return torch.full_like(self._grad_sq, float("nan"))
        unseen = {self._unit_of_param[id(p)] for o in skipped for g in o.param_groups for p in g["params"]
                  if id(p) in self._unit_of_param}
        mask = torch.zeros(len(self._grad_sq), dtype=torch.bool)
        mask[sorted(unseen)] = True
        return self._grad_sq.masked_fill(mask.to(self._grad_sq.device), float("nan"))

    # ------------------------------------------------------------------ per step
    @property
    def units(self) -> List[Unit]:
        self._require_setup()
        return self.plan.units

    def _require_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "this SmartFreezer was closed (close() removed its hooks and released the model): it can no "
                "longer step, freeze or load a state. Build a new SmartFreezer to go on freezing (frozen "
                "units stay frozen; its state_dict() resumes in the new one).")
        self._require_setup()

    def _set_up_from_deferred_example(self, even_if_lazy: bool = False) -> None:
        """Set up now on the example inputs set-up waited with for lazy layers, where something
        needs the units before the first forward: a resume loading the freezer's checkpoint
        (``even_if_lazy``: the model's weights, loaded before or after, replace what a lazy layer
        draws here; one the checkpoint lacks, a spare head, keeps it, as before 2026-12-07)."""
        if (self.plan is None and self._deferred_example is not None and self._first_forward_hook is not None
                and (even_if_lazy or not uninitialized_parameters(self.module))):  # else the first forward draws them
            self._remove_first_forward_hook()
            try:
                self._setup(*self._deferred_example)
            except BaseException:
                self._place_first_forward_hook()
                raise
            self._deferred_example = None

    def _require_setup(self, call: str = "step() or load_state_dict()") -> None:
        self._set_up_from_deferred_example()
        if self.plan is None and self._deferred_example is not None:
            raise RuntimeError(
                f"SmartFreezer: the model's lazy layers ({uninitialized_parameters(self.module)[:2]}) are not "
                "materialised yet, and set-up waits for the first forward pass to draw their weights: run one "
                f"(or load the model's weights) before calling {call}.")
        if self.plan is None:
            raise RuntimeError(
                "SmartFreezer has not seen the model run yet: pass example_inputs=..., or run a "
                f"forward pass before calling {call}."
            )

    def step(self) -> None:
        """Call once after each ``optimizer.step()``."""
        self._require_open()
        if self._sync is not None and not self._distributed_step_ok():
            return
        self._end_owed()
        self.step_count += 1
        step = self.step_count
        self._note_idle_units(step)
        self._guard.on_freezer_step(self)  # model changes since the last step, step() vs optimizer steps
        if self.num_frozen:
            self._check_prefix_still_frozen()
            self._region.end_statistics_reestimation()  # a training step: a recalibration pass is over
        if step % self.sample_every == 0:  # at the history's pace: a hold shorter than that moves no window
            self._note_units_held_by_user(step)
        if (self.total_steps is not None and step > self.total_steps and not self._warned_past_total
                and self.policy.uses_total_steps):
            self._warned_past_total = True  # once (also for a run resumed past it)
            self._warn_past_total_steps(step)
        started = time.perf_counter()
        if self.history is not None and step % self.sample_every == 0 and self.policy.wants_snapshots():
            with _range("smartfrz::snapshot"):
                self.history.snapshot()
        with _range("smartfrz::decide"):
            if self._grad_sq is not None:
                if self._sync is not None and self._dist_kind == "fsdp2":
                    self._sync.all_reduce_sum(self._grad_sq)
                self.policy.observe_gradients(step - 1, self._observed_grad_sq())
                self._grad_sq = torch.zeros_like(self._grad_sq)
            self._stepped.clear()
            if self.num_frozen < self.max_frozen:
                decision = self._decide(step)
                if decision is not None:
                    self._submit(step, decision)
        if self._sync is None:  # (under torch.distributed a decision waits for the other ranks too)
            self._note_policy_cost(started)
        with _range("smartfrz::apply"):
            self._apply_due(step)

    def _note_policy_cost(self, started: float) -> None:
        """Warn once where the policy's work in step() (SmartFRZ's predictor: about 0.75 ms per unit
        scored on one CPU thread, whatever a training step costs) takes more than
        POLICY_COST_SHARE of the wall time of a stretch of steps: a deep network's short run on
        the CPU ran 2.8x as long (review77). On a GPU the policy's work is queued, not waited for."""
        now = time.perf_counter()
        total = self._policy_total
        if total[1] is None:
            total[1], total[2] = now, self.step_count
        else:
            total[0] += now - started
        total[3] = now
        cost = self._policy_cost
        if cost[1] is None:
            self._policy_cost = [0.0, now, 0]
            return
        cost[0] += now - started
        cost[2] += 1
        if cost[2] < POLICY_COST_STEPS:
            return
        stretch = (cost[0], now - cost[1], f"the last {cost[2]} steps")
        self._policy_cost = [0.0, now, 0]
        # or since the first step: steps of 1-2 ms never reach 0.25 s in a stretch (review107: 33-41 %
        # of a run's time, no warning)
        run = (total[0], now - total[1], f"the {self.step_count - total[2]} steps since step {total[2]}")
        for seconds, wall, steps in (stretch, run):
            if self._policy_cost_warned or wall <= 0 or seconds < POLICY_COST_SHARE * wall or seconds < 0.25:
                continue
            self._policy_cost_warned = True
            warnings.warn(
                f"SmartFreezer: over {steps} the policy's work in freezer.step() ({self.policy.describe()}: "
                f"snapshots and decisions) took {seconds:.1f} s of {wall:.1f} s, {seconds / wall:.0%} of the training "
                f"time, and may cost more than freezing saves. {self.policy.cost_advice()}"
                f"{self._reference_gather_advice()}", stacklevel=3)

    def _reference_gather_advice(self) -> str:
        """Where the weight history's snapshots run the PyTorch reference gather (the C++
        extension not loaded, no kernel for the device), what it costs and how to do better:
        review105 measured the policy's cost warning blaming the predictor before it had run."""
        if self.history is None:
            return ""
        from . import ops

        from .ops._extension import reference_only

        kind = self.history.device.type
        if not ops.backends((kind,))["gather_history"][kind].startswith("reference"):
            return ""
        why = ("SMARTFRZ_BACKEND=reference asks for it: unset it to run the C++ extension" if reference_only() else
               "the C++ extension is not loaded: python -m smartfrz_fast.info says why; install again with a C++ "
               "compiler at hand (the README's install command) to build it")
        return (" Its snapshots of the weight history run the PyTorch reference gather, about 40 us per parameter "
                f"tensor on one CPU thread (the C++ extension's: about 7 us per unit), because {why}.")

    def _distributed_step_ok(self) -> bool:
        """Under torch.distributed every rank must count the same steps: a rank's decision
        broadcasts, DDP rebuilds and schedules happen at its step numbers. A step() with no
        optimizer step since the previous one (rank-local control flow, one batch more on one
        rank) put this rank ahead: the ranks then waited for each other in different collectives
        (a hang), or froze at different steps and drifted apart silently. It is not counted, with
        a warning (a GradScaler's skipped step is skipped on every rank alike, so schedules shift
        by the skipped steps there, where one process counts them)."""
        if self._guard.optimizer_steps == 0:
            self._guard.warn_once("unmatched distributed", (
                "SmartFreezer.step() was called with no optimizer step since the previous call, under "
                "torch.distributed: it is not counted (every rank must count the same steps, or the ranks freeze at "
                "different steps or wait for each other). Call it once after each optimizer.step(), on every "
                "rank."))
            return False
        return True

    def _check_prefix_still_frozen(self) -> None:
        """The user's code turned ``requires_grad`` back on inside the frozen prefix (a GAN's
        ``set_requires_grad(D, True)``, ``model.requires_grad_(True)`` to unfreeze for a later
        phase). The prefix's modules still run in eval mode and its parameters are out of every
        optimizer, so they did not train: silent until now. A frozen unit's parameters are frozen
        again, with one warning; a layer the user froze before set-up (no unit) that now trains
        inside the prefix is the user's: one warning. A loop over the prefix's parameters per step."""
        if self._held is None:
            modules = self._region.always + list(self._region.partly)
            names = {id(m): n for n, m in self.module.named_modules()}
            self._held = (self.plan.frozen_parameters(self.num_frozen),
                          [(f"{names.get(id(m), type(m).__name__)}.{n}".lstrip("."), p) for m in modules
                           for n, p in m.named_parameters(recurse=False) if id(p) in self._frozen_by_user])
        frozen, foreign = self._held
        woke = [(n, p) for n, p in frozen if p.requires_grad]
        if woke:
            self._take_out_of_training([p for _, p in woke])
            if self._refreeze_hook is None:
                # code that wakes them once (a GAN's toggle) may do so at every step, after step():
                # from now on they are frozen again as each forward starts, before the graph is built
                self._refreeze_hook = self.model.register_forward_pre_hook(engine_hook(self._refreeze_woken))
                self._hooks.append(self._refreeze_hook)
            names = ", ".join(n for n, _ in woke[:3]) + (" ..." if len(woke) > 3 else "")
            self._guard.warn_once("woke", (
                f"SmartFreezer: your code set requires_grad=True on {len(woke)} frozen parameter(s) ({names}), e.g. "
                "model.requires_grad_(True) or a GAN's set_requires_grad(D, True). A frozen prefix stays frozen: its "
                "parameters are out of the optimizer and its modules run in eval mode, so they did not train, and "
                "the backward pass ran through them; the freezer sets requires_grad=False on them again, from now "
                "on also as each forward of the model starts (so code that wakes them to read their gradients, "
                "torch.autograd.grad over every parameter, fails: ask for the parameters that require grad). To train "
                "frozen layers again, call freezer.close() first (they then follow your requires_grad, "
                "model.train() and optimizer); to switch a part of the model on and off each step, switch only "
                "the parameters that still train."))
        trained = [n for n, p in foreign if p.requires_grad]
        if trained:
            self._guard.warn_once("foreign", (
                f"SmartFreezer: {', '.join(trained[:3])}{' ...' if len(trained) > 3 else ''} had requires_grad=False "
                "when the freezer was built (so it is in no unit) and trains now, inside the frozen prefix: the "
                "freezer keeps its module in eval mode, and the backward pass runs through the frozen units to "
                "reach it, so the prefix saves nothing. Choose which layers train before building the freezer: "
                "close() it and build a new SmartFreezer."))

    def _refreeze_woken(self, module, args) -> None:
        """Frozen parameters the user's code woke since the last look (``_check_prefix_still_frozen``)
        frozen again before this forward builds its graph: else its backward runs through them."""
        if self.num_frozen and not self._closed:
            self._check_prefix_still_frozen()

    def past_total_steps_effect(self) -> str:
        """What running past ``total_steps`` does to this freezer's policy, in words."""
        return ("its lr factor is 0 for every unit past the schedule's end, so nothing trains any more"
                if self.policy.manages_lr else "its schedule and pace were set for that length")

    def _warn_past_total_steps(self, step: int) -> None:
        warnings.warn(f"SmartFreezer: step {step} is past total_steps={self.total_steps}, and the policy "
                      f"{type(self.policy).__name__} was built for that many steps: "
                      f"{self.past_total_steps_effect()}. Pass the run's real number of optimizer steps as "
                      "total_steps.", stacklevel=3)

    def _decide(self, step: int) -> Optional[Decision]:
        """The policy's decision; under DDP rank 0's, broadcast only where the policy may
        decide (schedules: never, every rank computes the same int)."""
        if self._sync is None or self.policy.deterministic_schedule:
            return check_decision(self.policy, self.policy.decide(step, self.num_frozen), step, len(self.units))
        broadcast = self.policy.decides_at(step)  # before decide(), which may advance counters
        decision = check_decision(self.policy, self.policy.decide(step, self.num_frozen), step, len(self.units))
        if not broadcast:
            if decision is not None:
                raise RuntimeError(
                    f"{type(self.policy).__name__}.decide returned a decision at step {step}, where "
                    "its decides_at() said it would not: under DDP the ranks would disagree. Make "
                    "decides_at() true at every step where decide() may return a decision."
                )
            return None
        return self._sync.broadcast(decision)  # every rank applies rank 0's decision

    @property
    def max_frozen(self) -> int:
        return _max_frozen(self.units, self.keep_trainable)

    def _submit(self, step: int, decision: Decision) -> None:
        if isinstance(decision, Tensor) and decision.device.type == "cuda" and self.decision_delay > 0:
            host = torch.empty((), dtype=torch.int64, pin_memory=True)
            host.copy_(decision, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((step + self.decision_delay, host, event))
        else:
            self._pending.append((step, torch.as_tensor(decision).cpu(), None))

    def _apply_due(self, step: int) -> None:
        due = [p for p in self._pending if p[0] <= step]
        self._pending = [p for p in self._pending if p[0] > step]
        for _, host, event in due:
            if event is not None:
                event.synchronize()  # recorded decision_delay steps ago: long complete
            value = int(host)
            if value == -1 and self._sync is not None:
                continue  # a broadcast "no decision"
            check_prefix_length(self.policy, value, step, len(self.units))  # a device tensor's value
            value = self._hold_back_for_user(value, step)
            if self._sync is not None and not self.policy.deterministic_schedule:
                value = self._sync.least(value)  # a layer held on one rank holds on all: the replicas agree
            self.freeze_to(value, step=step)

    def _note_units_trained(self, optimizer: torch.optim.Optimizer) -> None:
        """After each step of one of the freezer's optimizers: the units it trained, with a
        parameter in it that requires grad, has a gradient and sits in a group whose learning rate
        is not 0. A unit held still in another way (its own optimizer not stepped, run under
        torch.no_grad(), requires_grad=False, a learning rate of 0) did not train; its unmoved
        weights are no sign that it is done. After the step: a closure computes the gradients
        inside it. Per step, a look at each unit's parameters until one trained (most often its
        first: about 0.3 us a unit on this CPU)."""
        trained = self._trained_this_step
        for group, units in zip(optimizer.param_groups, self._units_in_groups(optimizer)):
            if _learning_rate_is_0(group.get("lr")):
                continue
            for unit, params in units:
                if unit in trained:
                    continue
                for p in params:
                    if p.grad is not None and p.requires_grad:
                        trained.add(unit)
                        break

    def _units_in_groups(self, optimizer: torch.optim.Optimizer) -> List[List[Tuple[int, List[Tensor]]]]:
        """Per group of ``optimizer``: its parameters by unit. Made again when a group or the
        units' parameters change (a freeze takes parameters out; add_param_group; a swap)."""
        # Each group with the ids of its parameters (a list reassigned or edited in place, moving a
        # hold to other layers, keeps its length): groups and unit parameters are held, so their
        # ids are not reused, and a parameter of no unit maps to none whatever its id.
        layout = [(g, tuple(map(id, g["params"]))) for g in optimizer.param_groups]
        cached = self._units_of_groups.get(optimizer)
        if cached is not None and len(cached[0]) == len(layout) and all(
                g is h and n == m for (g, n), (h, m) in zip(cached[0], layout)):
            return cached[1]
        per_group = []
        for group in optimizer.param_groups:
            units: Dict[int, List[Tensor]] = {}
            for p in group["params"]:
                unit = self._unit_of_param.get(id(p))
                if unit is not None:
                    units.setdefault(unit, []).append(p)
            per_group.append(list(units.items()))
        self._units_of_groups[optimizer] = (layout, per_group)
        return per_group

    def _note_idle_units(self, step: int) -> None:
        """At each ``step()`` after one or more optimizer steps: a unit outside the prefix that
        none of them trained is idle from this step on, until one trains it. A step() without an
        optimizer step (a GradScaler's skipped one) says nothing either way."""
        trained = self._trained_this_step
        if self._guard.optimizer_steps:
            if trained.issuperset(range(self.num_frozen, len(self.units))):  # most steps: every unit trained
                self._idle_since.clear()
            else:
                for unit in self.units[self.num_frozen:]:
                    if unit.index in trained:
                        self._idle_since.pop(unit.index, None)
                    else:
                        self._idle_since.setdefault(unit.index, step - 1)
        trained.clear()

    def _note_units_held_by_user(self, step: int) -> None:
        """Units outside the prefix that the user's code holds still (a warm-up of the head, a
        gradual unfreezing, a linear probe): idle (``_note_units_trained``) at two steps in a row
        or more, or idle at this step with no parameter that requires grad (a warm-up whose
        learning rate starts from 0 has one idle step, and holds nothing). A GAN's
        discriminator, switched off only around the generator's step, trains at its own
        optimizer's. At each snapshot and each decision."""
        for unit in self.units[self.num_frozen:]:
            idle_since = self._idle_since.get(unit.index)
            if idle_since is not None and (step - idle_since >= 2 or not any(p.requires_grad for p in unit.parameters)):
                self._last_held[unit.index] = step

    def _hold_back_for_user(self, value: int, step: int) -> int:
        """An adaptive policy's decision stops before a unit that the user's code held still
        within the last window (``window * sample_every`` steps): its weights, gradients and
        activations did not move because it did not train, which is no sign that it is done.
        Frozen now, it would stay frozen when the user lets it train. Schedules keep their
        schedule."""
        if self.policy.deterministic_schedule:
            return value
        self._note_units_held_by_user(step)  # held now, between two looks
        span = self.window * self.sample_every
        for index in range(self.num_frozen, min(value, len(self.units))):
            held = self._last_held.get(index)
            if held is not None and step - held < span:
                self._guard.warn_once("held by user", (
                    f"SmartFreezer: {type(self.policy).__name__} would freeze unit {self.units[index].name!r}, but "
                    f"your code held it still at step {held} (requires_grad=False, a learning rate of 0, no "
                    f"gradient, or its optimizer not stepped, on all of it): it did not train, which is no sign "
                    f"that it is done learning. It (and every unit after it) may freeze once it has trained for "
                    f"{span} steps (window * sample_every). A layer you mean to keep frozen for good, or one whose "
                    "output no loss reads (a pooler the loss never uses gets no gradient either): set "
                    "requires_grad=False on it before building the freezer (it is then no unit), or call "
                    "freezer.freeze_to()."))
                return index
            if index in self._idle_since:  # idle at its last step: not a hold yet, not done
                return index
        return value

    # ------------------------------------------------------------------ freeze action
    def freeze_to(self, num_units: int, step: Optional[int] = None) -> int:
        """Freeze the first ``num_units`` units (never fewer than already frozen). Returns the
        frozen-prefix length after clamping to ``max_frozen``, shared-parameter spans and
        non-finite weights."""
        self._require_open()
        if isinstance(num_units, bool) or (isinstance(num_units, Tensor) and num_units.dtype == torch.bool):
            raise TypeError(f"freeze_to expects a number of units (an int), got {num_units!r}")
        try:  # an int, a numpy int or a one-element int tensor (a policy's decision)
            num_units = operator.index(num_units)
        except TypeError:
            raise TypeError(f"freeze_to expects a number of units (an int), got {num_units!r}") from None
        if num_units < 0:
            raise ValueError(f"freeze_to expects a number of units >= 0, got {num_units}")
        wanted = min(num_units, self.max_frozen)
        target = self.plan.largest_allowed_cut(wanted)
        if target < wanted:
            self._warn_refused_cut(wanted, target)
        elif target > self.num_frozen:
            self._refused = None
        if target <= self.num_frozen:
            return self.num_frozen
        target = self._stop_before_nonfinite(target)
        if target <= self.num_frozen:
            return self.num_frozen
        newly = self.units[self.num_frozen:target]
        already = {id(p) for _, p in self.plan.frozen_parameters(self.num_frozen)}
        self._take_out_of_training([p for _, p in self.plan.frozen_parameters(target) if id(p) not in already])
        # every module of the prefix in eval (norm statistics stop moving, no dropout of any
        # kind): a frozen prefix is a fixed feature extractor, as in the activation cache
        switched = self._region.apply(target)
        self._held = None
        before = self.num_frozen
        self.num_frozen = target
        self._grad_index_cache.clear()
        if self.history is not None:
            self.history.drop_leading(target)
        event = self._event(self.step_count if step is None else step, newly)
        self.timeline.append(event)
        for listener in self._freeze_listeners:
            listener(event, newly)
        self._warn_split_shared(before, target)  # last: a warnings filter set to "error" finds the freeze done
        self._warn_heads_frozen(before, target)
        self._warn_user_frozen_to_eval(switched)
        self._warn_if_inputs_marked_for_grad(target)
        if target == len(self.units) and not any(p.requires_grad for p in self.module.parameters()):
            warnings.warn(f"SmartFreezer: every unit of the model is frozen now (keep_trainable="
                          f"{self.keep_trainable}): nothing in it requires grad, so a loss of this model alone "
                          "fails at backward() (\"element 0 of tensors does not require grad\"). Keep "
                          "keep_trainable >= 1 (the default keeps the head) unless the loss trains something else.",
                          stacklevel=2)
        return target

    def _take_out_of_training(self, params: Sequence[Tensor]) -> None:
        """``requires_grad=False``, no gradient, out of every optimizer with their state."""
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        ids = {id(p) for p in params}
        for opt in self.optimizers:
            self._note_taken(opt, _remove_params(opt, ids))
        self._drop_wrapper_state(ids)

    def _note_wrapper(self, wrapper: torch.optim.Optimizer) -> None:
        """A wrapper around one of the freezer's optimizers stepped (the freezer was given the inner
        one): its own state of the frozen parameters goes too, now and at later freezes."""
        if all(ref() is not wrapper for ref in self._wrappers):
            self._wrappers.append(weakref.ref(wrapper))
            if self.plan is not None:
                self._drop_wrapper_state({id(p) for _, p in self.plan.frozen_parameters(self.num_frozen)})

    def _drop_wrapper_state(self, ids: set) -> None:
        """The wrappers' own state of these parameters (their groups are the inner optimizers',
        from which the parameters went already)."""
        for ref in self._wrappers:
            wrapper = ref()
            state = {} if wrapper is None else getattr(wrapper, "state", {})
            for p in [p for p in state if id(p) in ids]:
                del state[p]

    def _note_taken(self, optimizer: torch.optim.Optimizer, taken: List[Tuple[int, int, Tensor, Optional[str]]]) -> None:
        """Remember where in ``optimizer`` each frozen parameter was (by name: a parameter may be
        replaced by a like one later), so that ``close()`` gives it back there (a user who then
        sets requires_grad=True trains it with the optimizer they kept, and a checkpoint of that
        optimizer lists the parameters in their order)."""
        if taken:
            names = {id(p): n for n, p in self.module.named_parameters(remove_duplicate=False)}
            self._taken.setdefault(optimizer, []).append(
                [(group, position, names[id(p)], opt_name) for group, position, p, opt_name in taken if id(p) in names])

    def _give_back_frozen(self) -> None:
        _give_back_frozen(self.module, self._taken, self.optimizers)

    def _warn_user_frozen_to_eval(self, switched: Sequence[nn.Module]) -> None:
        """Modules the user froze before set-up, left in train mode, that the prefix now runs in
        eval (every module called inside it does): their statistics stop, their dropout is off.
        Right for a stem in front of the model; not for an EMA or BYOL target network called in
        the same forward, whose BatchNorm statistics should move."""
        mine = [m for m in switched if id(m) in self._user_frozen_modules and reads_its_mode(m)]
        if not mine:
            return
        names = {id(m): n for n, m in self.module.named_modules()}
        listed = ", ".join(f"{names.get(id(m), '?')} ({type(m).__name__})" for m in mine[:3])
        self._guard.warn_once("user_frozen_eval", (
            f"SmartFreezer: the frozen prefix now runs in eval mode modules that lie in parts of the model you froze "
            f"before the freezer was built and left in train mode: {listed}{' ...' if len(mine) > 3 else ''} "
            "(their norm statistics stop moving, "
            "their dropout is off), as every module called inside the frozen prefix. If one should keep train "
            "mode (an EMA or BYOL target network called in the same forward), give SmartFreezer the part of the "
            "model that trains (the online network) instead of the model that holds both."))

    def _warn_refused_cut(self, wanted: int, target: int) -> None:
        refused = next(c for c in range(wanted, target, -1) if not self.plan.allowed_cut[c])
        self._refused = (f"asked to freeze {wanted} units, froze {target}: with shared_parameters='train', "
                         f"{self.plan.refused_cuts.get(refused, 'the cut is not allowed')}. "
                         "shared_parameters='freeze' can cut there (the shared parameter then freezes with "
                         "the prefix).")
        if not self._refused_warned:
            self._refused_warned = True
            warnings.warn(f"SmartFreezer: {self._refused}", stacklevel=4)

    def _warn_if_inputs_marked_for_grad(self, target: int) -> None:
        """Hugging Face's ``enable_input_require_grads`` hook (``gradient_checkpointing_enable()``
        sets it in transformers 5, PEFT's k-bit preparation in 4) makes the input embeddings'
        output require grad: autograd then runs the backward of every frozen layer after them,
        which the freezer counts as saved. Said once."""
        if self._marked_for_grad_warned:
            return
        unit_modules = {id(m) for u in self.units for m in u.modules}
        for name, marked in self.module.named_modules():
            entry = self.plan.module_calls.get(id(marked))
            if entry is None or not any(marks_output_for_grad(h) for h in marked._forward_hooks.values()):
                continue
            # the frozen units that start after its first call ends: their backward runs. The module
            # may be in no unit (an embedding the user froze, as for LoRA: PEFT's own set-up)
            end = entry[2][0][1]
            after = [u for u in range(target) if (self.plan.boundary[u] >= end if u else
                                                  id(marked) not in unit_modules and end <= self.plan.boundary[1])]
            if not after:
                continue
            self._marked_for_grad_warned = True
            warnings.warn(
                f"SmartFreezer: Hugging Face's enable_input_require_grads hook on {name!r} (set by "
                "gradient_checkpointing_enable() in transformers 5, and by PEFT's k-bit preparation) makes its output "
                f"require grad, so the backward pass runs through the {len(after)} frozen unit(s) after "
                "it, unless the activation cache serves them: their backward is not saved, though the report counts "
                "it (a 4-layer BERT with 2 layers frozen: 52.5 ms a step against 38-43 ms without the hook). With "
                "non-reentrant checkpointing (gradient_checkpointing_kwargs={'use_reentrant': False}, which frozen "
                "layers need anyway), call model.disable_input_require_grads() after gradient_checkpointing_enable().",
                stacklevel=3)
            return

    def _warn_heads_frozen(self, before: int, after: int) -> None:
        """An output of the model made by a head called before the trunk's end (a multi-task net's
        first task) stops learning once the prefix takes in that head (review74 #1). Said once
        per freeze."""
        heads = [(path, head) for path, head in self.plan.head_outputs if before <= head < after < len(self.units)]
        if not heads:
            return
        outputs = ", ".join(f"output{path} (its last layer: unit {head}, {self.units[head].name})" for path, head in heads)
        warnings.warn(
            f"SmartFreezer: the model's {outputs} is made by frozen units alone now (units 0-{after - 1} froze): "
            "a head called before the units that still train, feeding none of them. If your loss reads that output "
            "as a task of its own, the task stops learning now. Call such heads after the whole trunk, or give "
            "the freezer the trunk only (SmartFreezer(model.trunk, ...)); see docs/changes_and_misuse.md, "
            "'Several heads on one trunk'. If your loss only adds it to a later output (deep supervision), "
            "this is expected.", stacklevel=4)

    def _warn_split_shared(self, before: int, after: int) -> None:
        """One warning per group of shared parameters that this freeze newly splits."""
        was = {id(s.parameter) for s in self.plan.split_shared(before)}
        newly = [s for s in self.plan.split_shared(after) if id(s.parameter) not in was]
        other = {"train": "freeze", "freeze": "train"}[self.shared_parameters]
        for group in shared_groups(newly):
            # a module called exactly twice (an encoder on two views); a loop's (ALBERT's layer) is told elsewhere
            calls = [call[1] for s in group for _, call, _ in s.reads if call is not None]
            called_again = bool(calls) and max(calls) == 1
            warnings.warn(f"SmartFreezer: froze units 0-{after - 1}; {describe_shared(group, self.units)} "
                          f"{_SHARED_FATE[self.shared_parameters]} (shared_parameters={self.shared_parameters!r}; "
                          f"{other!r}: {_SHARED_FATE[other]}).{_CALLED_AGAIN if called_again else ''}", stacklevel=4)

    def add_freeze_listener(self, listener: Callable[[FreezeEvent, Sequence[Unit]], None]) -> None:
        """Call ``listener(event, newly_frozen_units)`` after every freeze (activation caches,
        compiled-region rebuilds, trainer callbacks, logging)."""
        self._freeze_listeners.append(listener)

    def remove_freeze_listener(self, listener: Callable[[FreezeEvent, Sequence[Unit]], None]) -> None:
        """Stop calling ``listener`` (a closed activation cache)."""
        self._freeze_listeners = [other for other in self._freeze_listeners if other is not listener]

    def add_change_listener(self, listener: Callable[[str, Any], None]) -> None:
        """Call ``listener("optimizer", (new, replaced))`` when the freezer takes over a re-created
        optimizer, and ``listener("parameters", {id(old): new})`` when parameters were replaced by
        like ones (``load_state_dict(assign=True)``): what keeps its own references to the
        optimizers or parameters (``SparseMasks``, an activation cache) follows them."""
        self._change_listeners.append(listener)

    def remove_change_listener(self, listener: Callable[[str, Any], None]) -> None:
        """Stop calling ``listener`` (a closed activation cache)."""
        self._change_listeners = [other for other in self._change_listeners if other is not listener]

    # ------------------------------------------------------------------ changes after set-up (see guards)
    def _adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> List[torch.optim.Optimizer]:
        """``optimizer`` holds the model's parameters but is not this freezer's (one re-created
        mid-run), and is about to step: it takes the place of the freezer's optimizers it shares
        parameters with, and gets what they had (frozen parameters and their state out, per-unit
        lrs for a policy that manages the lr). Returns the optimizers it replaces."""
        chain = _unwrapped(optimizer)
        for member in chain:
            _check_optimizer_can_lose_parameters(member)
        optimizer = chain[-1]
        self._wrappers += [weakref.ref(w) for w in chain[:-1]]
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        replaced = [o for o in self.optimizers if any(id(p) in held for g in o.param_groups for p in g["params"])]
        self.optimizers = [o for o in self.optimizers if all(o is not r for r in replaced)] + [optimizer]
        frozen = {id(p) for _, p in self.plan.frozen_parameters(self.num_frozen)}
        self._note_taken(optimizer, _remove_params(optimizer, frozen))
        self._drop_wrapper_state(frozen)
        if self.policy.manages_lr:  # runs in this very step, like the hook below
            self._scale_unit_lrs([optimizer])
        if self.policy.needs_gradients:  # runs after this very step, as for the freezer's own optimizers
            self._hooks.append(optimizer.register_step_post_hook(held_weakly(self._accumulate_grad_norms)))
        for check in self._after_step_checks:  # the no-gradient check after a freeze (compile.py)
            self._hooks.append(optimizer.register_step_post_hook(check))
        self._hooks.append(optimizer.register_load_state_dict_pre_hook(held_weakly(self._check_optimizer_load_order)))
        self._grad_index_cache.clear()
        for listener in self._change_listeners:  # before this step runs: its post-step hooks may join
            listener("optimizer", (optimizer, replaced))
        return replaced

    def _check_optimizer_load_order(self, optimizer, state_dict):
        """An optimizer state saved with frozen parameters taken out, loaded before the
        freezer's state put them out here too: torch's own error says only that the group sizes
        differ. Say what to do."""
        saved = [len(g.get("params", ())) for g in state_dict.get("param_groups", ())]
        mine = [len(g["params"]) for g in optimizer.param_groups]
        if self.num_frozen and saved != mine:
            # A resumed run that replays its code re-adds frozen parameters it woke (requires_grad
            # back on, add_param_group): out of the groups now, as at the saved run's next step.
            self._check_prefix_still_frozen()
            mine = [len(g["params"]) for g in optimizer.param_groups]
        if self.step_count == 0 and len(saved) == len(mine) and saved != mine and sum(saved) < sum(mine):
            raise ValueError(f"this optimizer state holds {sum(mine) - sum(saved)} parameters fewer than the optimizer, "
                             "as one saved after layers froze does. Load the freezer's state first "
                             "(freezer.load_state_dict(...), which takes the frozen parameters out), then the "
                             "optimizer's (with accelerate's load_state: in register_load_state_pre_hook, "
                             "docs/integrations/huggingface.md); a state saved from another model does not fit "
                             "this optimizer at all.")
        if self.step_count == 0 and not self._guard.optimizer_steps and state_dict.get("state"):
            self._guard.warn_once("optimizer state before freezer state", (
                f"SmartFreezer: this optimizer state was saved after training (it holds state for "
                f"{len(state_dict['state'])} parameters), and this freezer is at step 0: a resumed run loads "
                "the freezer's state first (freezer.load_state_dict(saved), then the optimizer's), or its "
                f"{type(self.policy).__name__} starts again from step 0, silently off the saved run's course. "
                "Starting a new run from another run's optimizer state: ignore this."))
        taken = sum(len(removal) for removal in self._taken.get(optimizer, []))
        if len(saved) == len(mine) and taken and sum(saved) - sum(mine) == taken:
            raise ValueError(
                f"this optimizer state still holds the {taken} frozen parameters that this optimizer no longer has: "
                "it was saved from an optimizer re-created after a freeze and before its first step (the freezer "
                "takes frozen parameters out of a new optimizer when it first steps). Load it into an optimizer "
                "over all the parameters before the freezer's state (optimizer.load_state_dict(...), then "
                "freezer.load_state_dict(...), which takes them out), or save after the new optimizer's first step.")
        return None

    def _resync(self) -> None:
        """A parameter or module was registered on the model after set-up. Parameters replaced by
        like ones (same shape, dtype, device; any strides) are adopted: frozen units stay frozen on
        the new ones, the optimizers and the history use them. Other changes are refused."""
        guard = self._guard
        layout = guards.model_layout(self.module)
        in_units = {id(m) for u in self.units for m in u.modules + u.norm_modules + u.dropout_modules}
        change = guards.describe_change(guard.layout, layout, in_units)
        old_params, new_params = guard.layout[1], layout[1]
        pairs: Dict[int, Tuple[Tensor, Tensor]] = {}
        kept = set()  # ids of old tensors that some name still holds
        for name, new in new_params.items() if not change else ():
            old = old_params[name]  # the same names: describe_change found none added or removed
            if new is old:
                kept.add(id(old))
                continue
            if not guards.same_layout(old, new):
                change = change or (f"parameter {name} changed from {tuple(old.shape)} {old.dtype} to "
                                    f"{tuple(new.shape)} {new.dtype}")
            elif pairs.get(id(old), (old, new))[1] is not new:
                change = change or (f"parameter {name} was shared and is no longer: tied weights untied, as "
                                    "load_state_dict(assign=True) does; re-tie them before the next step")
            pairs[id(old)] = (old, new)
        untied = [] if change else [name for name, new in new_params.items()
                                    if id(old_params[name]) in kept and new is not old_params[name]]
        if untied:  # `out.weight = nn.Parameter(emb.weight.clone())`: emb.weight would have left training
            change = (f"parameter {untied[0]} was shared and is no longer: tied weights untied; re-tie them "
                      "before the next step")
        old_ids = {id(t) for t in old_params.values()}
        if not change and (len({id(new) for _, new in pairs.values()}) != len(pairs)
                           or any(id(new) in old_ids for _, new in pairs.values())):
            # `out.weight = emb.weight` gives out.weight another name's tensor: a frozen emb froze the head
            change = "separate parameters now share one tensor (weights tied after set-up)"
        if not change and pairs and self._dist_kind == "fsdp2":
            change = "parameters replaced under FSDP2 (sharded parameters cannot be swapped in place)"
        if change:
            compiled = ("A block swapped for torch.compile(block) after set-up? Compile it in place instead "
                        "(block.compile(), or smartfrz_fast.compile.compile_blocks): the model keeps its modules and "
                        "this freezer goes on. " if "_orig_mod" in change else "")
            raise RuntimeError(
                f"SmartFreezer: the model changed after the freezer was set up ({change}). {compiled}The freezer's "
                "units, history and any activation cache describe the old model. Build a new SmartFreezer (and "
                "optimizer) for the changed model: close() this one first. Replacing parameters with ones of "
                "the same shape (load_state_dict(assign=True)) is fine. Training over (weights baked for saving: "
                "remove_parametrizations, merge_and_unload)? Save the freezer's state_dict() and close() it "
                "before changing the model.")
        frozen = {id(p) for _, p in self.plan.frozen_parameters(self.num_frozen)}  # not shared ones still training
        moved = [n for n, p in new_params.items() if id(old_params[n]) in frozen and p is not old_params[n]
                 and not torch.equal(p.detach(), old_params[n].detach())]
        if pairs and self._dist_kind == "ddp":
            warnings.warn("SmartFreezer: parameters of the model inside DistributedDataParallel were replaced "
                          "(load_state_dict(assign=True)): the freezer and the optimizer follow them, but DDP still "
                          "averages the gradients of the tensors it was built over, so the ranks drift apart. Wrap "
                          "the model in DDP after loading, or use smartfrz_fast.distributed.FreezableDDP, which "
                          "rebuilds its DDP.", stacklevel=4)
        if moved:
            warnings.warn(f"SmartFreezer: frozen parameters were replaced by other values ({moved[:3]}): they stay "
                          "frozen with the new values (an activation cache drops the rows it made with the old "
                          "ones and makes them again).", stacklevel=4)
        for unit in self.units:
            unit.parameters[:] = [pairs.get(id(p), (p, p))[1] for p in unit.parameters]
        for shared in self.plan.shared:
            shared.parameter = pairs.get(id(shared.parameter), (shared.parameter, shared.parameter))[1]
        for old, new in pairs.values():
            if id(old) in frozen:
                new.requires_grad_(False)
                new.grad = None
            for opt in self.optimizers:  # the new parameter takes the old one's place and state
                for group in opt.param_groups:
                    group["params"] = [new if p is old else p for p in group["params"]]
                for p in [p for p in opt.state if p is old]:
                    opt.state[new] = opt.state.pop(p)
        if self.history is not None:
            self.history.replace_sources({k: new for k, (_, new) in pairs.items()})
        self._map_parameters_to_units()
        self._grad_index_cache.clear()
        self._held = None
        if pairs:
            for listener in self._change_listeners:
                listener("parameters", {key: new for key, (_, new) in pairs.items()})
        guard.layout = layout
        guard.module_ids = {id(m) for m in layout[0].values()}
        guard.containers = guards.ContainerChildren(self.module)
        guard.changed = False

    def _stop_before_nonfinite(self, target: int) -> int:
        units = self.units[self.num_frozen:target]
        bad = torch.tensor([float(not ok) for ok in _all_finite(units)])
        if self._sync is not None and self._dist_kind == "fsdp2":  # each rank sees its own shards
            bad = bad.to(self._sync.device)
            self._sync.all_reduce_sum(bad)
        for unit, nonfinite in zip(units, bad.tolist()):
            if nonfinite:
                if not self._nonfinite_warned:
                    warnings.warn(
                        f"SmartFreezer: unit {unit.index} ({unit.name}) has NaN or inf weights; "
                        "it is not frozen (nor anything after it). Check the learning rate / loss scale.",
                        stacklevel=3,
                    )
                    self._nonfinite_warned = True
                return self.plan.largest_allowed_cut(unit.index)
        return self._stop_before_nonfinite_statistics(target)

    def _stop_before_nonfinite_statistics(self, target: int) -> int:
        """A norm's running statistics with NaN or inf (one bad batch through it in train mode,
        an fp16 variance that overflowed): train mode never reads them, the eval mode a freeze
        holds the prefix in does, and every later step's loss would be NaN (review78: 181 of 200
        steps skipped by a GradScaler, the loss scale at 0). The unit that would hold them in
        eval is not frozen, nor anything after it. One host sync, and only where a statistic is
        bad is the unit found."""
        stats = [(module, name, buffer) for module in self.module.modules()
                 for name in ("running_mean", "running_var")
                 for buffer in [getattr(module, name, None)]
                 if isinstance(buffer, Tensor) and not uninitialized(buffer) and buffer.is_floating_point()
                 and buffer.numel()]
        if not stats:
            return target
        finite = torch.stack([b.detach().abs().amax().isfinite().to(stats[0][2].device) for _, _, b in stats]).tolist()
        bad = {id(module): name for (module, name, _), ok in zip(stats, finite) if not ok}
        if not bad:
            return target
        for cut in range(self.num_frozen + 1, target + 1):
            always, partly = self.plan.eval_modules(cut)
            held = next((m for m in (*always, *partly) if id(m) in bad), None)
            if held is None:
                continue
            unit = self.units[cut - 1]
            if not self._nonfinite_statistics_warned:
                self._nonfinite_statistics_warned = True
                name = next((n for n, m in self.module.named_modules() if m is held), type(held).__name__)
                warnings.warn(
                    f"SmartFreezer: {name}.{bad[id(held)]} holds NaN or inf (a batch with NaN or inf went through "
                    "it in train mode, or a float16 statistic overflowed). Train mode never reads it; the eval "
                    f"mode a frozen prefix runs in would, and every later loss would be NaN: unit {unit.index} "
                    f"({unit.name}) is not frozen, nor anything after it. Reset it ({name}.reset_running_stats(); "
                    "training estimates it again) and look for the batch that caused it.", stacklevel=3)
            return self.plan.largest_allowed_cut(cut - 1)
        return target

    def _event(self, step: int, newly: Sequence[Unit]) -> FreezeEvent:
        return FreezeEvent(
            step=step,
            num_frozen=self.num_frozen,
            unit_names=tuple(u.name for u in newly),
            frozen_param_fraction=self.frozen_param_fraction(self.num_frozen),
            frozen_flops_fraction=self.frozen_flops_fraction(self.num_frozen),
        )

    # ------------------------------------------------------------------ reporting
    def frozen_param_fraction(self, num_frozen: Optional[int] = None) -> float:
        n = self.num_frozen if num_frozen is None else num_frozen
        total = sum(u.num_params for u in self.units)
        return sum(p.numel() for _, p in self.plan.frozen_parameters(n)) / max(total, 1)

    def frozen_flops_fraction(self, num_frozen: Optional[int] = None) -> float:
        """Share of one training step's FLOPs (forward + backward) that freezing the first
        ``num_frozen`` units removes: their backward (``Unit.backward_flops``: about twice their
        forward, once where their weights require no grad, as a LoRA base layer's), and with
        ``shared_parameters="freeze"`` the weight gradient of the later reads of the shared
        parameters they froze (about one forward of those reads)."""
        self._require_setup("frozen_flops_fraction()")
        n = self.num_frozen if num_frozen is None else num_frozen
        total = self.plan.total_forward_flops + self.plan.total_backward_flops
        saved = sum(u.backward_flops for u in self.units[:n]) + self.plan.later_read_flops(n)
        return saved / total if total else 0.0

    def training_flops_saved(self, total_steps: Optional[int] = None) -> float:
        """Fraction of the run's training FLOPs saved so far (or over ``total_steps``, assuming
        the current frozen prefix holds until then)."""
        end = total_steps if total_steps is not None else self.step_count
        if end <= 0:
            return 0.0
        saved, level, since = 0.0, 0.0, 0
        for event in self.timeline:
            # a freeze applied after step s first saves work in step s + 1
            saved += level * (min(event.step, end) - since)
            level, since = event.frozen_flops_fraction, min(event.step, end)
        saved += level * (end - since)
        return saved / end

    def report(self) -> str:
        """A table of the freeze timeline."""
        self._require_setup("report()")
        lines = [
            f"policy: {self.policy.describe()}",
            *self.policy.report_lines(),
            f"units: {len(self.units)}, frozen: {self.num_frozen}, steps: {self.step_count}",
            f"{'step':>7}  {'frozen':>6}  {'params':>7}  {'step FLOPs':>10}  units newly frozen",
        ]
        for e in self.timeline:
            names = ", ".join(e.unit_names)
            if e.step == self.total_steps == self.step_count:  # no optimizer step came after it (review77)
                names += "  (after the run's last step: saves nothing)"
            lines.append(
                f"{e.step:>7}  {e.num_frozen:>6}  {e.frozen_param_fraction:>7.1%}  "
                f"{e.frozen_flops_fraction:>10.1%}  {names}"
            )
        if not self.timeline:
            lines.append("      -       0       -           -  (nothing frozen yet)")
        lines.extend(self._shared_report())
        if self._refused is not None:
            lines.append(self._refused)
        if self.num_frozen:
            always, partly = self.plan.eval_modules(self.num_frozen)
            lines.append(f"frozen prefix in eval mode (no dropout, fixed norm statistics): {len(always)} modules"
                         + (f", and the first calls of {len(partly)} called again after it" if partly else ""))
        lines.append(f"training FLOPs saved so far: {self.training_flops_saved():.1%} (the frozen units' backward)")
        seconds, since, first, latest = self._policy_total
        wall = latest - since if since is not None else 0.0  # (not up to now: a report after an evaluation)
        if wall > 0 and seconds > 0:  # what that figure leaves out (review104: 1.4 % saved, 37 % slower)
            lines.append(f"the policy's own work in freezer.step() (snapshots, decisions; host time): {seconds:.2f} s, "
                         f"{seconds / wall:.0%} of the wall time from step {first} to step {self.step_count} (not in "
                         "the FLOPs saved)")
        for listener in self._freeze_listeners:  # an activation cache: the forward it skipped
            line = getattr(listener, "report_line", lambda: None)()
            if line:
                lines.append(line)
        guard = self._guard
        if guard is not None and self.step_count == 0 and guard.optimizer_steps:
            lines.append(f"note: the optimizer stepped {guard.optimizer_steps} times but step() was never called")
        elif guard is not None and guard.unmatched:
            lines.append(f"note: step() was called {guard.unmatched} of {self.step_count} times with no optimizer "
                         "step since the previous call (once per optimizer step is right)")
        return "\n".join(lines)

    def _shared_report(self) -> List[str]:
        """What happened to the shared parameters the frozen prefix splits."""
        lines = []
        for group in shared_groups(self.plan.split_shared(self.num_frozen)):
            lines.append(f"shared ({self.shared_parameters}): {describe_shared(group, self.units)} "
                         f"{_SHARED_FATE[self.shared_parameters]}")
        frozen_shared = [s for s in self.plan.shared if s.last_unit < self.num_frozen]
        if frozen_shared:
            lines.append(f"shared: {len(frozen_shared)} parameter(s) read only inside the prefix froze with it")
        return lines

    # ------------------------------------------------------------------ checkpoints
    def _signature(self) -> List[Tuple[str, List[Tuple[str, Tuple[int, ...]]]]]:
        return [(u.name, [(n, tuple(p.shape)) for n, p in zip(u.param_names, u.parameters)]) for u in self.units]

    def _settings(self) -> Dict[str, Any]:
        return {"sample_every": self.sample_every, "keep_trainable": self.keep_trainable,
                "decision_delay": self.decision_delay, "seed": self.seed,
                "shared_parameters": self.shared_parameters}

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a SmartFreezer is not saved whole (torch.save(freezer), pickle): it holds hooks on the "
                        "model and its optimizers. Save freezer.state_dict() with the checkpoint and load it into a "
                        "new SmartFreezer with freezer.load_state_dict(saved).")

    def __deepcopy__(self, memo: Dict[int, Any]) -> "SmartFreezer":
        # as copy.deepcopy does without __reduce_ex__ (a deep copy of an activation cache copies its freezer)
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue bit-identically (model and optimizer states apart)."""
        if self.plan is None and not self._closed:  # a checkpoint before training: a fresh freezer's
            return {"format": STATE_FORMAT, "version": STATE_VERSION, "before_set_up": True}
        self._require_setup("state_dict()")
        if not self._closed:
            self._resync()  # deleting a module calls no hook: the model is re-read in full here
        pending = []
        for apply_at, host, event in self._pending:
            if event is not None:
                event.synchronize()
            pending.append((apply_at, int(host)))
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "signature": self._signature(),
            "settings": self._settings(),
            "policy": type(self.policy).__name__,
            "policy_settings": self.policy.describe(),
            "total_steps": self.total_steps,
            "policy_state": self.policy.state_dict(),
            "step": self.step_count,
            "num_frozen": self.num_frozen,
            "timeline": [asdict(e) for e in self.timeline],
            "pending": pending,
            "history": self.history.state_dict() if self.history is not None else None,
            "user_held": sorted(self._last_held.items()),
            "lr_idle_since": sorted(self._idle_since.items()),
            "iteration_in_progress": self._iteration_in_progress(),
        }

    @property
    def step_owed(self) -> bool:
        """An optimizer step was taken (or restored from a checkpoint taken between
        ``optimizer.step()`` and ``step()``) that ``step()`` has not counted yet: a loop resuming
        from such a checkpoint calls ``step()`` first (the Lightning callback does)."""
        guard = self._guard
        # more optimizer steps than one iteration makes: a loop that never calls step() (freeze_to
        # by hand), which the never-stepped warning is about
        return guard is not None and not self._closed and 0 < guard.optimizer_steps <= len(self.optimizers)

    def _optimizer_stepped(self) -> bool:
        """One of the freezer's optimizers stepped since the last ``step()`` (any number of times:
        a critic stepped five times a batch)."""
        return self._guard is not None and not self._closed and self._guard.optimizer_steps > 0

    def _catch_up_owed_step(self) -> None:
        """Resumed from a checkpoint taken between ``optimizer.step()`` and ``step()``, the loop
        went on to its next iteration without calling ``step()`` first: the owed step is counted
        now, before this iteration's optimizer step, or every schedule would run a step behind the
        optimizer's for the rest of the run (a freeze lost at the end). At ``step()`` a forward
        alone tells nothing: an evaluation in train mode may come before the ``step()`` that
        finishes the saved iteration (review81: counted twice, 6.8e-3 off)."""
        self._end_owed()
        warnings.warn(
            "SmartFreezer: this run resumed from a checkpoint saved between optimizer.step() and freezer.step(), "
            "and the loop went on to its next iteration before freezer.step() was called: the freezer counts "
            "the owed step now, so its schedule stays in step with the optimizer's, but a freeze it makes now "
            "comes after this iteration's forward and backward instead of before. Call freezer.step() right "
            "after loading such a checkpoint (finishing its iteration) to resume exactly.", stacklevel=4)
        self.step()

    def _end_owed(self) -> None:
        self._owed_from_checkpoint = self._forward_since_owed = False
        if self._owed_hook is not None:
            self._owed_hook.remove()
            self._owed_hook = None

    def _note_forward_while_owed(self, module, args) -> None:
        """A training forward of the model while the saved iteration's step is owed: the loop
        went on to its next iteration (an evaluation under no_grad or in eval mode tells nothing)."""
        if torch.is_grad_enabled() and module.training:
            self._forward_since_owed = True

    def _iteration_in_progress(self) -> Optional[Dict[str, Any]]:
        """A checkpoint taken between ``optimizer.step()`` and ``freezer.step()``: that step is
        not counted yet. Resumed at the next iteration, every policy's schedule would run a step
        late, silently; resumed by calling ``freezer.step()`` first, AutoFreeze needs the
        gradient norms gathered for it. Saved (and restored) so that the second way is exact,
        with a warning that says so."""
        guard = self._guard
        if not self.step_owed:
            return None
        guard.warn_once("saved mid-iteration", (
            "SmartFreezer: state_dict() between optimizer.step() and freezer.step(): the freezer has not "
            "counted this optimizer step yet. A run resumed from this checkpoint continues exactly if it calls "
            "freezer.step() first (finishing this iteration); resumed at the next iteration, the freezer counts the "
            "step at that iteration's optimizer step, so a freeze due then comes after its forward and backward "
            "instead of before. Save after freezer.step() to avoid both."))
        return {"optimizer_steps": guard.optimizer_steps,
                "stepped": [i for i, opt in enumerate(self.optimizers) if id(opt) in self._stepped],
                "trained": sorted(self._trained_this_step),
                "grad_sq": None if self._grad_sq is None else self._grad_sq.detach().cpu().clone()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a checkpoint. Call it before ``optimizer.load_state_dict``: freezing removes
        parameters from the optimizer, and the optimizer's saved groups expect that.

        Everything is checked before anything changes: a refused checkpoint (another model,
        policy or settings, or a truncated dict) leaves the model, the optimizer and this
        freezer as they were."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            inside = [key for key, value in state.items() if isinstance(value, dict)
                      and value.get("format") == STATE_FORMAT] if isinstance(state, dict) else []
            raise ValueError("not a SmartFreezer state_dict (missing its format tag)" + (
                f": it holds one under {inside[0]!r}; pass freezer.load_state_dict(checkpoint[{inside[0]!r}])"
                if inside else ": pass what freezer.state_dict() returned"))
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"SmartFreezer state version {state.get('version')} is not supported (this is "
                             f"{STATE_VERSION}): it was saved by another version of smartfrz_fast. Resume with the "
                             "version that saved it, or start the freezer fresh: the model's state loads, and the "
                             "optimizer's after freezer.freeze_to(the checkpoint's num_frozen), which freezes what the "
                             "run had frozen (the optimizer's state holds only the layers still training).")
        if state.get("before_set_up"):
            if not self._closed and self.step_count == 0 and not self.num_frozen:
                return  # saved before the first forward: nothing to restore in a fresh freezer
            raise RuntimeError("this SmartFreezer state was saved before the freezer's first forward (a fresh "
                               "freezer's): it restores nothing into one that has trained or was closed.")
        if not self._closed:
            self._set_up_from_deferred_example(even_if_lazy=True)
        if self.plan is None and not self._closed:
            raise RuntimeError(
                "SmartFreezer has not seen the model run yet, so it cannot load a checkpoint: build it with "
                "example_inputs=<a batch> (or call freezer.set_up_before_first_forward(args, kwargs)) before "
                "load_state_dict(). A training forward to set it up would run the layers the checkpoint holds "
                "frozen in train mode (their BatchNorm statistics move) and the resumed run would differ.")
        self._require_open()
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"this SmartFreezer state_dict lacks {missing}: it is truncated or was edited. "
                             "Load the complete freezer.state_dict() saved with the checkpoint.")
        self._check_signature(state["signature"])
        if state["policy"] != type(self.policy).__name__:
            raise SettingsMismatch(
                f"the checkpoint was made with policy {state['policy']}, this run uses "
                f"{type(self.policy).__name__}: construct SmartFreezer with the same policy.",
                {"policy": state["policy"]})
        if self.num_frozen or self.step_count:
            raise RuntimeError(
                f"load_state_dict needs a fresh SmartFreezer (no steps taken yet); this one is at step "
                f"{self.step_count} with {self.num_frozen} units frozen" + (
                    ", as the checkpoint loaded into it already: load it once"
                    if self._loaded_at == self.step_count else "") +
                ". To roll back to an earlier checkpoint in this process: close() this freezer, set "
                "requires_grad=True again on the layers it froze (model.requires_grad_(True) where all train), "
                "build a new optimizer, scheduler, SmartFreezer (and ActivationCache) as at the start, then load the "
                "model's, the freezer's, the optimizer's and the scheduler's states, in that order (a checkpoint "
                "kept in memory: a deep copy, as torch's optimizer load shares its tensors).")
        # the model may have been loaded with load_state_dict(assign=True) since set-up: the state
        # freezes the parameters it holds now (else the old ones, and the next step found the
        # new ones "replaced" and still training); a changed model raises here, before any change
        self._resync()
        self._check_settings(state["settings"])
        step, num_frozen = state["step"], state["num_frozen"]
        if not (_is_int(step) and step >= 0 and _is_int(num_frozen) and 0 <= num_frozen <= len(self.units)):
            raise ValueError(f"this SmartFreezer state_dict is corrupt: step={step!r}, num_frozen={num_frozen!r} "
                             f"(a model of {len(self.units)} units)")
        self._check_restorable(num_frozen)
        try:
            timeline = self._checked_timeline(state["timeline"], step, num_frozen)
            pending = self._checked_pending(state["pending"], step)
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"this SmartFreezer state_dict has a corrupt timeline or pending list ({exc})") from exc
        # absent in checkpoints older than these guards
        user_held, idle_since = state.get("user_held", []), state.get("lr_idle_since", [])
        for key, pairs in (("user_held", user_held), ("lr_idle_since", idle_since)):
            if not (isinstance(pairs, (list, tuple)) and all(
                    isinstance(e, (list, tuple)) and len(e) == 2 and _is_int(e[0]) and 0 <= e[0] < len(self.units)
                    and _is_int(e[1]) and 0 <= e[1] <= step for e in pairs)):
                raise ValueError(f"this SmartFreezer state_dict is corrupt: {key}={pairs!r} is not a list of "
                                 f"(unit, step) pairs of a model of {len(self.units)} units up to step {step}")
        in_progress = state.get("iteration_in_progress")  # absent in checkpoints older than this field
        if in_progress is not None and not (
                isinstance(in_progress, dict) and _is_int(in_progress.get("optimizer_steps"))
                and in_progress["optimizer_steps"] > 0
                and isinstance(in_progress.get("stepped"), (list, tuple))
                and all(_is_int(i) and 0 <= i < len(self.optimizers) for i in in_progress["stepped"])
                and isinstance(in_progress.get("trained", []), (list, tuple))
                and all(_is_int(i) and 0 <= i < len(self.units) for i in in_progress.get("trained", []))
                and (in_progress.get("grad_sq") is None) == (self._grad_sq is None)
                and (self._grad_sq is None or (isinstance(in_progress["grad_sq"], Tensor)
                                               and in_progress["grad_sq"].shape == self._grad_sq.shape))):
            raise ValueError(f"this SmartFreezer state_dict is corrupt: iteration_in_progress={in_progress!r:.120}")
        if (state["history"] is None) != (self.history is None):
            raise ValueError("the checkpoint's weight history does not match this policy's needs")
        if self.history is not None:
            self.history.check_state(state["history"], max_count=step // self.sample_every)
        previous = self.policy.state_dict()
        try:
            self.policy.load_state_dict(state["policy_state"])
        except Exception:
            self.policy.load_state_dict(previous)  # a refused policy state leaves the policy as it was
            raise
        # nothing below can fail: every input was checked above
        if self.history is not None:
            self.history.load_state_dict(state["history"])
        self.step_count = step
        self._last_held = {int(index): int(at) for index, at in user_held}
        self._idle_since = {int(index): int(at) for index, at in idle_since}
        self._trained_this_step = {int(index) for index in (in_progress or {}).get("trained", [])}
        if in_progress is not None:  # the optimizer step of the iteration the checkpoint was taken in
            self._guard.optimizer_steps = int(in_progress["optimizer_steps"])
            self._stepped = {id(self.optimizers[i]) for i in in_progress["stepped"]}
            if self._grad_sq is not None:
                self._grad_sq.copy_(in_progress["grad_sq"])
        self._end_owed()
        if in_progress is not None:
            self._owed_from_checkpoint = True
            self._owed_hook = self.model.register_forward_pre_hook(engine_hook(self._note_forward_while_owed))
            self._hooks.append(self._owed_hook)
        self.freeze_to(num_frozen, step=step)
        self.timeline = timeline
        self._pending = [(apply_at, value, None) for apply_at, value in pending]
        self._loaded_at = step
        saved_policy = state.get("policy_settings")  # absent in checkpoints older than this check
        if saved_policy is not None and saved_policy != self.policy.describe():
            warnings.warn(f"SmartFreezer: the checkpoint's policy was {saved_policy}, this run's is "
                          f"{self.policy.describe()}: the resumed run will not continue as the saved one would.",
                          stacklevel=2)
        saved_total = state.get("total_steps", self.total_steps)  # absent in checkpoints older than this check
        if saved_total != self.total_steps and self.policy.uses_total_steps:
            warnings.warn(f"SmartFreezer: the checkpoint was made with total_steps={saved_total}, this run has "
                          f"total_steps={self.total_steps}: a policy paced by the run's length ({type(self.policy).__name__}) "
                          "will not continue as the saved run would (its schedule now says another prefix). "
                          "Pass the checkpoint's total_steps unless the run's length really changed.", stacklevel=2)

    def _checked_timeline(self, saved: Any, step: int, num_frozen: int) -> List[FreezeEvent]:
        """The saved timeline if it tells how this model's prefix grew to ``num_frozen`` by
        ``step`` (else ValueError); its fractions are recomputed from this model."""
        if not isinstance(saved, (list, tuple)):
            raise TypeError(f"the timeline is a {type(saved).__name__}, not a list")
        events, frozen, last = [], 0, 0
        for e in saved:
            at, n, names = e["step"], e["num_frozen"], tuple(e["unit_names"])
            if not (_is_int(at) and last <= at <= step and _is_int(n) and frozen < n <= num_frozen):
                raise ValueError(f"event {e!r} does not follow the one before it (step {last}, {frozen} frozen) "
                                 f"within step {step} and num_frozen {num_frozen}")
            if names != tuple(u.name for u in self.units[frozen:n]):
                raise ValueError(f"event {e!r} names other units than this model's {frozen}..{n - 1}")
            events.append(FreezeEvent(at, n, names, self.frozen_param_fraction(n), self.frozen_flops_fraction(n)))
            frozen, last = n, at
        if frozen != num_frozen:
            raise ValueError(f"the timeline ends with {frozen} frozen units, the state has num_frozen={num_frozen}")
        return events

    def _checked_pending(self, saved: Any, step: int) -> List[Tuple[int, Tensor]]:
        """Decisions waiting to be applied: due after ``step``, within ``decision_delay``; a
        broadcast 'no decision' (-1) is dropped."""
        pending = []
        for apply_at, value in saved:
            if not (_is_int(apply_at) and step < apply_at <= step + self.decision_delay
                    and _is_int(value) and -1 <= value <= len(self.units)):
                raise ValueError(f"pending decision {(apply_at, value)!r} is not a prefix length (-1 .. "
                                 f"{len(self.units)}) due in steps {step + 1} .. {step + self.decision_delay}")
            if value != -1:
                pending.append((apply_at, torch.tensor(value)))
        return pending

    def _check_settings(self, saved: Dict[str, Any]) -> None:
        mine = self._settings()
        saved = saved if isinstance(saved, dict) else {}
        # checkpoints made before the setting never split a shared parameter: either mode resumes them
        saved = {"shared_parameters": mine["shared_parameters"], **saved}
        differ = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if differ:
            was = ", ".join(f"{k}={a!r}" for k, (a, _) in differ.items())
            now = ", ".join(f"{k}={b!r}" for k, (_, b) in differ.items())
            hint = (" (sample_every follows total_steps unless given: pass the same total_steps, or "
                    "sample_every explicitly)" if "sample_every" in differ else "")
            raise SettingsMismatch(f"the checkpoint was made with {was}; this SmartFreezer has {now}. Construct it "
                                   f"with the checkpoint's settings to resume{hint}.",
                                   {k: a for k, (a, _) in differ.items()})

    def _check_restorable(self, num_frozen: int) -> None:
        """Raise unless ``freeze_to(num_frozen)`` would freeze exactly that many units."""
        if num_frozen > self.max_frozen:
            raise ValueError(f"the checkpoint has {num_frozen} frozen units, but this SmartFreezer may freeze at "
                             f"most {self.max_frozen} (keep_trainable={self.keep_trainable}).")
        if self.plan.largest_allowed_cut(num_frozen) != num_frozen:
            raise ValueError(f"the checkpoint's frozen prefix ({num_frozen} units) ends inside a span of units "
                             "that share parameters in this model: it was saved from a different model.")
        bad = [u.name for u in self.units[:num_frozen] if not all(bool(torch.isfinite(p).all()) for p in u.parameters)]
        if bad:
            raise ValueError(f"the checkpoint freezes units with NaN or inf weights in this model ({bad[:3]}): "
                             "load the model's state_dict (the checkpoint's weights) before the freezer's.")

    def _check_signature(self, saved) -> None:
        mine = self._signature()
        try:
            # a freezer on torch.compile(model) named its units "_orig_mod.*" before it managed the module inside
            saved = [(_uncompiled(name), [(_uncompiled(n), tuple(s)) for n, s in params]) for name, params in saved]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"this SmartFreezer state_dict's model signature is corrupt ({exc})") from exc
        if saved == mine:
            return
        if len(saved) != len(mine):
            detail = f"the checkpoint has {len(saved)} units, this model {len(mine)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(saved, mine)) if a != b)
            detail = f"unit {i} was {saved[i]}, is now {mine[i]}"
        if sorted(p for _, ps in saved for p in ps) == sorted(p for _, ps in mine for p in ps):
            raise ValueError(
                f"this SmartFreezer checkpoint holds this model's parameters, grouped into other units ({detail}): "
                "it was saved by an older smartfrz_fast, whose units put a parameter that its module reads after "
                "other layers (BEiT's lambda_2, Mamba's D) with its module's first read. Start the freezer fresh "
                "(the model's state loads, and the optimizer's after freezer.freeze_to(the checkpoint's "
                "num_frozen)), or resume with the version that saved it.")
        still_frozen = sorted({n for _, ps in saved for n, _ in ps}
                              & {n for n, p in self.module.named_parameters() if not p.requires_grad})
        if still_frozen:
            raise ValueError(
                f"this SmartFreezer checkpoint's units hold parameters that require no grad in this model "
                f"({', '.join(still_frozen[:3])}{' ...' if len(still_frozen) > 3 else ''}), so this freezer found "
                f"other units ({detail}). A model saved whole (torch.save(model)), copied (copy.deepcopy) or "
                "reused after close() keeps its frozen layers' requires_grad=False. Set requires_grad=True on the "
                "layers you train (model.requires_grad_(True)) before building the freezer, then load its state.")
        renamed = _name_prefix_added(saved, mine)
        if renamed is not None:
            raise ValueError(
                f"this SmartFreezer checkpoint holds this model's units, each parameter named {renamed} ({detail}): "
                "the freezer was built on a module inside the model in one run and on the model itself (or a "
                "wrapper around it) in the other. Build it on the same module as the run that saved it (the "
                "trainer callbacks: the same submodule=).")
        raise ValueError(
            f"this SmartFreezer checkpoint belongs to a different model ({detail}). Resume with "
            "the model the checkpoint was saved from, or start the freezer fresh. (Units are the parameters "
            "an example forward reads: with the same model, pass the example_inputs the saved run used, "
            "as a forward that takes another path reads other parameters.)"
        )

    @staticmethod
    def of(model: nn.Module) -> Optional["SmartFreezer"]:
        """The open SmartFreezer that manages ``model`` (or a part or a parent of it), or None:
        to close one you no longer hold directly (a trainer's callback holds it, say)."""
        return guards.managing_freezer(model)[1]

    def close(self) -> None:
        """Remove the hooks the engine placed (frozen norm layers stay in eval until then), put
        the frozen parameters back into the optimizer groups they left (no state; they stay
        ``requires_grad=False``) and close the policy."""
        if self._closed:
            return
        self._remove_first_forward_hook()
        self.policy.close()
        if self.plan is not None:
            self._give_back_frozen()
        remove_handles(self._hooks)
        if self._region is not None:
            self._region.remove()
        self._eval_hooks.clear()
        if self._guard is not None:
            self._guard.close()
        guards.release(self)
        self._closed = True
