"""What the shipped SmartFRZ predictor responds to: its probability on synthetic windows.

    python bench/probe_predictor_movement.py

Each window: a random newest snapshot w (K weights, standard normal) and older snapshots
w + r * d_t, where d_t is a deviation of unit size that shrinks to 0 at the newest snapshot
(converging), a random walk ending at w, or a drift plus noise. r is the movement over the
window relative to the weights' spread. Mean probability over 4 draws per cell, for a small
unit (144 weights, the demo's first conv) and a full one (K = 1024).
"""

import torch

from smartfrz_fast.ops.reference import predict_ref
from smartfrz_fast.predictor import load_predictor

MOVES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def deviation(kind, t, k):
    fade = torch.linspace(1, 0, t)[:, None]  # 0 at the newest snapshot
    if kind == "converging":
        return torch.randn(k)[None] * fade
    if kind == "random walk":
        steps = torch.randn(t, k)
        return (steps.flip(0).cumsum(0).flip(0) - steps[-1:]) / t ** 0.5
    return torch.randn(k)[None] * fade + 0.3 * torch.randn(t, k) * fade  # drift + noise


def main():
    torch.manual_seed(0)
    predictor = load_predictor()
    gain = float(predictor.provenance.get("input_gain", 1.0))
    sort = bool(predictor.provenance.get("sort_by_newest", False))
    weights = [w.detach() for w in predictor.flat_weights()]
    t, k = predictor.config.window, predictor.config.sample_size
    print(f"{'valid':>5} {'dynamics':<12} " + " ".join(f"{r:>6g}" for r in MOVES))
    for valid in (144, k):
        for kind in ("converging", "random walk", "drift"):
            cells = []
            for r in MOVES:
                windows = []
                for _ in range(4):
                    window = torch.randn(k)[None] + r * deviation(kind, t, k)
                    window[:, valid:] = 0
                    windows.append(window)
                history = torch.stack(windows)  # chronological: cursor 0
                prob, _ = predict_ref(history, torch.tensor(0), torch.arange(4), torch.full((4,), valid), weights,
                                      0.5, gain, sort)
                cells.append(f"{prob.mean().item():>6.2f}")
            print(f"{valid:>5} {kind:<12} " + " ".join(cells))


if __name__ == "__main__":
    main()
