"""Trainer integrations: freezing inside PyTorch Lightning and the Hugging Face Trainer.

Each lives in its own module, which imports its trainer stack; this package imports nothing
heavy, so ``import smartfrz_fast`` stays light::

    from smartfrz_fast.integrations.lightning import SmartFreezeCallback     # pip install lightning
    from smartfrz_fast.integrations.huggingface import SmartFreezeCallback   # pip install transformers accelerate

Both callbacks call ``SmartFreezer.step()`` after every optimizer step, save the freezer's
state with the trainer's own checkpoints, and on resume restore it *before* the trainer
restores the optimizer state (freezing removes parameters from the optimizer's groups, and the
saved optimizer state expects them gone).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from ..units import as_args

__all__ = ["split_example_inputs", "move_to_device", "check_callback_args"]


def check_callback_args(policy: Any, freezer_kwargs: Dict[str, Any], activation_cache: Any = None) -> None:
    """The constructor checks both trainers' ``SmartFreezeCallback`` share."""
    from ..policy.base import FreezePolicy

    if policy is not None and not isinstance(policy, FreezePolicy):
        raise TypeError(f"policy must be a FreezePolicy, got {type(policy).__name__}")
    if activation_cache is not None and not isinstance(activation_cache, dict):
        raise TypeError("SmartFreezeCallback: activation_cache= takes a dict of ActivationCache "
                        f"arguments (deterministic=True, ...), got {type(activation_cache).__name__}")
    for key in ("example_kwargs", "model", "optimizer"):
        if key in freezer_kwargs:
            raise TypeError(f"SmartFreezeCallback sets {key!r} itself; do not pass it")


def split_example_inputs(example: Any) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """``example_inputs`` as (positional, keyword) inputs: a dict is keyword inputs (what a
    Hugging Face model takes), otherwise ``units.as_args``'s rule: a tuple is the positional
    inputs, anything else one positional input."""
    if isinstance(example, dict):
        return (), dict(example)
    return as_args(example), {}


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Tensors inside nested tuples / lists / dicts moved to ``device`` (other leaves kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj
