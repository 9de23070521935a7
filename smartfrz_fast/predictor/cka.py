"""Moved to ``smartfrz_fast.lab.cka`` (the offline lab lives apart from the runtime predictor);
this name keeps old imports working."""

from ..lab.cka import *  # noqa: F401,F403
