"""Baseline policies against their papers' / reference implementations' formulas, without the engine."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from smartfrz_fast.policy import (
    AutoFreeze,
    Decision,
    FreezeOut,
    FreezePolicy,
    LinearFreeze,
    PolicyContext,
    StaticFreeze,
    UnitInfo,
)


def make_context(num_units: int, total_steps=100, max_frozen=None) -> PolicyContext:
    units = [UnitInfo(index=i, name=f"layer{i}", num_params=10 * (i + 1), forward_flops=100) for i in range(num_units)]
    return PolicyContext(
        units=units,
        total_steps=total_steps,
        device=torch.device("cpu"),
        max_frozen=num_units - 1 if max_frozen is None else max_frozen,
    )


def as_int(decision):
    if decision is None:
        return None
    if isinstance(decision, torch.Tensor):
        assert decision.dim() == 0 and decision.dtype == torch.int64
        return int(decision.item())
    assert isinstance(decision, int)
    return decision


def test_exports():
    import smartfrz_fast.policy as p

    for name in ["FreezePolicy", "PolicyContext", "UnitInfo", "Decision", "FreezeOut", "AutoFreeze", "LinearFreeze", "StaticFreeze"]:
        assert hasattr(p, name), name
    assert issubclass(FreezeOut, FreezePolicy) and Decision is not None


# ----------------------------------------------------------------------------------------------
# FreezeOut


def reference_freezeout(L, t0, how_scale, total, scale_lr):
    """Transcription of ajbrock/FreezeOut densenet.py: lr_ratio, max_j, update_lr (lr factor)."""
    scale_fn = {"linear": lambda x: x, "squared": lambda x: x**2, "cubic": lambda x: x**3}[how_scale]
    last_index = L - 1
    ratios = [scale_fn(t0 + (1 - t0) * float(i) / last_index) for i in range(L)]
    max_js = [total * r for r in ratios]

    def factor(i, j):  # the lr update_lr sets for iteration j, divided by the base lr
        if j > max_js[i]:
            return None  # frozen
        lr0 = 1.0 / ratios[i] if scale_lr else 1.0
        return 0.5 * lr0 * (1 + np.cos(np.pi * j / max_js[i]))

    return ratios, max_js, factor


@pytest.mark.parametrize("policy, said", [
    (lambda: StaticFreeze(2, at_step=400), "freezes after step 400"),
    # a freeze decided after the last step trains nothing frozen: it saves nothing either
    (lambda: StaticFreeze(2, at_step=300), "freezes after step 300"),
    (lambda: LinearFreeze(interval=400), "decisions every 400 steps"),
    (lambda: LinearFreeze(interval=300), "decisions every 300 steps"),
    (lambda: LinearFreeze(freeze_start=0.9, interval=200), "freeze_start=0.9"),
    (lambda: LinearFreeze(freeze_level=0.2), "freeze_level=0.2"),
    (lambda: AutoFreeze(num_intervals=2), "needs 3 intervals of 150 steps"),
    (lambda: AutoFreeze(interval=101), "needs 3 intervals of 101 steps"),
    (lambda: FreezeOut(t0=1.0), "its first unit freezes after step 301"),
    (lambda: FreezeOut(t0=0.9999), "its first unit freezes after step 300"),
])
def test_settings_that_never_freeze_in_the_run_warn(policy, said):
    # accepted silently before: no freeze at all in a 300-step run
    with pytest.warns(UserWarning, match=said + r".*no step of the run's 300 trains after it, so it will never freeze"):
        policy().bind(make_context(4, total_steps=300))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fine in (StaticFreeze(2, at_step=299), LinearFreeze(interval=299), AutoFreeze(interval=100),
                     FreezeOut(t0=0.99)):
            fine.bind(make_context(4, total_steps=300))


def test_freezeout_gives_the_head_before_a_scalar_tail_t_1():
    # a model ending in a learned temperature: the engine keeps the real head trainable (a unit of
    # single numbers is not counted), and FreezeOut's schedule over every unit gave the head
    # t=0.81: its lr factor was 0 for the last 18 % of the run, silently
    from smartfrz_fast import SmartFreezer

    class WithTemperature(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
            self.temperature = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.head(torch.tanh(self.body(x))) / self.temperature

    model = WithTemperature()
    policy = FreezeOut()
    SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), policy, example_inputs=torch.randn(2, 6),
                 total_steps=100)
    assert [u.name for u in policy.context.units] == ["body", "head", "<root>"]  # the model owns the temperature
    assert policy.freeze_times == [pytest.approx(0.8 ** 3), 1.0, 1.0]
    assert policy.lr_factors(90)[1] > 0


def test_freezeout_refuses_an_optimizer_that_computes_its_own_step_size():
    # Adafactor's default (lr=None, relative_step=True) failed inside the first step with
    # "unsupported operand type(s) for *: 'NoneType' and 'float'"; it never reads the group's lr
    from smartfrz_fast import SmartFreezer

    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    adafactor_like = torch.optim.SGD(model.parameters(), lr=0.1)
    adafactor_like.param_groups[0].update(lr=None, relative_step=True)
    with pytest.raises(ValueError, match=r"group 0 of SGD computes its own step size \(relative_step=True\).*"
                       "relative_step=False"):
        SmartFreezer(model, adafactor_like, FreezeOut(), example_inputs=torch.randn(2, 6), total_steps=100)


def test_freezeout_follows_a_learning_rate_held_as_a_numpy_scalar():
    # a LambdaLR reading a float32 table leaves np.float32 learning rates in the groups: refused before
    # as one "no factor can scale", pointing at Adafactor's settings (review46)
    from smartfrz_fast import SmartFreezer

    def run(table):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: table[step])
        freezer = SmartFreezer(model, opt, FreezeOut(), example_inputs=torch.randn(2, 6), total_steps=20)
        for step in range(20):
            torch.manual_seed(step)
            nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
            opt.step()
            opt.zero_grad()
            schedule.step()
            freezer.step()
        return model, freezer

    table = np.linspace(1, 0.1, 21).astype(np.float32)
    got, freezer = run(table)
    expected, _ = run([float(v) for v in table])
    assert freezer.num_frozen == 1  # the first layer; the head trains to the end
    for p, q in zip(got.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q)


def test_numpy_scalar_knobs_are_taken_as_numbers():
    # refused before with "must be an int >= 0, got np.int64(2)" (knobs read from a config or
    # computed with numpy); stored as Python numbers, so states load with weights_only=True
    static = StaticFreeze(np.int64(2), at_step=np.int32(5))
    assert (static.num_units, static.at_step) == (2, 5) and type(static.num_units) is int
    assert type(AutoFreeze(interval=np.int64(7), percentile=np.float32(40.0)).interval) is int
    assert type(LinearFreeze(np.float64(0.5), interval=np.int16(3)).interval) is int
    assert FreezeOut(t0=np.float64(0.8)).t0 == 0.8
    with pytest.raises(ValueError, match="num_units must be an int"):
        StaticFreeze(np.float64(2.0))


def test_freezeout_warns_when_t0_makes_the_first_units_lr_explode():
    # t0=0.05 (cubic): unit 0 trains for 0.0125 % of the run at 8000x the lr, and froze with
    # weights of magnitude 17 (0.9 at t0=0.8), silently
    with pytest.warns(UserWarning, match=r"first unit trains for 0.0125 % of the run at 8e\+03x the learning rate"):
        FreezeOut(t0=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FreezeOut(t0=0.05, scale_lr=False)
        FreezeOut(t0=0.5)


def test_freezeout_times_linear_and_cubic():
    p = FreezeOut(t0=0.5, spacing="linear")
    p.bind(make_context(5))
    assert p.freeze_times == pytest.approx([0.5, 0.625, 0.75, 0.875, 1.0], abs=1e-15)

    p = FreezeOut(t0=0.8, spacing="cubic")
    p.bind(make_context(3))
    assert p.freeze_times == pytest.approx([0.8**3, 0.9**3, 1.0], abs=1e-15)

    p = FreezeOut(t0=0.5, spacing="squared")
    p.bind(make_context(3))
    assert p.freeze_times == pytest.approx([0.25, 0.5625, 1.0], abs=1e-15)

    p = FreezeOut(t0=0.3, spacing="cubic")
    p.bind(make_context(1))
    assert p.freeze_times == [1.0]  # single unit: never frozen


@pytest.mark.parametrize("spacing", ["linear", "squared", "cubic"])
@pytest.mark.parametrize("scale_lr", [True, False])
def test_freezeout_matches_reference(spacing, scale_lr):
    L, N, t0 = 6, 97, 0.4
    p = FreezeOut(t0=t0, spacing=spacing, scale_lr=scale_lr)
    p.bind(make_context(L, total_steps=N))
    ratios, max_js, ref_factor = reference_freezeout(L, t0, spacing, N, scale_lr)
    assert p.freeze_times == pytest.approx(ratios, rel=1e-15)
    for j in range(N + 3):
        factors = p.lr_factors(j)
        assert len(factors) == L
        for i in range(L):
            ref = ref_factor(i, j)
            assert factors[i] == pytest.approx(0.0 if ref is None else ref, abs=1e-12), (i, j)
        # decide(step) after `step` steps is the prefix the reference has deactivated before
        # running iteration j == step
        if j >= 1:
            expected = sum(1 for i in range(L) if j > max_js[i])
            assert p.decide(j, 0) == expected


def test_freezeout_closed_form_and_freeze_steps():
    N = 100
    p = FreezeOut(t0=0.5, spacing="linear", scale_lr=True)
    p.bind(make_context(5, total_steps=N))
    # max_j = [50, 62.5, 75, 87.5, 100]
    assert p.freeze_steps == [51, 63, 76, 88, None]
    assert [p.decide(s, 0) for s in (1, 50, 51, 62, 63, 75, 76, 87, 88, 99, 100)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    f0 = p.lr_factors(0)
    assert f0 == pytest.approx([1 / 0.5, 1 / 0.625, 1 / 0.75, 1 / 0.875, 1.0])
    # unit 0 (t=0.5): half-way through its cosine at j = 25, zero at j = 50, frozen after
    assert p.lr_factors(25)[0] == pytest.approx(0.5 * 2.0 * (1 + math.cos(math.pi * 0.5)))
    assert p.lr_factors(50)[0] == pytest.approx(0.0, abs=1e-15)
    assert p.lr_factors(51)[0] == 0.0
    # last unit: plain cosine over the whole run, lr0 = lr
    for j in (0, 10, 50, 99):
        assert p.lr_factors(j)[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * j / N)))
    # unit 2 (t=0.75): closed form at j=30
    assert p.lr_factors(30)[2] == pytest.approx(0.5 / 0.75 * (1 + math.cos(math.pi * 30 / 75)))

    q = FreezeOut(t0=0.5, spacing="linear", scale_lr=False)
    q.bind(make_context(5, total_steps=N))
    assert q.lr_factors(0) == pytest.approx([1.0] * 5)


def test_freezeout_cubic_freeze_steps():
    N = 1000
    p = FreezeOut(t0=0.8, spacing="cubic")
    p.bind(make_context(3, total_steps=N))
    # t = [0.512, 0.729, 1]: max_j = 512, 729(.0000x), 1000
    steps = p.freeze_steps
    assert steps[0] == 513 and steps[2] is None
    assert steps[1] == math.floor(0.9**3 * N) + 1
    assert p.decide(512, 0) == 0 and p.decide(513, 0) == 1


def test_freezeout_requires_total_steps_and_flags():
    p = FreezeOut()
    assert p.manages_lr and not p.needs_gradients and not p.needs_history
    with pytest.raises(ValueError, match="total_steps"):
        p.bind(make_context(4, total_steps=None))
    assert "t0=0.8" in p.describe() and "cubic" in p.describe() and "scale_lr=True" in p.describe()
    assert p.state_dict() == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(t0=0.0), "t0"),
        (dict(t0=-0.1), "t0"),
        (dict(t0=1.5), "t0"),
        (dict(t0="0.5"), "t0"),
        (dict(spacing="quartic"), "spacing"),
        (dict(scale_lr="yes"), "scale_lr"),
    ],
)
def test_freezeout_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FreezeOut(**kwargs)


# ----------------------------------------------------------------------------------------------
# AutoFreeze


def reference_autofreeze(interval_norms, percentile):
    """Transcription of the decision part of YuhanLiu11/AutoFreeze's training loop, given the
    per-layer accumulated gradient norm of each interval. Returns start_layer after each
    interval (None where no decision is made). Frozen layers report norm 0."""
    start_layer = 0
    prev = None
    out = []
    for G in interval_norms:
        cur = {k: (0.0 if k < start_layer else float(v)) for k, v in enumerate(G)}
        if prev is None:
            prev = cur
            out.append(None)
            continue
        thr = {k: 0.0 for k in cur}
        for k in cur:
            if cur[k] > 0:
                thr[k] = abs(prev[k] - cur[k]) / prev[k]
        median_value = np.percentile(list(thr.values())[start_layer:], percentile)
        for k in thr:
            if thr[k] >= median_value:
                start_layer = k
                break
        prev = cur
        out.append(start_layer)
    return out


def feed_interval(policy, start_step, interval, norms, frozen):
    """Run one interval: every step sees the same per-unit gradient norms (sq norms given)."""
    decision = None
    for k in range(interval):
        step = start_step + k
        sq = torch.tensor(norms, dtype=torch.float32) ** 2
        sq[:frozen] = 0.0  # frozen units have no gradient
        policy.observe_gradients(step, sq)
        d = policy.decide(step + 1, frozen)
        if k < interval - 1:
            assert d is None
        decision = d
    return decision


def test_autofreeze_prefix_rule_and_blocking():
    L, interval = 5, 3
    p = AutoFreeze(interval=interval, percentile=50)
    p.bind(make_context(L, total_steps=None))
    frozen = 0
    # interval 1: only recorded
    assert feed_interval(p, 0, interval, [1.0, 2.0, 3.0, 4.0, 5.0], frozen) is None
    # interval 2: changes 1 %, 2 %, 50 %, 3 %, 40 % -> median 3 %: units 0,1 freeze; unit 2
    # (changing) blocks unit 3 although unit 3's change is below the median
    d = feed_interval(p, 3, interval, [1.01, 2.04, 4.5, 4.12, 7.0], frozen)
    assert isinstance(d, torch.Tensor) and d.device.type == "cpu"
    assert as_int(d) == 2
    ratios = p.last_ratios.tolist()
    assert ratios == pytest.approx([0.01, 0.02, 0.5, 0.03, 0.4], rel=1e-5)
    frozen = 2
    # interval 3: among active units 2,3,4: changes 1 %, 20 %, 30 % -> median 20 %: unit 2 freezes
    d = feed_interval(p, 6, interval, [0.0, 0.0, 4.5 * 1.01, 4.12 * 1.2, 7.0 * 1.3], frozen)
    assert as_int(d) == 3


def test_autofreeze_matches_reference_on_random_norms():
    rng = np.random.default_rng(0)
    L, interval, n_intervals = 8, 4, 12
    for percentile in (25, 50, 75):
        base = rng.uniform(0.5, 2.0, size=L)
        # gradient norm of unit i decays at a unit-specific speed, with noise
        speeds = np.sort(rng.uniform(0.0, 0.6, size=L))
        norms = [base * np.exp(-speeds * k) * (1 + 0.05 * rng.standard_normal(L)) for k in range(n_intervals)]
        p = AutoFreeze(interval=interval, percentile=percentile)
        p.bind(make_context(L, total_steps=None))
        frozen = 0
        ours = []
        for k, G in enumerate(norms):
            # per-step L2 norm G/interval, so the interval sum is G
            d = feed_interval(p, k * interval, interval, list(G / interval), frozen)
            d = as_int(d)
            ours.append(d)
            if d is not None:
                frozen = max(frozen, d)
        # the reference sees, for frozen units, norm 0: feed it our float32 sums
        ref = reference_autofreeze([np.asarray(G, dtype=np.float64) for G in norms], percentile)
        assert ours == ref, (percentile, ours, ref)
        assert ours[-1] > 0  # the schedule does freeze something


def test_autofreeze_interval_from_total_steps_and_first_decision():
    p = AutoFreeze(percentile=50)  # interval = total_steps // 10
    p.bind(make_context(4, total_steps=205))
    assert p.interval == 20
    assert "interval=total_steps//10=20" in p.describe() and "percentile=50" in p.describe()
    with pytest.raises(ValueError, match="total_steps"):
        AutoFreeze().bind(make_context(4, total_steps=None))
    q = AutoFreeze(num_intervals=20)
    q.bind(make_context(4, total_steps=10))
    assert q.interval == 1
    # decisions only at interval ends, first one at the end of the 2nd interval
    r = AutoFreeze(interval=5)
    r.bind(make_context(4, total_steps=None))
    decisions = {}
    for step in range(20):
        r.observe_gradients(step, torch.tensor([1.0, 1.0, 1.0, 4.0]) * (1 + step // 5))
        d = r.decide(step + 1, 0)
        if d is not None:
            decisions[step + 1] = as_int(d)
    assert sorted(decisions) == [10, 15, 20]


def test_autofreeze_accumulates_on_device_without_sync(monkeypatch):
    p = AutoFreeze(interval=4)
    p.bind(make_context(3, total_steps=None))
    calls = []
    orig_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or orig_item(self))
    for step in range(8):
        p.observe_gradients(step, torch.tensor([1.0, 4.0, 9.0]))
        p.decide(step + 1, 0)
    assert calls == []
    assert p.state_dict()["prev"].tolist() == pytest.approx([1.0, 2.0, 3.0])  # per-step means


def test_autofreeze_ignores_nonfinite_steps_and_zero_norm_units():
    p = AutoFreeze(interval=2)
    p.bind(make_context(3, total_steps=None))
    p.observe_gradients(0, torch.tensor([1.0, float("inf"), 0.0]))
    p.observe_gradients(1, torch.tensor([1.0, 1.0, float("nan")]))
    p.decide(2, 0)
    # means over the steps with a finite norm: unit 1's skipped step does not halve its G (a
    # plain sum compared 1 step with 2 next interval, and read a steady unit as changing 100 %)
    assert p.state_dict()["prev"].tolist() == [1.0, 1.0, 0.0]
    # unit 2 had no gradient, now has one: counts as changing without bound, never NaN
    p.observe_gradients(2, torch.tensor([1.0, 1.0, 1.0]))
    p.observe_gradients(3, torch.tensor([1.0, 1.0, 1.0]))
    d = p.decide(4, 0)
    r = p.last_ratios
    big = torch.finfo(torch.float32).max
    assert torch.isfinite(r).all() and r.tolist() == [0.0, 0.0, big]
    assert as_int(d) == 0  # ratios [0, 0, big], median 0: none strictly below
    # a unit with no gradient in an interval (a branch no batch used) is not converged: it read
    # as ratio 0, the most converged, and froze after a few batches of training
    for step in (4, 5):
        p.observe_gradients(step, torch.tensor([1.1, 0.0, 1.0]))
    p.decide(6, 0)
    assert p.last_ratios[1] == big
    # none in two intervals in a row (a unit the user froze, a branch never used): nothing to
    # wait for, or it would block every unit after it for the whole run
    for step in (6, 7):
        p.observe_gradients(step, torch.tensor([1.1, 0.0, 1.0]))
    p.decide(8, 0)
    assert p.last_ratios[1] == 0.0


def test_autofreeze_zero_ratio_ties_do_not_freeze():
    # all active units unchanged: every ratio is 0, percentile 0, nothing is strictly below
    # (the reference: the first layer with ratio >= median is layer 0, so nothing freezes)
    p = AutoFreeze(interval=1)
    p.bind(make_context(3, total_steps=None))
    for step in range(3):
        p.observe_gradients(step, torch.tensor([1.0, 1.0, 1.0]))
        d = p.decide(step + 1, 0)
    assert as_int(d) == 0
    assert reference_autofreeze([[1.0, 1.0, 1.0]] * 3, 50) == [None, 0, 0]


def test_autofreeze_state_dict_round_trip_mid_interval():
    L, interval = 6, 5
    rng = np.random.default_rng(1)
    seq = [torch.tensor(rng.uniform(0.1, 2.0, size=L) * np.exp(-np.arange(L)[::-1] * 0.02 * s), dtype=torch.float32) for s in range(60)]

    def run(policy, steps, frozen, out):
        for step in steps:
            sq = seq[step].clone()
            sq[:frozen] = 0
            policy.observe_gradients(step, sq)
            d = as_int(policy.decide(step + 1, frozen))
            out.append(d)
            if d is not None:
                frozen = max(frozen, min(d, L - 1))
        return frozen

    a = AutoFreeze(interval=interval, percentile=50)
    a.bind(make_context(L, total_steps=None))
    da = []
    frozen = run(a, range(0, 23), 0, da)  # 23: mid-interval, after 3 evaluations
    state = a.state_dict()
    assert state["steps_in_interval"] == 3 and state["evaluations"] == 4
    b = AutoFreeze(interval=interval, percentile=50)
    b.bind(make_context(L, total_steps=None))
    b.load_state_dict(state)
    # loading before bind works too (the engine may restore first)
    c = AutoFreeze(interval=interval, percentile=50)
    c.load_state_dict(state)
    c.bind(make_context(L, total_steps=None))
    rest_a, rest_b, rest_c = [], [], []
    fa = run(a, range(23, 60), frozen, rest_a)
    fb = run(b, range(23, 60), frozen, rest_b)
    fc = run(c, range(23, 60), frozen, rest_c)
    assert rest_a == rest_b == rest_c and fa == fb == fc
    assert any(d is not None for d in rest_a)
    for k, v in a.state_dict().items():
        w = b.state_dict()[k]
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, w)
        else:
            assert v == w
    # the state is a copy, not a view of the live accumulator
    s = a.state_dict()
    a.observe_gradients(60, torch.ones(L))
    assert not torch.equal(s["acc"], a.state_dict()["acc"])


def test_autofreeze_state_mismatch_raises():
    a = AutoFreeze(interval=5)
    a.bind(make_context(4, total_steps=None))
    b = AutoFreeze(interval=6)
    b.bind(make_context(4, total_steps=None))
    with pytest.raises(ValueError, match="interval"):
        b.load_state_dict(a.state_dict())
    c = AutoFreeze(interval=5)
    c.bind(make_context(3, total_steps=None))
    with pytest.raises(ValueError, match=r"'acc' is torch.float32 \(4,\); expected float \(3,\)"):
        c.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="keys"):
        c.load_state_dict({"acc": None})
    for key, bad in (("acc", torch.tensor([1.0, float("nan"), 0.0, 0.0])), ("prev", [0.0] * 4),
                     ("acc", torch.tensor([1.0, -1.0, 0.0, 0.0])), ("evaluations", -1), ("steps_in_interval", 1.5)):
        state = {**a.state_dict(), key: bad}
        with pytest.raises(ValueError, match=f"'{key}'"):  # an edited checkpoint: refused, not used
            b2 = AutoFreeze(interval=5)
            b2.bind(make_context(4, total_steps=None))
            b2.load_state_dict(state)


def test_autofreeze_flags():
    p = AutoFreeze(interval=3)
    assert p.needs_gradients and not p.manages_lr and not p.needs_history
    assert p.describe() == "AutoFreeze(interval=3, percentile=50)"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(percentile=0), "percentile"),
        (dict(percentile=100), "percentile"),
        (dict(percentile=-5), "percentile"),
        (dict(percentile="50"), "percentile"),
        (dict(interval=0), "interval"),
        (dict(interval=2.5), "interval"),
        (dict(interval=True), "interval"),
        (dict(num_intervals=0), "num_intervals"),
    ],
)
def test_autofreeze_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoFreeze(**kwargs)


def test_autofreeze_warns_of_a_fraction_where_a_percentile_is_meant():
    with pytest.warns(UserWarning, match=r"percentile=0.5 is on a 0-100 scale.*percentile=100 \* fraction"):
        AutoFreeze(percentile=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoFreeze(percentile=1)


# ----------------------------------------------------------------------------------------------
# LinearFreeze


def composer_reference(current_duration, freeze_start, freeze_level, num_layers):
    """Transcription of Composer's _freeze_schedule + freeze_depth of freeze_layers."""
    if current_duration <= freeze_start:
        pct = 0.0
    else:
        pct = freeze_level * ((current_duration - freeze_start) / (1.0 - freeze_start))
    return int(pct * len(list(range(num_layers))[0:-1]))


@pytest.mark.parametrize("freeze_start, freeze_level", [(0.5, 1.0), (0.0, 1.0), (0.3, 0.5), (0.9, 0.8)])
def test_linear_matches_composer(freeze_start, freeze_level):
    L, N = 11, 137
    p = LinearFreeze(freeze_start=freeze_start, freeze_level=freeze_level)
    p.bind(make_context(L, total_steps=N))
    for step in range(1, N + 1):
        assert p.decide(step, 0) == composer_reference(step / N, freeze_start, freeze_level, L), step


def test_linear_closed_form_points():
    p = LinearFreeze(freeze_start=0.5, freeze_level=1.0)
    p.bind(make_context(11, total_steps=100))
    # progress 0.5 -> 0, 0.75 -> int(0.5*10) = 5, 0.9 -> 8 (0.8*10 truncated), 1 -> 10
    assert p.decide(50, 0) == 0
    assert p.decide(75, 0) == 5
    assert p.decide(100, 0) == 10
    assert p.decide(90, 0) == int(((0.9 - 0.5) / 0.5) * 10)
    # Composer truncates: (0.6 - 0.5) / 0.5 is 0.19999999999999996 in floating point -> 1, not 2
    assert p.decide(60, 0) == 1
    assert p.decide(150, 0) == 10  # past total_steps: capped
    half = LinearFreeze(freeze_start=0.5, freeze_level=0.5)
    half.bind(make_context(11, total_steps=100))
    assert half.decide(100, 0) == 5


def test_linear_interval_and_requirements():
    p = LinearFreeze(freeze_start=0.0, interval=10)
    p.bind(make_context(5, total_steps=100))
    assert p.decide(5, 0) is None and p.decide(10, 0) == int(0.1 * 4)
    assert p.decide(50, 0) == 2
    assert "interval=10" in p.describe()
    assert LinearFreeze().describe() == "LinearFreeze(freeze_start=0.5, freeze_level=1)"
    with pytest.raises(ValueError, match="total_steps"):
        LinearFreeze().bind(make_context(5, total_steps=None))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(freeze_start=1.0), "freeze_start"),
        (dict(freeze_start=-0.1), "freeze_start"),
        (dict(freeze_level=1.5), "freeze_level"),
        (dict(freeze_level=-1), "freeze_level"),
        (dict(interval=0), "interval"),
    ],
)
def test_linear_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearFreeze(**kwargs)


# ----------------------------------------------------------------------------------------------
# StaticFreeze


def test_static_schedule():
    p = StaticFreeze(3, at_step=10)
    p.bind(make_context(5, total_steps=None))
    assert [p.decide(s, 0) for s in (1, 9)] == [None, None]
    assert [p.decide(s, 0) for s in (10, 11, 1000)] == [3, 3, 3]
    assert p.describe() == "StaticFreeze(num_units=3, at_step=10)"
    q = StaticFreeze(2)
    q.bind(make_context(5, total_steps=None))
    assert q.decide(1, 0) == 2


def test_static_bind_checks():
    with pytest.raises(ValueError, match="only 5"):
        StaticFreeze(6, at_step=1).bind(make_context(5))
    with pytest.warns(UserWarning, match="exceeds"):
        StaticFreeze(5, at_step=1).bind(make_context(5))


@pytest.mark.parametrize(
    "args, match",
    [((-1, 0), "num_units"), ((1.5, 0), "num_units"), ((2, -3), "at_step"), ((2, 1.0), "at_step")],
)
def test_static_invalid_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        StaticFreeze(*args)


# ----------------------------------------------------------------------------------------------
# FreezeOut with the user's lr scheduler (the engine scales each unit's lr inside the step)


def _schedulers():
    from torch.optim import lr_scheduler

    def warmup(opt, n):
        try:
            from transformers import get_linear_schedule_with_warmup
        except ImportError:  # the same LambdaLR transformers builds
            return lr_scheduler.LambdaLR(opt, lambda s: s / 3 if s < 3 else max(0.0, (n - s) / (n - 3)))
        return get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=n)

    return {
        "lambda": lambda opt, n: lr_scheduler.LambdaLR(opt, lambda s: 0.97 ** s),
        "cosine": lambda opt, n: lr_scheduler.CosineAnnealingLR(opt, T_max=n),
        "onecycle": lambda opt, n: lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=n),
        "linear_warmup": warmup,
    }


def _run_with_scheduler(make_scheduler, built, steps=24, seed=0, policy=None):
    """Two param groups (a weight-decay split, as most recipes), a scheduler built before or
    after the freezer; returns (lr used per step per unit, the scheduler's lr per step, freezer)."""
    from torch import nn

    from smartfrz_fast import SmartFreezer

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                          nn.Linear(6, 3))
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": weights, "weight_decay": 1e-4}, {"params": biases, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9)
    sched = make_scheduler(opt, steps) if built == "before" else None
    policy = policy or FreezeOut(t0=0.5, spacing="linear")
    freezer = SmartFreezer(model, opt, policy, example_inputs=(torch.randn(2, 6),), total_steps=steps)
    if sched is None:
        sched = make_scheduler(opt, steps)
    weight_of = [u.parameters[0] for u in freezer.units]
    used, scheduled = [], []

    def record(optimizer, args, kwargs):  # the lr each unit's weight steps with
        used.append([next((g["lr"] for g in optimizer.param_groups if any(p is w for p in g["params"])), None)
                     for w in weight_of])

    opt.register_step_post_hook(lambda *a: None)  # another hook of the user's: harmless
    hook = opt.register_step_pre_hook(record)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        scheduled.append(opt.param_groups[0]["lr"])
        x = torch.randn(8, 6, generator=g)
        nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,), generator=g)).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        freezer.step()
        assert len(opt.param_groups) == 2  # outside the step the groups are the user's
    hook.remove()
    return used, scheduled, freezer, opt


@pytest.mark.parametrize("built", ["before", "after"])
@pytest.mark.parametrize("name", sorted(_schedulers()))
def test_freezeout_multiplies_any_scheduler_built_before_or_after(name, built):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        used, scheduled, freezer, opt = _run_with_scheduler(_schedulers()[name], built)
    # the loop is in the right order: torch's scheduler must not say optimizer.step() was replaced
    assert not [w for w in caught if "overridden" in str(w.message)]
    policy = freezer.policy
    assert freezer.num_frozen > 0
    reference = None
    if built == "after":  # the scheduler's own lrs, without any freezer: untouched by it
        plain = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = _schedulers()[name](plain, len(scheduled))
        reference = []
        for _ in scheduled:
            reference.append(plain.param_groups[0]["lr"])
            plain.step()
            sched.step()
        assert scheduled == pytest.approx(reference, rel=1e-12)
    for j, row in enumerate(used):
        factors = policy.lr_factors(j)
        for i, lr in enumerate(row):
            if lr is None:  # frozen: not stepped at all
                assert i < freezer.num_frozen
                continue
            assert lr == pytest.approx(scheduled[j] * factors[i], rel=1e-12, abs=1e-15), (j, i)
    opt.state_dict()  # an ordinary state_dict of the user's two groups
    assert [len(g) for g in opt.state_dict()["param_groups"]] and len(opt.state_dict()["param_groups"]) == 2


def test_freezeout_with_a_constant_lr_trains_exactly_as_the_reference_split():
    """No scheduler: each unit's lr is FreezeOut's cosine of the base lr, as before the change."""
    used, scheduled, freezer, _ = _run_with_scheduler(
        lambda opt, n: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), "before")
    t = freezer.policy.freeze_times
    n = len(used)
    for j, row in enumerate(used):
        for i, lr in enumerate(row):
            if lr is not None and j <= t[i] * n:
                assert lr == pytest.approx(0.5 * (0.1 / t[i]) * (1 + math.cos(math.pi * j / (t[i] * n))), rel=1e-12)


@pytest.mark.parametrize("where", ["a pre-step hook", "the closure"])
@pytest.mark.parametrize("scheduler", ["before", "after", None])
def test_freezeout_groups_survive_a_step_that_raises(where, scheduler):
    """A step that raises (a closure's out-of-memory error, the batch skipped) ran no post-step
    hook: the per-unit groups stayed until the next step, so a scheduler stepped in between
    wrote into them (its update lost: cosine 2 % off for the rest of the run) and an emergency
    optimizer.state_dict() saved them (a checkpoint no optimizer loads; review44). The user's
    groups are back as the step raises."""
    from torch import nn

    from smartfrz_fast import SmartFreezer

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    make_scheduler = lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)  # noqa: E731
    sched = make_scheduler() if scheduler == "before" else None
    freezer = SmartFreezer(model, opt, FreezeOut(), example_inputs=(torch.randn(2, 4),), total_steps=10)
    sched = make_scheduler() if scheduler == "after" else sched
    fail = {"now": True}

    def boom(*args):
        if fail["now"]:
            raise RuntimeError("boom")

    hook = opt.register_step_pre_hook(boom) if where == "a pre-step hook" else None

    def closure():
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        if where == "the closure":
            boom()

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 4
    torch.optim.SGD(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).parameters(), lr=0.1).load_state_dict(
        opt.state_dict())
    if sched is not None:
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi / 10)), rel=1e-12)
    fail["now"] = False
    opt.step(closure)
    freezer.step()
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 4
    if hook is not None:
        hook.remove()
    freezer.close()
    assert ("step" in vars(opt)) == (sched is not None)  # unwrapped: the class's step, or the scheduler's


def test_freezeouts_step_wrapper_copies_pickles_and_unwraps_as_the_plain_step():
    import io

    from smartfrz_fast import SmartFreezer

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, FreezeOut(), example_inputs=(torch.randn(2, 4),), total_steps=10)
    copied = copy.deepcopy(opt)
    assert copied.step.__self__ is copied and copied.step.__func__ is type(opt).step
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.step.__self__ is loaded
    freezer.close()
    assert "step" not in vars(opt)


class _GroupCounter(torch.optim.Optimizer):
    """An optimizer that counts its steps per group in a tensor it advances in place (timm's Lamb
    does), and divides the step by that count."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group.setdefault("step", torch.zeros(()))
            group["step"].add_(1)
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] / float(group["step"]))


def test_freezeout_steps_a_group_counter_once_per_step():
    """FreezeOut's per-unit sub-groups shared the group's counter tensor, so it advanced once per
    unit per step (timm's Lamb: 79 after 40 steps of a 4-unit model, its bias correction wrong
    and per unit; review44). Each sub-group steps its own copy, and the count goes back."""
    from torch import nn

    from smartfrz_fast import SmartFreezer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    opt = _GroupCounter(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, FreezeOut(t0=0.5, spacing="linear"), example_inputs=(torch.randn(2, 4),),
                           total_steps=12)
    opt.step()  # the counter made before the freezer's split, as after a resume
    held = opt.param_groups[0]["step"]
    reference = copy.deepcopy(model)
    factors = []
    for step in range(12):
        factors.append(freezer.policy.lr_factors(freezer.step_count))
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step))
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
        reference(x).sum().backward()
        with torch.no_grad():  # the reference: one counter, each unit's lr scaled by hand
            for layer, factor in zip(reference, factors[-1]):
                for p in layer.parameters():
                    if p.grad is not None and factor > 0:
                        p.add_(p.grad, alpha=-0.1 * factor / (step + 2))
                    p.grad = None
        assert opt.param_groups[0]["step"] is held and int(held) == step + 2
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_freezeout_default_t0_is_the_recommended_one():
    p = FreezeOut()
    p.bind(make_context(5, total_steps=1000))
    assert p.t0 == 0.8 and p.freeze_times[0] == pytest.approx(0.512)
    assert p.freeze_steps[0] == 513


@pytest.mark.parametrize("total, interval", [(100, None), (105, None), (40, 8), (41, 8)])
def test_autofreeze_never_freezes_where_nothing_is_left_to_save(fresh_seed, total, interval):
    """Interval ends inside the last interval (the final step among them) decide nothing;
    every earlier end decides as before, and freezing is possible there."""
    p = AutoFreeze(interval=interval, percentile=50)
    p.bind(make_context(6, total_steps=total))
    q = AutoFreeze(interval=p.interval, percentile=50)  # the same rule without a known end
    q.bind(make_context(6, total_steps=None))
    gen = torch.Generator().manual_seed(fresh_seed)
    decided, unguarded = {}, {}
    for step in range(total):
        norms = torch.rand(6, generator=gen) + 0.1
        for policy, out in ((p, decided), (q, unguarded)):
            policy.observe_gradients(step, norms)
            if policy.decides_at(step + 1):
                out[step + 1] = as_int(policy.decide(step + 1, 0))
            else:
                assert policy.decide(step + 1, 0) is None
    last_end = total - total % p.interval if total % p.interval else total
    assert last_end in unguarded and last_end not in decided  # the reference decides at its last end
    assert all(s <= total - p.interval for s in decided)
    assert decided == {s: d for s, d in unguarded.items() if s <= total - p.interval} and decided


@pytest.mark.parametrize("make", [FreezeOut, LinearFreeze, AutoFreeze])
def test_a_schedule_without_total_steps_is_refused_when_the_freezer_is_built(make):
    """Without example_inputs set-up waits for the first forward, and the missing total_steps was
    only refused there, inside the training loop (review58)."""
    from smartfrz_fast import SmartFreezer

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="pass total_steps=<number of optimizer steps>"):
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), make())
    if make is AutoFreeze:  # with its own interval it needs none
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), AutoFreeze(interval=5)).close()


def test_a_policy_of_the_users_asking_for_total_steps_still_gets_the_refusal():
    """The construction-time check asks needs_total_steps(); a policy of the user's that reads
    total_steps through _require_total_steps in bind() without overriding it got None there."""
    from smartfrz_fast import SmartFreezer

    class Halfway(FreezePolicy):
        def bind(self, context):
            super().bind(context)
            self.at = self._require_total_steps() // 2

        def decide(self, step):
            return 1 if step >= self.at else None

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="pass total_steps="):
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), Halfway(), example_inputs=torch.randn(2, 4))


def test_a_subclass_given_an_interval_is_not_told_to_give_one():
    """AutoFreeze's refusal suggests interval= as the other way; a subclass given one that still
    reads total_steps in bind() was told to give what it had given (review65)."""
    from smartfrz_fast import SmartFreezer

    class HalfwayAutoFreeze(AutoFreeze):
        def bind(self, context):
            super().bind(context)
            self.stop_at = self._require_total_steps() // 2

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="pass total_steps=") as refused:
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), HalfwayAutoFreeze(interval=5),
                     example_inputs=torch.randn(2, 4))
    assert "interval" not in str(refused.value)
    with pytest.raises(ValueError, match="give AutoFreeze an interval"):  # where it is the other way
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), AutoFreeze())
