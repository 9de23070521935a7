"""Step 1 of the offline pipeline: train the zoo and record what SmartFRZ will see.

Each run trains through the real engine (``SmartFreezer``) with a recording policy that never
freezes, so the weight history is gathered by the very code (units, sampled positions, op) that
serves SmartFRZ in use. Every snapshot we keep the newest history slot ``[U, K]`` and, on a fixed
probe batch (model in eval mode, no grad), the centred Gram matrix of each unit's output, from
which ``cka.py`` computes the linear CKA against the end of training.

The time scale matches use: a run of N steps is snapshotted every ``snapshot_interval(N)``
steps, the interval SmartFRZ asks the engine for (``SNAPSHOTS_PER_RUN`` snapshots per run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from ..engine import SmartFreezer
from ..history import SAMPLING
from ..policy.base import FreezePolicy
from ..policy.smartfrz import SNAPSHOTS_PER_RUN, snapshot_interval
from ..predictor.model import write_atomically
from .cka import centered_gram, cka_from_grams
from .zoo import EVAL_SPECS, RunSpec, Session, zoo_specs


class _Recorder(FreezePolicy):
    """Never freezes; after every snapshot stores the newest history slot and the probe Grams."""

    name = "recorder"
    needs_history = True

    def __init__(self, on_snapshot):
        super().__init__()
        self.on_snapshot = on_snapshot
        self._seen = 0

    def decide(self, step: int, frozen: int):
        history = self.context.history
        if history.count != self._seen:
            self._seen = history.count
            self.on_snapshot(history.history[:, (history.count - 1) % history.window].clone())
        return None


def representation_module(unit) -> torch.nn.Module:
    """The module whose output is the unit's representation for CKA: a BatchNorm that the unit
    ends with (conv -> BN), else the unit's own layer. A LayerNorm merged into the unit is the
    *next* sublayer's pre-norm and would show the residual stream, which barely moves."""
    last = unit.modules[-1]
    if isinstance(last, torch.nn.modules.batchnorm._BatchNorm):
        return last
    return unit.modules[0]


def _first_tensor(out: Any) -> Tensor:
    """A module's output as one tensor: a recurrent layer returns (sequence, state)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def record_run(spec: RunSpec, snapshots: int = SNAPSHOTS_PER_RUN,
               on_step: Optional[Callable[[Session], None]] = None) -> Dict[str, Any]:
    """Train one zoo network and return its recorded history, CKA curves and metadata.
    ``on_step(session)`` is called after every optimizer step (the freezing trials checkpoint
    the run from there: the recorded run and their unbranched run are one and the same)."""
    t0 = time.perf_counter()
    session = Session(spec)
    model, task = session.model, session.task
    every = snapshot_interval(spec.steps, snapshots)
    slots: List[Tensor] = []
    grams: List[List[Tensor]] = []
    outputs: Dict[int, Tensor] = {}
    fallback: Dict[int, Tensor] = {}

    def on_snapshot(slot: Tensor) -> None:
        slots.append(slot)
        was = model.training
        model.eval()
        with torch.no_grad():
            model(task.probe)
        model.train(was)
        n = task.probe.shape[0]
        # a layer whose output is not per sample (a position table) is represented by the
        # unit's last module (its merged pre-norm of embedding + positions)
        grams.append([centered_gram(outputs[i] if outputs[i].shape[0] == n else fallback[i])
                      for i in range(len(units))])

    recorder = _Recorder(on_snapshot)
    freezer = SmartFreezer(model, session.optimizer, policy=recorder, example_inputs=session.example_inputs(),
                           total_steps=spec.steps, sample_every=every, keep_trainable=0)
    units = freezer.units
    hooks = []
    for unit in units:
        def hook(module, args, out, index=unit.index):
            outputs[index] = _first_tensor(out).detach().flatten(1).float()
        def last_hook(module, args, out, index=unit.index):
            fallback[index] = _first_tensor(out).detach().flatten(1).float()
        hooks.append(representation_module(unit).register_forward_hook(hook))
        hooks.append(unit.modules[-1].register_forward_hook(last_hook))
    for _ in range(spec.steps):
        loss = session.train_step()
        freezer.step()
        if on_step is not None:
            on_step(session)
    for h in hooks:
        h.remove()
    freezer.close()
    gram = torch.stack([torch.stack(g) for g in grams], 1)  # [U, S, N, N]
    cka = cka_from_grams(gram, gram[:, -1:])  # [U, S]: each snapshot against the last
    return {
        "spec": spec.as_dict(),
        "name": spec.name,
        "units": [u.name for u in units],
        "forward_flops": [u.forward_flops for u in units],
        "num_params": [u.num_params for u in units],
        "valid": freezer.history.valid.clone(),
        "sampling": SAMPLING,  # which weights the history holds
        "history": torch.stack(slots, 1),  # [U, S, K] raw sampled weights
        "cka": cka,
        "sample_every": every,
        "final_loss": loss.item(),
        **{f"test_{k}": v for k, v in task.evaluate(model).items()},  # test_accuracy, test_loss
        "seconds": time.perf_counter() - t0,
    }


def save_recording(run: Dict[str, Any], path: Path) -> None:
    """Write atomically: a job killed while writing leaves no torn file behind."""
    write_atomically(path, lambda tmp: torch.save(run, tmp))


def collect(out_dir: Path, specs: List[RunSpec], log=print) -> List[Path]:
    """Record every spec into ``out_dir/<name>.pt``; runs already there are kept (resumable)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, spec in enumerate(specs):
        path = out_dir / f"{spec.name}.pt"
        if not path.exists():
            run = record_run(spec)
            save_recording(run, path)
            log(f"[{i + 1}/{len(specs)}] {spec.name}: {len(run['units'])} units, "
                f"acc {run['test_accuracy']:.3f}, {run['seconds']:.1f} s")
        paths.append(path)
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smartfrz_fast.lab.collect")
    p.add_argument("--out", type=Path, default=Path("/tmp/smartfrz_zoo"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", type=str, default="0/1", help="i/n: record every n-th spec from i")
    p.add_argument("--eval-networks", action="store_true",
                   help="record evaluate.EVAL_SPECS instead (for `evaluate --label-oracle` on them: an "
                        "analysis of the label rule; never training data)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    i, n = map(int, args.shard.split("/"))
    if args.eval_networks:
        specs = list(EVAL_SPECS)[i::n]
    else:
        specs = zoo_specs(args.quick)[i::n]
    collect(args.out, specs, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
