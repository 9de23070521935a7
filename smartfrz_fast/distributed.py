"""Freezing under data parallelism: DDP (plain or re-wrapped) and FSDP2.

Every rank must freeze the same units at the same step, or the ranks' autograd graphs and
collectives disagree and training hangs or diverges. Schedule policies (FreezeOut,
LinearFreeze, StaticFreeze: ``deterministic_schedule``) compute the same int on every rank
and are applied as in a single process, with no collective at all. For data-dependent
policies every rank runs its policy as usual but applies only rank 0's decision, which
``DecisionSync`` broadcasts at the steps where ``policy.decides_at(step)`` holds (computed on
every rank from shared counters, so all ranks join the same collectives; AutoFreeze: interval
ends), while units are still left to freeze. With NCCL the broadcast stays on the GPU and is
read ``decision_delay`` steps later like any GPU decision (no extra host sync); with gloo it
is a small blocking CPU collective.

What happens to the wrapper after a freeze:

- ``FreezableDDP(module, **ddp_kwargs)`` (the default we recommend): a thin module that owns a
  ``DistributedDataParallel`` and rebuilds it after each freeze, so the new one buckets and
  all-reduces only the parameters that still train (no per-step unused-parameter search, no
  all-reduce of the frozen prefix's zeros). The rebuild costs one broadcast of the module's
  state from rank 0 per freeze event (a handful per run). Its ``state_dict`` keys carry the
  ``module.`` prefix, as DDP's do.
- ``DistributedDataParallel(..., find_unused_parameters=True)``: works unchanged; DDP finds the
  frozen parameters unused every step and still all-reduces their buckets.
- ``DistributedDataParallel`` with ``find_unused_parameters=False``: DDP would fail on the
  first backward after a freeze ("Expected to have finished reduction..."), so the engine
  refuses it up front. ``static_graph=True`` records the graph once and forbids any change.
- FSDP2 (``torch.distributed.fsdp.fully_shard``, per block): FSDP2 reads ``requires_grad``
  from the sharded parameters at every all-gather, and a parameter that needs no grad gets
  no reduce-scatter, so the engine's freeze action works as it is.
- FSDP1 (``FullyShardedDataParallel``) flattens parameters into FlatParameters whose
  ``requires_grad`` cannot change per layer mid-run: refused, with advice.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

NO_DECISION = -1


def _is_fsdp1(module: nn.Module) -> bool:
    # By name, so that the check does not import torch.distributed.fsdp.
    cls = type(module)
    return cls.__name__ == "FullyShardedDataParallel" and cls.__module__.startswith("torch.distributed.fsdp")


def _is_fsdp2(module: nn.Module) -> bool:
    return any(c.__name__ == "FSDPModule" for c in type(module).__mro__)


def reshard(model: nn.Module) -> None:
    """Register the sharded parameters again on every FSDP2 module. A forward without backward
    (the engine's traced set-up pass) leaves the root's own parameters (embeddings, a head)
    unsharded, registered as plain tensors the optimizer does not hold; the guard would record
    those and take the sharded ones for a changed model at the next checkpoint."""
    for module in model.modules():
        if _is_fsdp2(module):
            module.reshard()


def check_sharded_at_first_forward(model: nn.Module) -> None:
    """A set-up at the first forward runs after FSDP2 unsharded the root's own parameters
    (they are plain tensors then, not the DTensors the optimizer holds): refused with the fix."""
    if not _is_fsdp2(model):
        return
    plain = [n for n, p in model.named_parameters() if not hasattr(p, "to_local")]
    if plain:
        raise ValueError(
            f"SmartFreezer under FSDP2: at the first forward, the root module's own parameters ({plain[:3]}"
            f"{' ...' if len(plain) > 3 else ''}) are FSDP2's unsharded copies, not the sharded parameters your "
            "optimizer holds, so the freezer cannot set up there. Pass example_inputs=... (one batch) to "
            "SmartFreezer: it then sets up before training, on the sharded model.")


def unwrap(model: nn.Module) -> Tuple[nn.Module, Optional[str]]:
    """``(module whose layers are the units, kind)``; kind is "ddp", "freezable_ddp", "fsdp2"
    or None. Raises on wrappers that cannot freeze mid-run."""
    for name, module in model.named_modules():
        if _is_fsdp1(module):
            raise ValueError(
                f"SmartFreezer: {'the model' if not name else repr(name)} is wrapped in FSDP1 "
                "(FullyShardedDataParallel), which flattens parameters into FlatParameters whose "
                "requires_grad cannot change per layer during training. Use FSDP2 instead: "
                "torch.distributed.fsdp.fully_shard(block) on each block, then on the root "
                "(see docs/integrations/ddp_fsdp.md), or DistributedDataParallel."
            )
    if isinstance(model, FreezableDDP):
        return model.module, "freezable_ddp"
    if isinstance(model, DistributedDataParallel):
        check_ddp(model)
        return model.module, "ddp"
    if any(_is_fsdp2(m) for m in model.modules()):
        return model, "fsdp2"
    wrapper = _WRAPPERS.get(model)
    if wrapper is not None and wrapper() is not None:
        raise ValueError(
            "SmartFreezer: this module is wrapped by a FreezableDDP; give SmartFreezer the FreezableDDP itself. "
            "Given the inner module, the freezer cannot rebuild DDP after a freeze, and DDP's next backward fails "
            "(its error then asks for find_unused_parameters=True, which FreezableDDP does not need).")
    return model, None


def check_ddp_parts(model: nn.Module, may_freeze: Set[int]) -> None:
    """Refuse a DDP around a part of the model (``model.body = DDP(body)``) that holds a
    parameter that may freeze (ids in ``may_freeze``) under settings a freeze breaks; one around
    a part that never freezes (the head ``keep_trainable`` keeps) is fine as it is."""
    for name, module in model.named_modules():
        if name and isinstance(module, DistributedDataParallel) and any(
                id(p) in may_freeze for p in module.parameters()):
            check_ddp(module, where=f" around the model's {name!r}")


def check_ddp(ddp: DistributedDataParallel, where: str = "") -> None:
    """Refuse DDP settings under which a freeze mid-run would fail."""
    check_ddp_settings(getattr(ddp, "static_graph", False), ddp.find_unused_parameters, where=where)


def check_ddp_settings(
    static_graph: bool,
    find_unused_parameters: bool,
    *,
    fix_static: str = "Drop static_graph=True and wrap the model in "
    "smartfrz_fast.distributed.FreezableDDP(module, ...) (rebuilt after each freeze) or pass "
    "find_unused_parameters=True.",
    fix_unused: str = "Wrap the model in smartfrz_fast.distributed.FreezableDDP(module, **ddp_kwargs) "
    "instead (recommended: it re-wraps after each freeze and stops all-reducing the frozen prefix), "
    "or pass find_unused_parameters=True.",
    where: str = "",
) -> None:
    """The one check of DDP settings, for a DDP object and for the trainers' DDP options
    (which pass their own way to fix it)."""
    if static_graph:
        raise ValueError(
            f"SmartFreezer: DistributedDataParallel{where} with static_graph=True records the autograd graph "
            f"once and forbids freezing layers mid-run. {fix_static}"
        )
    if not find_unused_parameters:
        raise ValueError(
            f"SmartFreezer: DistributedDataParallel{where} with find_unused_parameters=False fails at the "
            "first backward after a freeze (the frozen parameters never get a gradient). "
            f"{fix_unused}"
        )


# inner module -> the FreezableDDP around it (a freezer given the inner module is refused)
_WRAPPERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


class FreezableDDP(nn.Module):
    """``DistributedDataParallel`` that is rebuilt after every freeze.

    Use it where you would use DDP and hand it to ``SmartFreezer``; the engine calls
    ``rewrap()`` on every rank at the same step. The DDP object is kept out of the module tree,
    so ``state_dict()`` keys are DDP's (``module.<name>``) and the parameters are the inner
    module's (optimizers need no change). ``static_graph=True`` is refused (see module doc).
    """

    def __init__(self, module: nn.Module, **ddp_kwargs: Any) -> None:
        super().__init__()
        if ddp_kwargs.get("static_graph"):
            raise ValueError(
                "FreezableDDP: static_graph=True forbids any change of the trained parameters; "
                "leave it off (FreezableDDP rebuilds DDP after each freeze instead)."
            )
        self.module = module
        self.ddp_kwargs = dict(ddp_kwargs)
        self.rewraps = 0
        self._idle_comm_hooks: List[Tuple[Any, Any]] = []  # (hook, state) kept while no DDP is built
        _WRAPPERS[module] = weakref.ref(self)
        object.__setattr__(self, "ddp", DistributedDataParallel(module, **self.ddp_kwargs))
        self._wrapped = self._trained()

    def _trained(self) -> List[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)

    def current(self) -> nn.Module:
        """The DDP over the parameters that train now (the module itself once none does), rebuilt
        first if they changed: requires_grad set by the user's code (freezer.close() and
        requires_grad_(True) to train frozen layers again), or parameters replaced
        (load_state_dict(assign=True)); the DDP built before would not average the new ones'
        gradients. Every rank makes the same change, so every rank rebuilds at this forward.
        The activation cache runs its forward through this too."""
        if self._trained_changed():
            self.rewrap()
        return self.ddp

    def _trained_changed(self) -> bool:
        """The parameters that require grad are not those the current DDP was built over (one
        flag read a parameter per forward)."""
        wrapped, i = self._wrapped, 0
        for p in self.module.parameters():
            if p.requires_grad:
                if i == len(wrapped) or wrapped[i] is not p:
                    return True
                i += 1
        return i != len(wrapped)

    def train(self, mode: bool = True) -> "FreezableDDP":
        super().train(mode)
        self.ddp.training = mode
        return self

    def no_sync(self):
        """DDP's ``no_sync()`` (gradient accumulation) on the current wrapper; nothing to hold
        back once no parameter trains (no DDP then)."""
        if isinstance(self.ddp, DistributedDataParallel):
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def join(self, *args: Any, **kwargs: Any):
        """DDP's ``join()`` (uneven inputs) on the current wrapper; a rebuild inside it joins too.
        Pass ``throw_on_early_termination=True``: without it a rank out of batches stops stepping
        while the others step on and freeze (docs/integrations/ddp_fsdp.md)."""
        if isinstance(self.current(), DistributedDataParallel):
            return self.ddp.join(*args, **kwargs)
        return contextlib.nullcontext()

    def register_comm_hook(self, state: Any, hook: Any) -> None:
        """DDP's ``register_comm_hook`` (gradient compression, PowerSGD) on the current wrapper;
        each rebuild registers it again (kept for the next one while no parameter trains)."""
        if isinstance(self.ddp, DistributedDataParallel):
            self.ddp.register_comm_hook(state, hook)
        else:
            self._idle_comm_hooks.append((hook, state))

    def rewrap(self) -> None:
        """Build a new DDP over the parameters that still train (a collective: all ranks). The
        communication hooks registered on the old one (``model.ddp.register_comm_hook`` or
        ``register_comm_hook`` above) are registered on the new one, with their state."""
        old = self.ddp
        join_state = {}
        if isinstance(old, DistributedDataParallel):
            comm_hooks = list(getattr(old, "_comm_hooks", ()))
            # inside DDP's join(): the new DDP is in it too (the context manager set these on the old)
            join_state = {k: getattr(old, k) for k in ("_join_config", "_divide_by_initial_world_size")
                          if hasattr(old, k)}
            old._remove_autograd_hooks()  # the old reducer must not see the next backward
        else:  # none was built while nothing trained
            comm_hooks = self._idle_comm_hooks
        object.__setattr__(self, "ddp", None)
        del old
        self._idle_comm_hooks = []
        if any(p.requires_grad for p in self.module.parameters()):
            ddp = DistributedDataParallel(self.module, **self.ddp_kwargs)
            for hook, state in comm_hooks:
                ddp.register_comm_hook(state, hook)
            for key, value in join_state.items():
                setattr(ddp, key, value)
            object.__setattr__(self, "ddp", ddp)
        else:  # nothing left to synchronise: run the module directly (the hooks kept for later)
            object.__setattr__(self, "ddp", self.module)
            self._idle_comm_hooks = comm_hooks
        self._wrapped = self._trained()
        self.rewraps += 1


class DecisionSync:
    """Broadcasts rank 0's freeze decision (an int64, ``NO_DECISION`` for none) at the steps
    where the policy may decide (all ranks call ``broadcast`` at the same steps)."""

    def __init__(self, process_group: Any, param_device: torch.device) -> None:
        import torch.distributed as dist

        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.src = dist.get_global_rank(process_group, 0) if process_group is not None else 0
        backend = str(dist.get_backend(process_group)).lower()
        # NCCL needs device tensors, gloo host tensors.
        use_cuda = param_device.type == "cuda" and "nccl" in backend
        self.device = param_device if use_cuda else torch.device("cpu")

    def broadcast(self, decision: Any) -> Tensor:
        import torch.distributed as dist

        buf = torch.full((), NO_DECISION, dtype=torch.int64, device=self.device)
        if self.rank == 0 and decision is not None:
            if isinstance(decision, Tensor):
                buf.copy_(decision.reshape(()))  # device to device: no host sync
            else:
                buf.fill_(int(decision))
        dist.broadcast(buf, src=self.src, group=self.group)
        return buf

    def same_on_every_rank(self, text: str) -> bool:
        """True if every rank passes the same ``text`` (one small all-reduce of its digest)."""
        import hashlib

        import torch.distributed as dist

        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
        both = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        return both.tolist() == [digest, -digest]

    def least(self, value: int) -> int:
        """The smallest of the ranks' ``value`` (every rank calls it at the same step)."""
        import torch.distributed as dist

        buf = torch.tensor(int(value), dtype=torch.int64, device=self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.MIN, group=self.group)
        return int(buf)

    def all_reduce_sum(self, tensor: Tensor) -> None:
        """Sum per-rank partial statistics (FSDP2 shard gradient norms) in place."""
        import torch.distributed as dist

        if tensor.device.type == self.device.type:
            dist.all_reduce(tensor, group=self.group)
        else:  # gloo with CUDA statistics: round-trip through the host
            host = tensor.cpu()
            dist.all_reduce(host, group=self.group)
            tensor.copy_(host)


def make_sync(model: nn.Module, kind: Optional[str], process_group: Any, param_device: torch.device):
    """A ``DecisionSync`` when training runs on more than one rank, else None.

    ``process_group``: None picks the DDP wrapper's group, else the default group when
    torch.distributed is initialised with more than one rank; ``False`` turns syncing off
    (every rank then follows its own policy: only for policies known to agree)."""
    if process_group is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if kind is not None:
            raise RuntimeError(
                f"SmartFreezer: the model is wrapped for distributed training ({kind}) but "
                "torch.distributed is not initialised. Call init_process_group first."
            )
        return None
    if process_group is None:
        ddp = model.ddp if isinstance(model, FreezableDDP) else model
        process_group = getattr(ddp, "process_group", None) if kind in ("ddp", "freezable_ddp") else None
    if dist.get_world_size(process_group) < 2:
        return None
    return DecisionSync(process_group, param_device)
