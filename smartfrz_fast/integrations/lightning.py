"""PyTorch Lightning integration: ``SmartFreezeCallback``.

::

    import lightning.pytorch as L
    from smartfrz_fast import FreezeOut
    from smartfrz_fast.integrations.lightning import SmartFreezeCallback

    trainer = L.Trainer(max_epochs=4, callbacks=[SmartFreezeCallback(FreezeOut(t0=0.5))])
    trainer.fit(module, loader)                      # module.example_input_array is set
    trainer.fit(module, loader, ckpt_path="last.ckpt")   # resume: freeze state comes back

Where it hooks into Lightning's ``fit`` (2.x):

1. ``load_state_dict`` (callback state, restored before ``configure_optimizers`` runs): the
   freezer state is kept until the freezer exists.
2. ``on_fit_start`` (optimizers exist, their saved state is not restored yet): build the
   ``SmartFreezer`` over the optimizers from ``configure_optimizers`` and apply the saved
   freezer state, which removes the frozen parameters from the optimizer groups, so that the
   optimizer state Lightning restores next matches. Strategies that restore the checkpoint
   after setup (``restore_checkpoint_after_setup``) call ``load_state_dict`` after this hook,
   still before the optimizer state: it is applied at once.
3. ``on_train_batch_end``: ``freezer.step()`` once per batch in which an optimizer stepped
   (``trainer.global_step`` moved), so gradient accumulation is counted right.
4. ``state_dict``: the freezer state goes into the checkpoint's ``callbacks`` entry (and the
   activation cache's, when there is one; it is loaded right after the freezer's).

With ``activation_cache={...}`` the callback also builds an ``ActivationCache`` over the frozen
module in ``on_fit_start``; ``training_step`` calls ``callback.cached(inputs, sample_ids)``
instead of the module, and the frozen prefix's forward is skipped for cached samples. Under
Lightning's DDP strategy ``training_step`` already runs inside DDP's forward, so the cached
forward is all-reduced like any other.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Dict, Optional

from torch import nn

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "smartfrz_fast.integrations.lightning needs PyTorch Lightning 2.x: "
        "pip install 'lightning>=2.2'"
    ) from exc

from ..cache import ActivationCache
from ..distributed import check_ddp_settings
from ..engine import SmartFreezer
from ..policy.base import FreezePolicy
from . import check_callback_args, load_freezer_state, move_to_device, split_example_inputs

# Strategies whose parameters are sharded or owned by another engine: the freeze action
# (removing parameters from the optimizer's groups) does not apply to them.
_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy")


class SmartFreezeCallback(Callback):
    """Progressive layer freezing inside ``lightning.pytorch.Trainer.fit``.

    Args:
        policy: a ``FreezePolicy`` (default: SmartFRZ, which needs predictor weights).
        example_inputs: inputs for one forward pass of the frozen module that finds its units
            (a tensor, a tuple of positional inputs or a dict of keyword inputs). Default: the
            LightningModule's ``example_input_array``, read as Lightning reads it (a list or tuple,
            a NamedTuple too, is the positional inputs); without either, the units are found at
            the first forward pass, which works for a fresh run but not for a resume.
        submodule: attribute path of the module to freeze inside the LightningModule (e.g.
            ``"net"``) when ``training_step`` does not go through the LightningModule's
            ``forward``; default the LightningModule itself.
        total_steps: optimizer steps in the run; default ``trainer.estimated_stepping_batches``.
        activation_cache: keyword arguments of ``ActivationCache`` (``num_samples``,
            ``deterministic``, ``storage``, ...) to skip the frozen prefix's forward pass; then
            ``training_step`` calls ``callback.cached(inputs, sample_ids)``.
        **freezer_kwargs: passed to ``SmartFreezer`` (``sample_every``, ``window``,
            ``sample_size``, ``keep_trainable``, ``decision_delay``, ``seed``).

    After ``fit`` has started, ``callback.freezer`` is the ``SmartFreezer`` and
    ``callback.cache`` the ``ActivationCache`` (or None).
    """

    def __init__(
        self,
        policy: Optional[FreezePolicy] = None,
        *,
        example_inputs: Any = None,
        submodule: Optional[str] = None,
        total_steps: Optional[int] = None,
        activation_cache: Optional[Dict[str, Any]] = None,
        **freezer_kwargs: Any,
    ) -> None:
        super().__init__()
        check_callback_args(policy, freezer_kwargs, activation_cache)
        self.policy = policy
        self.example_inputs = example_inputs
        self.submodule = submodule
        self.total_steps = total_steps
        self.freezer_kwargs = freezer_kwargs
        self.cache_kwargs = activation_cache
        self.freezer: Optional[SmartFreezer] = None
        self.cache: Optional[ActivationCache] = None
        self._cached_model: Optional[nn.Module] = None
        self._saved_state: Optional[Dict[str, Any]] = None
        self._saved_cache_state: Optional[Dict[str, Any]] = None
        self._last_global_step = 0
        self._pace: Optional[Dict[str, int]] = None  # see _check_manual_pace

    @property
    def state_key(self) -> str:
        """One callback per submodule (a GAN's generator and discriminator), each with its own
        state in the checkpoint; the whole module's keeps the class name."""
        return super().state_key if self.submodule is None else self._generate_state_key(submodule=self.submodule)

    @property
    def _legacy_state_key(self) -> str:
        """The key of checkpoints saved before ``state_key`` named the submodule (Lightning looks
        there when ``state_key`` is missing): only one such callback could exist then."""
        return type(self).__qualname__

    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        """The checkpoint's one freezer state saved under another key (a callback with another
        submodule, or none) is taken, so that what does not fit is said, not silently skipped."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states or self._legacy_state_key in states:
            return  # Lightning loads it
        saved = [key for key in states if str(key).startswith(type(self).__qualname__)]
        if len(saved) == 1 and sum(isinstance(cb, SmartFreezeCallback) for cb in trainer.callbacks) == 1:
            self.load_state_dict(copy.deepcopy(states[saved[0]]))

    # ------------------------------------------------------------------ set-up
    def _target(self, pl_module: "pl.LightningModule") -> nn.Module:
        module: Any = pl_module
        for name in (self.submodule or "").split("."):
            if name:
                if not hasattr(module, name):
                    raise AttributeError(f"SmartFreezeCallback: submodule {self.submodule!r} not found "
                                         f"on {type(pl_module).__name__} (no attribute {name!r})")
                module = getattr(module, name)
        if not isinstance(module, nn.Module):
            raise TypeError(f"SmartFreezeCallback: submodule {self.submodule!r} is a "
                            f"{type(module).__name__}, not an nn.Module")
        return module

    @staticmethod
    def _check_strategy(trainer: "pl.Trainer") -> None:
        strategy = trainer.strategy
        names = {cls.__name__ for cls in type(strategy).__mro__}
        unsupported = names.intersection(_UNSUPPORTED_STRATEGIES)
        if unsupported:
            raise NotImplementedError(
                f"SmartFreezeCallback does not support {type(strategy).__name__}: it shards or owns the "
                "parameters, so they cannot be frozen one by one. Use a single device or DDP.")
        if "DDPStrategy" in names:
            kwargs = getattr(strategy, "_ddp_kwargs", {}) or {}
            check_ddp_settings(
                bool(kwargs.get("static_graph")), bool(kwargs.get("find_unused_parameters")),
                fix_static="Drop static_graph when training with SmartFreezeCallback.",
                fix_unused="Freezing mid-run needs find_unused_parameters=True: use "
                "strategy='ddp_find_unused_parameters_true' or DDPStrategy(find_unused_parameters=True).")

    def _example(self, pl_module: "pl.LightningModule") -> Any:
        if self.example_inputs is not None:
            return self.example_inputs
        if self.submodule is None:
            return getattr(pl_module, "example_input_array", None)
        return None

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._check_strategy(trainer)
        if self.freezer is not None:
            # a second fit() with this callback: the freezer carries on (frozen layers stay frozen)
            # and takes over configure_optimizers' new optimizers at their first step; the cached
            # rows hold only if nothing wrote the frozen weights through .data since (weight averaging)
            if self.cache is not None:
                self.cache.check_prefix_weights()
            return
        optimizers = list(trainer.optimizers)
        if not optimizers:
            raise ValueError("SmartFreezeCallback: configure_optimizers returned no optimizer")
        total = self.total_steps
        if total is None:
            total = _estimated_optimizer_steps(trainer)
            if total == 0:  # limit_train_batches=0 (a debugging run): nothing trains, nothing to freeze
                return
            if total is None and self.policy is not None and self.policy.needs_total_steps():
                raise ValueError(
                    f"SmartFreezeCallback: Lightning cannot tell how many optimizer steps this run makes "
                    f"(estimated_stepping_batches={trainer.estimated_stepping_batches}: an IterableDataset without "
                    f"max_steps, or max_time only), and {type(self.policy).__name__} follows a schedule over the "
                    "whole run: pass SmartFreezeCallback(..., total_steps=N), or Trainer(max_steps=N).")
            # manual optimization: the estimate counts every batch (or max_steps optimizer steps);
            # the freezer steps once per batch in which an optimizer stepped. Checked in the first epoch
            self._pace = {"total": total, "batches": 0, "steps": 0} if (
                total is not None and not pl_module.automatic_optimization) else None
        model = self._target(pl_module)
        example = self._example(pl_module)
        args, kwargs = (None, None)
        if example is not None:
            # as Lightning feeds its batches: precision="bf16-true" casts floating inputs to bf16
            convert = getattr(getattr(trainer, "precision_plugin", None), "convert_input", None)
            example = convert(example) if convert is not None else example
            example = move_to_device(example, pl_module.device)
            if self.example_inputs is None and isinstance(example, (list, tuple)):
                # example_input_array as Lightning feeds it to the forward: a list or tuple, a
                # NamedTuple too, is the positional inputs (review100: a NamedTuple passed whole)
                args, kwargs = tuple(example), {}
            else:
                args, kwargs = split_example_inputs(example)
        if self._saved_state is not None and example is None:
            raise ValueError(
                "SmartFreezeCallback: resuming needs the model's units before Lightning restores the "
                "optimizer state, i.e. before any forward pass: set the LightningModule's "
                "example_input_array or pass example_inputs=... to SmartFreezeCallback.")
        self.freezer = SmartFreezer(model, optimizers, self.policy, example_inputs=args,
                                    example_kwargs=kwargs, total_steps=total, **self.freezer_kwargs)
        if self._saved_state is not None:
            # Before restore_training_state: the optimizer's groups must lose the frozen
            # parameters before their saved state is loaded into them.
            load_freezer_state(self.freezer, self._saved_state)
            self._saved_state = None
        if self.cache_kwargs is not None:
            self.cache = ActivationCache(self.freezer, **self.cache_kwargs)
            self._cached_model = self.cache.wrap()
            outer = getattr(trainer.strategy, "model", None)  # the strategy's DDP around the LightningModule
            if isinstance(outer, nn.parallel.DistributedDataParallel):
                self.cache.note_outer_ddp(outer)
            if self._saved_cache_state is not None:  # after the freezer's, as the cache requires
                self.cache.load_state_dict(self._saved_cache_state)
                self._saved_cache_state = None

    def cached(self, inputs: Any, sample_ids: Any, **kwargs: Any) -> Any:
        """The frozen module's forward through the activation cache: call it in
        ``training_step`` with the batch's sample ids (``IndexedDataset`` adds them)."""
        if self.cache_kwargs is None:
            raise RuntimeError("SmartFreezeCallback.cached: the callback was built without "
                               "activation_cache={...}; pass it, or call the module directly.")
        if self._cached_model is None:
            raise RuntimeError("SmartFreezeCallback.cached is for training_step: the cache is built "
                               "when fit starts (call the module directly outside fit).")
        return self._cached_model(inputs, sample_ids, **kwargs)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # global_step is restored after on_fit_start: take the baseline here.
        self._last_global_step = trainer.global_step
        if (self.freezer is not None and trainer.global_step > 0 and self.total_steps is None
                and self.freezer.step_count == 0 and not self.freezer.timeline):
            total = self.freezer.total_steps
            warnings.warn(
                f"SmartFreezeCallback: the run resumes at step {trainer.global_step} from a checkpoint saved without "
                "this callback's state: the freezer starts counting now, and its schedule spans the whole run's "
                f"{total} steps, so it runs {trainer.global_step} steps late (freezing less than planned). Pass "
                f"total_steps=<the steps left{'' if total is None else f', {total - trainer.global_step}'}> to fit it to "
                "the rest of the run, or resume from a checkpoint saved with the callback.", stacklevel=2)
        if self.freezer is not None and self.freezer.step_owed:
            # resumed from a checkpoint a callback of the user's saved in on_train_batch_end before
            # this one's: the batch's optimizer step happened, its freezer step did not (lost, the
            # schedule ran one step behind for the rest of the run)
            self.freezer.step()

    # ------------------------------------------------------------------ per step
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        advanced = trainer.global_step - self._last_global_step
        # manual optimization through the raw optimizers (self.optimizers(use_pl_optimizer=False))
        # steps them without moving global_step: the freezer saw those steps itself (review79: it
        # never stepped, nothing froze)
        stepped = bool(advanced) or (not pl_module.automatic_optimization and self.freezer is not None
                                     and self.freezer._optimizer_stepped())
        if self._pace is not None:
            self._check_manual_pace(trainer, advanced, stepped)
        if self.freezer is None or not stepped:
            return  # accumulating gradients (or a skipped step): no optimizer step this batch
        self._last_global_step = trainer.global_step
        self.freezer.step()

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        pace, self._pace = self._pace, None  # the first epoch tells
        if pace is not None and pace["steps"] < pace["batches"]:
            self._warn_pace(f"the freezer stepped in {pace['steps']} of the first epoch's {pace['batches']} "
                            "batches (optimizer steps by hand every few batches), Lightning's estimate counts "
                            f"every batch ({pace['total']} steps)")

    def _check_manual_pace(self, trainer: "pl.Trainer", advanced: int, stepped: bool) -> None:
        """Measured: hand accumulation over 2 batches, or two optimizers under max_steps, made 24
        freezer steps for an estimate of 48, and a LinearFreeze to the end froze 1 of 3 units."""
        pace = self._pace
        pace["batches"] += 1
        pace["steps"] += stepped
        if advanced > 1 and trainer.max_steps not in (None, -1):
            self._pace = None
            self._warn_pace(f"{advanced} optimizer steps per batch end the run after max_steps / {advanced} "
                            f"batches, and the freezer steps once per batch, not {pace['total']} times")

    def _warn_pace(self, what: str) -> None:
        warnings.warn(f"SmartFreezeCallback: under manual optimization {what}: the policy's schedule does not fit "
                      "the run. Pass total_steps= (the number of batches in which an optimizer steps).", stacklevel=2)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {}
        if self.freezer is not None and self.freezer.plan is not None:
            with warnings.catch_warnings():  # saved mid-iteration: on_train_start finishes it on resume
                warnings.filterwarnings("ignore", message=r"SmartFreezer: state_dict\(\) between optimizer.step")
                state["freezer"] = self.freezer.state_dict()
        elif self._saved_state is not None:  # restored but not applied yet: keep it
            state["freezer"] = self._saved_state
        if self.cache is not None:
            state["cache"] = self.cache.state_dict()
        elif self._saved_cache_state is not None:
            state["cache"] = self._saved_cache_state
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state, cache_state = state_dict.get("freezer"), state_dict.get("cache")
        if cache_state is not None and self.cache_kwargs is None:
            raise ValueError("SmartFreezeCallback: the checkpoint holds an activation cache's state, but "
                             "this callback has no activation_cache={...}: pass the same cache arguments "
                             "as the run that saved it.")
        if state is None:
            return
        if self.freezer is None:  # applied in on_fit_start, once the optimizers exist
            self._saved_state, self._saved_cache_state = state, cache_state
            return
        if self.freezer.step_count:
            raise RuntimeError(
                "SmartFreezeCallback: this callback's freezer has trained in an earlier fit(), and frozen layers "
                "are never unfrozen, so it cannot go back to a checkpoint. To resume from one, build the "
                "LightningModule, Trainer and SmartFreezeCallback afresh (as a new process does).")
        if self.freezer.plan is None:
            raise ValueError(
                "SmartFreezeCallback: this strategy restores the checkpoint after setup, and the "
                "model's units are not known yet: set example_input_array or pass example_inputs=...")
        load_freezer_state(self.freezer, state)
        if cache_state is not None:
            self.cache.load_state_dict(cache_state)


def _estimated_optimizer_steps(trainer: "pl.Trainer") -> Optional[int]:
    """The run's optimizer steps as Lightning estimates them (0: limit_train_batches=0, a
    debugging run that trains nothing), or None where it does not know
    (``inf``; -1, which it returns for an IterableDataset without ``max_steps``: it crashed every
    policy, review79). Under ``GradientAccumulationScheduler`` Lightning counts every epoch at the
    first epoch's accumulation (64 steps for a 48-step run: a schedule policy ran slow and never
    reached its last unit, review79): the epochs are counted at their own."""
    if trainer.limit_train_batches == 0:  # (Lightning then counts an infinite epoch: -1)
        return 0
    estimated = trainer.estimated_stepping_batches
    if estimated == float("inf") or estimated < 0:
        return None
    scheduler = next((c for c in trainer.callbacks if isinstance(c, GradientAccumulationScheduler)), None)
    batches = trainer.num_training_batches
    if scheduler is None or trainer.max_epochs in (None, -1) or batches == float("inf"):
        return int(estimated)
    steps = sum(math.ceil(batches / scheduler.get_accumulate_grad_batches(epoch))
                for epoch in range(max(trainer.max_epochs, 1)))
    return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps
