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

import difflib
import inspect
from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

import torch

from ..units import as_args

__all__ = ["split_example_inputs", "move_to_device", "check_callback_args", "load_freezer_state"]


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
    # a misspelt setting failed only inside fit(), after the trainer's set-up (review105)
    from ..engine import SmartFreezer

    own = ("policy", "example_inputs", "total_steps", "activation_cache", "submodule")  # the callbacks' own
    known = [name for name, p in inspect.signature(SmartFreezer.__init__).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in (*own, "example_kwargs")]
    for key in freezer_kwargs:
        if key == "submodule":  # (Lightning's callback takes it; this one does not: review108)
            raise TypeError("SmartFreezeCallback: the Hugging Face callback takes no submodule=: it freezes the "
                            "model the Trainer trains; to freeze part of it, keep the rest trainable with "
                            "keep_trainable= (a count of trailing units) or set requires_grad=False yourself")
        if key not in known:
            near = difflib.get_close_matches(key, [*known, *own], n=1)
            raise TypeError(f"SmartFreezeCallback: {key!r} is not an argument of the callback nor a setting of "
                            "SmartFreezer" + (f" (did you mean {near[0]!r}?)" if near else "")
                            + f"; SmartFreezer's settings: {', '.join(known)}")


def split_example_inputs(example: Any) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """``example_inputs`` as (positional, keyword) inputs: a mapping is keyword inputs (what a
    Hugging Face model takes; its collators return a ``BatchEncoding``, a mapping that is no
    dict), otherwise ``units.as_args``'s rule: a tuple is the positional inputs, anything else (a
    NamedTuple too) one positional input."""
    if isinstance(example, Mapping):
        return (), dict(example)
    return as_args(example), {}


def move_to_device(obj: Any, device: torch.device, float_dtype: Optional[torch.dtype] = None) -> Any:
    """Tensors inside nested tuples / lists / mappings moved to ``device`` (other leaves kept),
    floating-point ones cast to ``float_dtype`` if given (a model trained in bf16 throughout)."""
    if isinstance(obj, torch.Tensor):
        if float_dtype is not None and obj.is_floating_point():
            return obj.to(device, float_dtype)
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device, float_dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        moved = [move_to_device(v, device, float_dtype) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)  # a namedtuple takes fields
    return obj


def load_freezer_state(freezer: Any, state: Dict[str, Any]) -> None:
    """``freezer.load_state_dict(state)``; a checkpoint made with other settings is refused
    naming the callback arguments that resume it (the callbacks build the freezer)."""
    from ..engine import SettingsMismatch

    try:
        freezer.load_state_dict(state)
    except SettingsMismatch as exc:
        saved = dict(exc.saved)
        policy = f"{saved.pop('policy')}(...)" if "policy" in saved else "policy"
        arguments = "".join(f", {k}={v!r}" for k, v in saved.items())
        raise ValueError(f"SmartFreezeCallback: {exc} The callback passes its policy and keyword arguments to the "
                         f"freezer: build it as SmartFreezeCallback({policy}{arguments}, ...).") from exc
