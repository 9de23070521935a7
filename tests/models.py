"""Small models shared by the tests."""

import gc
import warnings
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


def freezer_step_with_a_glitch(freezer, weight, value) -> None:
    """``freezer.step()`` with ``weight[0, 0] = value`` while it runs (its snapshot or evaluation
    sees it), put right after: an overflow rolled back."""
    good = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = value
    freezer.step()
    with torch.no_grad():
        weight.copy_(good)


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


def train_on_batches(make_model, inputs_of, targets, batches, frozen: int, lr: float = 0.1, cache_args=None):
    """A fresh ``make_model()`` (seed 0) trained by SGD on ``batches`` of sample ids (inputs
    ``inputs_of(ids)``: a tensor, or a tuple of positional inputs), cross-entropy on ``targets``,
    its first ``frozen`` units frozen at step 1; through an activation cache made with
    ``cache_args`` where given. Returns (model, cache, losses)."""
    from smartfrz_fast import SmartFreezer, StaticFreeze
    from smartfrz_fast.cache import ActivationCache

    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    freezer = SmartFreezer(model, optimizer, StaticFreeze(frozen, at_step=1), example_inputs=inputs_of(batches[0]),
                           total_steps=len(batches))
    cache = None if cache_args is None else ActivationCache(
        freezer, num_samples=len(targets), deterministic=True, **cache_args)
    forward = cache.wrap() if cache is not None else None
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ids in batches:
            inputs = inputs_of(ids)
            if cache is not None:
                out = forward(inputs, ids)
            else:
                out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            loss = nn.functional.cross_entropy(out, targets[ids])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            freezer.step()
            losses.append(loss.item())
    return model, cache, losses


def with_and_without_cache(make_model, inputs_of, targets, batches, frozen: int, lr: float = 0.1,
                           tolerance: float = 0.0, **cache_args):
    """``train_on_batches`` without and with the activation cache; checks that the weights agree
    within ``tolerance`` (and, at 0, the losses exactly). Returns (model without, model with, cache)."""
    (plain, _, plain_losses), (model, cache, losses) = (
        train_on_batches(make_model, inputs_of, targets, batches, frozen, lr, args) for args in (None, cache_args))
    if tolerance == 0:
        assert losses == plain_losses
    for a, b in zip(plain.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)
    return plain, model, cache


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
