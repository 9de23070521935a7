"""Moved to ``smartfrz_fast.lab.zoo`` (the offline lab lives apart from the runtime predictor);
this name keeps old imports working."""

from ..lab.zoo import *  # noqa: F401,F403
