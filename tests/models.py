"""Small models shared by the tests."""

import gc
from contextlib import contextmanager

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Four units: conv+bn, conv+bn, conv+bn, linear head."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean((2, 3)))


def batch(step: int, size: int = 16, classes: int = 10):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, classes, (size,), generator=g)


def train_steps(model, optimizer, freezer, steps: int, start: int = 0) -> None:
    """``steps`` plain SGD steps on ``batch(start) .. batch(start + steps - 1)``, the freezer
    stepped after each optimizer step: the training loop most engine tests need."""
    for step in range(start, start + steps):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        freezer.step()


def train_cached_steps(cached, optimizer, freezer, x, steps: int) -> None:
    """``steps`` steps of a model wrapped by an activation cache, on 16 inputs ``x`` in two
    batches of 8 in turn (sample ids 0-7, 8-15), the loss the output's sum, the freezer stepped
    after each optimizer step."""
    for step in range(steps):
        ids = torch.arange(8) + 8 * (step % 2)
        cached(x[ids], ids).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        freezer.step()


class LayerStack(nn.Module):
    """Layers run in turn by a plain module's forward (the activation cache's module-swap chain,
    not nn.Sequential's)."""

    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@contextmanager
def collector_off():
    """Python's cycle collector off (after one collection): what is freed meanwhile is freed by
    reference counting, as a dropped freezer, model or optimizer must be."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
