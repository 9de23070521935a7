"""What each ``shared_parameters`` mode saves and costs on a small tied-embedding LM (CPU).

A GPT-2 with tied input/output embeddings (transformers' own GPT2LMHeadModel, random init)
learns a fixed random Markov chain over its vocabulary (a learnable task whose best loss is the
chain's entropy). Three runs from the same initial weights and the same batches: no freezing,
half the units frozen at ``--freeze-at`` with ``shared_parameters="train"``, and with
``"freeze"``. Reported: the final loss (mean of the last 50 steps), the median step CPU time
after the freeze (of the one training thread, so other jobs on the machine matter less), and
the engine's own count of the training FLOPs the freeze removes::

    nice -n 19 python bench/bench_shared_parameters.py            # writes bench/results/shared_parameters_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_commit  # noqa: E402

from smartfrz_fast import SmartFreezer  # noqa: E402
from smartfrz_fast.policy import StaticFreeze  # noqa: E402


def markov_batches(vocab: int, seq: int, batch: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=g) * 4.0  # peaked: a few likely successors each
    probs = logits.softmax(-1)
    entropy = float(-(probs * probs.log()).sum(-1).mean())
    batches = []
    for _ in range(steps):
        tokens = torch.empty(batch, seq, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq):
            tokens[:, t] = torch.multinomial(probs[tokens[:, t - 1]], 1, generator=g).squeeze(1)
        batches.append(tokens)
    return batches, entropy


def run(mode, args, batches):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.width,
                                             n_layer=args.layers, n_head=4, tie_word_embeddings=True))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    freezer = None
    if mode != "full":
        policy = StaticFreeze(0, at_step=args.freeze_at)
        freezer = SmartFreezer(model, opt, policy, example_inputs={"input_ids": batches[0]}, shared_parameters=mode)
        policy.num_units = len(freezer.units) // 2
    losses, times = [], []
    for step, tokens in enumerate(batches):
        start = time.thread_time()  # CPU time of this one thread: robust to other jobs
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if freezer is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                freezer.step()
        times.append(time.thread_time() - start)
        losses.append(loss.item())
    after = times[args.freeze_at + 5:]
    return {
        "mode": mode,
        "final_loss": statistics.fmean(losses[-50:]),
        "ms_after_freeze": 1e3 * statistics.median(after),
        "flops_saved": freezer.frozen_flops_fraction() if freezer else 0.0,
        "params_frozen": freezer.frozen_param_fraction() if freezer else 0.0,
        "frozen": f"{freezer.num_frozen}/{len(freezer.units)}" if freezer else "0",
        "adam_state_tensors": len(opt.state),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--freeze-at", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "shared_parameters_cpu.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches, entropy = markov_batches(args.vocab, args.seq, args.batch, args.steps)
    rows = [run(mode, args, batches) for mode in ("full", "train", "freeze")]
    lines = [
        f"GPT-2 tied (vocab {args.vocab}, width {args.width}, {args.layers} layers, seq {args.seq}, batch "
        f"{args.batch}), AdamW lr {args.lr}, {args.steps} steps, half the units frozen at step {args.freeze_at}; "
        f"Markov-chain tokens, best possible loss {entropy:.3f}.",
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores shared, {args.threads} thread), "
        f"torch {torch.__version__}, commit {git_commit()}, {time.strftime('%Y-%m-%d')}, load "
        f"{os.getloadavg()[0]:.1f}.",
        "",
        "| shared_parameters | frozen units | params frozen | step FLOPs saved | CPU ms/step after freeze | "
        "final loss (last 50) | Adam state tensors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "no freezing" if r["mode"] == "full" else f'"{r["mode"]}"'
        lines.append(f"| {name} | {r['frozen']} | {r['params_frozen']:.1%} | {r['flops_saved']:.1%} | "
                     f"{r['ms_after_freeze']:.1f} | {r['final_loss']:.3f} | {r['adam_state_tensors']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
