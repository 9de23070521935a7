"""smartfrz_fast: progressive layer freezing (SmartFRZ and baselines) for PyTorch training.

Importing the package is light: it imports torch, but neither Triton nor the compiled
extension, and it does not initialise CUDA. Ops and kernels load on first use.
"""

__version__ = "0.1.0"

from .engine import FreezeEvent, SmartFreezer
from .sieve import DistributedSievingSampler, SievingSampler
from .sparse import SparseMasks
from .policy import (
    AutoFreeze,
    Egeria,
    FreezeOut,
    FreezePolicy,
    LinearFreeze,
    SmartFRZ,
    StaticFreeze,
)

__all__ = [
    "SmartFreezer",
    "FreezeEvent",
    "FreezePolicy",
    "SmartFRZ",
    "FreezeOut",
    "AutoFreeze",
    "Egeria",
    "SparseMasks",
    "SievingSampler",
    "DistributedSievingSampler",
    "LinearFreeze",
    "StaticFreeze",
    "__version__",
]
