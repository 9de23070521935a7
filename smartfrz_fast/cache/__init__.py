"""Frozen-prefix activation cache: skip the forward pass through frozen blocks.

See ``docs/activation_cache.md``. ``ActivationCache(freezer, num_samples=..., deterministic=True)``
follows the freezer's frozen prefix; ``cache.wrap()`` gives a module whose forward takes
``(inputs, sample_ids)``; ``IndexedDataset`` adds the sample ids to a dataset's items.
"""

from .core import ActivationCache, CachedModel, IndexedDataset
from .split import Block, BlockChain, Inputs, find_blocks, fx_chain
from .storage import STORAGE_DTYPES, TIERS

__all__ = ["ActivationCache", "CachedModel", "IndexedDataset", "Block", "BlockChain", "Inputs",
           "find_blocks", "fx_chain", "STORAGE_DTYPES", "TIERS"]
