"""Demo: train a small CNN on real handwritten digits twice, without and with layer freezing.

    python -m smartfrz_fast.demo                 # SmartFRZ, ~2-3 minutes on 2 CPU cores
    python -m smartfrz_fast.demo --policy linear
    python -m smartfrz_fast.demo --quick         # a few seconds, for smoke tests
    python -m smartfrz_fast.demo --sieve 0.8     # the freezing run also sieves data (SpFDE)
    python -m smartfrz_fast.demo --cache         # a third run: freezing + the activation cache

Both runs start from the same initial weights and see the same batches in the same order; only
the freezing differs. The demo prints both runs' test accuracy and wall time, the time freezing
saved, the freeze timeline (which unit froze at which step) and the share of training FLOPs
saved. With ``--cache`` a third run freezes the same way and also serves the frozen prefix's
output from the activation cache (the digits are fixed, so a sample's input never changes),
skipping the frozen layers' forward pass too. Everything runs on the CPU; the data is
scikit-learn's bundled digits (no download).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .data import load_digits_dataset

# The policy the demo uses when --policy is not given: SmartFRZ with the shipped predictor
# (measured on this demo: -0.2 points, 35 % of the training FLOPs saved; FreezeOut -0.05 / 17 %).
DEFAULT_POLICY = "smartfrz"
POLICIES = ("smartfrz", "freezeout", "autofreeze", "linear", "egeria", "static")

# (out_channels, stride) of each conv-BN-ReLU block: 8 freezable conv units plus the linear head.
# Early blocks run at full resolution, so their backward pass is a real share of a step.
DEFAULT_BLOCKS: Tuple[Tuple[int, int], ...] = (
    (16, 1), (32, 1), (32, 1), (64, 2), (64, 1), (64, 1), (128, 2), (128, 1),
)
QUICK_BLOCKS: Tuple[Tuple[int, int], ...] = ((8, 1), (16, 1), (16, 2), (32, 1), (32, 2))
CACHE_BYTES = 2 ** 30  # --cache: rows beyond 1 GiB are recomputed (the default run needs ~0.5 GiB)


class DigitNet(nn.Module):
    """A plain CNN: conv-BN-ReLU blocks, global average pooling and a linear head.

    Layers are attributes ``conv1, bn1, conv2, bn2, ..., fc`` so that the engine's unit names
    read ``conv1+bn1``, ``conv2+bn2``, ..., ``fc``.
    """

    def __init__(
        self,
        blocks: Sequence[Tuple[int, int]] = DEFAULT_BLOCKS,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.num_blocks = len(blocks)
        c = in_channels
        for i, (out, stride) in enumerate(blocks, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(c, out, 3, stride=stride, padding=1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(out))
            c = out
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.num_blocks + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)), inplace=True)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


@dataclass
class RunResult:
    name: str
    train_seconds: float
    test_accuracy: float
    final_loss: float
    steps: int
    step_ms_by_frozen: Dict[int, List[float]] = field(default_factory=dict)
    freezer: object = None
    step_ms: List[float] = field(default_factory=list)  # every step's wall time, in order
    accuracy_curve: List[Tuple[int, float]] = field(default_factory=list)  # (step, test accuracy)
    cache_summary: Optional[str] = None  # a --cache run's ActivationCache.describe() at its end


def build_policy(name: str, total_steps: int, num_freezable: int, model: Optional[nn.Module] = None,
                 probe: Optional[torch.Tensor] = None):
    """The demo's settings of each policy (num_freezable: units the engine may freeze; Egeria
    needs the model and a fixed batch of training inputs: it watches the units' outputs on it)."""
    from .policy import AutoFreeze, Egeria, FreezeOut, LinearFreeze, StaticFreeze

    if name == "freezeout":
        # Brock et al.'s recommended setting for the cubic schedule: t0 = 0.8, so the first unit
        # freezes at 0.8**3 = 51% of training and the last conv unit at ~93% (unit i at t_i * total).
        return FreezeOut(t0=0.8, spacing="cubic", scale_lr=True)
    if name == "autofreeze":
        return AutoFreeze(num_intervals=10, percentile=50.0)
    if name == "linear":
        # Composer's defaults: start freezing at half of training, reach all but the head.
        return LinearFreeze(freeze_start=0.5, freeze_level=1.0)
    if name == "egeria":
        if model is None or probe is None:
            raise ValueError("the egeria policy needs the model and a batch of training inputs (model=, probe=)")
        return Egeria(model, probe)  # the paper's knobs at their defaults, as in the lab's table
    if name == "static":
        # Freeze the first half of the freezable units once half of training is done.
        return StaticFreeze(num_units=max(1, num_freezable // 2), at_step=max(1, total_steps // 2))
    if name == "smartfrz":
        from .policy import SmartFRZ  # raises (demo exits 2) if the weights file is missing or corrupt

        return SmartFRZ()
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")


def _lr_lambda(total_steps: int):
    # Cosine annealing to zero over the run: the schedule FreezeOut's per-unit schedules
    # generalise (its last unit follows exactly this one).
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])


def _make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def train(
    name: str,
    init_state: Dict[str, torch.Tensor],
    make_model,
    data: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    policy_name: Optional[str] = None,
    progress: bool = True,
    eval_points: int = 0,
    sieve: Optional[float] = None,
    cache: bool = False,
) -> RunResult:
    """One training run; with ``policy_name`` it runs under a ``SmartFreezer``. With
    ``eval_points`` > 0, test accuracy is also measured that many times along the run (for
    ``--plot``; the evaluation time is left out of the run's wall time). With ``sieve``, each
    epoch covers only that fraction of the samples (``SievingSampler``: the easiest fifth of
    them swapped for held-back ones every epoch), so the run takes fewer steps. With ``cache``
    (and a policy), the frozen prefix's output comes from an ``ActivationCache``."""
    from tqdm.auto import tqdm

    x_train, y_train, x_test, y_test = data
    model = make_model()
    model.load_state_dict(init_state)
    model.train()
    optimizer = _make_optimizer(model, lr)
    n = x_train.shape[0]
    sampler = None
    if sieve is not None:
        from .sieve import SievingSampler

        sampler = SievingSampler(n, active_fraction=sieve, swap_fraction=0.2, seed=seed)
    steps_per_epoch = (len(sampler) if sampler else n) // batch_size  # drop the last partial batch
    total_steps = steps_per_epoch * epochs

    freezer = None
    scheduler = None
    if policy_name is not None:
        from .engine import SmartFreezer

        num_units = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        policy = build_policy(policy_name, total_steps, num_units - 1, model, x_train[:batch_size])
        freezer = SmartFreezer(
            model, optimizer, policy=policy, example_inputs=(x_train[:batch_size],),
            total_steps=total_steps, keep_trainable=1,
        )
        if not policy.manages_lr:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps))
    activation_cache = cached_model = None
    if cache and freezer is not None:
        from .cache import ActivationCache

        # fp32 rows: the run trains exactly as the one without the cache, only faster.
        activation_cache = ActivationCache(freezer, num_samples=n, deterministic=True, max_bytes=CACHE_BYTES)
        cached_model = activation_cache.wrap()  # forward(inputs, sample_ids)

    order = torch.Generator().manual_seed(seed)  # the same batches, in the same order, per run
    step_ms: Dict[int, List[float]] = {}
    every_step: List[float] = []
    curve: List[Tuple[int, float]] = []
    eval_every = max(1, total_steps // eval_points) if eval_points > 0 else 0
    eval_seconds = 0.0
    loss_value = float("nan")
    bar = tqdm(total=total_steps, desc=f"{name:>15}", unit="step", disable=not progress,
               leave=True, dynamic_ncols=True, file=sys.stderr)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.tensor(list(sampler)) if sampler else torch.randperm(n, generator=order)
        for b in range(steps_per_epoch):
            t0 = time.perf_counter()
            frozen = freezer.num_frozen if freezer is not None else 0
            idx = perm[b * batch_size:(b + 1) * batch_size]
            logits = cached_model(x_train[idx], idx) if cached_model is not None else model(x_train[idx])
            if sampler is None:
                loss = F.cross_entropy(logits, y_train[idx])
            else:  # per-sample losses rank the samples for the next rotation
                losses = F.cross_entropy(logits, y_train[idx], reduction="none")
                sampler.record(idx, losses)
                loss = losses.mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            if freezer is not None:
                freezer.step()
            step_ms.setdefault(frozen, []).append((time.perf_counter() - t0) * 1e3)
            every_step.append(step_ms[frozen][-1])
            if eval_every and len(every_step) % eval_every == 0:
                t_eval = time.perf_counter()
                curve.append((len(every_step), evaluate(model, x_test, y_test)))
                eval_seconds += time.perf_counter() - t_eval
            if b % 10 == 0:
                loss_value = loss.item()
                postfix = {"loss": f"{loss_value:.3f}"}
                if freezer is not None:
                    postfix["frozen"] = freezer.num_frozen
                bar.set_postfix(postfix, refresh=False)
            bar.update(1)
    seconds = time.perf_counter() - start - eval_seconds
    bar.close()
    loss_value = loss.item()
    accuracy = evaluate(model, x_test, y_test)
    summary = None
    if activation_cache is not None:
        summary = activation_cache.describe()
        activation_cache.close()  # its rows are not needed after the run
    return RunResult(name, seconds, accuracy, loss_value, total_steps, step_ms, freezer, every_step, curve,
                     summary)


def _warm_up(make_model, init_state, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
    """A few throwaway steps so that neither timed run pays one-time kernel set-up costs."""
    model = make_model()
    model.load_state_dict(init_state)
    opt = _make_optimizer(model, lr)
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _preflight(policy_name: str, make_model, init_state, x: torch.Tensor, total_steps: int, lr: float):
    """Build the policy and a freezer on a throwaway copy, so that a policy that cannot run
    (SmartFRZ without trained weights) fails before any training. Returns an error or None."""
    from .engine import SmartFreezer

    model = make_model()
    model.load_state_dict(init_state)
    num_units = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    try:
        policy = build_policy(policy_name, total_steps, num_units - 1, model, x)
        SmartFreezer(model, _make_optimizer(model, lr), policy=policy, example_inputs=(x,),
                     total_steps=total_steps, keep_trainable=1).close()
    except Exception as exc:  # noqa: BLE001 - reported to the user, demo exits with code 2
        if policy_name != "smartfrz":
            raise
        return exc
    return None


def _step_time_table(result: RunResult, freezer) -> List[str]:
    names = [u.name for u in freezer.units]
    lines = [f"  {'frozen units':<28} {'steps':>6} {'median ms/step':>15}"]
    for k in sorted(result.step_ms_by_frozen):
        times = sorted(result.step_ms_by_frozen[k])
        label = "none" if k == 0 else (names[0] if k == 1 else f"{names[0]} .. {names[k - 1]}")
        lines.append(f"  {f'{k} ({label})':<28} {len(times):>6} {times[len(times) // 2]:>15.1f}")
    return lines


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = "python -m smartfrz_fast.demo") -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a small CNN on scikit-learn's handwritten digits (enlarged with "
                    "deterministic distortions) without and with progressive layer freezing, "
                    "on the CPU, and compare accuracy, wall time and FLOPs.",
    )
    p.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY,
                   help=f"freezing policy (default: {DEFAULT_POLICY})")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 3; quick: 2)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: 128; quick: 64)")
    p.add_argument("--samples", type=int, default=None,
                   help="training images generated from the train originals (default: 16000; quick: 1024)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: 16; quick: 12)")
    p.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the weights and the batch order")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice, usually the core count)")
    p.add_argument("--quick", action="store_true", help="a tiny run of a few seconds (for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--sieve", type=float, metavar="FRACTION", default=None,
                   help="the freezing run also sieves data (SpFDE): each epoch trains on FRACTION "
                        "of the samples, the easiest fifth of them swapped for held-back ones "
                        "every epoch (SievingSampler); fewer steps for the same epochs")
    p.add_argument("--cache", action="store_true",
                   help="a third run freezes the same way and also skips the frozen layers' forward "
                        "pass with the activation cache (fp32 rows in memory)")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="write a PNG (or .pdf, .svg) of the freeze timeline, step time and test accuracy over "
                        "training (needs matplotlib, the plot extra: pip install matplotlib)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"epochs": (3, 2), "batch_size": (128, 64), "samples": (16000, 1024), "image_size": (16, 12)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    for key in ("epochs", "batch_size", "samples"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.samples < args.batch_size:
        p.error("--samples must be at least --batch-size")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.image_size < 8:
        p.error("--image-size must be at least 8 (the digits are 8x8 images)")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error("--lr must be a positive number")
    if args.sieve is not None and not (0.0 < args.sieve <= 1.0 and args.sieve * args.samples >= args.batch_size):
        p.error("--sieve must be a fraction in (0, 1] that leaves at least one batch of samples per epoch")
    return args


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m smartfrz_fast.demo") -> int:
    args = parse_args(argv, prog)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    blocks = QUICK_BLOCKS if args.quick else DEFAULT_BLOCKS

    def make_model() -> nn.Module:
        return DigitNet(blocks)

    t_data = time.perf_counter()
    data = load_digits_dataset(num_samples=args.samples, seed=args.seed, image_size=args.image_size,
                               return_tensors=True)
    t_data = time.perf_counter() - t_data
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    init_state = copy.deepcopy(make_model().state_dict())
    total_steps = (x_train.shape[0] // args.batch_size) * args.epochs

    error = _preflight(args.policy, make_model, init_state, x_train[:args.batch_size], total_steps, args.lr)
    if error is not None:
        print(f"--policy {args.policy} cannot run: {error}", file=sys.stderr)
        print("Choose another policy, e.g. --policy freezeout.", file=sys.stderr)
        return 2

    n_params = sum(p.numel() for p in make_model().parameters())
    print("smartfrz_fast demo: layer freezing on the CPU")
    print(f"  data   : scikit-learn digits -> {x_train.shape[0]} train / {x_test.shape[0]} test images "
          f"of {args.image_size}x{args.image_size} (test from held-out originals; built in {t_data:.1f} s)")
    print(f"  model  : {len(blocks)} conv-BN-ReLU blocks + linear head, {n_params:,} parameters")
    print(f"  train  : {args.epochs} epoch(s) x {total_steps // args.epochs} steps of batch {args.batch_size}, "
          f"SGD lr {args.lr:g} (nesterov, cosine), {torch.get_num_threads()} CPU thread(s), seed {args.seed}")
    print(f"  policy : {args.policy}")
    if args.sieve is not None:
        print(f"  sieve  : the freezing run trains on {args.sieve:.0%} of the samples per epoch "
              "(easiest fifth swapped for held-back ones every epoch)")
    print()

    _warm_up(make_model, init_state, x_train[:args.batch_size], y_train[:args.batch_size], args.lr)
    if args.plot:
        from .plot import plot_format

        try:
            plot_format(args.plot)
        except (ImportError, ValueError) as exc:
            print(f"--plot: {exc}", file=sys.stderr)
            return 2
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):  # before minutes of training
            print(f"--plot: cannot write into {folder} (no such folder, or not writable)", file=sys.stderr)
            return 2
    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                  progress=not args.no_progress, eval_points=20 if args.plot else 0)
    full = train("full training", init_state, make_model, data, **common)
    name = f"with {args.policy}" + ("+sieve" if args.sieve is not None else "")
    frozen = train(name, init_state, make_model, data, policy_name=args.policy, sieve=args.sieve, **common)
    freezer = frozen.freezer
    runs = [full, frozen]
    if args.cache:
        runs.append(train(name + "+cache", init_state, make_model, data, policy_name=args.policy,
                          sieve=args.sieve, cache=True, **common))

    def saved(run: RunResult) -> str:
        seconds = full.train_seconds - run.train_seconds
        share = 100.0 * seconds / full.train_seconds if full.train_seconds > 0 else 0.0
        return f"{seconds:.1f} s ({share:.1f}% of full training's wall time)"

    print()
    print("Results")
    print(f"  {'run':<20} {'test accuracy':>13} {'train wall time':>16} {'final loss':>11}")
    for r in runs:
        print(f"  {r.name:<20} {r.test_accuracy:>13.2%} {r.train_seconds:>14.1f} s {r.final_loss:>11.4f}")
    print(f"  time saved: {saved(frozen)}")
    if args.cache:
        cached = runs[-1]
        print(f"  time saved with the activation cache too: {saved(cached)}")
        print(f"  {cached.cache_summary}")
    print(f"  accuracy change: {100.0 * (frozen.test_accuracy - full.test_accuracy):+.2f} points")
    print(f"  training FLOPs saved (engine's count): {freezer.training_flops_saved():.1%}")
    if args.sieve is not None:  # sieving saves only the steps it does not run
        used = frozen.steps / full.steps * (1.0 - freezer.training_flops_saved())
        print(f"  with sieving: {frozen.steps} steps instead of {full.steps}; training FLOPs saved "
              f"vs full training: {1.0 - used:.1%}")
    print()
    print("Freeze timeline")
    print(freezer.report())
    print()
    print("Step time by frozen prefix (run with freezing)")
    print("\n".join(_step_time_table(frozen, freezer)))
    if args.plot:
        from .plot import Curve, plot_training

        plot_training(args.plot, [Curve(r.name, r.step_ms, r.accuracy_curve) for r in (full, frozen)],
                      freezer.timeline, len(freezer.units),
                      title=f"smartfrz_fast demo: {args.policy}, {args.epochs} epochs x "
                            f"{total_steps // args.epochs} steps of batch {args.batch_size}, "
                            f"{torch.get_num_threads()} CPU thread(s)")
        print(f"\nplot written to {args.plot}")
    if args.quick:
        print()
        print("(--quick: a tiny smoke-test run; accuracy and timings are not meaningful)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
