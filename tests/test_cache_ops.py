"""smartfrz::cache_store / cache_load: the references against independent math, and opcheck."""

import pytest
import torch

from smartfrz_fast import ops
from smartfrz_fast.ops import reference

STORAGE = [torch.float64, torch.float32, torch.bfloat16, torch.float8_e4m3fn]
VALUE_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def poisoned(capacity, d, dtype):
    data = torch.full((capacity, d), float("nan")).to(dtype)  # NaN exists in every storage dtype
    scales = torch.full((capacity,), float("nan"))
    return data, scales


def random_rows(n, d, dtype):
    # rows of very different magnitudes, some with a zero, one all zero
    values = torch.randn(n, d, dtype=torch.float64) * torch.logspace(-3, 3, n, dtype=torch.float64)[:, None]
    values[1] = 0.0
    values[2, 0] = 0.0
    return values.to(dtype)


def error_bound(values64, storage):
    """Largest |loaded - value| allowed per element, from each format's rounding."""
    mag = values64.abs()
    if storage == torch.float64:
        return torch.zeros_like(mag)
    if storage == torch.float32:
        return mag * 2.0 ** -24
    if storage == torch.bfloat16:
        return mag * 2.0 ** -8 * 1.0001  # 8 significant bits: half-ulp <= 2^-8 relative
    scale = mag.amax(1, keepdim=True) / 448.0
    # e4m3: 3 mantissa bits (half-ulp 2^-4 relative); below 2^-6 (subnormal) the step is 2^-9
    return mag * 2.0 ** -4 + scale * 2.0 ** -10 + mag * 2.0 ** -20


@pytest.mark.parametrize("storage", STORAGE, ids=str)
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES, ids=str)
def test_store_load_roundtrip(storage, value_dtype, fresh_seed):
    n, d, capacity = 7, 13, 11
    values = random_rows(n, d, value_dtype)
    slots = torch.randperm(capacity)[:n]
    data, scales = poisoned(capacity, d, storage)
    ops.cache_store(values, slots, data, scales)
    untouched = torch.ones(capacity, dtype=torch.bool)
    untouched[slots] = False
    assert torch.isnan(data[untouched].float()).all(), f"seed {fresh_seed}: rows outside slots written"
    assert torch.isnan(scales[untouched]).all(), f"seed {fresh_seed}"
    for out_dtype in (torch.float64, torch.float32, torch.bfloat16):
        loaded = ops.cache_load(data, scales, slots, out_dtype)
        assert loaded.dtype == out_dtype and loaded.shape == (n, d)
        v64 = values.double()
        bound = error_bound(v64, storage)
        if out_dtype == torch.bfloat16:
            bound = bound + (v64.abs() + bound) * 2.0 ** -8 * 1.0001
        elif out_dtype == torch.float32 and storage == torch.float64:
            bound = bound + v64.abs() * 2.0 ** -24
        err = (loaded.double() - v64).abs()
        assert (err <= bound).all(), f"seed {fresh_seed}: max excess {(err - bound).max().item()}"
    assert (ops.cache_load(data, scales, slots[1:2], torch.float32) == 0).all(), "a zero row stays zero"


def test_fp8_scale_maps_row_max_to_448(fresh_seed):
    values = random_rows(5, 9, torch.float32)
    data, scales = poisoned(5, 9, torch.float8_e4m3fn)
    ops.cache_store(values, torch.arange(5), data, scales)
    amax = values.abs().amax(1)
    expected = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    torch.testing.assert_close(scales, expected, rtol=0, atol=0)
    peak = data.float().abs().amax(1)
    assert (peak[amax > 0] == 448.0).all()
    loaded = ops.cache_load(data, scales, torch.arange(5), torch.float32)
    torch.testing.assert_close(loaded.abs().amax(1), amax, rtol=1e-6, atol=0)


@pytest.mark.parametrize("storage", STORAGE, ids=str)
def test_nonfinite_rows_load_as_nan(storage):
    values = torch.randn(3, 6)
    values[0, 2] = float("inf")
    values[1, 4] = float("nan")
    data, scales = poisoned(3, 6, storage)
    ops.cache_store(values, torch.arange(3), data, scales)
    loaded = ops.cache_load(data, scales, torch.arange(3), torch.float32)
    assert not torch.isfinite(loaded[1]).all() and not torch.isfinite(loaded[0]).all()
    if storage == torch.float8_e4m3fn:  # no inf in e4m3: the whole row becomes NaN, never finite
        assert torch.isnan(loaded[0]).all()
    assert torch.isfinite(loaded[2]).all()


def test_reference_matches_independent_fp8_rounding(fresh_seed):
    """Per element, the fp8 reference picks the nearest representable e4m3 value times the scale."""
    values = random_rows(4, 17, torch.float64)
    data, scales = poisoned(4, 17, torch.float8_e4m3fn)
    ops.cache_store(values, torch.arange(4), data, scales)
    # every finite e4m3 value, from its 256 bit patterns
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    grid = torch.unique(grid[torch.isfinite(grid)])
    for r in range(4):
        x = (values[r].float() / scales[r]).double()
        nearest_dist = (x[:, None] - grid[None, :]).abs().min(1).values
        got = data[r].double()
        assert torch.equal((x - got).abs(), nearest_dist), f"seed {fresh_seed}: row {r} not nearest"


@pytest.mark.parametrize("storage", STORAGE, ids=str)
def test_opcheck_cache_ops(storage, fresh_seed):
    data, scales = poisoned(9, 5, storage)
    data.zero_()
    scales.fill_(1.0)
    values = torch.randn(4, 5)
    slots = torch.tensor([8, 0, 3, 5])
    utils = torch.library._OPCHECK_DEFAULT_UTILS
    if storage == torch.float8_e4m3fn:
        # opcheck's schema checker multiplies the mutated tensors, which fp8 cannot do on the
        # CPU ("mul_cpu_reduced_float" not implemented); the other checks run on fp8 as usual.
        utils = tuple(u for u in utils if u != "test_schema")
    torch.library.opcheck(ops.cache_store, (values, slots, data, scales), test_utils=utils)
    torch.library.opcheck(ops.cache_load, (data, scales, slots, torch.float32), test_utils=utils)


def test_ops_registered():
    assert {"cache_store", "cache_load"} <= set(ops.OPS)
    assert ops.backends()["cache_load"]["cpu"] == "reference (PyTorch)"
    assert reference.FP8_MAX == float(torch.finfo(torch.float8_e4m3fn).max)
