"""Moved to ``smartfrz_fast.lab.train`` (the offline lab lives apart from the runtime predictor);
this name keeps old imports and ``python -m smartfrz_fast.predictor.train`` working."""

import sys

from ..lab.train import *  # noqa: F401,F403
from ..lab import train as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
