"""Loading the compiled extension ``smartfrz_fast._C`` once, on first use.

The extension is optional: when it is missing or fails to load, every op falls back to its
pure-PyTorch reference and ``python -m smartfrz_fast.info`` says why.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass, field
from typing import Dict, Optional


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at each call)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


BACKEND_CHOICES = ("auto", "reference")


def reference_only() -> bool:
    """``SMARTFRZ_BACKEND=reference``: every op runs the PyTorch reference (no C++ extension,
    no Triton); ``auto`` (or unset): the fastest available. Anything else is a mistake worth
    saying (a misspelt value ran the default backends silently)."""
    choice = os.environ.get("SMARTFRZ_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"SMARTFRZ_BACKEND={os.environ['SMARTFRZ_BACKEND']!r}: choose one of {BACKEND_CHOICES} "
                         "(reference: the PyTorch reference ops only; auto: the fastest available)")
    return choice == "reference"


@dataclass(frozen=True)
class ExtensionStatus:
    module: Optional[object]
    reason: str  # why it is not loaded, or "" when it is
    build_info: Dict[str, object] = field(default_factory=dict)

    @property
    def loaded(self) -> bool:
        return self.module is not None

    @property
    def has_cuda(self) -> bool:
        return bool(self.build_info.get("cuda", False))


@functools.lru_cache(maxsize=None)
def extension_status() -> ExtensionStatus:
    if reference_only():
        return ExtensionStatus(None, "disabled by SMARTFRZ_BACKEND=reference")
    import torch  # noqa: F401  (the extension links against libtorch: load it first)

    try:
        module = importlib.import_module("smartfrz_fast._C")
    except ImportError as exc:
        return ExtensionStatus(
            None,
            f"smartfrz_fast._C is not available ({exc}); the pure-PyTorch reference runs instead. "
            "Rebuild with `pip install --no-build-isolation -e .` and read the build log.",
        )
    info = dict(module.build_info())
    if info.get("torch_version") != torch.__version__:
        return ExtensionStatus(
            None,
            f"smartfrz_fast._C was built against torch {info.get('torch_version')} but torch "
            f"{torch.__version__} is installed; rebuild with `pip install --no-build-isolation -e .`.",
            info,
        )
    return ExtensionStatus(module, "", info)
