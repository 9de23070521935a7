"""Run in a subprocess by test_resume.py: train, checkpoint, resume in a fresh process.

usage: resume_worker.py {full|resumed} OUT_DIR OPTIMIZER POLICY

"full" trains uninterrupted, saving a checkpoint on the way; "resumed" starts a fresh process
from that checkpoint and finishes the run.
"""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from models import SmallCNN, batch  # noqa: E402

from smartfrz_fast import AutoFreeze, FreezeOut, SmartFreezer, SmartFRZ, StaticFreeze  # noqa: E402
from smartfrz_fast.predictor import AttentionPredictor, PredictorConfig, save_predictor  # noqa: E402

TOTAL, SPLIT = 40, 17
TINY_PREDICTOR = PredictorConfig(sample_size=16, window=4, hidden=8, embed=4, head_hidden=4)


def make_policy(name: str, out: Path):
    if name == "static":
        return StaticFreeze(1, at_step=10)
    if name == "freezeout":
        return FreezeOut(t0=0.3, spacing="linear")
    if name == "autofreeze":
        return AutoFreeze(interval=5, percentile=50)
    if name == "smartfrz":
        # A test predictor (seeded, head biased towards "freeze") to exercise the mechanism:
        # the history ring and the decisions must survive the checkpoint.
        path = out / "predictor.pt"
        if not path.exists():
            torch.manual_seed(123)
            predictor = AttentionPredictor(TINY_PREDICTOR)
            with torch.no_grad():
                predictor.head[-1].bias.copy_(torch.tensor([-3.0, 3.0]))
            save_predictor(predictor, path, {"purpose": "resume test"})
        return SmartFRZ(weights=path, evaluate_every=5, settle_ratio=None)
    raise ValueError(name)


def build(optimizer_name: str, policy_name: str, out: Path):
    torch.manual_seed(0)
    model = SmallCNN()
    if optimizer_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    freezer = SmartFreezer(model, opt, make_policy(policy_name, out), example_inputs=batch(0)[0],
                           total_steps=TOTAL, sample_every=5, window=4, sample_size=16)
    return model, opt, freezer


def run(model, opt, freezer, start, stop):
    for step in range(start, stop):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()


def main(phase: str, out: Path, optimizer_name: str, policy_name: str) -> None:
    model, opt, freezer = build(optimizer_name, policy_name, out)
    if phase == "full":
        run(model, opt, freezer, 0, SPLIT)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "freezer": freezer.state_dict()},
                   out / "checkpoint.pt")
        run(model, opt, freezer, SPLIT, TOTAL)
    else:
        ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
        model.load_state_dict(ckpt["model"])
        freezer.load_state_dict(ckpt["freezer"])  # before the optimizer: it removes frozen params
        opt.load_state_dict(ckpt["optimizer"])
        run(model, opt, freezer, SPLIT, TOTAL)
    torch.save({"model": model.state_dict(), "num_frozen": freezer.num_frozen,
                "timeline": [(e.step, e.num_frozen) for e in freezer.timeline]}, out / f"{phase}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4])
