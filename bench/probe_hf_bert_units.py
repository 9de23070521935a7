"""Does SmartFRZ freeze a Hugging Face BERT whose position table shares a unit with a LayerNorm?

    python bench/probe_hf_bert_units.py [--steps 480]

Unit discovery merges BERT's embeddings LayerNorm into the position-embedding unit, so its
sampled weights mix scales near 1 with table entries of a few hundredths (docs/predictor.md,
"Which weights the history samples": on the zoo's small ViTs and text encoders such a unit kept
the predictor's probability low all run). A 2-layer, width-64 BERT is trained from scratch on an
easy task (the label is the first token mod 4, random tokens, AdamW 1e-3) with SmartFRZ's
shipped weights and `freeze_attention=True` (the default stops before the first attention unit);
the script prints each unit's probability every 40 steps and the freezing
timeline. 1 thread, about two minutes on a CPU core.
"""

import argparse

import torch

from smartfrz_fast import SmartFreezer, SmartFRZ


class PrintedSmartFRZ(SmartFRZ):
    """SmartFRZ that prints its probabilities at evaluations on multiples of ``every`` steps."""

    score_every_unit = True  # every active unit's, not only as far as the prefix goes

    def __init__(self, every: int):
        super().__init__(freeze_attention=True)  # the timeline the predictor alone would make
        self.every = every

    def decide(self, step, frozen):
        before = self.last_probabilities
        decision = super().decide(step, frozen)
        if self.last_probabilities is not before and step % self.every == 0:
            probs = " ".join(f"{p:.2f}" for p in self.last_probabilities.tolist())
            print(f"step {step:4d}, {frozen:2d} frozen; active units' probabilities: {probs}", flush=True)
        return decision


def batch(i: int):
    g = torch.Generator().manual_seed(i)
    tokens = torch.randint(0, 256, (32, 32), generator=g)
    return tokens, tokens[:, 0] % 4


def main() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=480)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, num_labels=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    freezer = SmartFreezer(model, optimizer, policy=PrintedSmartFRZ(every=40),
                           example_kwargs={"input_ids": batch(0)[0]}, total_steps=args.steps)
    for i in range(args.steps):
        tokens, labels = batch(i)
        loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        freezer.step()
        if i == 0:
            print("units:", ", ".join(f"{u.index} {u.name}" for u in freezer.units))
    print(f"final loss {loss.item():.4f}; freezing timeline (step, units frozen): "
          f"{[(e.step, e.num_frozen) for e in freezer.timeline]}")


if __name__ == "__main__":
    main()
