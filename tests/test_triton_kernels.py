"""The Triton kernels (smartfrz_fast/ops/triton_kernels.py) against the references.

Fresh random inputs every run (odd sizes, every accepted dtype, poisoned outputs); the seed is
in every failure message (conftest's ``fresh_seed``).

Without a GPU the kernels run in Triton's CPU interpreter, which must be switched on before
triton is imported. .ci/run exports TRITON_INTERPRET=1; when it is unset, no GPU is visible and
triton is not imported yet, this module sets it itself, so that running this file alone just
works. If triton was already imported in compiled mode on a machine without a GPU, or
TRITON_INTERPRET is explicitly off there, collection fails loudly: nothing would run the kernels.
The AOT test compiles them for sm_75 ... sm_120 without a GPU (slow marker).
Tests on CUDA tensors (compiled kernels, CUDA graphs, host-sync checks) are marked ``gpu``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (`pip install -e '.[test]'` installs it)", allow_module_level=True)

HAS_GPU = torch.cuda.is_available()
# Before triton is imported: triton.language's own @jit helpers (tl.zeros, tl.sum, ...) are
# defined at its import, and they must be defined in interpreter mode too.
if not HAS_GPU and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from smartfrz_fast.ops import reference  # noqa: E402
from smartfrz_fast.ops import triton_kernels as tk  # noqa: E402
from smartfrz_fast.predictor import AttentionPredictor, PredictorConfig  # noqa: E402

if not HAS_GPU and not tk.INTERPRET:
    raise RuntimeError("no GPU is visible and triton (or the kernels) were imported without TRITON_INTERPRET=1: "
                       "the kernels can run nowhere. Export TRITON_INTERPRET=1 before starting pytest.")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cpu" and not tk.INTERPRET:
        pytest.skip("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
    if request.param == "cuda" and tk.INTERPRET:
        pytest.skip("compiled kernels are off under TRITON_INTERPRET=1")
    return torch.device(request.param)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Exact comparison that treats equal NaNs as equal."""
    return t.contiguous().view(torch.int32)


def test_importing_the_package_and_registry_does_not_import_triton():
    """Triton is imported at the first CUDA call, never by `import smartfrz_fast` or its ops."""
    import subprocess

    code = ("import sys, smartfrz_fast, smartfrz_fast.ops as ops; b = ops.backends(); "
            "assert 'triton' not in sys.modules, 'triton imported'; print(b['predict']['cuda'])")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SMARTFRZ_BACKEND")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    # with Triton installed, CUDA predict is registered to it (without importing it)
    assert done.stdout.strip().startswith("Triton"), done.stdout


def test_interpreter_switched_on_too_late_is_a_clear_error():
    import subprocess

    code = ("import os, triton; os.environ['TRITON_INTERPRET'] = '1'; "
            "import smartfrz_fast.ops.triton_kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0 and "set after triton had been imported" in done.stderr, done.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# gather_history

# (dtype, base shape, view): the layouts parameters have in practice
SOURCE_KINDS = [
    (torch.float32, (11, 13), lambda t: t),
    (torch.float16, (9, 17), lambda t: t.t()),
    (torch.bfloat16, (20, 30), lambda t: t[3:15, 5:25:2]),
    (torch.float64, (8, 3, 3, 5), lambda t: t.contiguous(memory_format=torch.channels_last)),
    (torch.float32, (50,), lambda t: t[7::3]),
    (torch.bfloat16, (4, 5, 6), lambda t: t.permute(2, 0, 1)),
    (torch.float16, (6, 10), lambda t: t[:, 4]),
]


def random_gather_case(device, g):
    def rint(lo, hi):
        return int(torch.randint(lo, hi, (), generator=g))

    sources = [view(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)).to(device)
               for dtype, shape, view in SOURCE_KINDS]
    num_units, window, k = rint(3, 10), rint(2, 8), rint(5, 300)
    source_ids = torch.randint(0, len(sources), (num_units, k), generator=g, dtype=torch.int32)
    offsets = torch.empty(num_units, k, dtype=torch.int64)
    spans = [reference._strided_span(s).numel() for s in sources]
    for s, span in enumerate(spans):  # a random element of each source's addressable span
        hit = source_ids == s
        offsets[hit] = torch.randint(0, span, (int(hit.sum()),), generator=g)
    small = rint(0, num_units)
    source_ids[small, rint(1, k):] = -1  # a unit with fewer than K weights
    source_ids[(small + 1) % num_units, rint(0, k)] = len(sources) + 3  # a stray id reads 0
    rows = torch.randperm(num_units, generator=g)[:rint(1, num_units + 1)]  # any order
    cursor = torch.tensor(rint(-7, 100))
    history = torch.full((num_units, window, k), float("nan"))
    return [sources, source_ids.to(device), offsets.to(device), rows.to(device), cursor.to(device),
            history.to(device)]


@pytest.mark.parametrize("block_k", [16, 1024])
@pytest.mark.parametrize("repeat", range(3))
def test_gather_matches_reference(device, fresh_seed, block_k, repeat):
    g = torch.Generator().manual_seed(fresh_seed)
    sources, source_ids, offsets, rows, cursor, history = random_gather_case(device, g)
    expected = history.cpu().clone()
    reference.gather_history_ref([s.cpu() for s in sources], source_ids.cpu(), offsets.cpu(), rows.cpu(),
                                 cursor.cpu(), expected)
    tk.gather_history(sources, source_ids, offsets, rows, cursor, history, block_k=block_k)
    # exact: a gather copies (fp16/bf16 -> fp32 is exact, fp64 -> fp32 rounds to nearest in both),
    # and the NaN poison outside the written slot stays untouched
    assert torch.equal(bits(history.cpu()), bits(expected)), f"seed {fresh_seed}, shape {tuple(history.shape)}"


def test_gather_real_model_history(device, fresh_seed):
    """A real WeightHistory (SmallCNN units, K=1024, masked small units) snapshotted by the kernel."""
    from smartfrz_fast.history import WeightHistory
    from smartfrz_fast.units import discover_units
    from models import SmallCNN, batch

    model = SmallCNN(width=24).to(device)
    plan = discover_units(model, (batch(0)[0].to(device),))
    wh = WeightHistory(plan.units, sample_size=1024, window=5, seed=fresh_seed % 1000)
    assert (wh.valid < 1024).any() and (wh.valid == 1024).any()  # both kinds of units
    expected = torch.full_like(wh.history, float("nan")).cpu()
    wh.history.fill_(float("nan"))
    for step in range(6):  # the ring wraps
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        wh.drop_leading(min(step // 3, len(wh.units) - 1))
        tk.gather_history(wh.sources, wh.source_ids, wh.offsets, wh.rows, wh.cursor, wh.history)
        reference.gather_history_ref([s.detach().cpu() for s in wh.sources], wh.source_ids.cpu(),
                                     wh.offsets.cpu(), wh.rows.cpu(), wh.cursor.cpu(), expected)
        wh.cursor.add_(1)
        assert torch.equal(bits(wh.history.cpu()), bits(expected)), f"seed {fresh_seed}, step {step}"


def test_gather_reads_current_storage(device):
    """The cached pointer table holds addresses: in-place updates and new tensors are both seen."""
    a = torch.arange(10.0, device=device)
    b = torch.arange(100.0, 120.0, device=device).half()
    ids = torch.tensor([[0, 1, 1]], dtype=torch.int32, device=device)
    offs = torch.tensor([[3, 0, 19]], device=device)
    rows = torch.tensor([0], device=device)
    history = torch.zeros(1, 2, 3, device=device)
    tk.gather_history([a, b], ids, offs, rows, torch.tensor(0, device=device), history)
    assert history[0, 0].tolist() == [3.0, 100.0, 119.0]
    a.mul_(2)
    tk.gather_history([a, b], ids, offs, rows, torch.tensor(1, device=device), history)
    assert history[0, 1].tolist() == [6.0, 100.0, 119.0]
    b = torch.arange(200.0, 220.0, device=device).bfloat16()
    tk.gather_history([a, b], ids, offs, rows, torch.tensor(2, device=device), history)
    assert history[0, 0].tolist() == [6.0, 200.0, 219.0]


def test_gather_no_rows_writes_nothing(device):
    history = torch.full((2, 3, 4), float("nan"), device=device)
    ids = torch.zeros(2, 4, dtype=torch.int32, device=device)
    tk.gather_history([torch.ones(4, device=device)], ids, torch.zeros(2, 4, dtype=torch.int64, device=device),
                      torch.empty(0, dtype=torch.int64, device=device), torch.tensor(0, device=device), history)
    assert torch.isnan(history).all()


def test_gather_rejects_bad_input(device):
    history = torch.zeros(2, 3, 4, device=device)
    ids = torch.zeros(2, 4, dtype=torch.int32, device=device)
    offs = torch.zeros(2, 4, dtype=torch.int64, device=device)
    rows = torch.arange(2, device=device)
    cursor = torch.tensor(0, device=device)
    src = [torch.ones(4, device=device)]
    with pytest.raises(TypeError, match="source 0 has dtype torch.int64"):
        tk.gather_history([torch.ones(4, dtype=torch.int64, device=device)], ids, offs, rows, cursor, history)
    with pytest.raises(TypeError, match="source_ids must be a 2-D torch.int32"):
        tk.gather_history(src, ids.long(), offs, rows, cursor, history)
    with pytest.raises(ValueError, match=r"must both be \[U, K\]"):
        tk.gather_history(src, ids[:, :3], offs[:, :3], rows, cursor, history)
    with pytest.raises(TypeError, match="history must be a 3-D float32"):
        tk.gather_history(src, ids, offs, rows, cursor, history.double())
    with pytest.raises(TypeError, match="cursor must be a 0-D"):
        tk.gather_history(src, ids, offs, rows, cursor.reshape(1), history)


# --------------------------------------------------------------------------------------------
# predict

# Odd sizes; BK=32/BN=32 defaults make several K and H chunks in some of them.
CONFIGS = [
    PredictorConfig(sample_size=37, window=7, hidden=24, embed=8, head_hidden=6),
    PredictorConfig(sample_size=70, window=2, hidden=40, embed=5, head_hidden=3),
    PredictorConfig(sample_size=19, window=30, hidden=33, embed=17, head_hidden=1),
]
# All weight dtypes are upcast exactly before use (kernel and reference alike), so the bound is
# fp32 rounding from a different summation order whatever the weights' dtype.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-5, atol=1e-6),
             torch.bfloat16: dict(rtol=1e-5, atol=1e-6)}
TIE = 1e-5  # a decision is compared only where no probability lies this close to the threshold


def random_predict_case(config, device, g, weight_dtype=torch.float32, num_units=None):
    def rint(lo, hi):
        return int(torch.randint(lo, hi, (), generator=g))

    num_units = num_units or rint(1, 8) * 2 + 1
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=g)))
    predictor = AttentionPredictor(config)
    with torch.no_grad():  # spread the probabilities so that decisions vary
        predictor.head[-1].weight.mul_(20)
    weights = [w.detach().to(device, weight_dtype) for w in predictor.flat_weights()]
    k, window = config.sample_size, config.window
    scale = torch.rand(num_units, 1, 1, generator=g) * 3
    history = torch.randn(num_units, window, k, generator=g) * scale + torch.randn(num_units, 1, 1, generator=g)
    valid = torch.randint(1, k + 1, (num_units,), generator=g)
    valid[0] = k
    for u in range(num_units):  # masked positions hold garbage: it must be ignored
        history[u, :, int(valid[u]):] = 1e6
    rows = torch.randperm(num_units, generator=g)[:rint(1, num_units + 1)]
    cursor = torch.tensor(rint(0, 1000))
    return [history.to(device), cursor.to(device), rows.to(device), valid.to(device), weights]


def threshold_between(prob: torch.Tensor, g) -> float:
    """A threshold in a gap of at least 2*TIE between two sorted probabilities (or 0.5)."""
    p = torch.sort(prob.double().cpu()).values
    p = torch.cat([torch.zeros(1, dtype=p.dtype), p, torch.ones(1, dtype=p.dtype)])
    gaps = [i for i in range(len(p) - 1) if p[i + 1] - p[i] > 2 * TIE]
    i = gaps[int(torch.randint(0, len(gaps), (), generator=g))]
    return float((p[i] + p[i + 1]) / 2)


def check_predict(inputs, threshold, seed, dtype=torch.float32, input_gain=1.0, sort_by_newest=False, **kwargs):
    history, cursor, rows, valid, weights = inputs
    expected_prob, _ = reference.predict_ref(history.cpu(), cursor.cpu(), rows.cpu(), valid.cpu(),
                                             [w.cpu() for w in weights], threshold, input_gain, sort_by_newest)
    device = history.device
    out = (torch.full((rows.numel(),), float("nan"), device=device), torch.tensor(-77, device=device))
    prob, prefix = tk.predict(history, cursor, rows, valid, weights, threshold, input_gain, sort_by_newest,
                              out=out, **kwargs)
    assert prob is out[0] and prefix is out[1]
    torch.testing.assert_close(prob.cpu(), expected_prob, **TOLERANCE[dtype], msg=lambda m: f"seed {seed}: {m}")
    # the decision from the kernel's own probabilities is exact; against the reference's, exact
    # unless a probability is a near-tie with the threshold
    assert int(prefix) == int(reference.freezable_prefix(prob.cpu(), threshold)), f"seed {seed}"
    if not ((expected_prob - threshold).abs() < TIE).any():
        assert int(prefix) == int(reference.freezable_prefix(expected_prob, threshold)), f"seed {seed}"
    return prob, prefix


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"K{c.sample_size}T{c.window}H{c.hidden}")
def test_predict_matches_reference(device, fresh_seed, config, weight_dtype):
    g = torch.Generator().manual_seed(fresh_seed)
    inputs = random_predict_case(config, device, g, weight_dtype)
    exp, _ = reference.predict_ref(*[x.cpu() for x in inputs[:4]], [w.cpu() for w in inputs[4]], 0.5)
    check_predict(inputs, threshold_between(exp, g), fresh_seed, weight_dtype)


def test_predict_full_size(device, fresh_seed):
    """The shipped configuration (K=1024, T=30, 256/64/32), interpreter-friendly blocks."""
    g = torch.Generator().manual_seed(fresh_seed)
    inputs = random_predict_case(PredictorConfig(), device, g, num_units=3)
    blocks = dict(block_k=1024, block_n=256) if tk.INTERPRET else {}
    exp, _ = reference.predict_ref(*[x.cpu() for x in inputs[:4]], [w.cpu() for w in inputs[4]], 0.5)
    check_predict(inputs, threshold_between(exp, g), fresh_seed, **blocks)


def test_predict_decisions_follow_the_threshold(device, fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    history, cursor, _, valid, weights = random_predict_case(CONFIGS[0], device, g, num_units=5)
    rows = torch.arange(5, device=device)
    check_predict([history, cursor, rows, valid, weights], 0.5, fresh_seed)
    _, prefix = tk.predict(history, cursor, rows, valid, weights, 0.0)
    assert int(prefix) == 5
    _, prefix = tk.predict(history, cursor, rows, valid, weights, 1.01)
    assert int(prefix) == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, on purpose
def test_predict_non_finite_window_never_freezes(device, fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    history, cursor, _, valid, weights = random_predict_case(CONFIGS[0], device, g, num_units=7)
    with torch.no_grad():
        weights[-1].copy_(torch.tensor([-30.0, 30.0]))  # "freeze" wherever the window is finite
    history[1, 3, 0] = float("nan")
    history[3, 0, -1] = float("inf")  # in a masked position of a small unit: still refused
    valid[3] = 5
    history[5, 6, 2] = float("-inf")
    history[6, 2] = 3e38  # finite, but the snapshot's sum overflows in the normalisation
    valid[6] = history.shape[-1]  # (over one valid position it would not: a finite window)
    rows = torch.arange(7, device=device)
    prob, prefix = check_predict([history, cursor, rows, valid, weights], 0.5, fresh_seed)
    assert prob[[1, 3, 5, 6]].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert (prob[[0, 2, 4]] > 0.99).all() and int(prefix) == 1


@pytest.mark.parametrize("layer", range(0, 24, 2))  # every weight matrix of the key/query/value MLPs and the head
def test_predict_nan_predictor_weights_never_freeze(device, fresh_seed, layer):
    """The reference's contract: NaN predictor weights give probability 0. The kernels' ReLUs
    (tl.maximum, which drops NaN by default) turned a NaN before one into a finite probability
    that could freeze (review38)."""
    g = torch.Generator().manual_seed(fresh_seed)
    history, cursor, rows, valid, weights = random_predict_case(CONFIGS[0], device, g, num_units=4)
    weights = list(weights)
    if layer >= len(weights):
        pytest.skip("fewer weight tensors")
    weights[layer + 1] = weights[layer + 1].clone()  # the bias after weight matrix `layer`
    weights[layer + 1].view(-1)[0] = float("nan")
    prob, prefix = check_predict([history, cursor, rows, valid, weights], 1e-6, fresh_seed)
    assert prob.tolist() == [0.0] * rows.numel() and int(prefix) == 0


def test_predict_scale_and_offset_are_normalised_away(device, fresh_seed):
    """Per-snapshot standardisation in two passes: a large mean does not cancel the variance.

    The invariance is exact only where a snapshot's variance is far above NORM_EPS (1e-8): a unit
    of two nearly equal weights (variance 1e-7) moved by 2.8e-4 when scaled by 1000, in the
    float64 reference as in the kernel. So draws with such a snapshot are drawn again.
    """
    g = torch.Generator().manual_seed(fresh_seed)
    while True:
        history, cursor, rows, valid, weights = random_predict_case(CONFIGS[0], device, g)
        _, _, var = reference.window_moments(history.cpu(), valid.cpu())
        # a single valid weight normalises to exactly 0 at any scale
        if bool(((var >= 1e-2) | (valid.cpu() == 1)[:, None, None]).all()):
            break
    prob, _ = tk.predict(history, cursor, rows, valid, weights, 0.5)
    shifted, _ = check_predict([history * 1000 + 7, cursor, rows, valid, weights], 0.5, fresh_seed)
    torch.testing.assert_close(shifted, prob, rtol=1e-4, atol=1e-5)


def test_predict_no_rows(device):
    history, cursor, _, valid, weights = random_predict_case(CONFIGS[0], device, torch.Generator().manual_seed(0))
    out = (torch.empty(0, device=device), torch.tensor(-1, device=device))
    prob, prefix = tk.predict(history, cursor, torch.empty(0, dtype=torch.int64, device=device), valid, weights,
                              0.5, out=out)
    assert prob.numel() == 0 and int(prefix) == 0


def test_predict_rejects_bad_input(device):
    history, cursor, rows, valid, weights = random_predict_case(CONFIGS[0], device, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="expects 24 weight tensors"):
        tk.predict(history, cursor, rows, valid, weights[:-1], 0.5)
    other = [w.detach().to(device) for w in AttentionPredictor(CONFIGS[1]).flat_weights()]
    with pytest.raises(ValueError, match="reads 70 sampled weights per snapshot, history holds 37"):
        tk.predict(history, cursor, rows, valid, other, 0.5)
    mixed = weights[:6] + other[6:12] + weights[12:]
    with pytest.raises(ValueError, match="share one shape"):
        tk.predict(history, cursor, rows, valid, mixed, 0.5)
    with pytest.raises(TypeError, match="history must be a 3-D float32"):
        tk.predict(history.double(), cursor, rows, valid, weights, 0.5)
    with pytest.raises(ValueError, match="at least 2 snapshots"):
        tk.predict(history[:, :1], cursor, rows, valid, weights, 0.5)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        tk.predict(history, cursor, rows, valid, [w.double() for w in weights], 0.5)
    with pytest.raises(ValueError, match="out must be"):
        tk.predict(history, cursor, rows, valid, weights, 0.5, out=(torch.empty(1, device=device),
                                                                   torch.tensor(0, device=device)))


# The input transform (reference.transform_window), fused into the window loads.
TRANSFORMS = [(1.0, False), (30.0, False), (1.0, True), (30.0, True)]


def with_ties_in_newest(history, cursor):
    """Round the newest snapshot (slot (cursor - 1) % T) to integers: many equal values, -0.0
    beside 0.0, while the older snapshots at tied positions still differ, so a wrong tie order
    changes the input."""
    newest = (int(cursor) - 1) % history.shape[1]
    history = history.clone()
    history[:, newest] = history[:, newest].round()
    return history


@pytest.mark.parametrize("gain,sort", TRANSFORMS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"K{c.sample_size}T{c.window}H{c.hidden}")
def test_predict_transform_matches_reference(device, fresh_seed, config, gain, sort):
    g = torch.Generator().manual_seed(fresh_seed)
    history, cursor, rows, valid, weights = random_predict_case(config, device, g, num_units=int(
        torch.randint(1, 4, (), generator=g)) * 2 + 1)
    history = with_ties_in_newest(history, cursor)
    inputs = [history, cursor, rows, valid, weights]
    exp, _ = reference.predict_ref(*[x.cpu() for x in inputs[:4]], [w.cpu() for w in weights], 0.5, gain, sort)
    check_predict(inputs, threshold_between(exp, g), fresh_seed, input_gain=gain, sort_by_newest=sort)


def test_predict_sorted_ties_keep_position_order(device, fresh_seed):
    """The kernel's rank order is the stable one: a reference given the same newest values in
    another position order (a different tie order only) disagrees, the kernel does not."""
    # Random weights can saturate every probability to exactly 0 or 1, and then no order can
    # show (seeds 3179633356 and 1217295261): the kernel must match the reference in every
    # case, and the order must matter in at least one of a few.
    config = CONFIGS[0]
    for seed in range(fresh_seed, fresh_seed + 4):
        g = torch.Generator().manual_seed(seed)
        history, cursor, _, valid, weights = random_predict_case(config, device, g, num_units=3)
        valid.fill_(config.sample_size)
        history = with_ties_in_newest(history, cursor)
        rows = torch.arange(3, device=device)
        prob, _ = check_predict([history, cursor, rows, valid, weights], 0.5, seed, input_gain=30.0,
                                sort_by_newest=True)
        flipped = history.flip(-1)  # all valid: the same values, ties in reverse position order
        other, _ = reference.predict_ref(flipped.cpu(), cursor.cpu(), rows.cpu(), valid.cpu(),
                                         [w.cpu() for w in weights], 0.5, 30.0, True)
        if other.ne(prob.cpu()).any():
            return
    pytest.fail(f"seeds {fresh_seed}..{fresh_seed + 3}: the ties did not matter")


def test_predict_transform_full_size(device, fresh_seed):
    """The shipped predictor's setting: K=1024, T=30, sorted, gain 30, partly valid units."""
    g = torch.Generator().manual_seed(fresh_seed)
    history, cursor, rows, valid, weights = random_predict_case(PredictorConfig(), device, g, num_units=3)
    history = with_ties_in_newest(history, cursor)
    blocks = dict(block_k=1024, block_n=256) if tk.INTERPRET else {}
    inputs = [history, cursor, rows, valid, weights]
    exp, _ = reference.predict_ref(*[x.cpu() for x in inputs[:4]], [w.cpu() for w in weights], 0.5, 30.0, True)
    check_predict(inputs, threshold_between(exp, g), fresh_seed, input_gain=30.0, sort_by_newest=True, **blocks)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, on purpose
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 3e37 * 30, on purpose
def test_predict_transform_non_finite_never_freezes(device, fresh_seed):
    """NaN/inf anywhere (newest snapshot included, where amplifying makes inf - inf) gives 0,
    and an amplification that overflows fp32 counts as non-finite too."""
    g = torch.Generator().manual_seed(fresh_seed)
    history, cursor, _, valid, weights = random_predict_case(CONFIGS[0], device, g, num_units=5)
    with torch.no_grad():
        weights[-1].copy_(torch.tensor([-30.0, 30.0]))
    newest = (int(cursor) - 1) % CONFIGS[0].window
    history[1, newest, 4] = float("nan")
    history[2, newest, 0] = float("inf")
    history[3, (newest + 1) % CONFIGS[0].window, 1] = 3e37  # times 30: inf
    rows = torch.arange(5, device=device)
    prob, _ = check_predict([history, cursor, rows, valid, weights], 0.5, fresh_seed, input_gain=30.0,
                            sort_by_newest=True)
    assert prob[[1, 2, 3]].tolist() == [0.0, 0.0, 0.0] and (prob[[0, 4]] > 0.99).all()


def test_predict_rejects_a_non_finite_gain(device):
    history, cursor, rows, valid, weights = random_predict_case(CONFIGS[0], device, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="input_gain must be a finite number"):
        tk.predict(history, cursor, rows, valid, weights, 0.5, float("inf"), True)


def record_decisions(policy):
    """Make a SmartFRZ policy keep each window its ``decide`` scored, with the op's answer."""
    records, decide = [], policy.decide

    def recording_decide(step, frozen):
        h = policy.context.history
        window = [h.history.clone(), h.cursor.clone(), h.rows.clone(), h.valid.clone()]
        first_active, before = h.first_active, policy.last_probabilities
        decision = decide(step, frozen)
        if policy.last_probabilities is not before:  # the op ran on this window, on these rows
            window[2] = policy.last_rows.clone()
            records.append(dict(window=window, prob=policy.last_probabilities.clone(),
                                decision=int(decision), first_active=first_active))
        return decision

    policy.decide = recording_decide
    return records


@pytest.mark.slow
def test_real_training_history_gather_and_predict(device, fresh_seed, monkeypatch):
    """A REAL weight history: SmallCNN trained 34 steps under SmartFreezer with the shipped
    predictor (snapshot every step, T=30, K=1024; units with fewer than K weights among them).

    gather: every snapshot the engine takes (on the CPU through the C++ extension, on CUDA the
    Triton kernel) is retaken by the reference, the Triton kernel and, where it is built, the C++
    extension into shadow rings: all bitwise equal, the wrap of the ring included.
    predict: the windows SmartFRZ.decide scored, with the shipped weights and its input transform
    (gain, sort_by_newest) as decide passes them, through the Triton kernel and the reference:
    probabilities within the fp32 tolerance, the kernel's decision equal to the engine's except at
    a near-tie (|p - threshold| < TIE). In the interpreter only the last window is run (its rows
    start after any unit frozen by then): tl.sort costs ~4 s per unit there."""
    from torch import nn

    from smartfrz_fast import SmartFreezer, SmartFRZ
    from smartfrz_fast.ops._extension import extension_status
    from models import SmallCNN, batch

    model = SmallCNN(width=24).to(device)  # fresh_seed seeded torch: a new initialisation each run
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    policy = SmartFRZ(settle_ratio=None)  # the shipped weights, default threshold
    policy.score_every_unit = True  # every window of the rows (on the CPU, not only as far as the prefix goes)
    records = record_decisions(policy)
    freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0)[0].to(device), sample_every=1)
    assert policy.input_gain != 1.0 and policy.sort_inputs  # bound from the provenance: the transform is exercised
    h = freezer.history
    assert (h.valid < 1024).any() and (h.valid == 1024).any(), h.valid  # masked and full units

    status = extension_status()
    use_ext = status.loaded and (device.type == "cpu" or status.has_cuda)
    rings = {"reference": h.history.cpu().clone(), "triton": h.history.clone()}
    if use_ext:
        rings["C++ ext"] = h.history.clone()
    engine_snapshot = h.snapshot

    def snapshot():  # the parameters do not change between the engine's gather and these
        cursor, rows = h.cursor.clone(), h.rows.clone()
        engine_snapshot()
        args = (h.source_ids, h.offsets, rows, cursor)
        reference.gather_history_ref([s.detach().cpu() for s in h.sources], *[a.cpu() for a in args],
                                     rings["reference"])
        tk.gather_history(h.sources, *args, rings["triton"])
        if use_ext:
            torch.ops.smartfrz_ext.gather_history(h.sources, *args, rings["C++ ext"])
        for name, ring in rings.items():
            assert torch.equal(bits(ring.cpu()), bits(h.history.cpu())), \
                f"seed {fresh_seed}, snapshot {h.count}: {name} differs from the engine's ring"

    monkeypatch.setattr(h, "snapshot", snapshot)
    for step in range(34):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    # the ring wrapped (snapshots stop once the prefix is as long as the policy may make it); decisions made
    assert (h.count == 34 or freezer.num_frozen == policy._limit) and h.count > 30 and len(records) >= 4, \
        (h.count, len(records))

    blocks = dict(block_k=1024, block_n=256) if tk.INTERPRET else {}
    for record in records[-1:] if tk.INTERPRET else records:
        prob, prefix = check_predict(record["window"] + [policy._weights], policy.threshold, fresh_seed,
                                     input_gain=policy.input_gain, sort_by_newest=policy.sort_inputs, **blocks)
        torch.testing.assert_close(record["prob"].cpu(), prob.cpu(), **TOLERANCE[torch.float32],
                                   msg=lambda m: f"seed {fresh_seed}: the engine's probabilities: {m}")
        near_tie = torch.cat([prob.cpu(), record["prob"].cpu()]).sub(policy.threshold).abs().lt(TIE).any()
        if not near_tie:
            assert int(prefix) + record["first_active"] == record["decision"], f"seed {fresh_seed}"


# --------------------------------------------------------------------------------------------
# Compiled for every target architecture without a GPU: the interpreter does not check what the
# compiler rejects (a loop-carried name changing shape, constexpr-specialised arguments, tl.dot's
# minimum sizes), nor shared memory and registers against a device's per-block limits.


@pytest.mark.slow
def test_kernels_compile_and_fit_every_architecture(tmp_path):
    """bench/kernel_arch_table.py compiles every specialisation for sm_75 ... sm_120 and checks
    each against that architecture's per-block limits (predict: the configuration it runs there).
    About 4 minutes of CPU on a cold Triton cache (232 s measured on a 2-core CI-type machine,
    triton 3.8.0), under 20 s on a warm one."""
    if HAS_GPU:
        pytest.skip("a GPU is visible: the gpu-marked tests compile and run the kernels for real")
    import subprocess
    from pathlib import Path

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this triton has no ahead-of-time compile API: {exc}")
    script = Path(__file__).resolve().parents[1] / "bench" / "kernel_arch_table.py"
    out = tmp_path / "limits.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "--out", str(out), "--jobs", "2"], capture_output=True,
                          text=True, env=env, timeout=1800)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    table = out.read_text()
    assert "Everything fits." in table and "**no**" in table  # sm_86's first predict configuration does not
    for target in (75, 80, 86, 89, 90, 100, 120):
        runs = [line for line in table.splitlines() if line.startswith(f"| sm_{target} |") and "_predict_kernel" in line
                and line.rstrip().endswith("| yes | yes |")]
        assert len(runs) == 2, (target, table)  # plain and the shipped transform each run one that fits


# --------------------------------------------------------------------------------------------
# GPU only: dispatch, CUDA graphs, no host syncs


@pytest.mark.gpu
def test_ops_dispatch_to_triton_on_cuda():
    if tk.INTERPRET:
        pytest.skip("the registry does not use Triton under TRITON_INTERPRET=1")
    from smartfrz_fast import ops

    assert ops.backends()["gather_history"]["cuda"].startswith("Triton")
    assert ops.backends()["predict"]["cuda"].startswith("Triton")
    with pytest.raises(ValueError, match="take CUDA tensors"):
        tk.gather_history([torch.ones(3)], torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int64),
                          torch.arange(1), torch.tensor(0), torch.zeros(1, 2, 2))
    g = torch.Generator().manual_seed(1)
    sources, source_ids, offsets, rows, cursor, history = random_gather_case(torch.device("cuda"), g)
    expected = history.cpu().clone()
    reference.gather_history_ref([s.cpu() for s in sources], source_ids.cpu(), offsets.cpu(), rows.cpu(),
                                 cursor.cpu(), expected)
    ops.gather_history(sources, source_ids, offsets, rows, cursor, history)
    assert torch.equal(bits(history.cpu()), bits(expected))
    torch.library.opcheck(ops.gather_history, (sources, source_ids, offsets, rows, cursor, history))
    history, cursor, rows, valid, weights = random_predict_case(CONFIGS[0], torch.device("cuda"), g)
    torch.library.opcheck(ops.predict, (history, cursor, rows, valid, weights, 0.5))
    prob, prefix = ops.predict(history, cursor, rows, valid, weights, 0.5)
    expected_prob, _ = reference.predict_ref(history, cursor, rows, valid, weights, 0.5)
    torch.testing.assert_close(prob, expected_prob, rtol=1e-5, atol=1e-6)
    torch.library.opcheck(ops.predict, (history, cursor, rows, valid, weights, 0.5, 30.0, True))
    prob, prefix = ops.predict(history, cursor, rows, valid, weights, 0.5, 30.0, True)
    expected_prob, _ = reference.predict_ref(history, cursor, rows, valid, weights, 0.5, 30.0, True)
    torch.testing.assert_close(prob, expected_prob, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("gain,sort", [(1.0, False), (30.0, True)])
def test_cuda_graph_replay_without_host_sync(fresh_seed, gain, sort):
    """Gather + predict captured once, replayed as the cursor moves and the weights change."""
    if tk.INTERPRET:
        pytest.skip("compiled kernels are off under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(fresh_seed)
    dev = torch.device("cuda")
    config = PredictorConfig()
    _, _, _, _, weights = random_predict_case(config, dev, g, num_units=3)
    sources = [torch.randn(300, 200, device=dev).t(), torch.randn(5000, device=dev).bfloat16()]
    num_units = 5
    ids = torch.randint(0, 2, (num_units, config.sample_size), dtype=torch.int32, device=dev)
    offs = torch.where(ids == 0, torch.randint(0, 60000, ids.shape, device=dev),
                       torch.randint(0, 5000, ids.shape, device=dev))
    rows = torch.arange(1, num_units, device=dev)
    valid = torch.full((num_units,), config.sample_size, device=dev)
    history = torch.randn(num_units, config.window, config.sample_size, device=dev)
    cursor = torch.tensor(0, device=dev)
    out = (torch.empty(rows.numel(), device=dev), torch.empty((), dtype=torch.int64, device=dev))

    def step():
        tk.gather_history(sources, ids, offs, rows, cursor, history)
        tk.predict(history, cursor.add(1), rows, valid, weights, 0.5, gain, sort, out=out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and build the pointer table outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(config.window + 3):  # the ring wraps
        with torch.no_grad():
            for s in sources:
                s.add_(torch.randn_like(s))
        expected = history.clone()
        reference.gather_history_ref(sources, ids, offs, rows, cursor, expected)  # syncs: not checked
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.equal(bits(history), bits(expected)), f"seed {fresh_seed}"
        prob_ref, _ = reference.predict_ref(history, cursor + 1, rows, valid, weights, 0.5, gain, sort)
        torch.testing.assert_close(out[0], prob_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed {fresh_seed}: {m}")
        cursor.add_(1)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()  # eager calls do not sync either
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---------------------------------------------------------------- gather_rows (cache rows)
ROW_DTYPES = [torch.float32, torch.bfloat16, torch.float8_e4m3fn]


def random_rows(num_rows, width, dtype, device, pinned=False):
    rows = (torch.randn(num_rows, width) * 50).to(dtype)
    rows = rows.pin_memory() if pinned else rows.to(device)
    return rows


@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("width", [1, 3, 37, 1029])
def test_gather_rows_matches_indexing(device, fresh_seed, dtype, width):
    source = random_rows(29, width, dtype, device)
    index = torch.randint(0, 29, (11,), device=device)
    index[3] = index[4]  # a repeated row
    out = tk.gather_rows(source, index, block=256)
    assert out.dtype == dtype and out.shape == (11, width) and out.device == index.device
    assert torch.equal(out.view(torch.uint8), source[index].view(torch.uint8))  # bit for bit


def test_gather_rows_scales_column_and_odd_byte_rows(device, fresh_seed):
    scales = torch.rand(13, device=device)
    index = torch.tensor([12, 0, 5], device=device)
    assert torch.equal(tk.gather_rows(scales.view(-1, 1), index).view(-1), scales[index])
    odd = random_rows(7, 5, torch.float8_e4m3fn, device)  # 5-byte rows: copied byte by byte
    assert torch.equal(tk.gather_rows(odd, index[1:] % 7).view(torch.uint8), odd[index[1:] % 7].view(torch.uint8))


def test_gather_rows_out_of_range_is_zero_not_a_fault(device):
    source = torch.ones(4, 6, device=device)
    out = tk.gather_rows(source, torch.tensor([1, -1, 4, 3], device=device))
    assert out[0].eq(1).all() and out[3].eq(1).all() and out[1:3].eq(0).all()


def test_gather_rows_empty_and_bad_input(device):
    source = torch.ones(4, 6, device=device)
    assert tk.gather_rows(source, torch.zeros(0, dtype=torch.int64, device=device)).shape == (0, 6)
    with pytest.raises(TypeError, match="int64"):
        tk.gather_rows(source, torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="contiguous rows"):
        tk.gather_rows(source.t(), torch.zeros(2, dtype=torch.int64, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_gather_rows_reads_pinned_host_memory(fresh_seed, dtype):
    if tk.INTERPRET:
        pytest.skip("compiled kernels are off under TRITON_INTERPRET=1")
    source = random_rows(301, 4099, dtype, None, pinned=True)
    index = torch.randint(0, 301, (64,), device="cuda")
    out = tk.gather_rows(source, index)
    assert out.is_cuda and torch.equal(out.cpu().view(torch.uint8), source[index.cpu()].view(torch.uint8))
    with pytest.raises(ValueError, match="not pinned"):
        tk.gather_rows(source.clone(), index)  # pageable host memory: the GPU cannot read it


# ---------------------------------------------------------------- cache_store / cache_load
STORAGE_DTYPES = [torch.float32, torch.bfloat16, torch.float8_e4m3fn]
ACTIVATION_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def storage_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit for bit, except that a NaN need only be a NaN: its bits differ between torch's own
    conversions (the CPU's vector and scalar paths give 0xFFFF and 0x7FC0 for a bf16 NaN)."""
    got, expected = got.cpu(), expected.cpu()
    nan = expected.float().isnan()
    assert torch.equal(got.float().isnan(), nan)
    assert torch.equal(storage_bits(got)[~nan], storage_bits(expected)[~nan])


def activation_rows(num_rows, width, dtype, device):
    """Rows over many magnitudes (fp8's subnormal range inside a row, rows of 1e-30 to 1e4, a
    zero row) and, in fp32, a row with a NaN and one with an inf (stored as NaN rows)."""
    magnitude = 10.0 ** torch.empty(num_rows, 1).uniform_(-30, 4)
    rows = torch.randn(num_rows, width) * magnitude * (10.0 ** torch.empty(1, width).uniform_(-4, 0))
    rows[0] = 0.0
    if dtype == torch.float32 and num_rows > 3 and width > 2:
        rows[1, width // 2] = float("nan")
        rows[2, 1] = float("-inf")
    return rows.to(dtype).to(device)


@pytest.mark.parametrize("storage", STORAGE_DTYPES)
@pytest.mark.parametrize("values_dtype", ACTIVATION_DTYPES)
@pytest.mark.parametrize("width", [1, 5, 37, 1029])
def test_cache_store_matches_the_reference(device, fresh_seed, storage, values_dtype, width):
    values = activation_rows(9, width, values_dtype, device)
    slots = torch.randperm(23, device=device)[:9]  # distinct, as the cache allocates them
    poison = torch.full((23, width), float("nan")).to(storage).to(device)  # rows not written stay so
    data, expected = poison.clone(), poison.clone()
    scales, expected_scales = torch.full((23,), -7.0, device=device), torch.full((23,), -7.0, device=device)
    reference.cache_store_ref(values, slots, expected, expected_scales)
    tk.cache_store(values, slots, data, scales, block=256)
    assert_same_bits(data, expected)  # NaN rows and untouched (poisoned) rows too
    assert_same_bits(scales, expected_scales)


@pytest.mark.parametrize("storage", STORAGE_DTYPES)
@pytest.mark.parametrize("dtype", ACTIVATION_DTYPES)
@pytest.mark.parametrize("width", [1, 37, 1029])
def test_cache_load_matches_the_reference(device, fresh_seed, storage, dtype, width):
    data = torch.empty(17, width, device=device).to(storage)
    scales = torch.empty(17, device=device)
    reference.cache_store_ref(activation_rows(17, width, torch.float32, device), torch.arange(17, device=device),
                              data, scales)
    slots = torch.randint(0, 17, (11,), device=device)
    slots[4] = slots[5]  # a row read twice
    out = tk.cache_load(data, scales, slots, dtype, block=256)
    expected = reference.cache_load_ref(data, scales, slots, dtype)
    assert out.dtype == dtype and out.shape == (11, width)
    assert_same_bits(out, expected)


@pytest.mark.parametrize("dtype", ACTIVATION_DTYPES)
def test_cache_load_decodes_every_fp8_code(device, dtype):
    """All 256 float8_e4m3fn codes (-0.0, subnormals, NaNs included) at scale 1 and at a
    random scale, as torch decodes them. -0.0 caught a kernel bug on Triton 3.6/3.7, which
    negate a float as 0 - x: the sign must be set as a bit."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).view(2, 128).to(device)
    scales = torch.tensor([1.0, float(torch.rand(()) * 1e-3)], device=device)
    out = tk.cache_load(codes, scales, torch.tensor([0, 1, 0], device=device), dtype)
    assert_same_bits(out, reference.cache_load_ref(codes, scales, torch.tensor([0, 1, 0], device=device), dtype))
    assert out[0, 0].item() == 0.0 and torch.signbit(out[1, 0]) and not torch.signbit(out[0, 0])


def test_cache_kernels_empty_and_bad_input(device):
    data, scales = torch.zeros(4, 6, device=device), torch.ones(4, device=device)
    none = torch.zeros(0, dtype=torch.int64, device=device)
    tk.cache_store(torch.zeros(0, 6, device=device), none, data, scales)
    assert tk.cache_load(data, scales, none, torch.float32).shape == (0, 6)
    with pytest.raises(TypeError, match="slots must be a 1-D int64"):
        tk.cache_load(data, scales, none.int(), torch.float32)
    with pytest.raises(TypeError, match="values must be"):
        tk.cache_store(torch.zeros(2, 5, device=device), torch.arange(2, device=device), data, scales)
    with pytest.raises(TypeError, match="data must be a contiguous 2-D"):
        tk.cache_load(data.half(), scales, none, torch.float32)
    with pytest.raises(TypeError, match="dtype must be one of"):
        tk.cache_load(data, scales, none, torch.float64)


@pytest.mark.gpu
def test_cache_ops_dispatch_to_triton_on_cuda(fresh_seed):
    if tk.INTERPRET:
        pytest.skip("the registry does not use Triton under TRITON_INTERPRET=1")
    from smartfrz_fast import ops

    assert ops.backends()["cache_store"]["cuda"].startswith("Triton")
    assert ops.backends()["cache_load"]["cuda"].startswith("Triton")
    values = activation_rows(5, 300, torch.float32, "cuda")
    data, scales = torch.empty(8, 300, device="cuda").to(torch.float8_e4m3fn), torch.empty(8, device="cuda")
    slots = torch.tensor([6, 0, 3, 1, 7], device="cuda")
    ops.cache_store(values, slots, data, scales)
    cpu_data, cpu_scales = data.cpu().clone(), scales.cpu().clone()
    reference.cache_store_ref(values.cpu(), slots.cpu(), cpu_data, cpu_scales)
    assert_same_bits(data, cpu_data)
    torch.library.opcheck(ops.cache_load, (data, scales, slots, torch.bfloat16))


def test_cache_store_rounds_as_torch_over_a_dense_sweep(device):
    """Every fp8 and bf16 rounding case, ties and fp8 subnormals included: 0.4 M values over
    [-448, 448] and [-0.03, 0.03], each row's amax 448 (scale 1), against torch's conversion."""
    x = torch.cat([torch.linspace(-448, 448, 200001), torch.linspace(-0.03, 0.03, 200001),
                   torch.tensor([2.0 ** -10, 3 * 2.0 ** -10, 1.5 * 2.0 ** -9, 2.5 * 2.0 ** -9, -0.0, 2.0 ** -6])])
    width = 1021
    x = torch.nn.functional.pad(x, (0, -x.numel() % width)).view(-1, width)
    x[:, 0] = 448.0
    x = x.to(device)
    slots = torch.arange(x.shape[0], device=device)
    fp8, scales = torch.empty(x.shape, device=device).to(torch.float8_e4m3fn), torch.empty(x.shape[0], device=device)
    tk.cache_store(x, slots, fp8, scales)
    assert scales.eq(1).all()
    assert torch.equal(storage_bits(fp8.cpu()), storage_bits(x.cpu().to(torch.float8_e4m3fn)))
    bf16 = torch.empty(x.shape, device=device, dtype=torch.bfloat16)
    tk.cache_store(x * 1e10, slots, bf16, scales)
    assert torch.equal(storage_bits(bf16.cpu()), storage_bits((x * 1e10).cpu().to(torch.bfloat16)))
