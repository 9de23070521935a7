"""Hugging Face Trainer integration: ``SmartFreezeCallback`` (a ``TrainerCallback``).

::

    from transformers import Trainer
    from smartfrz_fast import FreezeOut
    from smartfrz_fast.integrations.huggingface import SmartFreezeCallback

    trainer = Trainer(model=model, args=args, train_dataset=train)
    SmartFreezeCallback(FreezeOut(t0=0.5)).attach(trainer)
    trainer.train()                                   # or train(resume_from_checkpoint=True)

Why ``attach(trainer)`` and not only ``callbacks=[...]``: the Trainer creates its optimizer
lazily inside ``train()`` and, on a resume, loads the optimizer state soon after creating it,
with no callback event in between (``on_train_begin`` comes later). The freezer must exist and
have re-frozen the saved units *before* that load, since freezing removes parameters from the
optimizer's groups and the saved state expects them gone. ``attach`` adds the callback and wraps
two public methods of that one Trainer instance:

- ``train``: remembers ``resume_from_checkpoint`` (``True`` resolves to the last checkpoint);
- ``create_scheduler(num_training_steps)``: before the Trainer builds its lr scheduler, builds
  the ``SmartFreezer`` over the Trainer's optimizer (``num_training_steps`` is the run's step
  count) and, when resuming, loads ``<checkpoint>/smartfrz_freezer.pt``.

Why ``create_scheduler``: it is the one moment that transformers 4.x and 5.x share where the
optimizer exists, the run's step count is known, no lr scheduler has been built on the optimizer's
groups yet and the saved optimizer state is not loaded yet. (4.x builds the optimizer and the
scheduler together, before it sets ``trainer.state.max_steps``; 5.x builds the optimizer, wraps
the model, then builds the scheduler.)

Events: ``on_step_end`` (after ``optimizer.step()`` and the scheduler step, once per optimizer
step whatever the gradient accumulation) calls ``freezer.step()``. The freezer state goes into
``checkpoint-<step>`` as the Trainer's ``_save_checkpoint`` starts (wrapped by ``attach`` too):
the Trainer's save ends by deleting older checkpoints (``save_total_limit``), so written at
``on_save``, after it, a kill in between left no checkpoint to resume from. A Trainer without
``_save_checkpoint`` gets it at ``on_save``.

With ``activation_cache={...}``, ``attach`` also adds each training sample's index to its item
(``"sample_id"``, kept through the Trainer's column removal) and wraps ``compute_loss``: in
training it runs the model through an ``ActivationCache`` keyed by those ids, which computes the
model's own loss from ``labels`` (the chain's head does it as the model's forward does), so the
rest of ``compute_loss`` (label smoothing, ``compute_loss_func``, token averaging) is unchanged.
"""

from __future__ import annotations

import copy
import functools
import glob
import os
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any, Dict, Optional

import torch
from torch import nn

try:
    import transformers
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "smartfrz_fast.integrations.huggingface needs transformers (and accelerate): "
        "pip install 'transformers>=4.40' accelerate"
    ) from exc

from ..cache import ActivationCache, CachedModel, IndexedDataset
from ..distributed import check_ddp_settings
from ..engine import SmartFreezer, _unwrapped
from ..policy.base import FreezePolicy
from ..units import forward_keywords, marks_output_for_grad, preserved_rngs
from . import check_callback_args, load_freezer_state, move_to_device, split_example_inputs

CHECKPOINT_FILE = "smartfrz_freezer.pt"
CACHE_CHECKPOINT_FILE = "smartfrz_cache.{rank}.pt"  # the cache is per process (the samples it saw)
SAMPLE_ID = "sample_id"  # the key of a training item's index, the activation cache's sample id
PREFIX_CHECKPOINT_DIR = "checkpoint"


REENTRANT_ADVICE = (
    "Reentrant gradient checkpointing (use_reentrant=True) trains nothing inside a checkpointed block whose "
    "input needs no grad, which is what the output of a frozen prefix is: pass "
    "gradient_checkpointing_kwargs={'use_reentrant': False} (transformers 4.x defaults to True).")


def check_training_args(args: "transformers.TrainingArguments", model: nn.Module) -> None:
    """Refuse Trainer settings that conflict with freezing mid-run (clear errors), and warn of
    those that freezing changes."""
    if getattr(args, "neftune_noise_alpha", None) is not None:
        warnings.warn(
            "SmartFreezeCallback with NEFTune (neftune_noise_alpha): NEFTune adds its noise to the input "
            "embeddings only in train mode, and the freezer runs frozen layers in eval mode, so the noise "
            "stops once the embeddings freeze (the layers after them then train without it). Train "
            "without NEFTune, or without the callback, if the noise must last the whole run.", stacklevel=3)
    gc_on = bool(getattr(args, "gradient_checkpointing", False) or getattr(args, "activation_checkpointing", False))
    gc_kwargs = getattr(args, "gradient_checkpointing_kwargs", None) or getattr(
        args, "activation_checkpointing_kwargs", None) or {}
    if gc_on and isinstance(gc_kwargs, dict) and gc_kwargs.get("use_reentrant"):
        raise ValueError(REENTRANT_ADVICE)
    if args.world_size > 1 and args.parallel_mode.value == "distributed":
        find_unused = args.ddp_find_unused_parameters
        if find_unused is None:  # the Trainer's own default (its DDP kwargs)
            find_unused = not (gc_on or getattr(model, "is_gradient_checkpointing", False))
        check_ddp_settings(
            # ddp_static_graph: a TrainingArguments field only in transformers 5.x
            bool(getattr(args, "ddp_static_graph", None)), bool(find_unused),
            fix_static="Drop ddp_static_graph when training with SmartFreezeCallback.",
            fix_unused="Freezing mid-run needs find_unused_parameters=True: set "
            "TrainingArguments(ddp_find_unused_parameters=True).")


def check_checkpointing(model: nn.Module) -> None:
    """Refuse the checkpointing the model really uses when it is reentrant. With
    ``gradient_checkpointing=True`` and no kwargs, transformers 4.x gives each layer
    ``partial(checkpoint, use_reentrant=True)`` and 5.x ``use_reentrant=False``; the user may also
    have called ``gradient_checkpointing_enable`` directly. Unset is torch's default: reentrant."""
    for module in model.modules():
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if (getattr(module, "gradient_checkpointing", False) is True and isinstance(fn, functools.partial)
                and fn.keywords.get("use_reentrant", True)):
            raise ValueError(f"{REENTRANT_ADVICE} ({type(module).__name__} checkpoints with use_reentrant=True.)")


def release_marked_inputs(model: nn.Module) -> None:
    """transformers 5's ``gradient_checkpointing_enable()`` also calls ``enable_input_require_grads()``,
    which reentrant checkpointing needs (refused here, ``check_checkpointing``) and which makes the
    backward run through every frozen layer after the embeddings: with non-reentrant checkpointing
    the callback takes that hook off again (``disable_input_require_grads()``)."""
    if not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return
    set_by_transformers = getattr(model, "_require_grads_hook", None) is not None or getattr(
        model, "_require_grads_hooks", None)
    if set_by_transformers and callable(getattr(model, "disable_input_require_grads", None)):
        model.disable_input_require_grads()  # its own bookkeeping (4.x's raises when none was set)
    for module in model.modules():  # and any it lost track of (set twice; on a PEFT model's base)
        for key, hook in list(module._forward_hooks.items()):
            if marks_output_for_grad(hook):
                for hooks in (module._forward_hooks, module._forward_hooks_with_kwargs,
                              module._forward_hooks_always_called):
                    hooks.pop(key, None)


def _model_columns(trainer) -> Optional[set]:
    """The dataset columns the Trainer keeps (the model's forward parameters and the labels'
    names), where it drops the others (``remove_unused_columns``, its default); None where it
    keeps every column or cannot say."""
    fill = getattr(trainer, "_set_signature_columns_if_needed", None)
    if not getattr(trainer.args, "remove_unused_columns", False) or fill is None:
        return None
    try:
        fill()
    except Exception:  # noqa: BLE001 -- a Trainer subclass that cannot say: every column
        return None
    columns = getattr(trainer, "_signature_columns", None)
    return set(columns) if columns else None


def _forward_parameters(model: nn.Module) -> Optional[set]:
    """The keyword names ``model.forward`` takes; None where it takes any (``**kwargs``) or its
    signature cannot be read."""
    taken = forward_keywords(model)
    return None if taken is None or taken[1] else taken[0]


class SmartFreezeCallback(TrainerCallback):
    """Progressive layer freezing inside ``transformers.Trainer``; call ``attach(trainer)``.

    Args:
        policy: a ``FreezePolicy`` (default: SmartFRZ, which needs predictor weights).
        example_inputs: inputs for one forward pass that finds the model's units: a dict of
            keyword inputs (as a Transformers model takes), a tuple of positional inputs or a
            tensor. Default: the first two training samples put through the Trainer's data
            collator, else the model's ``dummy_inputs``.
        total_steps: optimizer steps in the run; default the Trainer's ``max_steps``.
        activation_cache: keyword arguments of ``ActivationCache`` (``deterministic=True`` at
            least; ``num_samples`` defaults to the training set's length): training steps skip
            the frozen prefix's forward pass for samples seen before.
        **freezer_kwargs: passed to ``SmartFreezer`` (``sample_every``, ``window``,
            ``sample_size``, ``keep_trainable``, ``decision_delay``, ``seed``).

    During and after ``train()``, ``callback.freezer`` is the ``SmartFreezer`` and
    ``callback.cache`` the ``ActivationCache`` (or None).
    """

    def __init__(self, policy: Optional[FreezePolicy] = None, *, example_inputs: Any = None,
                 total_steps: Optional[int] = None, activation_cache: Optional[Dict[str, Any]] = None,
                 **freezer_kwargs: Any) -> None:
        check_callback_args(policy, freezer_kwargs, activation_cache)
        self.policy = policy
        # unbound: a train() whose model_init builds a new model (hyperparameter_search) is a new
        # run, with a new freezer and a policy of its own
        self._policy_template = None if getattr(policy, "holds_model", False) else copy.deepcopy(policy)
        self.example_inputs = example_inputs
        self.total_steps = total_steps
        self.freezer_kwargs = freezer_kwargs
        self.cache_kwargs = activation_cache
        self.freezer: Optional[SmartFreezer] = None
        self.cache: Optional[ActivationCache] = None
        self._cached_model: Optional[CachedModel] = None
        self._trainer = None
        self._resume_from: Optional[str] = None
        self._written_at: Optional[int] = None  # the step whose checkpoint has the freezer's files
        self._stepped_at: Optional[int] = None  # the global step on_step_end last stepped the freezer at
        self._items_had_ids = False  # the training items came with a sample id of their own
        self._warned_no_ids = False

    # ------------------------------------------------------------------ attach
    def attach(self, trainer: "transformers.Trainer") -> "SmartFreezeCallback":
        """Add this callback to ``trainer`` and hook it in before the optimizer state loads."""
        if self._trainer is not None:
            raise RuntimeError("this SmartFreezeCallback is already attached to a Trainer; make one per Trainer")
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise NotImplementedError(
                "SmartFreezeCallback does not support DeepSpeed or FSDP: they shard or own the parameters, "
                "so they cannot be frozen one by one. Use a single device or DDP.")
        check_training_args(trainer.args, trainer.model)
        if self.cache_kwargs is not None:
            self._add_sample_ids(trainer)
        self._trainer = trainer
        if not any(c is self for c in trainer.callback_handler.callbacks):  # also in callbacks=[...]: once
            trainer.add_callback(self)

        original_train = trainer.train
        original_create_scheduler = trainer.create_scheduler
        original_compute_loss = trainer.compute_loss
        original_save_checkpoint = getattr(trainer, "_save_checkpoint", None)

        @functools.wraps(original_train)
        def train(resume_from_checkpoint=None, *args, **kwargs):
            resume = resume_from_checkpoint
            if isinstance(resume, bool):
                resume = get_last_checkpoint(trainer.args.output_dir) if resume else None
                # (None here: the Trainer itself raises its "no valid checkpoint" error)
            if resume is not None and self.freezer is not None and self.freezer.step_count:
                raise RuntimeError(
                    f"SmartFreezeCallback: this Trainer's freezer has trained in an earlier train(), and frozen "
                    f"layers are never unfrozen, so it cannot go back to {resume}. To resume from a checkpoint, "
                    "build the model, Trainer and SmartFreezeCallback afresh (as a new process does).")
            self._resume_from = None if resume is None else str(resume)
            return original_train(resume_from_checkpoint, *args, **kwargs)

        @functools.wraps(original_create_scheduler)
        def create_scheduler(num_training_steps, *args, **kwargs):
            self._on_optimizer_ready(trainer, num_training_steps)
            return original_create_scheduler(num_training_steps, *args, **kwargs)

        @functools.wraps(original_compute_loss)
        def compute_loss(model, inputs, *args, **kwargs):
            if not isinstance(inputs, MutableMapping):
                return original_compute_loss(model, inputs, *args, **kwargs)
            sample_ids = inputs.pop(SAMPLE_ID, None)  # the model does not take it
            if sample_ids is None and model.training and self.cache is not None and torch.is_grad_enabled():
                self._warn_no_sample_ids(trainer)
            if sample_ids is None or not model.training or self.cache is None:  # evaluation
                return original_compute_loss(model, inputs, *args, **kwargs)
            cached = _CachedCall(self._cached(model), sample_ids, trainer.accelerator)
            try:
                return original_compute_loss(cached, inputs, *args, **kwargs)
            except IndexError as exc:
                if self._items_had_ids and "outside [0," in str(exc):
                    raise IndexError(
                        f"{exc}\nSmartFreezeCallback: the training items came with a {SAMPLE_ID!r} of their own, "
                        "which the callback uses as the cache's row index (num_samples=len(train_dataset) unless "
                        f"activation_cache gives it): drop or rename that column (the callback then numbers the items "
                        f"itself), or pass activation_cache={{..., 'num_samples': <largest {SAMPLE_ID} + 1>}}.") from exc
                raise

        def save_checkpoint(model, trial, *args, **kwargs):
            # the freezer's files go in first: the Trainer's save ends by deleting older checkpoints
            # (save_total_limit), so a kill between it and on_save left no checkpoint to resume with
            folder = os.path.join(trainer._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
            self._write(trainer.args, trainer.state, folder)
            return original_save_checkpoint(model, trial, *args, **kwargs)

        trainer.train = train
        trainer.create_scheduler = create_scheduler
        if original_save_checkpoint is not None and hasattr(trainer, "_get_output_dir"):
            trainer._save_checkpoint = functools.wraps(original_save_checkpoint)(save_checkpoint)
        if self.cache_kwargs is not None:
            trainer.compute_loss = compute_loss
        return self

    def _add_sample_ids(self, trainer) -> None:
        """Give each training item its index under ``"sample_id"`` (unless it has one) and keep
        that column through the Trainer's removal of the inputs the model's forward does not take."""
        dataset = trainer.train_dataset
        if dataset is None or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise ValueError(
                "SmartFreezeCallback(activation_cache=...) needs a map-style train_dataset (a list, a torch "
                "Dataset or a datasets.Dataset): sample ids are dataset indices. Train without the cache.")
        if len(dataset) == 0:
            raise ValueError("SmartFreezeCallback(activation_cache=...): the train_dataset is empty")
        # a dataset that augments in __getitem__ draws from the run's generators
        with preserved_rngs(trainer.model if trainer.model is not None else nn.Module(), holders=(dataset,)):
            first = dataset[0]
        if not isinstance(first, Mapping):
            raise TypeError(
                "SmartFreezeCallback(activation_cache=...): training items must be dicts of model inputs "
                f"(as the Trainer's collators take), got {type(first).__name__}")
        self._items_had_ids = SAMPLE_ID in first
        if not self._items_had_ids:
            trainer.train_dataset = IndexedDataset(dataset, key=SAMPLE_ID)
        if not trainer.args.remove_unused_columns:
            return
        # The Trainer drops every item key its model's forward does not name (its signature columns,
        # filled once, lazily): add the sample id to them.
        fill = getattr(trainer, "_set_signature_columns_if_needed", None)
        if fill is None:
            raise NotImplementedError(
                f"SmartFreezeCallback(activation_cache=...): this Trainer (transformers {transformers.__version__}) "
                f"has no _set_signature_columns_if_needed, through which the callback keeps the {SAMPLE_ID!r} "
                "column: pass TrainingArguments(remove_unused_columns=False) (and give the Trainer only "
                "model inputs and labels), or train without the cache.")
        fill()
        if SAMPLE_ID not in trainer._signature_columns:
            trainer._signature_columns.append(SAMPLE_ID)

    def _warn_no_sample_ids(self, trainer) -> None:
        """A training batch without sample ids runs the whole model: said once, or the cache did
        nothing all run while describe() said it waited for its first forward (review80)."""
        if self._warned_no_ids:
            return
        self._warned_no_ids = True
        swapped = not isinstance(trainer.train_dataset, IndexedDataset) and not self._items_had_ids
        warnings.warn(
            f"SmartFreezeCallback: a training batch came without its {SAMPLE_ID!r} key, so the activation cache "
            "cannot serve it and the whole model runs, as for every batch without it. "
            + ("trainer.train_dataset was replaced after the callback numbered its items: number the new one "
               f"as it does, trainer.train_dataset = smartfrz_fast.cache.IndexedDataset(new, key={SAMPLE_ID!r}) (at "
               "most as many items as the first, the cache's num_samples). " if swapped else
               f"Your data_collator dropped it (one that builds the batch from the keys it knows, or "
               f"DataCollatorWithFlattening; a string {SAMPLE_ID!r} is dropped by the default collator): pass "
               f"the integer {SAMPLE_ID!r} of each item through, as a tensor of the batch. ")
            + "Where the ids cannot be passed, train without activation_cache.", stacklevel=3)

    def _cached(self, model: nn.Module) -> CachedModel:
        """The cache's module over the model the Trainer trains (its DDP wrapper, if any)."""
        if self._cached_model is None or self._cached_model.model is not model:
            self._cached_model = self.cache.wrap(model)
        return self._cached_model

    # ------------------------------------------------------------------ set-up
    def _example(self, trainer, model: nn.Module) -> Any:
        if self.example_inputs is not None:
            return self.example_inputs
        dataset = trainer.train_dataset
        if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset):
            columns = _model_columns(trainer)
            try:
                # a dataset that augments in __getitem__, a collator that masks tokens: they draw
                # from the user's generators, whose draws are the run's own
                with preserved_rngs(model, holders=(dataset, trainer.data_collator)):
                    items = [dataset[i] for i in range(min(2, len(dataset)))]
                    if columns is not None:  # as the Trainer drops them (remove_unused_columns): an 'idx' column
                        items = [{k: v for k, v in item.items() if k in columns} if isinstance(item, Mapping)
                                 else item for item in items]
                    batch = trainer.data_collator(items)
            except Exception:  # e.g. raw text columns the Trainer would drop: try dummy_inputs
                pass
            else:
                if isinstance(batch, MutableMapping):
                    batch.pop(SAMPLE_ID, None)  # the activation cache's, not the model's
                    # the labels of a model whose forward takes none (a compute_loss of the user's
                    # pops them): the Trainer keeps them for the loss, the forward refuses them
                    taken = _forward_parameters(model)
                    for key in [k for k in batch if taken is not None and k not in taken]:
                        batch.pop(key)
                return batch
        dummy = getattr(model, "dummy_inputs", None)
        if dummy:
            return dict(dummy)
        raise ValueError(
            "SmartFreezeCallback needs one batch of model inputs to find the model's layers before the "
            "first step: pass example_inputs=... (a dict of keyword inputs, or a tuple of positional ones).")

    def _on_optimizer_ready(self, trainer, num_training_steps: int) -> None:
        optimizer = trainer.optimizer
        if optimizer is None:
            raise RuntimeError(
                "SmartFreezeCallback: the Trainer asked for its lr scheduler before creating its optimizer; "
                "a Trainer subclass that overrides create_optimizer_and_scheduler must create the optimizer first.")
        # accelerate's AcceleratedOptimizer wraps the Trainer's: the freezer follows the inner one
        if self.freezer is not None and self.freezer.optimizers[0] is _unwrapped(optimizer)[-1]:
            self._note_another_train(num_training_steps)  # a second train(): the freezer carries on
            return
        model = trainer.model
        if self.freezer is not None and getattr(trainer, "model_init", None) is not None \
                and self.freezer.model is not model:
            if getattr(self.policy, "holds_model", False):
                raise ValueError(
                    f"SmartFreezeCallback: {type(self.policy).__name__} measures the model it was built on, and the "
                    "Trainer's model_init built a new model for this train() (hyperparameter_search): use another "
                    "policy there, or attach a new callback with a policy built on each new model.")
            self.freezer.close()  # the last run's model, which model_init replaced
            self.freezer, self.cache, self._cached_model, self._stepped_at = None, None, None, None
            self.policy = copy.deepcopy(self._policy_template)
        device = next(model.parameters()).device
        args, kwargs = split_example_inputs(move_to_device(self._example(trainer, model), device))
        total = self.total_steps
        if total is None and num_training_steps and num_training_steps > 0:
            total = int(num_training_steps)
        self.freezer = SmartFreezer(model, optimizer, self.policy, example_inputs=args, example_kwargs=kwargs,
                                    total_steps=total, **self.freezer_kwargs)
        if self.cache_kwargs is not None:
            self.cache = ActivationCache(self.freezer, **{"num_samples": len(trainer.train_dataset),
                                                          **self.cache_kwargs})
        if self._resume_from is not None:
            self._load(self._resume_from, device, trainer.args.process_index)

    def _note_another_train(self, num_training_steps: int) -> None:
        """A train() after another goes on with the same freezer, paced for the first run's
        ``total_steps`` (taken from that Trainer's steps): say so in the callback's terms, once,
        where this run takes it past that (the engine's warning told to pass total_steps, which
        the user never passed, review80)."""
        freezer = self.freezer
        total = freezer.total_steps
        if (self.total_steps is not None or total is None or not freezer.policy.uses_total_steps
                or freezer._warned_past_total or not num_training_steps
                or freezer.step_count + num_training_steps <= total):
            return
        freezer._warned_past_total = True  # instead of the engine's, at the first step past it
        warnings.warn(
            f"SmartFreezeCallback: this train() goes on with the freezer of the one before, whose policy "
            f"{type(freezer.policy).__name__} was built for that run's {total} optimizer steps; this one adds "
            f"{num_training_steps} to the {freezer.step_count} taken, so from step {total + 1} on "
            f"{freezer.past_total_steps_effect()}. To pace it for every train() call, pass "
            "SmartFreezeCallback(..., total_steps=<optimizer steps of all of them>).", stacklevel=2)

    def _load(self, checkpoint: str, device: torch.device, rank: int) -> None:
        path = os.path.join(checkpoint, CHECKPOINT_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {CHECKPOINT_FILE}: it was not saved with SmartFreezeCallback attached (or "
                "the run stopped between the Trainer's save and the callback's). Resume from a checkpoint "
                "written with the callback, or train without it.")
        state = torch.load(path, map_location=device, weights_only=True)
        load_freezer_state(self.freezer, state)
        cache_files = glob.glob(os.path.join(checkpoint, CACHE_CHECKPOINT_FILE.format(rank="*")))
        if not cache_files:
            return  # saved without a cache: a cache starts empty (rows fill as samples come back)
        if self.cache is None:
            raise ValueError(
                f"{checkpoint} holds an activation cache's state ({os.path.basename(cache_files[0])}), but this "
                "SmartFreezeCallback has no activation_cache={...}: pass the same cache arguments as the "
                "interrupted run, or delete the smartfrz_cache.*.pt files to resume without the cache.")
        path = os.path.join(checkpoint, CACHE_CHECKPOINT_FILE.format(rank=rank))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint} has activation cache states for other processes but none for process {rank}: "
                "resume with as many processes as the interrupted run, or delete the smartfrz_cache.*.pt "
                "files (the caches then refill as samples come back).")
        # after the freezer's, as the cache requires; its rows are taken back at the first forward
        self.cache.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        if self._trainer is None:
            raise RuntimeError(
                "SmartFreezeCallback must be attached with callback.attach(trainer) (passing it in "
                "callbacks=[...] is not enough, and is not needed): it has to hook in before the Trainer loads "
                "the optimizer state.")
        if self.freezer is None:
            raise RuntimeError(
                "SmartFreezeCallback is attached but the Trainer never called create_scheduler(), where the "
                "callback builds its freezer: a Trainer subclass that overrides create_optimizer_and_scheduler "
                "must still call self.create_scheduler(num_training_steps).")
        check_checkpointing(self._trainer.model)  # enabled by the Trainer by now (4.x and 5.x alike)
        release_marked_inputs(self._trainer.model)
        self._stepped_at = None  # a train() after another may count its steps from 0 again

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self._stepped_at:  # the callback registered twice: one step per step
            return
        self._stepped_at = state.global_step
        self.freezer.step()

    def on_save(self, args, state, control, **kwargs):
        """Written before the Trainer's save where the Trainer has ``_save_checkpoint`` (attach
        wraps it); here otherwise."""
        if self._written_at != state.global_step:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self._write(args, state, folder, saved_by_trainer=True)

    def _write(self, args, state, folder: str, saved_by_trainer: bool = False) -> None:
        if self.freezer is None or not (args.should_save or self.cache is not None):
            return
        if saved_by_trainer and not os.path.isdir(folder):
            raise FileNotFoundError(f"SmartFreezeCallback: the Trainer's checkpoint folder {folder} is missing")
        os.makedirs(folder, exist_ok=True)
        if args.should_save:  # the freezer's state is the same on every process
            torch.save(self.freezer.state_dict(), os.path.join(folder, CHECKPOINT_FILE))
        if self.cache is not None:  # every process: its own rows and counters
            torch.save(self.cache.state_dict(),
                       os.path.join(folder, CACHE_CHECKPOINT_FILE.format(rank=args.process_index)))
        self._written_at = state.global_step


class _CachedCall(nn.Module):
    """What ``Trainer.compute_loss`` calls as ``model(**inputs)``: the cached forward with this
    batch's sample ids. With mixed precision, accelerate runs the model's forward under its
    autocast and converts the outputs to fp32; the cached blocks are called directly, so this
    does the same around them. ``_get_name`` is the model's (the Trainer's label smoother reads it)."""

    def __init__(self, cached: CachedModel, sample_ids: Any, accelerator: Any) -> None:
        super().__init__()
        self.cached = cached
        self.sample_ids = sample_ids
        self.accelerator = accelerator

    def forward(self, **inputs: Any) -> Any:
        if not self.accelerator.native_amp:
            return self.cached((), self.sample_ids, **inputs)
        from accelerate.utils import convert_to_fp32

        with self.accelerator.autocast():
            return convert_to_fp32(self.cached((), self.sample_ids, **inputs))

    def _get_name(self) -> str:
        return self.accelerator.unwrap_model(self.cached.model)._get_name()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("cached", "accelerator"):  # not set yet
                raise
            # a custom compute_loss reads the model's own attributes (model.config, model.device)
            return getattr(self.accelerator.unwrap_model(self.cached.model), name)
