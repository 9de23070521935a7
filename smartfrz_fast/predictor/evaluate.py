"""Moved to ``smartfrz_fast.lab.evaluate`` (the offline lab lives apart from the runtime predictor);
this name keeps old imports and ``python -m smartfrz_fast.predictor.evaluate`` working."""

import sys

from ..lab.evaluate import *  # noqa: F401,F403
from ..lab import evaluate as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
