"""When a Triton kernel cannot compile or launch on a device, its op falls back, once and for good.

A kernel that runs on one GPU can fail on another: too little shared memory per block (99 KiB
on sm_86/sm_89/sm_120, 227 KiB on sm_90), an architecture the installed Triton, ptxas or driver
does not support, a Triton bug. Training must not stop for that. ``triton_kernels`` turns any
failure to compile or launch into ``KernelUnavailable`` (raised before the kernel wrote
anything); the registry then runs the op's next backend on that device from then on (sticky:
no retry, no compile, on later steps) and warns once, naming the kernel, the device and why.
``python -m smartfrz_fast.info --check`` shows it. Importing this module does not import Triton.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor


class KernelUnavailable(RuntimeError):
    """Triton kernel ``kernel`` could not compile or launch on ``device`` (nothing was written)."""

    def __init__(self, kernel: str, device: torch.device, cause: BaseException):
        self.kernel, self.device, self.cause = kernel, device, cause
        reason = f"{type(cause).__name__}: {cause}".strip().replace("\n", " ")
        self.reason = reason if len(reason) <= 500 else reason[:500] + " ..."
        super().__init__(f"Triton kernel {kernel} cannot run on {describe_device(device)}: {self.reason}")


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA A10G, sm_86)``; just the device where CUDA cannot say more."""
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            major, minor = torch.cuda.get_device_capability(device)
            return f"{device} ({torch.cuda.get_device_name(device)}, sm_{major}{minor})"
        except Exception:  # a description must never raise in the failure path
            pass
    return str(device)


# (op name, device) -> (backend that runs instead, the KernelUnavailable message). Sticky for
# the process: a failed kernel is never compiled or launched again on that device.
_FALLBACKS: Dict[Tuple[str, torch.device], Tuple[str, str]] = {}


def run_guarded(op_name: str, where: Tensor, kernel: Callable, fallback: Callable, fallback_name: str,
                args: Sequence) -> object:
    """``kernel(*args)``, or ``fallback(*args)`` where the kernel cannot run on ``where``'s device.

    The hot path (nothing ever failed) costs one truthiness test and a try block: no device
    lookup, no host synchronisation.
    """
    if _FALLBACKS and (op_name, where.device) in _FALLBACKS:
        return fallback(*args)
    try:
        return kernel(*args)
    except KernelUnavailable as exc:
        _FALLBACKS[(op_name, where.device)] = (fallback_name, str(exc))
        warnings.warn(f"smartfrz_fast: {exc}. smartfrz::{op_name} runs {fallback_name} on {where.device} from "
                      "now on; training continues. `python -m smartfrz_fast.info --check` tests every op on "
                      "this GPU.", RuntimeWarning, stacklevel=3)
        return fallback(*args)


def fallbacks() -> Dict[Tuple[str, str], Tuple[str, str]]:
    """``{(op, device): (backend now running, why)}`` for the fallbacks taken in this process."""
    return {(op, str(device)): value for (op, device), value in _FALLBACKS.items()}
