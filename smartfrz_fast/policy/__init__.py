"""Freezing policies: each decides the frozen-prefix length; the engine does the freezing."""

from .autofreeze import AutoFreeze
from .egeria import Egeria
from .base import Decision, FreezePolicy, PolicyContext, UnitInfo
from .freezeout import FreezeOut
from .linear import LinearFreeze
from .smartfrz import SmartFRZ
from .static import StaticFreeze

__all__ = [
    "AutoFreeze",
    "Decision",
    "Egeria",
    "FreezeOut",
    "FreezePolicy",
    "LinearFreeze",
    "PolicyContext",
    "SmartFRZ",
    "StaticFreeze",
    "UnitInfo",
]
