"""Run by test_integration_lightning.py: a two-process DDP fit (gloo, CPU) with
SmartFreezeCallback running ``RankSkewed`` (a policy that proposes a different frozen prefix on
each rank: every rank must apply rank 0's); each rank saves its weights, freeze timeline and
proposals. With "cache", training_step goes through the callback's activation cache (each
rank caches the rows of the samples it sees) and each rank also saves its cache's counters.

usage: lightning_ddp_worker.py OUT_DIR [cache]
"""

import os
import sys
from pathlib import Path

import lightning.pytorch as L
import torch

from ddp_worker import RankSkewed, leave_group_and_exit
from models import batch
from test_integration_lightning import LitCachedCNN, LitCNN  # the tests' modules: one definition

from smartfrz_fast.cache import IndexedDataset
from smartfrz_fast.integrations.lightning import SmartFreezeCallback


def main(out: Path, cache: bool) -> None:
    xs, ys = zip(*(batch(i) for i in range(4)))
    data = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    loader = torch.utils.data.DataLoader(IndexedDataset(data) if cache else data, batch_size=8, shuffle=False)
    # Lightning's launcher starts rank 1 as a copy of this script (same arguments) with LOCAL_RANK set.
    policy = RankSkewed(int(os.environ.get("LOCAL_RANK", 0)))
    if cache:
        callback = SmartFreezeCallback(policy, submodule="net", example_inputs=batch(0)[0],
                                       activation_cache=dict(num_samples=len(data), deterministic=True))
        module = LitCachedCNN(callback)
    else:
        module, callback = LitCNN(), SmartFreezeCallback(policy)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_epochs=3,
                        callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out)
    trainer.fit(module, loader)
    torch.save({"model": module.state_dict(), "num_frozen": callback.freezer.num_frozen,
                "timeline": [(e.step, e.num_frozen) for e in callback.freezer.timeline],
                "proposals": policy.proposals, "rank": policy.rank,
                "cache": None if callback.cache is None else dict(callback.cache.stats, boundary=callback.cache.boundary)},
               out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] == ["cache"])
    leave_group_and_exit()
