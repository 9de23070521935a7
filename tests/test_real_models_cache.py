"""The activation cache on real architectures built from their libraries' configs
(tests/real_models.py): about half the units frozen, the same batches per sample id every
epoch. The cache turns on or says precisely why not; training with it gives the loss and
weights of freezing without it; its audits raise no false alarm."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from models import LayerStack
from real_models import ALL_MODELS, BATCH, MORE_MODELS, build
from smartfrz_fast import SmartFreezer
from smartfrz_fast.cache import ActivationCache
from smartfrz_fast.policy import StaticFreeze

STEPS = 6  # 2 batches of BATCH samples: an epoch every 2 steps, so rows hit and audits run
FREEZE_AT = 1
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32; rows computed on a subset of a batch may round differently


def _freeze_half(freezer) -> None:
    freezer.freeze_to(len(freezer.units) // 2)


def _train(name: str, cache_on: bool, freeze=_freeze_half, **freezer_options):
    real = build(name)
    model = real.model
    args, kwargs = real.batch(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied-weight notices: another test's subject
        freezer = SmartFreezer(model, optimizer, policy=StaticFreeze(0), example_inputs=args, example_kwargs=kwargs,
                               **freezer_options)
    cache = ActivationCache(freezer, num_samples=2 * BATCH, deterministic=True, audit_rows=2) if cache_on else None
    run = cache.wrap() if cache_on else model
    model.train()
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            if step == FREEZE_AT:
                freeze(freezer)
            args, kwargs = real.batch(step % 2)
            ids = torch.arange(BATCH) + BATCH * (step % 2)
            out = run(args, ids, **kwargs) if cache_on else model(*args, **kwargs)
            loss = real.loss(out, step % 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            freezer.step()
            losses.append(float(loss))
    messages = [str(w.message) for w in caught if "ActivationCache" in str(w.message)]
    return model, freezer, cache, losses, messages


def _assert_same_training(name, plain, plain_losses, cached, losses):
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), **TOL)
    for (n, a), b in zip(cached.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, **TOL, msg=f"{name}: {n}")


@pytest.mark.parametrize("name", ALL_MODELS + MORE_MODELS)
def test_cache_on_real_model(name):
    plain, freezer, _, plain_losses, _ = _train(name, cache_on=False)
    cached, freezer_c, cache, losses, messages = _train(name, cache_on=True)
    assert freezer.num_frozen == freezer_c.num_frozen
    text = cache.describe()
    assert not messages, (text, messages)  # no audit alarm, no failure
    assert cache.enabled, text
    if cache.active:
        assert cache.stats["hits"] > 0 and cache.stats["audited"] > 0, text
        assert "nothing cached" not in text and cache.reason is None
    else:  # a precise reason a user can act on, never "on" with nothing cached and no reason
        assert cache.reason and "nothing cached" in text, text
        if freezer_c.num_frozen:
            assert "keeps training" in cache.reason or "output" in cache.reason, text
        else:
            assert "nothing is frozen" in cache.reason, text
    _assert_same_training(name, plain, plain_losses, cached, losses)


@pytest.mark.parametrize("name", ["gpt2_tied", "llama_tied", "t5"])
def test_tied_models_cache_with_the_shared_weight_frozen(name):
    plain, _, _, plain_losses, _ = _train(name, cache_on=False, shared_parameters="freeze")
    cached, _, cache, losses, messages = _train(name, cache_on=True, shared_parameters="freeze")
    text = cache.describe()
    assert cache.active and cache.stats["hits"] > 0 and not messages, (text, messages)
    _assert_same_training(name, plain, plain_losses, cached, losses)


@pytest.mark.parametrize("name", ["gpt2_tied", "llama_tied"])
def test_tied_weight_that_keeps_training_is_named(name):
    cached, _, cache, _, messages = _train(name, cache_on=True)  # shared_parameters="train"
    text = cache.describe()
    assert not cache.active and cache.enabled and not messages, text
    assert "keeps training" in cache.reason and "lm_head.weight" in cache.reason, text
    assert text.startswith("activation cache on, nothing cached") and cache.reason in text


class _Scaled(nn.Module):
    """A block that reads a parameter only once one is added (as a user editing a model would)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        out = torch.tanh(self.linear(x))
        scale = getattr(self, "scale", None)
        return out if scale is None else out * scale


def _sequential_with_cache():
    model = nn.Sequential(_Scaled(6), _Scaled(6), _Scaled(6), nn.Linear(6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 6)
    freezer = SmartFreezer(model, optimizer, policy=StaticFreeze(0), example_inputs=x)
    freezer.freeze_to(2)
    cache = ActivationCache(freezer, num_samples=8, deterministic=True)
    run = cache.wrap()
    for _ in range(2):  # fill, then hit
        run(x, torch.arange(8)).sum().backward()
    assert cache.active and cache.stats["hits"] == 8
    return model, cache, run, x


def test_block_appended_after_set_up_is_run():
    model, cache, run, x = _sequential_with_cache()
    model.append(nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="changed since the cache was set up"):
        out = run(x, torch.arange(8))
    assert out.shape == (8, 2)
    torch.testing.assert_close(out, model(x))
    assert cache.active and len(cache.chain) == 5


def test_parameter_added_inside_a_cached_block_trains():
    model, cache, run, x = _sequential_with_cache()
    model[1].scale = nn.Parameter(torch.full((6,), 2.0))  # inside the cached prefix, trainable
    with pytest.warns(UserWarning, match="changed since the cache was set up"):
        out = run(x, torch.arange(8))
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    assert model[1].scale.grad is not None and model[1].scale.grad.abs().sum() > 0
    assert cache.boundary <= 1  # the cut stops before the trainable parameter


class _Noisy(nn.Module):
    """A random op that eval mode does not turn off (a user's own noise layer), once ``on``."""

    on = False

    def forward(self, x):
        return x + 0.1 * torch.randn_like(x) if self.on else x


def _noisy_run():
    noisy = _Noisy()
    model = nn.Sequential(nn.Linear(6, 6), noisy, nn.Linear(6, 6), nn.Linear(6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 6)  # the same input every step
    freezer = SmartFreezer(model, optimizer, policy=StaticFreeze(0), example_inputs=x)
    freezer.freeze_to(2)
    cache = ActivationCache(freezer, num_samples=8, deterministic=True, audit_rows=2)
    return noisy, cache, cache.wrap(), x


def test_audit_blames_a_nondeterministic_prefix_not_the_data():
    noisy, cache, run, x = _noisy_run()
    run(x, torch.arange(8)).sum().backward()  # the chain is checked and rows stored: deterministic so far
    noisy.on = True
    with pytest.warns(UserWarning, match="frozen prefix is not deterministic") as caught:
        for _ in range(2):
            run(x, torch.arange(8)).sum().backward()
    assert not cache.enabled and "not deterministic" in cache.reason
    assert not any("augmentation" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_a_model_random_in_eval_is_cut_before_the_draw_and_told_why():
    """Until 2026-12-07 the set-up's eval passes drew apart and nothing was cached, with "not
    deterministic in eval mode"; they draw alike now, and the cut stops before the draw."""
    noisy, cache, run, x = _noisy_run()
    noisy.on = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):  # a miss, then hits
            torch.manual_seed(seed)
            got = run(x, torch.arange(8))
            torch.manual_seed(seed)
            torch.testing.assert_close(got, cache.freezer.model(x))
    assert cache.boundary == 1 and cache.stats["hits"] == 16, cache.describe()
    assert "up to 2 is drawn at random" in cache.describe(), cache.describe()
    assert not any("augmentation" in str(w.message) for w in caught)


class _CountingNorm(nn.Module):
    """Writes its buffer in every forward, eval mode too (no ``self.training`` guard)."""

    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.register_buffer("mean", torch.zeros(width))

    def forward(self, x):
        with torch.no_grad():
            self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return self.lin(x - self.mean)


@pytest.mark.parametrize("container", [nn.Sequential, LayerStack])
def test_a_buffer_written_in_eval_mode_is_named_as_the_cause(container):
    model = container(_CountingNorm(6), _CountingNorm(6), nn.Linear(6, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 6)
    freezer = SmartFreezer(model, optimizer, policy=StaticFreeze(0), example_inputs=x)
    freezer.freeze_to(2)
    cache = ActivationCache(freezer, num_samples=8, deterministic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache.wrap()(x, torch.arange(8)).sum().backward()
    assert not cache.active
    assert "writes buffers" in cache.describe() and ".mean" in cache.describe(), cache.describe()
    assert "random op" not in cache.describe(), cache.describe()
