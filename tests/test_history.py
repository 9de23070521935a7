"""The weight-history ring buffer: positions, masking, snapshots, wraparound."""

import copy

import pytest
import torch
from torch import nn

from smartfrz_fast.history import WeightHistory
from smartfrz_fast.units import discover_units


def make_units(channels_last=False):
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 5))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.add_module("tiny", nn.Linear(5, 2))
    return model, discover_units(model, (torch.randn(2, 3, 6, 6),)).units


def test_positions_are_seeded_distinct_and_masked_for_small_units():
    _, units = make_units()
    a = WeightHistory(units, sample_size=64, window=4, seed=3)
    b = WeightHistory(units, sample_size=64, window=4, seed=3)
    c = WeightHistory(units, sample_size=64, window=4, seed=4)
    assert torch.equal(a.offsets, b.offsets) and torch.equal(a.source_ids, b.source_ids)
    assert not torch.equal(a.offsets, c.offsets)
    sizes = [u.num_params for u in units]
    assert a.valid.tolist() == [min(64, n) for n in sizes]
    tiny = len(units) - 1
    assert sizes[tiny] == 12 and (a.source_ids[tiny, 12:] == -1).all()
    for row in range(len(units)):
        pairs = set(zip(a.source_ids[row, : a.valid[row]].tolist(), a.offsets[row, : a.valid[row]].tolist()))
        assert len(pairs) == int(a.valid[row]), "positions must be distinct"


def test_snapshot_reads_the_right_weights_even_for_channels_last_parameters():
    model, units = make_units()
    contiguous = WeightHistory(units, sample_size=32, window=3, seed=0)
    contiguous.snapshot()
    for row, unit in enumerate(units):
        flat = torch.cat([p.detach().reshape(-1) for p in unit.parameters])
        got = contiguous.history[row, 0, : contiguous.valid[row]]
        assert torch.isin(got, flat).all(), "every sampled value is one of the unit's weights"
        assert (contiguous.history[row, 0, contiguous.valid[row]:] == 0).all(), "masked tail is 0"
    # The same weights stored channels_last: other storage offsets, same logical positions.
    strided = copy.deepcopy(model).to(memory_format=torch.channels_last)
    strided_units = discover_units(strided, (torch.randn(2, 3, 6, 6),)).units
    assert not strided_units[0].parameters[0].is_contiguous()
    other = WeightHistory(strided_units, sample_size=32, window=3, seed=0)
    assert not torch.equal(other.offsets, contiguous.offsets)
    other.snapshot()
    assert torch.equal(other.history, contiguous.history)


def test_a_layout_changed_in_place_after_set_up_is_followed():
    # model.to(memory_format=...) after set-up keeps the Parameter objects and calls no hook:
    # the history must go on sampling the same weights, and its positions digest stay the same
    model, units = make_units()
    history = WeightHistory(units, sample_size=32, window=3, seed=0)
    digest = history.positions_digest()
    history.snapshot()
    conv = units[0].parameters[0]
    model.to(memory_format=torch.channels_last)
    assert units[0].parameters[0] is conv and not conv.is_contiguous()
    history.snapshot()
    assert torch.equal(history.history[:, 1], history.history[:, 0])
    assert history.positions_digest() == digest
    fresh = WeightHistory(units, sample_size=32, window=3, seed=0)  # drawn on the new layout
    assert torch.equal(fresh.offsets, history.offsets) and fresh.positions_digest() == digest


def test_a_parameter_resized_in_place_after_set_up_is_a_clear_error():
    # p.data = smaller keeps the Parameter object and calls no hook: the Triton gather read past
    # its end (garbage such as -1.8e38), the others failed with an index error naming no cause
    model, units = make_units()
    history = WeightHistory(units, sample_size=32, window=3, seed=0)
    history.snapshot()
    before = history.history.clone()
    weight = units[0].parameters[0]
    weight.data = weight.data[:1].clone()
    with pytest.raises(RuntimeError, match=rf"{units[0].param_names[0]} changed shape in place"):
        history.snapshot()
    assert torch.equal(history.history, before) and history.count == 1


def test_ring_wraps_and_frozen_rows_stop_updating():
    model, units = make_units()
    history = WeightHistory(units, sample_size=8, window=3, seed=0)
    for i in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(i))
        if i == 3:
            history.drop_leading(1)
        history.snapshot()
    assert history.count == 5 and int(history.cursor) == 5 and history.full
    # row 0 froze before snapshot 3: its slots keep snapshots 0, 1, 2
    valid0 = int(history.valid[0])
    assert history.history[0, :, :valid0].unique().tolist() == [0.0, 1.0, 2.0]
    # row 1 kept going: slots (0,1,2) hold snapshots 3, 4, 2
    valid1 = int(history.valid[1])
    assert [history.history[1, t, :valid1].unique().item() for t in range(3)] == [3.0, 4.0, 2.0]
