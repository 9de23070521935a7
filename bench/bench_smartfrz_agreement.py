"""SmartFRZ's temporal agreement (averaging, patience) measured on two small jobs, CPU.

    python bench/bench_smartfrz_agreement.py --job demo --seeds 0 1 --variants p1s1 p1s5 p2s1
    python bench/bench_smartfrz_agreement.py --job finetune --seeds 0 1 [--nudges 1e-6 1e-3]

``pAsB``: ``SmartFRZ(patience=A, smoothing=B)`` (``pAsBrR``: also ``settle_ratio=R``) with the shipped predictor (``--weights``: another;
``--freeze-attention``: let the encoder's attention units freeze, as before 2026-12-06). Jobs:

- ``demo``: the demo's CNN on the digits (``smartfrz_fast.demo.train``, its loop and settings;
  ``--quick`` the demo's quick mode).
- ``finetune``: a small pre-norm transformer encoder (4 layers, d=64, 19 units), pretrained here
  for ``--pretrain-steps`` on one synthetic sequence task (topic of a token sequence, 8 classes),
  then fine-tuned on another (topic pair x a "sentiment" marked by rare tokens, 8 classes) with
  AdamW and a linear warm-up/decay schedule, as a Hugging Face fine-tuning loop.

Per run: test accuracy, training FLOPs saved, the freeze timeline, and the predictor's raw
probabilities at every evaluation (share in 0.3-0.8, mean change between evaluations, and the
first evaluation's probabilities: does the first decision discriminate between units?).
One JSON line per run on stdout. Since 2026-12-06 SmartFRZ scores only the units it may still
freeze (not the kept head, not attention units it stops before) and, with patience and
smoothing 1, none before ``min_progress``: the traces hold fewer rows and evaluations than
the runs in docs/predictor.md (decisions are the same).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from smartfrz_fast import SmartFreezer, SmartFRZ


def parse_variant(text):
    """``pAsB`` or ``pAsBrR``: patience A, smoothing B, settle_ratio R (absent: None)."""
    head, _, ratio = text.partition("r")
    patience, smoothing = head[1:].split("s")
    return int(patience), int(smoothing), float(ratio) if ratio else None


def traced(policy):
    """Record the raw probabilities of every evaluation (a host copy: this is a benchmark), of
    every active unit (on the CPU SmartFRZ scores only as far as the prefix goes)."""
    policy.trace = []
    policy.score_every_unit = True
    decide = policy.decide

    def wrapper(step, frozen):
        policy.last_probabilities = None
        out = decide(step, frozen)
        if policy.last_probabilities is not None:
            first = policy.context.history.first_active
            policy.trace.append((step, first, policy.last_probabilities.detach().cpu().tolist()))
        return out

    policy.decide = wrapper
    return policy


def trace_stats(trace):
    probs = [p for _, _, row in trace for p in row]
    moves = []
    for (_, f0, a), (_, f1, b) in zip(trace, trace[1:]):
        offset = f1 - f0  # units frozen in between drop out of the row
        moves += [abs(x - y) for x, y in zip(a[offset:], b)]
    return {
        "evaluations": len(trace),
        "share_0.3_0.8": round(sum(0.3 <= p <= 0.8 for p in probs) / max(1, len(probs)), 3),
        "mean_move": round(sum(moves) / max(1, len(moves)), 3),
        "first_eval": None if not trace else {"step": trace[0][0], "first_active": trace[0][1],
                                              "prob": [round(p, 2) for p in trace[0][2]]},
    }


# ---------------------------------------------------------------- demo job
def demo_runs(args, variants):
    from smartfrz_fast import demo
    from smartfrz_fast.data import load_digits_dataset

    quick = args.quick
    blocks = demo.QUICK_BLOCKS if quick else demo.DEFAULT_BLOCKS
    samples, batch, epochs, size = (1024, 64, 2, 12) if quick else (args.samples, 128, 3, 16)
    for seed in args.seeds:
        data = load_digits_dataset(num_samples=samples, seed=seed, image_size=size, return_tensors=True)
        torch.manual_seed(seed)
        init = copy.deepcopy(demo.DigitNet(blocks).state_dict())

        def run(name, variant=None):
            policy_name = None
            if variant is not None:
                patience, smoothing, ratio = variant
                demo.build_policy = lambda *a, **k: traced(SmartFRZ(args.weights, patience=patience, smoothing=smoothing,
                                                                    settle_ratio=ratio))
                policy_name = "smartfrz"
            t = time.perf_counter()
            result = demo.train(name, init, lambda: demo.DigitNet(blocks), data, epochs=epochs, batch_size=batch,
                                lr=0.05, seed=seed, policy_name=policy_name, progress=False)
            row = {"job": "demo-quick" if quick else f"demo-{samples}", "seed": seed, "variant": name,
                   "accuracy": round(100 * result.test_accuracy, 2), "steps": result.steps,
                   "seconds": round(time.perf_counter() - t, 1)}
            if result.freezer is not None:
                f = result.freezer
                row.update(flops_saved=round(100 * f.training_flops_saved(result.steps), 1),
                           timeline=[(e.step, e.num_frozen) for e in f.timeline], **trace_stats(f.policy.trace))
            print(json.dumps(row), flush=True)

        if not args.no_full:
            run("full")
        for text in variants:
            run(text, parse_variant(text))


# ---------------------------------------------------------------- fine-tuning job
VOCAB, SEQ, TOPICS = 64, 32, 8


class Encoder(nn.Module):
    def __init__(self, d=64, layers=4, classes=8):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(SEQ, d)  # learned positions, as BERT's
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True,
                                                                norm_first=True) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.emb(x) + self.pos.weight
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(1))


def sequences(n, generator):
    """Token sequences with a topic (half the tokens from the topic's block of 7) and a
    sentiment (1: a few tokens from the rare block 56-63 at positions after a marker token)."""
    topic = torch.randint(0, TOPICS, (n,), generator=generator)
    sentiment = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randint(0, 56, (n, SEQ), generator=generator)
    own = topic[:, None] * 7 + torch.randint(0, 7, (n, SEQ), generator=generator)
    pick = torch.rand(n, SEQ, generator=generator) < 0.35
    x = torch.where(pick, own, x)
    rare = 56 + torch.randint(0, 8, (n, SEQ), generator=generator)
    mark = (torch.rand(n, SEQ, generator=generator) < 0.12) & (sentiment[:, None] == 1)
    x = torch.where(mark, rare, x)
    noise = (torch.rand(n, SEQ, generator=generator) < 0.04) & (sentiment[:, None] == 0)  # ambiguous rare tokens
    x = torch.where(noise, rare, x)
    return x, topic, sentiment


def linear_warmup(total, warmup):
    return lambda s: s / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))


def pretrained(seed, steps):
    path = f"/tmp/smartfrz_agreement_pretrained_s{seed}_{steps}.pt"
    torch.manual_seed(1000 + seed)
    model = Encoder()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    g = torch.Generator().manual_seed(2000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup(steps, steps // 10))
    for _ in range(steps):
        x, topic, _ = sequences(64, g)
        F.cross_entropy(model(x), topic).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    torch.save(model.state_dict(), path)
    return model


def finetune_runs(args, variants):
    for seed in args.seeds:
        base = pretrained(seed, args.pretrain_steps)
        g = torch.Generator().manual_seed(3000 + seed)
        x_train, t_train, s_train = sequences(args.train_samples, g)
        y_train = (t_train // 2) * 2 + s_train  # 8 classes: topic pair x sentiment
        x_test, t_test, s_test = sequences(2000, g)
        y_test = (t_test // 2) * 2 + s_test
        total = args.steps

        def run(name, variant=None, nudge=None):
            model = copy.deepcopy(base)
            model.head = nn.Linear(64, 8)
            torch.manual_seed(seed)
            model.head.reset_parameters()
            if nudge is not None:  # full training from weights moved by size * mean|W| * N(0, 1)
                size, draw = nudge
                noise = torch.Generator().manual_seed(1000 + draw)
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn(p.shape, generator=noise) * (size * float(p.abs().mean())))
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup(total, total // 10))
            freezer = None
            if variant is not None:
                patience, smoothing, ratio = variant
                freezer = SmartFreezer(model, opt, traced(SmartFRZ(args.weights, patience=patience, smoothing=smoothing,
                                                                   settle_ratio=ratio,
                                                                   freeze_attention=args.freeze_attention)),
                                       example_inputs=(x_train[:8],), total_steps=total)
            order = torch.Generator().manual_seed(seed)
            t = time.perf_counter()
            for step in range(total):
                idx = torch.randint(0, x_train.shape[0], (32,), generator=order)
                F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                if freezer is not None:
                    freezer.step()
            model.eval()
            with torch.no_grad():
                accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
            row = {"job": "finetune", "seed": seed, "variant": name, "accuracy": round(100 * accuracy, 2),
                   "steps": total, "seconds": round(time.perf_counter() - t, 1)}
            if freezer is not None:
                row.update(flops_saved=round(100 * freezer.training_flops_saved(total), 1),
                           timeline=[(e.step, e.num_frozen) for e in freezer.timeline],
                           **trace_stats(freezer.policy.trace))
            print(json.dumps(row), flush=True)

        if not args.no_full:
            run("full")
        for size in args.nudges:  # the job's own noise floor (bench/bench_noise_floor.py's nudges)
            for draw in (0, 1):
                run(f"nudge{size:g}-{draw}", nudge=(size, draw))
        for text in variants:
            run(text, parse_variant(text))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--job", choices=("demo", "finetune"), required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="*", default=["p1s1", "p1s5", "p2s1"])
    p.add_argument("--quick", action="store_true", help="demo: the demo's quick mode")
    p.add_argument("--no-full", action="store_true", help="skip the full-training run")
    p.add_argument("--samples", type=int, default=16000, help="demo: training images")
    p.add_argument("--steps", type=int, default=400, help="finetune: fine-tuning steps")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--nudges", type=float, nargs="*", default=[],
                   help="finetune: also full training from weights nudged by these relative sizes, two draws each")
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weights", default=None, help="a predictor file (default: the shipped weights)")
    p.add_argument("--freeze-attention", action="store_true",
                   help="finetune: SmartFRZ(freeze_attention=True), the encoder's attention units may freeze")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    (demo_runs if args.job == "demo" else finetune_runs)(args, args.variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
