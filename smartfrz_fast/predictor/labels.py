"""Moved to ``smartfrz_fast.lab.labels`` (the offline lab lives apart from the runtime predictor);
this name keeps old imports working."""

from ..lab.labels import *  # noqa: F401,F403
