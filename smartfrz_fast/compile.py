"""torch.compile, AMP and activation checkpointing next to progressive freezing.

torch.compile guards on every parameter's ``requires_grad``: a model compiled as one frame
recompiles at every freeze and, after ``torch._dynamo.config.recompile_limit`` (8) of them,
gives up and runs eagerly. ``compile_blocks`` compiles each block separately instead. A block
still recompiles each time one of its units freezes and once when its input stops needing
grad (the block before it froze whole): about units-per-block + 1 graphs per block class
(identical blocks share dynamo's cache entries, and so the recompile limit). A block that is
entirely frozen goes back to eager, where autograd records nothing for it (its input needs no
grad), so it never compiles again. ``compile_blocks`` warns when a block holds as many units
as ``recompile_limit``: pick coarser units' blocks, or raise the limit.

``FreezeAwareGradScaler`` (use it in place of ``torch.amp.GradScaler``): ``GradScaler.step``
raises ("No inf checks were recorded for this optimizer") when an optimizer has no gradients,
which is what freezing every parameter of one optimizer (say, the embedding's) leaves behind,
and ``GradScaler.update`` raises when no optimizer stepped at all. ``scaler_step`` fixes only
the first for a plain ``GradScaler``.

``check_grads_after_freeze``: reentrant activation checkpointing
(``checkpoint(..., use_reentrant=True)``) whose input needs no grad, the output of a frozen
prefix, returns an output that needs no grad: the checkpointed block silently trains
nothing. Use ``use_reentrant=False``; this check warns after a freeze when a trainable unit
is left without a gradient.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, List, Sequence

import torch
from torch import nn


class CompiledBlocks:
    """Blocks compiled one by one (``nn.Module.compile``, in place: names and state_dict keys
    unchanged); a block whose parameters are all frozen is switched back to eager."""

    def __init__(self, blocks: Sequence[nn.Module], freezer: Any = None, **compile_kwargs: Any) -> None:
        self.blocks: List[nn.Module] = list(blocks)
        if not self.blocks or not all(isinstance(b, nn.Module) for b in self.blocks):
            raise TypeError("compile_blocks expects a non-empty sequence of nn.Module blocks (e.g. model.layers)")
        self.eager = [False] * len(self.blocks)
        builtin = [f"{i} ({type(b).__name__})" for i, b in enumerate(self.blocks) if type(b).__module__.startswith("torch.")]
        if builtin:
            warnings.warn(f"compile_blocks: blocks {', '.join(builtin[:3])} are torch's own module classes, and "
                          "nn.Module.compile() on those compiles nothing (dynamo skips torch.nn's frames): they "
                          "run eagerly. Pass blocks of a module class of your own (a small nn.Module whose forward "
                          "calls the Sequential), or their layers.", stacklevel=3)
        for block in self.blocks:
            block.compile(**compile_kwargs)
        self.refresh()
        self._checked = False
        if freezer is not None:
            if freezer.plan is not None:
                self._check_recompile_budget(freezer.units)
            me = weakref.ref(freezer)  # the freezer holds this listener: no cycle, so `del` frees it
            freezer.add_freeze_listener(lambda event, units: self._on_freeze(me()))

    def _on_freeze(self, freezer: Any) -> None:
        if not self._checked:  # units found lazily, at the first forward
            self._check_recompile_budget(freezer.units)
        self.refresh()

    def _check_recompile_budget(self, units: Sequence[Any]) -> None:
        """Warn when a block holds ``recompile_limit`` units or more: its units' freezes plus
        its input's would take more graphs than dynamo keeps, and it would fall back to eager."""
        self._checked = True
        limit = int(torch._dynamo.config.recompile_limit)
        for i, block in enumerate(self.blocks):
            inside = {id(m) for m in block.modules()}
            count = sum(1 for u in units if any(id(m) in inside for m in u.modules))
            if count >= limit:
                warnings.warn(
                    f"compile_blocks: block {i} ({type(block).__name__}) holds {count} freezable units; "
                    f"freezing them one by one takes up to {count + 1} compiled graphs, beyond "
                    f"torch._dynamo.config.recompile_limit={limit}, after which dynamo runs the block "
                    "eagerly. Compile smaller blocks, or raise recompile_limit.",
                    stacklevel=3,
                )

    def refresh(self) -> int:
        """Switch every fully frozen block to eager; returns how many run eagerly."""
        for i, block in enumerate(self.blocks):
            params = list(block.parameters())
            if not self.eager[i] and params and not any(p.requires_grad for p in params):
                block._compiled_call_impl = None  # what nn.Module.compile set: the eager call
                self.eager[i] = True
        return sum(self.eager)


def compile_blocks(blocks: Sequence[nn.Module], freezer: Any = None, **compile_kwargs: Any) -> CompiledBlocks:
    """Compile each block on its own (``torch.compile`` kwargs pass through) and, given the
    ``SmartFreezer``, return frozen blocks to eager as they freeze. Run the model itself
    uncompiled: the blocks are the compiled regions."""
    return CompiledBlocks(blocks, freezer, **compile_kwargs)


def _has_grads(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.grad is not None for g in optimizer.param_groups for p in g["params"])


def scaler_step(scaler: "torch.amp.GradScaler", optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any):
    """``scaler.step(optimizer)`` that skips an optimizer with no gradients (all its
    parameters frozen) instead of raising.

    Prefer ``FreezeAwareGradScaler``: with a plain ``GradScaler``, a step in which *every*
    optimizer was skipped makes the following ``scaler.update()`` raise ("No inf checks were
    recorded prior to update"); ``FreezeAwareGradScaler.update`` keeps the scale instead."""
    if not _has_grads(optimizer):
        if scaler.is_enabled():  # a disabled scaler keeps no per-optimizer records
            scaler._per_optimizer_states.pop(id(optimizer), None)  # drop an empty unscale_ record
        return None
    return scaler.step(optimizer, *args, **kwargs)


class FreezeAwareGradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose ``step`` skips optimizers left without gradients by
    freezing, and whose ``update`` keeps the scale when no optimizer stepped at all."""

    def step(self, optimizer, *args, **kwargs):
        if not _has_grads(optimizer):
            if self._enabled:  # disabled (enabled=False, or "cuda" without a GPU): no records
                self._per_optimizer_states.pop(id(optimizer), None)
            return None
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale=None) -> None:
        if self._enabled and new_scale is None and not any(
            s["found_inf_per_device"] for s in self._per_optimizer_states.values()
        ):
            self._per_optimizer_states.clear()  # nothing stepped: nothing to learn about the scale
            return
        super().update(new_scale)


def check_grads_after_freeze(freezer: Any) -> None:
    """After each freeze, check after the next optimizer step that the unit right after the frozen
    prefix got a gradient; warn naming the trainable units that did not (reentrant checkpointing
    over a frozen prefix's output). SmartFreezer does this by default; calling it again adds
    nothing. Costs one pass over the parameters per freeze event, nothing per step."""
    if getattr(freezer, "_checks_grads_after_freeze", False):
        return
    freezer._checks_grads_after_freeze = True
    armed = [False]
    me = weakref.ref(freezer)  # the freezer holds this check: no cycle, so `del` frees it (and its model)

    def arm(event, units) -> None:
        armed[0] = True

    def check(optimizer, args, kwargs) -> None:
        freezer = me()
        if not armed[0] or freezer is None:
            return
        trainable = [u for u in freezer.units[freezer.num_frozen:] if any(p.requires_grad for p in u.parameters)]
        if trainable:
            unit = {id(p) for p in trainable[0].parameters}

            def holds(opt) -> bool:
                return any(id(p) in unit for group in opt.param_groups for p in group["params"])

            if not holds(optimizer) and any(holds(opt) for opt in freezer.optimizers):
                return  # another network's optimizer (a GAN's discriminator): wait for this unit's own
        armed[0] = False

        def starved(unit) -> bool:  # zero_grad(set_to_none=False) leaves zeros, not None
            # (a unit of empty tensors, a zero-length prompt table, has no gradient to receive: review92)
            return any(p.numel() for p in unit.parameters) and all(
                p.grad is None or not bool(p.grad.any()) for p in unit.parameters if p.requires_grad)

        # the unit right after the prefix: a branch not taken this step (routing, experts) is not this
        if trainable and starved(trainable[0]):
            current = {id(p) for p in freezer.module.parameters()}
            if any(id(p) not in current for p in trainable[0].parameters):
                # replaced without torch's registration hooks (model.to() / .double() under
                # set_overwrite_module_params_on_conversion(True)): the freezer and the optimizer
                # hold the old tensors. The next freezer.step() adopts like ones or refuses, saying why
                freezer._guard.changed = True
                return
            starved_units = [u for u in trainable if starved(u)]
            zeros = any(p.grad is not None for u in starved_units for p in u.parameters if p.requires_grad)
            warnings.warn(
                f"SmartFreezer: after the last freeze, trainable unit(s) {[u.name for u in starved_units][:4]} "
                f"received no gradient{' (all zeros)' if zeros else ''}. "
                + ("If this step's loss does not reach them (ReLUs that fire for no sample of the batch, an output "
                   "no loss reads), the zeros are the model's own, not the freeze's: ignore this. " if zeros else
                   "If this step's loss does not read them (a head trained on other steps, a branch not taken, an "
                   "output no loss reads, as a pooler whose output the model returns but the loss never uses), that "
                   "is the model's own, not the freeze's: ignore this. ")
                + "Otherwise: reentrant activation checkpointing (checkpoint(..., use_reentrant=True)) on an input "
                "that needs no grad, such as a frozen prefix's output, trains nothing: use "
                "use_reentrant=False (timm: timm.layers.set_reentrant_ckpt(False); Hugging Face: "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})).",
                stacklevel=2,
            )

    freezer.add_freeze_listener(arm)
    freezer._after_step_checks.append(check)  # an optimizer the freezer adopts later gets it too
    for opt in freezer.optimizers:
        # after the step, not before: Lightning (and any closure) runs the backward inside
        # optimizer.step(closure), so before it the gradients were the previous step's (cleared:
        # a false warning; or left over: a missed one)
        freezer._hooks.append(opt.register_step_post_hook(check))
