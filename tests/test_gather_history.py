"""The compiled gather_history kernels against the reference (reference.gather_history_ref).

The C++ kernel is a copy, so results must be bitwise equal (NaN payloads aside, see bits()),
on fresh random inputs each run:
the seed is printed in every failure message (set SMARTFRZ_TEST_SEED to replay one).
Skips when the extension is not built, unless SMARTFRZ_REQUIRE_EXT=1, where that fails.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable, List

import pytest
import torch

from smartfrz_fast.ops import reference

REQUIRE_EXT = os.environ.get("SMARTFRZ_REQUIRE_EXT") == "1"
HAS_GPU = torch.cuda.is_available()


def _status():
    from smartfrz_fast.ops._extension import extension_status

    return extension_status()


@pytest.fixture(scope="module")
def ext_status():
    status = _status()
    if not status.loaded:
        if REQUIRE_EXT:
            pytest.fail(f"SMARTFRZ_REQUIRE_EXT=1 but smartfrz_fast._C is not loaded: {status.reason}")
        pytest.skip(f"smartfrz_fast._C is not built/loaded: {status.reason}")
    assert hasattr(torch.ops.smartfrz_ext, "gather_history")
    return status


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, ext_status):
    if request.param == "cuda":
        if not HAS_GPU:
            pytest.skip("no CUDA GPU visible")
        if not ext_status.has_cuda:
            if REQUIRE_EXT and os.environ.get("SMARTFRZ_BUILD_CUDA", "auto") != "0":
                pytest.fail("a GPU is visible but smartfrz_fast._C was built without CUDA kernels "
                            f"(build_info: {ext_status.build_info})")
            pytest.skip("smartfrz_fast._C was built without CUDA kernels")
    return torch.device(request.param)


def fresh_seed() -> int:
    if os.environ.get("SMARTFRZ_TEST_SEED"):
        return int(os.environ["SMARTFRZ_TEST_SEED"])
    return random.SystemRandom().randrange(2**31)


# --------------------------------------------------------------------------------------------
# Random cases


# (name, dtype, base shape, view of the base): every layout a parameter can have in practice.
SOURCE_KINDS: List[tuple] = [
    ("fp32 contiguous", torch.float32, (11, 13), lambda t: t),
    ("fp16 transposed", torch.float16, (9, 17), lambda t: t.t()),
    ("bf16 sliced, storage offset", torch.bfloat16, (20, 30), lambda t: t[3:15, 5:25:2]),
    ("fp64 channels_last conv", torch.float64, (8, 3, 3, 5),
     lambda t: t.contiguous(memory_format=torch.channels_last)),
    ("fp32 strided 1-D", torch.float32, (50,), lambda t: t[7::3]),
    ("bf16 permuted 3-D", torch.bfloat16, (4, 5, 6), lambda t: t.permute(2, 0, 1)),
    ("fp16 column", torch.float16, (6, 10), lambda t: t[:, 4]),
]


@dataclass
class Case:
    seed: int
    sources: List[torch.Tensor]
    source_ids: torch.Tensor
    offsets: torch.Tensor
    rows: torch.Tensor
    cursor: torch.Tensor
    history: torch.Tensor  # poisoned with NaN

    def args(self, history=None):
        return (self.sources, self.source_ids, self.offsets, self.rows, self.cursor,
                self.history if history is None else history)


def _with_specials(base: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Sprinkle values whose conversion to float32 is delicate: +-0, inf, nan, huge, tiny."""
    flat = base.view(-1)
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-6, 65504.0, -3.0e38]
    if base.dtype == torch.float64:
        specials += [1e300, -1e300, 1e-300, 1.0 + 2.0**-30]
    for value in specials:
        flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = value
    return base


# Layouts that clone() keeps (dense, only permuted): opcheck clones its inputs, and an offset
# into a sliced source means nothing in its (compacted) clone.
DENSE_KINDS = [kind for kind in SOURCE_KINDS if "transposed" in kind[0] or "channels_last" in kind[0]
               or "permuted" in kind[0] or "contiguous" in kind[0]]


def make_case(device, seed: int, num_units: int = 7, k: int = 37, num_slots: int = 5,
              requires_grad: bool = False, kinds=SOURCE_KINDS) -> Case:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    sources = []
    for _, dtype, shape, view in kinds:
        base = _with_specials((torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype), gen)
        base = base.to(device)  # contiguous base: the view below is taken on the device
        source = view(base)
        if requires_grad:
            source.requires_grad_()  # like an nn.Parameter
        sources.append(source)
    rng.shuffle(sources)

    ids = torch.full((num_units, k), -1, dtype=torch.int32)
    offsets = torch.randint(-(10**9), 10**9, (num_units, k), generator=gen)  # junk where masked
    for unit in range(num_units):
        valid = rng.choice([0, k, rng.randrange(1, k) if k > 1 else k])  # empty, full or partial units
        for j in range(valid):
            if rng.random() < 0.05:
                continue  # an occasional masked position among the valid ones
            sid = rng.randrange(len(sources))
            src = sources[sid]
            index = [rng.randrange(size) for size in src.shape]
            ids[unit, j] = sid
            offsets[unit, j] = sum(i * s for i, s in zip(index, src.stride()))
    num_rows = rng.randrange(1, num_units)  # a proper subset, in random order
    rows = torch.tensor(rng.sample(range(num_units), num_rows), dtype=torch.int64)
    cursor = torch.tensor(rng.randrange(num_slots, 7 * num_slots), dtype=torch.int64)  # wraps around
    history = torch.full((num_units, num_slots, k), float("nan"), dtype=torch.float32)
    return Case(seed, sources, ids.to(device), offsets.to(device), rows.to(device), cursor.to(device),
                history.to(device))


def bits(t: torch.Tensor) -> torch.Tensor:
    """float32 bits with every NaN canonicalised: torch itself converts a float16 NaN to
    0x7fc00000 or 0x7fffffff depending on the code path (vectorised or scalar tail), so NaN
    payloads are no part of the contract; everything else (signed zeros, infs, rounding of
    float64) must be bitwise equal."""
    t = t.detach().cpu().contiguous()
    out = t.view(torch.int32).clone()
    out[t.isnan()] = 0x7FC00000
    return out


def check_against_reference(case: Case, run: Callable[..., None], what: str) -> None:
    expected = case.history.clone()
    reference.gather_history_ref(*case.args(expected))
    actual = case.history.clone()
    run(*case.args(actual))
    msg = f"{what}: seed={case.seed} (replay with SMARTFRZ_TEST_SEED={case.seed})"
    mismatch = (bits(actual) != bits(expected))
    assert not bool(mismatch.any()), f"{msg}: {int(mismatch.sum())} elements differ at {mismatch.nonzero()[:5].tolist()}"

    # The poison is intact outside the gathered rows and outside the slot (also covered by the
    # bitwise check; spelled out for the failure message).
    slot = int(case.cursor) % case.history.shape[1]
    touched = torch.zeros(case.history.shape[:2], dtype=torch.bool)
    touched[case.rows.cpu(), slot] = True
    assert bool(actual.cpu()[~touched].isnan().all()), f"{msg}: wrote outside rows x slot"
    assert not bool(actual.cpu()[touched].isnan().all()) or case.history.shape[2] == 0, msg


# --------------------------------------------------------------------------------------------
# Tests


def test_build_info(ext_status):
    info = ext_status.build_info
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_version"], str) and (info["cuda_version"] != "") == info["cuda"]
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert "smartfrz_ext::gather_history" in info["ops"]


@pytest.mark.parametrize("repeat", range(3))
def test_ext_op_matches_reference(device, repeat):
    case = make_case(device, fresh_seed())
    check_against_reference(case, torch.ops.smartfrz_ext.gather_history, f"smartfrz_ext on {device}")


@pytest.mark.parametrize("shape", [(1, 1, 1), (13, 3, 1), (5, 2, 129), (33, 4, 8)])
def test_ext_op_odd_shapes(device, shape):
    num_units, num_slots, k = shape
    case = make_case(device, fresh_seed(), num_units=max(num_units, 2), k=k, num_slots=num_slots)
    check_against_reference(case, torch.ops.smartfrz_ext.gather_history, f"shape {shape} on {device}")


def test_public_op_dispatches_to_extension(device):
    import smartfrz_fast.ops as ops

    backend = ops.backends((device.type,))["gather_history"][device.type]
    assert not backend.startswith("reference"), backend
    case = make_case(device, fresh_seed())
    check_against_reference(case, ops.gather_history, f"smartfrz.gather_history on {device}")


def test_parameters_requiring_grad(device):
    case = make_case(device, fresh_seed(), requires_grad=True)
    with torch.no_grad():
        check_against_reference(case, torch.ops.smartfrz_ext.gather_history, "no_grad params")
    # Outside no_grad too: history is a buffer, the sources are only read.
    check_against_reference(case, torch.ops.smartfrz_ext.gather_history, "params")


def test_all_rows_and_repeated_calls(device):
    seed = fresh_seed()
    case = make_case(device, seed)
    case.rows = torch.arange(case.history.shape[0], device=device)
    expected, actual = case.history.clone(), case.history.clone()
    for step in range(2 * case.history.shape[1] + 1):  # fills every slot, wraps around
        cursor = torch.tensor(step, dtype=torch.int64, device=device)
        args = (case.sources, case.source_ids, case.offsets, case.rows, cursor)
        reference.gather_history_ref(*args, expected)
        torch.ops.smartfrz_ext.gather_history(*args, actual)
        for s in case.sources:
            s.add_(1.0)  # the next snapshot differs
    assert torch.equal(bits(actual), bits(expected)), f"seed={seed}"


def test_empty_rows_and_zero_k(device):
    case = make_case(device, fresh_seed())
    empty = case.rows[:0]
    history = case.history.clone()
    torch.ops.smartfrz_ext.gather_history(case.sources, case.source_ids, case.offsets, empty, case.cursor, history)
    assert bool(history.isnan().all())
    h0 = torch.empty(3, 2, 0, device=device)
    torch.ops.smartfrz_ext.gather_history([], torch.empty(3, 0, dtype=torch.int32, device=device),
                                          torch.empty(3, 0, dtype=torch.int64, device=device),
                                          torch.tensor([0, 2], device=device), case.cursor, h0)


@pytest.mark.gpu
def test_cuda_cursor_on_cpu(ext_status):
    if not HAS_GPU or not ext_status.has_cuda:
        pytest.skip("needs a CUDA GPU and the CUDA kernels")
    case = make_case(torch.device("cuda"), fresh_seed())
    case.cursor = case.cursor.cpu()
    check_against_reference(case, torch.ops.smartfrz_ext.gather_history, "CPU cursor, CUDA history")


# ---- bad inputs (CPU: the CUDA kernel reports data-dependent errors with a device assert) ----


def _bad(case: Case, **changes):
    args = dict(sources=case.sources, source_ids=case.source_ids, offsets=case.offsets, rows=case.rows,
                cursor=case.cursor, history=case.history.clone())
    args.update(changes)
    return args


@pytest.mark.parametrize("change, message", [
    (lambda c: dict(history=c.history.double()), "history must be float32"),
    (lambda c: dict(history=c.history.transpose(0, 1)), "history must be"),
    (lambda c: dict(history=c.history[:, :, :5].contiguous()), "source_ids must be"),
    (lambda c: dict(source_ids=c.source_ids[:, :-1].contiguous()), "source_ids must be"),
    (lambda c: dict(source_ids=c.source_ids.long()), "source_ids must be int32"),
    (lambda c: dict(source_ids=c.source_ids.t().contiguous().t()), "source_ids must be contiguous"),
    (lambda c: dict(offsets=c.offsets.int()), "offsets must be int64"),
    (lambda c: dict(offsets=c.offsets[:-1].contiguous()), "offsets must have the shape"),
    (lambda c: dict(rows=c.rows.int()), "rows must be int64"),
    (lambda c: dict(rows=torch.tensor([0, c.history.shape[0]])), "out of range"),
    (lambda c: dict(rows=torch.tensor([-1])), "out of range"),
    (lambda c: dict(cursor=torch.tensor([1, 2])), "cursor must hold one value"),
    (lambda c: dict(cursor=torch.tensor(1.0)), "cursor must be int64"),
    (lambda c: dict(sources=c.sources + [torch.zeros(3, dtype=torch.int32)]), "supported: float32"),
    (lambda c: dict(sources=c.sources[:1]), "out of range for 1 sources"),
    (lambda c: dict(offsets=torch.full_like(c.offsets, 10**6)), "out of range for sources"),
])
def test_bad_inputs_raise(ext_status, change, message):
    seed = fresh_seed()
    case = make_case(torch.device("cpu"), seed)
    case.rows = torch.arange(case.history.shape[0])  # every unit, so bad ids/offsets are reached
    case.source_ids[:, :2] = torch.tensor([0, 1], dtype=torch.int32)  # every unit reads sources 0 and 1
    case.offsets[:, :2] = 0  # ... at their first element
    with pytest.raises(RuntimeError, match=message):
        torch.ops.smartfrz_ext.gather_history(**_bad(case, **change(case)))


# ---- torch.library.opcheck: schema (mutation of history), fake/meta, autograd, AOT ----


def test_opcheck(device):
    case = make_case(device, fresh_seed(), num_units=5, k=9, num_slots=3, kinds=DENSE_KINDS)
    torch.library.opcheck(torch.ops.smartfrz_ext.gather_history.default, case.args())
    grad_case = make_case(device, fresh_seed(), num_units=5, k=9, num_slots=3, requires_grad=True,
                          kinds=DENSE_KINDS)
    torch.library.opcheck(torch.ops.smartfrz_ext.gather_history.default, grad_case.args(),
                          test_utils=("test_schema", "test_faketensor"))
