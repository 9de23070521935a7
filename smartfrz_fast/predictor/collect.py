"""Moved to ``smartfrz_fast.lab.collect`` (the offline lab lives apart from the runtime predictor);
this name keeps old imports and ``python -m smartfrz_fast.predictor.collect`` working."""

import sys

from ..lab.collect import *  # noqa: F401,F403
from ..lab import collect as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
