"""Run by test_integration_hf.py under ``torch.distributed.run`` (two processes, gloo, CPU): a
Hugging Face Trainer with SmartFreezeCallback under DDP. Each rank runs ``RankSkewed`` (a policy
that proposes a different frozen prefix on each rank); every rank must apply rank 0's.

usage: python -m torch.distributed.run --nproc_per_node 2 hf_ddp_worker.py OUT_DIR [RESUME] [--static] [--cache]
Saves OUT_DIR/rank<r>.pt: weights, freeze timeline, proposals. --static: StaticFreeze(3, at_step=1)
instead (the embeddings freeze early); --cache: with the activation cache (its counters saved too).
"""

import os
import sys
from pathlib import Path

import torch
from ddp_worker import RankSkewed, leave_group_and_exit
from test_integration_hf import dataset, tiny_bert, training_args
from transformers import Trainer

from smartfrz_fast import StaticFreeze
from smartfrz_fast.integrations.huggingface import SmartFreezeCallback


def main(out: Path, resume: str = "", static: bool = False, cache: bool = False) -> None:
    # Under torchrun accelerate names the CPU "cpu:0"; transformers 4.x passes that to torch.load
    # when it loads the optimizer state on resume, and torch cannot restore "cpu:0" (the Trainer
    # fails so without the callback too; 5.x maps it to "cpu"). A plain "cpu" device avoids it.
    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    model = tiny_bert()
    args = training_args(out, ddp_backend="gloo", ddp_find_unused_parameters=True, per_device_train_batch_size=4,
                         save_steps=6)
    trainer = Trainer(model=model, args=args, train_dataset=dataset())
    rank = args.process_index
    policy = StaticFreeze(3, at_step=1) if static else RankSkewed(rank)
    callback = SmartFreezeCallback(policy, activation_cache={"deterministic": True} if cache else None).attach(trainer)
    trainer.train(resume_from_checkpoint=resume or None)
    freezer = callback.freezer
    torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "events": [(e.step, e.num_frozen) for e in freezer.timeline], "proposals": getattr(policy, "proposals", None),
                "world_size": args.world_size, "global_step": trainer.state.global_step,
                "frozen": sorted(n for n, p in model.named_parameters() if not p.requires_grad),
                "cache": None if callback.cache is None else dict(callback.cache.stats, boundary=callback.cache.boundary,
                                                                  describe=callback.cache.describe())},
               out / f"rank{rank}{'-resumed' if resume else ''}.pt")
    leave_group_and_exit()


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(Path(argv[0]), argv[1] if len(argv) > 1 else "", static="--static" in sys.argv, cache="--cache" in sys.argv)
