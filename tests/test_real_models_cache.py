"""The activation cache on real architectures built from their libraries' configs
(tests/real_models.py): about half the units frozen, the same batches per sample id every
epoch. The cache turns on or says precisely why not; training with it gives the loss and
weights of freezing without it; its audits raise no false alarm."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from real_models import ALL_MODELS, BATCH, build
from smartfrz_fast import SmartFreezer
from smartfrz_fast.cache import ActivationCache
from smartfrz_fast.policy import StaticFreeze

STEPS = 6  # 2 batches of BATCH samples: an epoch every 2 steps, so rows hit and audits run
FREEZE_AT = 1
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32; rows computed on a subset of a batch may round differently


def _eval_frozen_subtrees(model: nn.Module) -> None:
    """A frozen prefix is a fixed feature extractor: every module whose parameters are all
    frozen runs in eval (attention dropout and stochastic depth included), as the cache computes
    its rows. Applied in both runs, so they are compared under the same semantics."""
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def _train(name: str, cache_on: bool):
    real = build(name)
    model = real.model
    args, kwargs = real.batch(0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied-weight notices: another test's subject
        freezer = SmartFreezer(model, optimizer, policy=StaticFreeze(0), example_inputs=args, example_kwargs=kwargs)
    target = len(freezer.units) // 2
    freezer.add_freeze_listener(lambda event, units: _eval_frozen_subtrees(model))
    cache = ActivationCache(freezer, num_samples=2 * BATCH, deterministic=True, audit_rows=2) if cache_on else None
    run = cache.wrap() if cache_on else model
    model.train()
    losses, messages = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            if step == FREEZE_AT:
                freezer.freeze_to(target)
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


@pytest.mark.parametrize("name", ALL_MODELS)
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
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_losses), **TOL)
    for (n, a), b in zip(cached.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, **TOL, msg=f"{name}: {n}")
