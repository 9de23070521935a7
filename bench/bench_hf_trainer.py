"""Step time inside a real Hugging Face Trainer: no freezing, the same prefix frozen, and frozen +
activation cache, side by side in one run (a BERT-style classifier built from a config).

    python bench/bench_hf_trainer.py [--device cpu|cuda] [--layers 6 --hidden 256 --seq 128]

Each mode trains the same model from the same seed on the same batches; the embeddings and the
first ``--frozen-layers`` encoder layers freeze after ``--freeze-at`` steps (StaticFreeze). A
callback stamps every optimizer step; a mode's figure is the median step time over the steps
after the cache's filling epoch (the epoch after the freeze), so all three are timed on the same
step numbers. The three modes run in turn ``--repeats`` times (A B C A B C ...), so that machine
load hits them alike; rows (one per mode and repeat) are appended to
``bench/results/hf_trainer.csv`` with the device, versions, date, commit and load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch

from bench_cache import finish_rows
from smartfrz_fast import StaticFreeze
from smartfrz_fast.units import discover_units

FIELDS = ["device", "torch", "transformers", "python", "date", "commit", "threads", "model", "batch", "samples",
          "frozen_units", "mode", "ms_per_step", "steps_timed", "repeat", "machine", "load"]
MODES = ("full", "frozen", "frozen+cache")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--frozen-layers", type=int, default=4, help="encoder layers frozen (after the embeddings)")
    p.add_argument("--freeze-at", type=int, default=4, help="optimizer step after which the prefix freezes")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    p.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "hf_trainer.csv"))
    return p.parse_args()


def build_model(args):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=2000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                        max_position_embeddings=args.seq, num_labels=4)
    return BertForSequenceClassification(config)


def make_dataset(args):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 2000, (args.samples, args.seq), generator=g)
    labels = ids[:, 0] % 4
    return [{"input_ids": ids[i], "attention_mask": torch.ones(args.seq, dtype=torch.long), "labels": labels[i]}
            for i in range(args.samples)]


def prefix_units(model, args, example) -> int:
    """Units in the embeddings and the first ``frozen_layers`` encoder layers."""
    units = discover_units(model, (), {"input_ids": example["input_ids"][None]}).units
    inside = ["bert.embeddings."] + [f"bert.encoder.layer.{i}." for i in range(args.frozen_layers)]
    return sum(1 for u in units if any(u.name.startswith(p) for p in inside))


def run_mode(mode, args, out_dir):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from smartfrz_fast.integrations.huggingface import SmartFreezeCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_step_end(self, *a, **kw):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

    model = build_model(args)
    train_set = make_dataset(args)
    frozen_units = prefix_units(model, args, train_set[0])
    steps_per_epoch = args.samples // args.batch
    training = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch, num_train_epochs=args.epochs,
        dataloader_drop_last=True, save_strategy="no", logging_strategy="no", report_to="none",
        use_cpu=args.device == "cpu", disable_tqdm=True, seed=0, learning_rate=1e-4)
    trainer = Trainer(model=model, args=training, train_dataset=train_set)
    clock = StepClock()
    trainer.add_callback(clock)
    callback = None
    if mode != "full":
        cache = {"deterministic": True} if mode == "frozen+cache" else None
        callback = SmartFreezeCallback(StaticFreeze(frozen_units, at_step=args.freeze_at),
                                       activation_cache=cache).attach(trainer)
    trainer.train()
    # steady state: from the second epoch after the freeze (the first one fills the cache)
    first = (args.freeze_at // steps_per_epoch + 2) * steps_per_epoch
    times = [(b - a) * 1e3 for a, b in zip(clock.stamps[first - 1:], clock.stamps[first:])]
    if len(times) < 3:
        raise SystemExit(f"only {len(times)} steps after the cache's filling epoch: raise --epochs")
    if callback is not None and callback.cache is not None:
        print(f"    {callback.cache.describe()}")
    return frozen_units, statistics.median(times), len(times)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    rows = []
    model_name = f"bert L{args.layers} H{args.hidden} seq{args.seq}"
    print(f"{model_name}, batch {args.batch}, {args.samples} samples, embeddings + {args.frozen_layers} "
          f"layers frozen after step {args.freeze_at}, {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode in MODES:
                frozen, ms, n = run_mode(mode, args, os.path.join(tmp, f"{mode}-{repeat}"))
                load = f"{os.getloadavg()[0]:.2f}"
                print(f"  {mode:<13} {ms:8.1f} ms/step (median of {n} steps)  load {load}", flush=True)
                rows.append(dict(model=model_name, batch=args.batch, samples=args.samples,
                                 frozen_units=frozen if mode != "full" else 0, mode=mode,
                                 ms_per_step=round(ms, 2), steps_timed=n, repeat=repeat, load=load,
                                 transformers=transformers.__version__))
    medians = {m: statistics.median(r["ms_per_step"] for r in rows if r["mode"] == m) for m in MODES}
    print("mode           ms/step   vs full")
    for mode in MODES:
        print(f"{mode:<13} {medians[mode]:8.1f}   {medians[mode] / medians['full']:.2f}x")
    finish_rows(args.csv, FIELDS, rows, torch.device(args.device))


if __name__ == "__main__":
    main()
