"""Hugging Face Trainer integration: ``SmartFreezeCallback`` (a ``TrainerCallback``).

::

    from transformers import Trainer
    from smartfrz_fast import FreezeOut
    from smartfrz_fast.integrations.huggingface import SmartFreezeCallback

    trainer = Trainer(model=model, args=args, train_dataset=train)
    SmartFreezeCallback(FreezeOut(t0=0.5)).attach(trainer)
    trainer.train()                                   # or train(resume_from_checkpoint=True)

Why ``attach(trainer)`` and not only ``callbacks=[...]``: the Trainer creates its optimizer
lazily inside ``train()`` and, on a resume, loads the optimizer state right after creating it,
with no callback event in between (``on_train_begin`` comes later). The freezer must exist and
have re-frozen the saved units *before* that load, since freezing removes parameters from the
optimizer's groups and the saved state expects them gone. ``attach`` adds the callback and wraps
two public methods of that one Trainer instance:

- ``train``: remembers ``resume_from_checkpoint`` (``True`` resolves to the last checkpoint);
- ``create_optimizer``: right after the optimizer is built, builds the ``SmartFreezer`` over
  it and, when resuming, loads ``<checkpoint>/smartfrz_freezer.pt`` -- before the Trainer
  builds its lr scheduler and before it loads the optimizer state.

Events: ``on_step_end`` (after ``optimizer.step()`` and the scheduler step, once per optimizer
step whatever the gradient accumulation) calls ``freezer.step()``; ``on_save`` (after the
Trainer wrote ``checkpoint-<step>``) writes the freezer state into that folder.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Optional

import torch
from torch import nn

try:
    import transformers
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "smartfrz_fast.integrations.huggingface needs transformers (and accelerate): "
        "pip install 'smartfrz_fast[hf]'"
    ) from exc

from ..distributed import check_ddp_settings
from ..engine import SmartFreezer
from ..policy.base import FreezePolicy
from . import check_callback_args, check_lr_scheduler, move_to_device, split_example_inputs

CHECKPOINT_FILE = "smartfrz_freezer.pt"
PREFIX_CHECKPOINT_DIR = "checkpoint"


def check_training_args(args: "transformers.TrainingArguments", model: nn.Module) -> None:
    """Refuse Trainer settings that conflict with freezing mid-run (clear errors)."""
    gc_on = bool(getattr(args, "gradient_checkpointing", False) or getattr(args, "activation_checkpointing", False))
    gc_kwargs = getattr(args, "gradient_checkpointing_kwargs", None) or getattr(
        args, "activation_checkpointing_kwargs", None) or {}
    if gc_on and isinstance(gc_kwargs, dict) and gc_kwargs.get("use_reentrant"):
        raise ValueError(
            "Reentrant gradient checkpointing (use_reentrant=True) trains nothing inside a checkpointed "
            "block whose input needs no grad, which is what the output of a frozen prefix is: use "
            "gradient_checkpointing_kwargs={'use_reentrant': False} (the Transformers default).")
    if args.world_size > 1 and args.parallel_mode.value == "distributed":
        find_unused = args.ddp_find_unused_parameters
        if find_unused is None:  # the Trainer's own default (Trainer._build_accelerator_args)
            find_unused = not (gc_on or getattr(model, "is_gradient_checkpointing", False))
        check_ddp_settings(
            bool(args.ddp_static_graph), bool(find_unused),
            fix_static="Drop ddp_static_graph when training with SmartFreezeCallback.",
            fix_unused="Freezing mid-run needs find_unused_parameters=True: set "
            "TrainingArguments(ddp_find_unused_parameters=True).")


class SmartFreezeCallback(TrainerCallback):
    """Progressive layer freezing inside ``transformers.Trainer``; call ``attach(trainer)``.

    Args:
        policy: a ``FreezePolicy`` (default: SmartFRZ, which needs predictor weights).
        example_inputs: inputs for one forward pass that finds the model's units: a dict of
            keyword inputs (as a Transformers model takes), a tuple of positional inputs or a
            tensor. Default: the first two training samples put through the Trainer's data
            collator, else the model's ``dummy_inputs``.
        total_steps: optimizer steps in the run; default the Trainer's ``max_steps``.
        **freezer_kwargs: passed to ``SmartFreezer`` (``sample_every``, ``window``,
            ``sample_size``, ``keep_trainable``, ``decision_delay``, ``seed``).

    During and after ``train()``, ``callback.freezer`` is the ``SmartFreezer``.
    """

    def __init__(self, policy: Optional[FreezePolicy] = None, *, example_inputs: Any = None,
                 total_steps: Optional[int] = None, **freezer_kwargs: Any) -> None:
        check_callback_args(policy, freezer_kwargs)
        self.policy = policy
        self.example_inputs = example_inputs
        self.total_steps = total_steps
        self.freezer_kwargs = freezer_kwargs
        self.freezer: Optional[SmartFreezer] = None
        self._trainer = None
        self._resume_from: Optional[str] = None

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
        self._trainer = trainer
        trainer.add_callback(self)

        original_train = trainer.train
        original_create_optimizer = trainer.create_optimizer

        @functools.wraps(original_train)
        def train(resume_from_checkpoint=None, *args, **kwargs):
            resume = resume_from_checkpoint
            if isinstance(resume, bool):
                resume = get_last_checkpoint(trainer.args.output_dir) if resume else None
                # (None here: the Trainer itself raises its "no valid checkpoint" error)
            self._resume_from = None if resume is None else str(resume)
            return original_train(resume_from_checkpoint, *args, **kwargs)

        @functools.wraps(original_create_optimizer)
        def create_optimizer(*args, **kwargs):
            optimizer = original_create_optimizer(*args, **kwargs)
            self._on_optimizer_created(trainer)
            return optimizer

        trainer.train = train
        trainer.create_optimizer = create_optimizer
        return self

    # ------------------------------------------------------------------ set-up
    def _example(self, trainer, model: nn.Module) -> Any:
        if self.example_inputs is not None:
            return self.example_inputs
        dataset = trainer.train_dataset
        if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset):
            try:
                return trainer.data_collator([dataset[i] for i in range(min(2, len(dataset)))])
            except Exception:  # e.g. raw text columns the Trainer would drop: try dummy_inputs
                pass
        dummy = getattr(model, "dummy_inputs", None)
        if dummy:
            return dict(dummy)
        raise ValueError(
            "SmartFreezeCallback needs one batch of model inputs to find the model's layers before the "
            "first step: pass example_inputs=... (a dict of keyword inputs, or a tuple of positional ones).")

    def _on_optimizer_created(self, trainer) -> None:
        optimizer = trainer.optimizer
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        if self.freezer is not None and self.freezer.optimizers[0] is optimizer:
            return  # create_optimizer called again on the same optimizer (a second train())
        model = trainer.model
        device = next(model.parameters()).device
        args, kwargs = split_example_inputs(move_to_device(self._example(trainer, model), device))
        total = self.total_steps
        if total is None and trainer.state.max_steps and trainer.state.max_steps > 0:
            total = int(trainer.state.max_steps)
        self.freezer = SmartFreezer(model, optimizer, self.policy, example_inputs=args, example_kwargs=kwargs,
                                    total_steps=total, **self.freezer_kwargs)
        if self.freezer.policy.manages_lr:
            check_lr_scheduler(
                self.freezer.policy, trainer.lr_scheduler is not None,
                "the lr scheduler passed to the Trainer (built on the old groups)",
                "Pass optimizers=(optimizer, None) and let the Trainer build its scheduler.")
            warnings.warn(
                f"{type(self.freezer.policy).__name__} sets every unit's learning rate itself after each "
                "step, overriding the Trainer's lr scheduler (the logged learning_rate is the scheduler's, "
                "not the one used).", stacklevel=2)
        if self._resume_from is not None:
            self._load(self._resume_from, device)

    def _load(self, checkpoint: str, device: torch.device) -> None:
        path = os.path.join(checkpoint, CHECKPOINT_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {CHECKPOINT_FILE}: it was not saved with SmartFreezeCallback attached (or "
                "the run stopped between the Trainer's save and the callback's). Resume from a checkpoint "
                "written with the callback, or train without it.")
        state = torch.load(path, map_location=device, weights_only=True)
        self.freezer.load_state_dict(state)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        if self._trainer is None or self.freezer is None:
            raise RuntimeError(
                "SmartFreezeCallback must be attached with callback.attach(trainer) (not only passed in "
                "callbacks=[...]): it has to hook in before the Trainer loads the optimizer state.")

    def on_step_end(self, args, state, control, **kwargs):
        self.freezer.step()

    def on_save(self, args, state, control, **kwargs):
        if self.freezer is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir,
                              f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"SmartFreezeCallback: the Trainer's checkpoint folder {folder} is missing")
        torch.save(self.freezer.state_dict(), os.path.join(folder, CHECKPOINT_FILE))
