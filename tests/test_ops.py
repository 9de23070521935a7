"""The op registry: schemas, fakes, opcheck, and the references against independent math."""

import math

import pytest
import torch

from smartfrz_fast import ops
from smartfrz_fast.ops import reference
from smartfrz_fast.ops.reference import WEIGHTS_PER_MLP
from smartfrz_fast.predictor import AttentionPredictor, PredictorConfig

SMALL = PredictorConfig(sample_size=37, window=7, hidden=24, embed=8, head_hidden=6)


def random_gather_inputs(num_units=5, window=6, k=13):
    sources = [
        torch.randn(4, 9),
        torch.randn(7, 3).t(),  # non-contiguous
        torch.randn(30, dtype=torch.float64)[5:],  # storage offset
        torch.randn(3, 5).half(),
    ]
    spans = [reference._strided_span(s).numel() for s in sources]
    source_ids = torch.randint(0, len(sources), (num_units, k), dtype=torch.int32)
    offsets = torch.stack([torch.stack([torch.randint(0, spans[s], ()) for s in row]) for row in source_ids.tolist()])
    source_ids[-1, k // 2:] = -1  # a small unit: masked tail
    history = torch.full((num_units, window, k), float("nan"))
    return sources, source_ids, offsets, history


def test_gather_history_ref_reads_storage_offsets(fresh_seed):
    sources, source_ids, offsets, history = random_gather_inputs()
    rows = torch.tensor([0, 2, 4])
    cursor = torch.tensor(9)
    ops.gather_history(sources, source_ids, offsets, rows, cursor, history)
    slot = 9 % history.shape[1]
    for r in range(history.shape[0]):
        for t in range(history.shape[1]):
            if r in rows.tolist() and t == slot:
                continue
            assert torch.isnan(history[r, t]).all(), f"seed {fresh_seed}: row {r} slot {t} was written"
    for r in rows.tolist():
        for k in range(source_ids.shape[1]):
            s = int(source_ids[r, k])
            if s < 0:
                expected = 0.0
            else:
                # element at that storage offset, read through a fresh strided view
                element = torch.as_strided(sources[s], (1,), (1,), sources[s].storage_offset() + int(offsets[r, k]))
                expected = float(element.float())  # history is float32
            assert history[r, slot, k].item() == expected, f"seed {fresh_seed}"


def test_opcheck_gather_history(fresh_seed):
    sources, source_ids, offsets, history = random_gather_inputs()
    history.zero_()
    torch.library.opcheck(ops.gather_history, (sources, source_ids, offsets, torch.tensor([1, 3]),
                                               torch.tensor(2), history))


def random_predict_inputs(config=SMALL, num_units=5):
    history = torch.randn(num_units, config.window, config.sample_size) * torch.rand(num_units, 1, 1) * 3
    valid = torch.randint(2, config.sample_size + 1, (num_units,))
    predictor = AttentionPredictor(config)
    return history, valid, predictor


def independent_predict(history, cursor, rows, valid, predictor):
    """The predictor written out with nn modules, one unit at a time."""
    t = history.shape[1]
    probs = []
    for r in rows.tolist():
        n = int(valid[r])
        chrono = [history[r, (int(cursor) + i) % t, :n].double() for i in range(t)]
        normed = []
        for snap in chrono:
            z = (snap - snap.mean()) / torch.sqrt(snap.var(unbiased=False) + reference.NORM_EPS)
            normed.append(torch.cat([z, torch.zeros(history.shape[2] - n, dtype=z.dtype)]))
        x = torch.stack(normed)
        pd = predictor.double()
        q = pd.query(x[-1])
        keys = pd.key(x[:-1])
        values = pd.value(x[:-1])
        att = torch.softmax(keys @ q / math.sqrt(q.numel()), 0)
        logits = pd.head(att @ values)
        probs.append(torch.softmax(logits, 0)[1])
        predictor.float()
    return torch.stack(probs)


def test_predict_ref_matches_independent_math(fresh_seed):
    history, valid, predictor = random_predict_inputs()
    rows = torch.tensor([0, 1, 3, 4])
    cursor = torch.tensor(11)
    prob, prefix = ops.predict(history, cursor, rows, valid, predictor.flat_weights(), 0.5)
    expected = independent_predict(history, cursor, rows, valid, predictor)
    torch.testing.assert_close(prob.double(), expected, rtol=1e-4, atol=1e-5, msg=f"seed {fresh_seed}")
    assert int(prefix) == int(reference.freezable_prefix(expected, 0.5))


def _live_predict_inputs():
    """random_predict_inputs whose predictor's output depends on its input: a random head can
    sit with every ReLU dead on these inputs (the same probability for every unit, whatever
    the history), and then no change of the history can show. Redrawn until live."""
    for _ in range(20):
        history, valid, predictor = random_predict_inputs()
        full = torch.full_like(valid, SMALL.sample_size)
        prob, _ = ops.predict(history, torch.tensor(3), torch.arange(5), full, predictor.flat_weights(), 0.5)
        if not torch.all(prob == prob[0]):
            return history, valid, predictor
    raise AssertionError("20 random predictors in a row had a dead head")


def test_predict_query_is_the_newest_snapshot(fresh_seed):
    history, valid, predictor = _live_predict_inputs()
    rows = torch.arange(5)
    w = predictor.flat_weights()
    cursor = torch.tensor(3)  # newest snapshot in slot 2
    prob, _ = ops.predict(history, cursor, rows, valid, w, 0.5)
    # rotating the ring together with the cursor changes nothing
    rolled = torch.roll(history, shifts=2, dims=1)
    prob_rolled, _ = ops.predict(rolled, cursor + 2, rows, valid, w, 0.5)
    torch.testing.assert_close(prob, prob_rolled)
    # swapping two older snapshots changes nothing (attention has no positional term) ...
    swapped = history.clone()
    swapped[:, [0, 4]] = history[:, [4, 0]]
    torch.testing.assert_close(prob, ops.predict(swapped, cursor, rows, valid, w, 0.5)[0])
    # ... but replacing the newest one does (an untrained predictor is nearly flat, so only
    # ask for a change; units with few valid weights may normalise to the same snapshot)
    changed = history.clone()
    changed[:, 2] = torch.randn_like(changed[:, 2])
    full = torch.full_like(valid, SMALL.sample_size)
    prob_full = ops.predict(history, cursor, rows, full, w, 0.5)[0]
    assert not torch.equal(prob_full, ops.predict(changed, cursor, rows, full, w, 0.5)[0]), f"seed {fresh_seed}"


def test_predict_normalisation_hides_weight_scale():
    # exact only where a snapshot's variance is far above NORM_EPS: a snapshot of two nearly
    # equal weights is not scale-free (1 draw in 3000 moved by 3.6e-5), so such draws are redrawn
    while True:
        history, valid, predictor = random_predict_inputs()
        if bool((reference.window_moments(history, valid)[2] >= 1e-2).all()):
            break
    rows = torch.arange(5)
    w = predictor.flat_weights()
    prob, _ = ops.predict(history, torch.tensor(0), rows, valid, w, 0.5)
    scaled, _ = ops.predict(history * 1000 + 7, torch.tensor(0), rows, valid, w, 0.5)
    torch.testing.assert_close(prob, scaled, rtol=1e-4, atol=1e-5)
    # masked positions are ignored, whatever they hold
    poisoned = history.clone()
    for r in range(5):
        poisoned[r, :, int(valid[r]):] = 1e6
    torch.testing.assert_close(prob, ops.predict(poisoned, torch.tensor(0), rows, valid, w, 0.5)[0])


def test_predict_never_freezes_on_nonfinite_history():
    history, valid, predictor = random_predict_inputs()
    w = predictor.flat_weights()
    with torch.no_grad():
        predictor.head[-1].bias.copy_(torch.tensor([-20.0, 20.0]))  # "freeze" everywhere
    history[1, 3, 0] = float("nan")
    history[3, 0, 0] = float("inf")
    history[4, 2] = 3e38  # finite, but the snapshot's sum overflows in the normalisation
    prob, prefix = ops.predict(history, torch.tensor(0), torch.arange(5), valid, w, 0.5)
    assert prob[0] > 0.99 and prob[1] == 0 and prob[3] == 0 and prob[2] > 0.99 and prob[4] == 0
    assert int(prefix) == 1


@pytest.mark.parametrize("probs,threshold,expected", [
    ([0.9, 0.8, 0.2, 0.9], 0.5, 2), ([0.1, 0.9], 0.5, 0), ([0.6, 0.6], 0.6, 2), ([], 0.5, 0),
])
def test_freezable_prefix(probs, threshold, expected):
    assert int(reference.freezable_prefix(torch.tensor(probs), threshold)) == expected


def test_opcheck_predict(fresh_seed):
    history, valid, predictor = random_predict_inputs()
    w = [p.detach() for p in predictor.flat_weights()]
    torch.library.opcheck(ops.predict, (history, torch.tensor(4), torch.tensor([0, 2, 3]), valid, w, 0.5))


def test_backends_report_every_op():
    table = ops.backends()
    assert {"gather_history", "predict", "cache_store", "cache_load"} <= set(table) == set(ops.OPS)
    assert all(set(v) == {"cpu", "cuda"} for v in table.values())


@pytest.mark.gpu
def test_ops_on_cuda_match_cpu_reference(fresh_seed):
    history, valid, predictor = random_predict_inputs()
    rows = torch.tensor([0, 2, 4])
    w = predictor.flat_weights()
    cpu = ops.predict(history, torch.tensor(5), rows, valid, w, 0.5)
    gpu = ops.predict(history.cuda(), torch.tensor(5).cuda(), rows.cuda(), valid.cuda(),
                      [x.cuda() for x in w], 0.5)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The predictor's input transform (sort_by_newest, input_gain), applied by the predict op


def eager_transform_then_predict(history, cursor, rows, valid, weights, threshold, gain, sort):
    """What SmartFRZ.decide did before the op took the transform: the whole ring transformed
    with eager ops (newest slot picked by the cursor), then the untransformed op."""
    from smartfrz_fast.ops.reference import amplify_deviation, sort_by_newest

    ring = history
    newest = ring.index_select(1, (cursor - 1) % ring.shape[1])
    if sort:
        ring = sort_by_newest(ring, newest, valid)
        newest = ring.index_select(1, (cursor - 1) % ring.shape[1])
    ring = amplify_deviation(ring, newest, gain)
    return ops.predict(ring, cursor, rows, valid, weights, threshold)


@pytest.mark.parametrize("gain", [1.0, 30.0])
@pytest.mark.parametrize("sort", [False, True])
def test_predict_transform_matches_the_eager_transform(fresh_seed, gain, sort):
    g = torch.Generator().manual_seed(fresh_seed)
    history, valid, predictor = random_predict_inputs(num_units=7)
    history[:, :, : SMALL.sample_size // 2] = history[:, :, : SMALL.sample_size // 2].round()  # ties
    w = [p.detach() for p in predictor.flat_weights()]
    with torch.no_grad():
        w[-2].mul_(20)  # spread the probabilities
    rows = torch.tensor([5, 0, 3])
    cursor = torch.tensor(int(torch.randint(0, 100, (), generator=g)))
    prob, prefix = ops.predict(history, cursor, rows, valid, w, 0.5, gain, sort)
    expected, expected_prefix = eager_transform_then_predict(history, cursor, rows, valid, w, 0.5, gain, sort)
    torch.testing.assert_close(prob, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed {fresh_seed}: {m}")
    if not ((expected - 0.5).abs() < 1e-5).any():
        assert int(prefix) == int(expected_prefix), f"seed {fresh_seed}"
    if gain == 1.0 and not sort:  # the defaults are the untransformed op, bit for bit
        assert torch.equal(prob, ops.predict(history, cursor, rows, valid, w, 0.5)[0])


def test_predict_transform_changes_the_probabilities():
    """Each half of the transform reaches the predictor (the arguments are not ignored)."""
    torch.manual_seed(0)
    history, valid, predictor = random_predict_inputs()
    w = [p.detach() for p in predictor.flat_weights()]
    rows, cursor = torch.arange(5), torch.tensor(2)
    plain = ops.predict(history, cursor, rows, valid, w, 0.5)[0]
    assert not torch.allclose(plain, ops.predict(history, cursor, rows, valid, w, 0.5, 30.0)[0])
    assert not torch.allclose(plain, ops.predict(history, cursor, rows, valid, w, 0.5, 1.0, True)[0])


def test_sort_by_newest_is_stable_and_keeps_masked_last():
    newest = torch.tensor([[2.0, -0.0, 1.0, 0.0, 1.0, float("inf"), 1.0, -5.0, 0.0]])  # 3 valid ones tie
    valid = torch.tensor([7])  # positions 7 and 8 are masked (-5 and 0 would otherwise sort early)
    window = torch.stack([newest[0] + 10 * torch.arange(9.0), newest[0]])[None]  # [1, 2, 9], newest last
    out = reference.sort_by_newest(window, window[:, -1:], valid)
    order = [1, 3, 2, 4, 6, 0, 5, 7, 8]  # -0.0 ties with 0.0; equal values keep position order
    assert torch.equal(out, window[..., order])
    # transform_window: sort, then amplify about the (sorted) newest snapshot
    window[..., 5] = 9.0  # finite (inf - inf is NaN), still the largest valid value: same order
    out = window[..., order]
    moved = reference.transform_window(window, valid, 3.0, True)
    assert torch.equal(moved[:, -1], out[:, -1])
    torch.testing.assert_close(moved[:, 0], out[:, -1] + 3.0 * (out[:, 0] - out[:, -1]))


def test_predict_rejects_a_non_finite_gain():
    history, valid, predictor = random_predict_inputs()
    with pytest.raises(ValueError, match="input_gain must be a finite number"):
        ops.predict(history, torch.tensor(1), torch.arange(5), valid, predictor.flat_weights(), 0.5, float("nan"))


def test_the_reference_refuses_what_the_kernels_refuse():
    # a 1-snapshot window (no key: every unit read the same) and an integer source (read as
    # numbers) passed the reference, which is the CPU path, while the kernels raised (review38)
    history, valid, predictor = random_predict_inputs()
    with pytest.raises(ValueError, match="at least 2 snapshots"):
        reference.predict_ref(history[:, :1], torch.tensor(0), torch.arange(5), valid, predictor.flat_weights(), 0.5)
    sources, source_ids, offsets, history = random_gather_inputs()
    sources[0] = torch.randint(-5, 5, (4, 9), dtype=torch.int8)
    with pytest.raises(TypeError, match="dtype torch.int8; supported"):
        reference.gather_history_ref(sources, source_ids, offsets, torch.arange(5), torch.tensor(0), history)


@pytest.mark.parametrize("gain,sort", [(30.0, True), (30.0, False), (1.0, True)])
def test_opcheck_predict_with_the_transform(gain, sort):
    history, valid, predictor = random_predict_inputs()
    w = [p.detach() for p in predictor.flat_weights()]
    torch.library.opcheck(ops.predict, (history, torch.tensor(4), torch.tensor([0, 2, 3]), valid, w, 0.5, gain, sort))


def test_smartfrz_decide_passes_the_training_transform_to_the_op(tmp_path, fresh_seed):
    """SmartFRZ.decide hands the provenance's transform to the op: its probabilities equal the
    eager transform of the whole ring (the path it replaced), on real engine histories with
    partly valid units."""
    from smartfrz_fast import SmartFreezer, SmartFRZ
    from smartfrz_fast.predictor import save_predictor

    from models import SmallCNN, batch, train_steps

    config = PredictorConfig(sample_size=128, window=4, hidden=16, embed=8, head_hidden=4)
    predictor = AttentionPredictor(config)
    with torch.no_grad():
        predictor.head[-1].weight.mul_(20)
    path = tmp_path / "p.pt"
    save_predictor(predictor, path, {"purpose": "test", "input_gain": 30.0, "sort_by_newest": True})
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    policy = SmartFRZ(weights=path, threshold=0.999999)  # scored every snapshot, never freezes
    policy.score_every_unit = True
    freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0)[0], window=4, sample_size=128)
    train_steps(model, opt, freezer, 7)
    hist = freezer.history
    assert (hist.valid < 128).any() and (hist.valid == 128).any()  # partly valid units among them
    policy._evaluated_at = -1  # score the current window again
    policy.decide(7, freezer.num_frozen)
    assert policy.last_rows.tolist() == hist.rows.tolist()[:policy.context.max_frozen]  # all but the kept head
    expected, _ = eager_transform_then_predict(hist.history, hist.cursor, policy.last_rows, hist.valid,
                                               policy._weights, policy.threshold, 30.0, True)
    torch.testing.assert_close(policy.last_probabilities, expected, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"seed {fresh_seed}: {m}")


# ---------------------------------------------------------------------------------------------
# The CPU path in fewer passes (ops/cpu_predict.py) against the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("window, sample_size", [(2, 1), (7, 37), (13, 64)])
@pytest.mark.parametrize("gain, sort", [(1.0, False), (30.0, True), (4.5, False), (1.0, True)])
def test_predict_cpu_matches_the_reference(fresh_seed, dtype, window, sample_size, gain, sort):
    from smartfrz_fast.ops.cpu_predict import predict_cpu

    g = torch.Generator().manual_seed(fresh_seed)
    config = PredictorConfig(sample_size=sample_size, window=window, hidden=24, embed=8, head_hidden=6)
    units = 11
    history = (torch.randn(units, window, sample_size, generator=g).cumsum(1) * 0.1
               + torch.randn(units, 1, sample_size, generator=g) * 3).to(dtype)
    valid = torch.randint(1, sample_size + 1, (units,), generator=g)
    valid[0] = sample_size
    for r in range(units):
        history[r, :, int(valid[r]):] = 1e6 if r % 2 else 0.0  # masked positions: whatever they hold
    history[2, 1, 0] = float("nan")
    history[4, 0, -1] = float("inf")  # masked unless unit 4 is full: either way the unit scores 0
    history[6, -1] = 3e38  # finite, but its moments overflow in float32
    predictor = AttentionPredictor(config).to(dtype)
    w = [p.detach() for p in predictor.flat_weights()]
    with torch.no_grad():
        w[-2].mul_(20)  # spread the probabilities
    rows = torch.randperm(units, generator=g)[:9]
    cursor = torch.tensor(int(torch.randint(0, 100, (), generator=g)))
    expected, expected_prefix = reference.predict_ref(history, cursor, rows, valid, w, 0.5, gain, sort)
    prob, prefix = predict_cpu(history, cursor, rows, valid, w, 0.5, gain, sort)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(prob, expected, rtol=tolerance, atol=tolerance, msg=lambda m: f"seed {fresh_seed}: {m}")
    assert bool(((prob == 0) == (expected == 0)).all()), f"seed {fresh_seed}: units scored 0 differ"
    if not ((expected - 0.5).abs() < 1e-4).any():
        assert int(prefix) == int(expected_prefix), f"seed {fresh_seed}"
    empty = predict_cpu(history, cursor, rows[:0], valid, w, 0.5, gain, sort)
    assert empty[0].shape == (0,) and int(empty[1]) == 0


def test_predict_cpu_joins_the_first_layers_of_the_weights_it_is_given(fresh_seed):
    # the key and value first layers were kept joined between calls for a while: weights written in
    # place, and another predictor's tensors (which may take a freed one's memory), must be read anew
    from smartfrz_fast.ops.cpu_predict import predict_cpu

    torch.manual_seed(fresh_seed)
    history, valid, _ = random_predict_inputs()
    rows, cursor = torch.arange(5), torch.tensor(3)
    for _ in range(3):
        w = [p.detach().clone() for p in AttentionPredictor(SMALL).flat_weights()]
        for write in (False, True):
            if write:
                with torch.no_grad():
                    w[WEIGHTS_PER_MLP].mul_(-2.0)  # the key MLP's first weight
                    w[2 * WEIGHTS_PER_MLP + 1].add_(1.0)  # the value MLP's first bias
            expected, _ = reference.predict_ref(history, cursor, rows, valid, w, 0.5)
            prob, _ = predict_cpu(history, cursor, rows, valid, w, 0.5)
            torch.testing.assert_close(prob, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {fresh_seed}: {m}")
        del w


def test_predict_cpu_reads_weights_given_new_storage_and_inference_weights(fresh_seed):
    # review106/108: `w.data = new` (vector_to_parameters) keeps the tensor and its version, and
    # the joined layers kept between calls were served stale (0.17 off), also when keyed by
    # address (a freed candidate's storage comes back); inference tensors have no version (a crash)
    from smartfrz_fast.ops.cpu_predict import predict_cpu

    torch.manual_seed(fresh_seed)
    history, valid, predictor = random_predict_inputs()
    rows, cursor = torch.arange(5), torch.tensor(3)
    params = list(predictor.parameters())
    w = [p.detach() for p in predictor.flat_weights()]
    predict_cpu(history, cursor, rows, valid, w, 0.5)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.randn(sum(p.numel() for p in params)), params)
    w = [p.detach() for p in predictor.flat_weights()]
    expected, _ = reference.predict_ref(history, cursor, rows, valid, w, 0.5)
    torch.testing.assert_close(predict_cpu(history, cursor, rows, valid, w, 0.5)[0], expected, rtol=1e-5, atol=1e-5)
    base = torch.nn.utils.parameters_to_vector(params).detach().clone()
    for k in range(3):  # perturb, score, restore: a candidate may take the freed one's address
        candidate = base + 0.5 * torch.randn(base.shape, generator=torch.Generator().manual_seed(k))
        torch.nn.utils.vector_to_parameters(candidate, params)
        del candidate
        w = [p.detach() for p in predictor.flat_weights()]
        expected, _ = reference.predict_ref(history, cursor, rows, valid, w, 0.5)
        torch.testing.assert_close(predict_cpu(history, cursor, rows, valid, w, 0.5)[0], expected,
                                   rtol=1e-5, atol=1e-5)
        torch.nn.utils.vector_to_parameters(base, params)
        del w  # the candidate's storage is free for the next one
    w = [p.detach() for p in predictor.flat_weights()]
    expected, _ = reference.predict_ref(history, cursor, rows, valid, w, 0.5)
    with torch.inference_mode():
        frozen = [t.clone() for t in w]
        torch.testing.assert_close(predict_cpu(history, cursor, rows, valid, frozen, 0.5)[0], expected,
                                   rtol=1e-5, atol=1e-5)


def test_predict_runs_the_cpu_path_unless_the_reference_is_asked_for():
    assert ops.backends()["predict"]["cpu"] == "PyTorch, fused passes (ops/cpu_predict.py)"
