"""Data sieving sampler: rotation rule, determinism, coverage, resume, composition with freezing."""

import numpy as np
import pytest
import torch
from torch import nn

from smartfrz_fast import FreezeOut, SievingSampler, SmartFreezer

from models import SmallCNN


def epoch_ids(sampler, loss_of=None):
    ids = list(iter(sampler))
    if loss_of is not None:
        sampler.record(torch.tensor(ids), torch.tensor([loss_of(i) for i in ids], dtype=torch.float32))
    return ids


def test_swaps_the_easiest_for_the_pool_front():
    s = SievingSampler(10, active_fraction=0.6, swap_fraction=0.34, seed=3)
    active, pool = list(s.active), list(s.pool)
    assert len(active) == 6 and s.num_swap == 2 and sorted(active + pool) == list(range(10))
    ids = epoch_ids(s, loss_of=lambda i: float(i))  # loss = id: the smallest ids are easiest
    assert sorted(ids) == sorted(active)
    epoch_ids(s)  # epoch 2 starts with a rotation
    easiest = sorted(active)[:2]
    assert set(easiest).isdisjoint(s.active) and set(pool[:2]) <= set(s.active)
    assert s.pool == pool[2:] + easiest
    # an unseen sample (no loss recorded) is never the one sieved out
    s2 = SievingSampler(10, active_fraction=0.6, swap_fraction=0.34, seed=3)
    s2.record(torch.tensor(s2.active[:4]), torch.zeros(4))
    assert set(s2.rotate()) <= set(s2.active[:4]) | set(s2.pool)


def test_a_look_at_the_loader_before_training_sieves_out_no_unseen_sample():
    # next(iter(loader)) for example inputs started an epoch: the first training epoch then
    # rotated with no loss recorded and sieved out the lowest ids unseen
    s = SievingSampler(20, active_fraction=0.8, swap_fraction=0.25, seed=0)
    active = list(s.active)
    next(iter(s))
    assert sorted(epoch_ids(s, loss_of=float)) == sorted(active) and s.rotations == 0
    epoch_ids(s)  # rotates now, on the losses of the epoch that trained
    assert s.rotations == 1 and set(s.pool[-s.num_swap:]) <= set(active)


def test_a_small_active_set_still_visits_every_sample():
    # round(0.2 * 2 active) = 0 samples per rotation: the pool was never visited
    s = SievingSampler(10, active_fraction=0.25, swap_fraction=0.2, seed=0)
    assert s.num_swap == 1
    seen = set()
    for _ in range(20):
        seen |= set(epoch_ids(s, loss_of=float))
    assert seen == set(range(10))
    assert SievingSampler(10, active_fraction=0.25, swap_fraction=0.0).num_swap == 0


def test_deterministic_under_seed_and_covers_every_sample():
    def run(seed, epochs=12):
        s = SievingSampler(50, active_fraction=0.5, swap_fraction=0.3, seed=seed)
        return [epoch_ids(s, loss_of=lambda i: float((i * 7) % 11)) for _ in range(epochs)]

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    # pool 25, swap 8 per rotation: every held-back sample is active within 4 rotations
    assert set().union(*map(set, a[:5])) == set(range(50))


def test_state_dict_resumes_the_rotation():
    loss = lambda i: float((i * 13) % 17)  # noqa: E731
    s = SievingSampler(40, active_fraction=0.5, swap_fraction=0.25, interval=2, seed=5, momentum=0.5)
    full = [epoch_ids(s, loss) for _ in range(9)]
    s1 = SievingSampler(40, active_fraction=0.5, swap_fraction=0.25, interval=2, seed=5, momentum=0.5)
    head = [epoch_ids(s1, loss) for _ in range(5)]
    state = s1.state_dict()
    s2 = SievingSampler(40, active_fraction=0.5, swap_fraction=0.25, interval=2, seed=5, momentum=0.5)
    s2.load_state_dict(state)
    tail = [epoch_ids(s2, loss) for _ in range(4)]
    assert head + tail == full
    with pytest.raises(ValueError, match="seed"):
        SievingSampler(40, seed=6).load_state_dict(state)
    # the same settings computed otherwise (0.1 + 0.4) or given as numpy scalars are the same run,
    # and the state holds Python numbers (torch.load(weights_only=True) refuses numpy ones)
    SievingSampler(40, active_fraction=0.1 + 0.4, swap_fraction=np.float32(0.25), interval=2, seed=5,
                   momentum=np.float64(0.5)).load_state_dict(state)
    assert all(type(state[k]) is float for k in ("active_fraction", "swap_fraction", "momentum"))
    # settings that change the rotation are named, not resumed into another run
    for key, other in (("active_fraction", 0.6), ("swap_fraction", 0.5), ("momentum", 0.0)):
        settings = dict(active_fraction=0.5, swap_fraction=0.25, interval=2, seed=5, momentum=0.5)
        settings[key] = other
        with pytest.raises(ValueError, match=key):
            SievingSampler(40, **settings).load_state_dict(state)


def test_bad_arguments():
    with pytest.raises(ValueError, match="active_fraction"):
        SievingSampler(10, active_fraction=0.0)
    with pytest.raises(ValueError, match="interval"):
        SievingSampler(10, interval=0)
    s = SievingSampler(10)
    with pytest.raises(ValueError, match="reduction='none'"):
        s.record(torch.arange(4), torch.zeros(()))


def test_composes_with_a_dataloader_and_freezing():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    ids = torch.arange(64)
    data = torch.utils.data.TensorDataset(x, y, ids)  # the index is the sample id
    sampler = SievingSampler(64, active_fraction=0.5, swap_fraction=0.25, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    epochs = 6
    freezer = SmartFreezer(model, opt, policy=FreezeOut(t0=0.5), example_inputs=x[:2],
                           total_steps=epochs * len(loader))
    seen = set()
    for _ in range(epochs):
        for xb, yb, idb in loader:
            losses = nn.functional.cross_entropy(model(xb), yb, reduction="none")
            losses.mean().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
            sampler.record(idb, losses)
            seen.update(idb.tolist())
    assert freezer.num_frozen > 0 and sampler.rotations == epochs - 1
    assert len(loader) == 4 and seen == set(range(64))
