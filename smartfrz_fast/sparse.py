"""Freezing in sparse training (SpFDE, Yuan et al., NeurIPS 2022, "Layer Freezing & Data
Sieving: Missing Pieces of a Generic Framework for Sparse Training").

``SparseMasks`` holds a model's weight masks (``torch.nn.utils.prune`` masks, or a dict the
user passes, static or updated by a dynamic-sparse-training schedule) and keeps them and the
freezer consistent:

- after every optimizer step the masked weights are zeroed (the invariant ``w * ~mask == 0``);
- the weight history samples only unmasked positions, and is re-drawn when a mask changes;
- a frozen layer's mask freezes with it: ``update`` leaves frozen layers' masks as they are;
- ``state_dict``/``load_state_dict`` resume masks and frozen flags. Resume order: model,
  then ``masks.load_state_dict``, then ``freezer.load_state_dict``, then the optimizer.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

# optimizer state tensors that follow a weight elementwise (SGD momentum, Adam moments)
# optimizer state of a parameter's shape, zeroed at its pruned positions (SGD, Adam(W), NAdam,
# RAdam, Adamax, RMSprop, Adadelta, Adagrad, Rprop). Centered RMSprop's grad_avg too: left, its
# variance square_avg - grad_avg^2 went below 0 there and the weights to NaN.
_ELEMENTWISE_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta", "sum",
                      "grad_avg", "exp_inf", "prev")


def prune_masks(model: nn.Module) -> Dict[str, Tensor]:
    """The ``torch.nn.utils.prune`` masks of a model, keyed by the name of the parameter they
    mask (``conv.weight_orig``): the mask buffers themselves, not copies."""
    return {name: module._buffers[buf_name] for name, (module, buf_name) in _prune_slots(model).items()}


def _prune_slots(model: nn.Module) -> Dict[str, Tuple[nn.Module, str]]:
    """Where each ``torch.nn.utils.prune`` mask lives: ``{parameter name: (module, buffer name)}``.
    Pruning a layer again (iterative magnitude pruning) registers a new buffer there."""
    slots = {}
    for module_name, module in model.named_modules():
        for buf_name, buf in module._buffers.items():
            if buf is not None and buf_name.endswith("_mask"):
                orig = buf_name[: -len("_mask")] + "_orig"
                if orig in module._parameters:
                    slots[f"{module_name}.{orig}" if module_name else orig] = (module, buf_name)
    return slots


def random_masks(model: nn.Module, sparsity: float, seed: int = 0, dense_ends: bool = True) -> Dict[str, Tensor]:
    """SpFDE's initial sparse structure: each ``nn.Conv*``/``nn.Linear`` weight keeps a seeded
    random ``1 - sparsity`` of its entries (uniform per layer, exact counts). ``dense_ends``:
    the first and the last such layer (stem and classifier) stay dense, as is usual in sparse
    training. Returns ``{parameter name: bool mask}`` for ``SparseMasks(model, masks)``."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"random_masks: sparsity must be in [0, 1), got {sparsity!r}")
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if dense_ends:
        layers = layers[1:-1]
    if not layers:
        raise ValueError("random_masks: the model has no Linear/Conv layers to sparsify "
                         "(with dense_ends=True it needs at least three)")
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, module in layers:
        w = module.weight
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        keep[torch.randperm(w.numel(), generator=g)[: round((1.0 - sparsity) * w.numel())]] = True
        masks[f"{name}.weight" if name else "weight"] = keep.view(w.shape).to(w.device)
    return masks


def _check_mask(name: str, mask: Any, param: Tensor, where: str) -> None:
    """A mask must be a tensor of the parameter's shape holding bools or 0/1 (a 0.5 would be
    read as "keep"; a smaller shape would broadcast into a wrong mask)."""
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(param.shape):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{where}: mask for '{name}' is {shape}, the parameter is {tuple(param.shape)}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{where}: mask for '{name}' must be bool or 0/1 values")


class SparseMasks:
    """Weight masks of a sparse model, kept consistent with freezing.

    Args:
        model: the model (its parameter names key the masks).
        masks: ``{parameter name: mask}`` (bool or 0/1, the parameter's shape); a name of a
            pruned weight (``conv.weight``) means its ``conv.weight_orig``. None: the model's
            ``torch.nn.utils.prune`` masks.
    """

    def __init__(self, model: nn.Module, masks: Optional[Mapping[str, Tensor]] = None) -> None:
        params = dict(model.named_parameters())
        self._model = model
        self._prune = _prune_slots(model)
        given = prune_masks(model) if masks is None else dict(masks)
        if not given:
            raise ValueError(
                "SparseMasks: no masks: the model has no torch.nn.utils.prune masks and none were "
                "passed. Prune the model first or pass masks={parameter name: bool tensor}."
            )
        self.params: Dict[str, nn.Parameter] = {}
        self.masks: Dict[str, Tensor] = {}  # bool, on the parameter's device (prune: a bool view is made on use)
        # a tied weight's other names (head.weight of a head tied to emb.weight) mean its first name
        first_name = {id(p): n for n, p in params.items()}
        canonical = {n: first_name[id(q)] for n, q in model.named_parameters(remove_duplicate=False)}
        self._canonical = canonical
        for name, mask in given.items():
            if name not in canonical and name + "_orig" in canonical:
                name = name + "_orig"
            if name not in canonical:
                raise ValueError(f"SparseMasks: the model has no parameter '{name}' (mask given for it)")
            if canonical[name] != name and canonical[name] in given:
                raise ValueError(f"SparseMasks: masks given for both '{name}' and '{canonical[name]}', which are one "
                                 "tied weight: give one mask for it")
            name = canonical[name]
            p = params[name]
            _check_mask(name, mask, p, "SparseMasks")
            self.params[name] = p
            self.masks[name] = mask if name in self._prune else mask.to(device=p.device, dtype=torch.bool).clone()
        # followed by module and buffer name: the prune buffers these masks are
        self._prune = {n: (m, b) for n, (m, b) in self._prune.items() if n in self.masks and self.masks[n] is m._buffers[b]}
        self.frozen: set = set()
        self._freezer_ref: Optional[weakref.ref] = None
        # held weakly: each optimizer's hook holds these masks, so a strong list made the two a
        # cycle that only Python's collector freed (the model's memory with it)
        self._optimizer_refs: List[weakref.ref] = []
        self._hooks: List[Any] = []
        self.apply_()

    @property
    def _freezer(self) -> Any:
        """The attached freezer, held weakly: the optimizers' hooks hold these masks, and a
        freezer its user drops is let go (its hooks with it), as without masks."""
        return None if self._freezer_ref is None else self._freezer_ref()

    @property
    def _optimizers(self) -> List[torch.optim.Optimizer]:
        return [opt for opt in (ref() for ref in self._optimizer_refs) if opt is not None]

    def _frozen_now(self, name: str) -> bool:
        """Frozen with its layer, and still so: after ``freezer.close()`` the layer may train
        again (or a checkpoint's frozen layers are loaded into a run that trains them), and its
        mask is then enforced at every step again (review82: every masked weight moved)."""
        return name in self.frozen and not self.params[name].requires_grad

    def bool_mask(self, name: str) -> Tensor:
        m = self.masks[name]
        return m if m.dtype == torch.bool else m != 0

    def _by_id(self) -> Dict[int, Tensor]:
        return {id(self.params[n]): self.bool_mask(n) for n in self.params}

    def _follow_prune(self) -> None:
        """Adopt the mask buffers ``torch.nn.utils.prune`` registered since (a layer pruned again:
        iterative magnitude pruning): the old buffer no longer masks the layer, and its pruned
        weights kept moving under momentum, sampled by the history and saved as unpruned. A dict
        lookup per pruned layer."""
        moved = [name for name, (module, buf_name) in self._prune.items()
                 if module._buffers.get(buf_name) is not None and module._buffers[buf_name] is not self.masks[name]]
        if not moved:
            return
        prev = self._by_id()
        for name in moved:
            module, buf_name = self._prune[name]
            _check_mask(name, module._buffers[buf_name], self.params[name], "SparseMasks (a layer pruned again)")
            self.masks[name] = module._buffers[buf_name]
        frozen = [n for n in moved if self._frozen_now(n)]
        if frozen:
            warnings.warn(f"SparseMasks: frozen layer(s) pruned again ({frozen[:3]}): their masks were frozen with "
                          "them, and the new ones change what the frozen layers compute", stacklevel=3)
        self.apply_(moved, follow=False)
        if self._freezer is not None:
            self._restrict_history(prev)

    # ------------------------------------------------------------------ invariant
    @torch.no_grad()
    def apply_(self, names: Optional[List[str]] = None, follow: bool = True) -> None:
        """Zero the masked weights (and their optimizer state) of ``names`` (default: every
        trainable masked parameter; frozen ones do not change)."""
        if follow:
            self._follow_prune()
        for name in names if names is not None else [n for n in self.params if not self._frozen_now(n)]:
            p, keep = self.params[name], self.bool_mask(name)
            p.mul_(keep)
            for opt in self._optimizers:
                for key, value in opt.state.get(p, {}).items():
                    if key in _ELEMENTWISE_STATE and isinstance(value, Tensor) and value.shape == p.shape:
                        value.mul_(keep)

    def violations(self) -> Dict[str, int]:
        """``{name: count}`` of masked weights that are not zero (empty when consistent)."""
        self._follow_prune()
        out = {}
        for name, p in self.params.items():
            bad = int((p.detach() != 0).logical_and(~self.bool_mask(name)).sum())
            if bad:
                out[name] = bad
        return out

    def density(self) -> float:
        self._follow_prune()
        kept = sum(int(self.bool_mask(n).sum()) for n in self.params)
        return kept / max(1, sum(p.numel() for p in self.params.values()))

    # ------------------------------------------------------------------ freezer
    def attach(self, freezer) -> "SparseMasks":
        """Keep ``freezer`` consistent with the masks: masked weights zeroed after every
        optimizer step, the history restricted to unmasked positions, masks frozen with their
        layers. Call before training (and, on resume, before ``freezer.load_state_dict``)."""
        if self._freezer is not None:
            raise RuntimeError("SparseMasks is already attached to a freezer")
        self._freezer_ref = weakref.ref(freezer)
        for opt in freezer.optimizers:
            if all(o is not opt for o in self._optimizers):  # attach_optimizer may have come first
                self.attach_optimizer(opt)
        freezer.add_freeze_listener(self._on_freeze)
        freezer.add_change_listener(self._on_change)
        if freezer.plan is not None:
            self._restrict_history()
        else:  # units are found at the first forward: restrict right after the engine's set-up
            def after_setup(module, args):
                self._restrict_history()
                handle.remove()

            from .frozen import engine_hook

            handle = freezer.model.register_forward_pre_hook(engine_hook(after_setup))
        return self

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> "SparseMasks":
        """Zero the masked weights and their optimizer state after every step of ``optimizer``
        (``attach`` does this for the freezer's optimizers, and follows the ones it re-creates;
        call it directly for sparse training without a freezer, and again for every optimizer
        you re-create: nothing else sees a new optimizer)."""
        if any(opt is optimizer for opt in self._optimizers):
            raise RuntimeError("SparseMasks: this optimizer is already attached")
        self._optimizer_refs.append(weakref.ref(optimizer))
        self._hooks.append(optimizer.register_step_post_hook(lambda *args: self.apply_()))
        return self

    def _restrict_history(self, prev: Optional[Dict[int, Tensor]] = None) -> None:
        history = getattr(self._freezer, "history", None)
        if history is not None:
            history.restrict_to_masks(self._by_id(), prev)

    def _on_change(self, kind: str, detail: Any) -> None:
        """The freezer took over a re-created optimizer, or parameters were replaced by like ones:
        enforce the masks on what trains now (the old objects no longer do)."""
        if kind == "optimizer":
            new, replaced = detail
            self._optimizer_refs = [weakref.ref(o) for o in self._optimizers if all(o is not r for r in replaced)]
            if all(o is not new for o in self._optimizers):
                self.attach_optimizer(new)
        elif kind == "parameters":
            self.params = {n: detail.get(id(p), p) for n, p in self.params.items()}
            # load_state_dict(assign=True) replaces the mask buffers too, which the masks now are
            for name, (module, buf_name) in self._prune.items():
                if module._buffers.get(buf_name) is not None:
                    self.masks[name] = module._buffers[buf_name]

    def _on_freeze(self, event, units) -> None:
        # a shared parameter that keeps training from its later reads (shared_parameters="train")
        # is not frozen: its mask is still enforced at every step
        ids = {id(p) for u in units for p in u.parameters if not p.requires_grad}
        newly = [n for n, p in self.params.items() if id(p) in ids]
        self.apply_(newly)  # a frozen layer's weights and mask agree from now on
        self.frozen.update(newly)

    # ------------------------------------------------------------------ dynamic sparse training
    def update(self, new_masks: Mapping[str, Tensor]) -> List[str]:
        """A dynamic-sparse-training step: replace masks (prune and grow). Frozen layers keep
        their masks (SpFDE: a frozen layer's mask freezes with it); newly pruned weights and
        their optimizer state are zeroed, newly grown ones start at 0. Returns the names whose
        mask changed."""
        self._follow_prune()
        skipped, changed = [], []
        prev = self._by_id()
        for name, mask in new_masks.items():
            if name not in self._canonical and name + "_orig" in self._canonical:
                name = name + "_orig"
            name = self._canonical.get(name, name)  # a tied weight's other name
            if name not in self.params:
                raise ValueError(f"SparseMasks.update: no mask for '{name}' (masks: {sorted(self.params)[:4]} ...)")
            _check_mask(name, mask, self.params[name], "SparseMasks.update")
            mask = mask.to(device=self.params[name].device, dtype=torch.bool)
            if torch.equal(mask, self.bool_mask(name)):
                continue
            if not self.params[name].requires_grad:  # frozen (with its layer, or by your code)
                skipped.append(name)
                continue
            self.masks[name].copy_(mask)  # prune buffers keep their float dtype
            changed.append(name)
        if skipped:
            warnings.warn(f"SparseMasks.update: {len(skipped)} frozen layer(s) keep their masks: {skipped[:3]}",
                          stacklevel=2)
        if changed:
            self.apply_(changed)
            if self._freezer is not None:
                self._restrict_history(prev)
        return changed

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        self._follow_prune()
        return {"masks": {n: self.bool_mask(n).cpu().clone() for n in self.params},
                "frozen": sorted(n for n in self.frozen if self._frozen_now(n))}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if set(state) != {"masks", "frozen"} or set(state["masks"]) != set(self.params):
            raise ValueError(
                "SparseMasks: the checkpoint's masks are for parameters "
                f"{sorted(state.get('masks', {}))[:4]}, this run masks {sorted(self.params)[:4]}: "
                "construct SparseMasks for the same model and masks."
            )
        self._follow_prune()
        for name, mask in state["masks"].items():  # all checked before any is copied
            _check_mask(name, mask, self.params[name], "SparseMasks.load_state_dict")
        with torch.no_grad():
            for name, mask in state["masks"].items():
                self.masks[name].copy_(mask.to(self.masks[name].device))
        self.frozen = set(state["frozen"])
        self.apply_(list(self.params))
        if self._freezer is not None and self._freezer.plan is not None:
            self._restrict_history()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
