"""Run by test_integration_lightning.py: a two-process DDP fit (gloo, CPU) with
SmartFreezeCallback running ``RankSkewed`` (a policy that proposes a different frozen prefix on
each rank: every rank must apply rank 0's); each rank saves its weights, freeze timeline and
proposals. With "cache", training_step goes through the callback's activation cache (each
rank caches the rows of the samples it sees) and each rank also saves its cache's counters.

With "mlp" (and "cache mlp"): an MLP whose first two units hold BatchNorms, trained under
LinearFreeze(0.1), so that the prefix deepens through norms while rows are cached.

usage: lightning_ddp_worker.py OUT_DIR [cache] [mlp]
"""

import os
import sys
from pathlib import Path

import lightning.pytorch as L
import torch

from ddp_worker import RankSkewed, leave_group_and_exit
from models import batch
from test_integration_lightning import LitCachedCNN, LitCNN  # the tests' modules: one definition

from smartfrz_fast import LinearFreeze
from smartfrz_fast.cache import IndexedDataset
from smartfrz_fast.integrations.lightning import SmartFreezeCallback


class LitMLP(LitCNN):
    def __init__(self, callback=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
            torch.nn.Linear(32, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
            torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        self.example_input_array = torch.zeros(2, 16)
        self.freezing = callback

    def training_step(self, data, batch_idx):
        x, y, *ids = data
        out = self.freezing.cached(x, ids[0]) if self.freezing is not None else self(x)
        return torch.nn.functional.cross_entropy(out, y)


def main(out: Path, cache: bool, mlp: bool) -> None:
    if mlp:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, 16, generator=g)
        data = torch.utils.data.TensorDataset(x, (x @ torch.randn(16, 4, generator=g)).argmax(1))
    else:
        xs, ys = zip(*(batch(i) for i in range(4)))
        data = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    loader = torch.utils.data.DataLoader(IndexedDataset(data) if cache else data, batch_size=8, shuffle=False)
    # Lightning's launcher starts rank 1 as a copy of this script (same arguments) with LOCAL_RANK set.
    policy = LinearFreeze(0.1) if mlp else RankSkewed(int(os.environ.get("LOCAL_RANK", 0)))
    if mlp:
        callback = SmartFreezeCallback(policy, submodule="net" if cache else None, example_inputs=torch.zeros(2, 16),
                                       activation_cache=dict(num_samples=len(data), deterministic=True) if cache
                                       else None)
        module = LitMLP(callback if cache else None)
    elif cache:
        callback = SmartFreezeCallback(policy, submodule="net", example_inputs=batch(0)[0],
                                       activation_cache=dict(num_samples=len(data), deterministic=True))
        module = LitCachedCNN(callback)
    else:
        module, callback = LitCNN(), SmartFreezeCallback(policy)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_epochs=4 if mlp else 3,
                        callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out)
    trainer.fit(module, loader)
    torch.save({"model": module.state_dict(), "num_frozen": callback.freezer.num_frozen,
                "timeline": [(e.step, e.num_frozen) for e in callback.freezer.timeline],
                "proposals": getattr(policy, "proposals", None), "rank": trainer.global_rank,
                "cache": None if callback.cache is None else dict(callback.cache.stats, boundary=callback.cache.boundary)},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), "cache" in sys.argv[2:], "mlp" in sys.argv[2:])
    leave_group_and_exit()
