"""Egeria: int8 fake quantisation, the plasticity rule, real training, resume."""

import copy

import pytest
import torch
from torch import nn

from smartfrz_fast import Egeria, SmartFreezer
from smartfrz_fast.policy.base import PolicyContext, UnitInfo
from smartfrz_fast.policy.egeria import fake_quantize_int8, relative_slope

from models import freezer_step_with_a_glitch


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))


def quant_reference(w):
    # float64 per-row loop: the specification
    out = torch.empty_like(w, dtype=torch.float64)
    for c in range(w.shape[0]):
        row = w[c].double()
        s = row.abs().max() / 127 if row.abs().max() > 0 else torch.tensor(1e-300, dtype=torch.float64)
        out[c] = torch.clamp(torch.round(row / s), -127, 127) * s
    return out


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(7, 3, 3, 5), (13, 11), (1, 1)])
def test_fake_quantize_matches_reference(fresh_seed, dtype, atol, shape):
    w = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
    w[0].zero_()  # an all-zero channel must not divide by zero
    q = fake_quantize_int8(w)
    assert q.dtype == dtype and q.shape == w.shape
    ref = quant_reference(w)
    step = w.double().abs().reshape(shape[0], -1).amax(1) / 127
    # w / scale within the dtype's rounding of a half step may round either way: one step apart
    per_element = step.clamp_min(1e-300).reshape(-1, *[1] * (len(shape) - 1)).expand(shape)
    quotient = w.double() / per_element
    near_half = ((quotient.abs() % 1) - 0.5).abs() <= torch.finfo(dtype).eps * 128
    close = (q.double() - ref).abs() <= atol * float(w.abs().max())
    one_step = (q.double() - ref).abs() <= per_element * (1 + 1e-6)
    assert bool((close | (near_half & one_step)).all()), f"seed {fresh_seed}: {(q.double() - ref).abs().max()}"
    # at most half a step from the input, and idempotent (up to the dtype's rounding)
    err = (q.double() - w.double()).abs().reshape(shape[0], -1).amax(1)
    assert bool((err <= step / 2 + atol * float(w.abs().max()) + 1e-12).all())
    assert torch.count_nonzero(q[0]) == 0
    bias = torch.randn(9, dtype=dtype)
    assert torch.equal(fake_quantize_int8(bias), bias)


def test_relative_slope():
    assert relative_slope([2.0, 2.0, 2.0, 2.0]) == 0.0
    # y = 1 + x over 0..3: slope 1, mean 2.5, change over the window 3 -> 3 / 2.5
    assert relative_slope([1.0, 2.0, 3.0, 4.0]) == pytest.approx(1.2)
    assert relative_slope([5.0]) == float("inf")


def bound(policy, num_units=4, total_steps=100):
    units = [UnitInfo(i, n, 10, 10) for i, n in enumerate(["0", "2", "4", "6"][:num_units])]
    policy.bind(PolicyContext(units=units, total_steps=total_steps, device=torch.device("cpu"),
                              max_frozen=num_units - 1))
    return policy


def test_rule_on_constructed_distances():
    pol = bound(Egeria(mlp(), torch.randn(4, 12), interval=1, warmup=0, window=3, tolerance=0.05,
                       patience=2, ref_refresh=10))
    flat, growing = 0.01, lambda k: 0.01 * (1 + k)
    got = []
    for k in range(6):  # unit 0 flat, unit 1 growing, unit 2 flat (blocked by unit 1)
        got.append(pol.observe([flat, growing(k), flat, flat], frozen=0))
    # window of 3 full at k=2, two hits at k=3
    assert got == [0, 0, 0, 1, 1, 1]
    assert pol.last_plasticity[1] > 0.05 > pol.last_plasticity[2]
    # a unit that moves again loses its hits: patience counts consecutive evaluations
    pol2 = bound(Egeria(mlp(), torch.randn(4, 12), interval=1, warmup=0, window=3, tolerance=0.05,
                        patience=2, ref_refresh=10))
    seq = [0.01, 0.01, 0.01, 0.05, 0.05, 0.05, 0.05]
    got = [pol2.observe([d, 1.0 * (k + 1), 1.0, 1.0], frozen=0) for k, d in enumerate(seq)]
    assert got == [0, 0, 0, 0, 0, 0, 1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        Egeria(mlp(), torch.randn(2, 12), window=1)
    with pytest.raises(ValueError, match="ref_refresh"):
        Egeria(mlp(), torch.randn(2, 12), window=5, ref_refresh=3)
    # equal to the window: it fills at the refresh, and patience 2 never passed (nothing froze)
    with pytest.raises(ValueError, match=r"ref_refresh \(5\) < window \+ patience - 1 \(6\)"):
        Egeria(mlp(), torch.randn(2, 12), window=5, patience=2, ref_refresh=5)
    Egeria(mlp(), torch.randn(2, 12), window=5, patience=2, ref_refresh=6)
    for tolerance in (True, float("inf")):
        with pytest.raises(ValueError, match="tolerance must be a positive finite number"):
            Egeria(mlp(), torch.randn(2, 12), tolerance=tolerance)
    with pytest.raises(TypeError, match="nn.Module"):
        Egeria("model", torch.randn(2, 12))
    with pytest.raises(ValueError, match=r"Egeria: ref_device='gpu' is not a torch device"):
        Egeria(mlp(), torch.randn(2, 12), ref_device="gpu")
    with pytest.raises(ValueError, match="total_steps"):
        bound(Egeria(mlp(), torch.randn(2, 12)), total_steps=None)


class KeywordMLP(nn.Module):
    """A model called with keyword inputs, as Hugging Face models are."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, features, scale=None):
        return self.net(features if scale is None else features * scale)


def test_probe_of_keyword_inputs_and_a_probe_the_model_cannot_take():
    model = KeywordMLP()
    probe = {"features": torch.randn(16, 12, generator=torch.Generator().manual_seed(7))}
    policy = Egeria(model, probe, probe_kwargs={"scale": torch.tensor(2.0)}, interval=2, warmup=2, window=3,
                    ref_refresh=8, asynchronous=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, policy=policy, example_inputs=probe, decision_delay=0)
    for step in range(12):
        x = torch.randn(32, 12, generator=torch.Generator().manual_seed(step))
        model(features=x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    policy.close()
    assert policy.overhead()["evaluations"] >= 4 and len(policy.last_plasticity) == len(freezer.units)
    with pytest.raises(ValueError, match="cannot run on probe_inputs.*dict of keyword inputs"):
        Egeria(mlp(), torch.randn(2, 7))  # the wrong width: refused now, not on the worker thread


def train(model, freezer, opt, steps, start=0):
    for step in range(start, steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 12, generator=g), torch.randint(0, 5, (32,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()


def make_run(asynchronous=True):
    model = mlp()
    probe = torch.randn(64, 12, generator=torch.Generator().manual_seed(7))
    policy = Egeria(model, probe, interval=2, warmup=2, window=3, tolerance=0.05, patience=2,
                    ref_refresh=8, asynchronous=asynchronous)
    # units 0 and 1 hardly move (lr 1e-6; 0 would be a hold): their activations stay at the
    # reference's; 2 and 3 train
    opt = torch.optim.SGD([{"params": list(model[0].parameters()) + list(model[2].parameters()), "lr": 1e-6},
                           {"params": list(model[4].parameters()) + list(model[6].parameters()), "lr": 0.5}],
                          momentum=0.9)
    freezer = SmartFreezer(model, opt, policy=policy, example_inputs=probe[:2], decision_delay=0)
    return model, opt, policy, freezer


def test_freezes_exactly_the_units_that_stopped_learning():
    model, opt, policy, freezer = make_run()
    train(model, freezer, opt, 40)
    policy.close()
    assert freezer.num_frozen == 2, freezer.report()
    # evaluations launched at steps 2, 4, 6, 8 are read at 4, 6, 8, 10: the window (3) is full
    # at step 8 (first hit), the second hit at step 10 freezes
    assert [e.step for e in freezer.timeline] == [10]
    stats = policy.overhead()
    assert stats["evaluations"] >= 15 and stats["worker_s"] > 0
    assert model[4].weight.requires_grad and model[6].weight.requires_grad


def test_parameters_replaced_in_place_are_followed():
    # load_state_dict(assign=True) swaps every tensor: Egeria must read the new ones, not the
    # old ones that no longer train (they would look converged and freeze everything)
    runs = []
    for assign in (False, True):
        model, opt, policy, freezer = make_run(asynchronous=False)
        train(model, freezer, opt, 5)
        if assign:
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        train(model, freezer, opt, 30, start=5)
        policy.close()
        runs.append(([e.step for e in freezer.timeline], torch.tensor(policy.last_plasticity)))
    assert runs[0][0] == runs[1][0] == [10]
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0, equal_nan=True)


def test_sync_and_async_agree_and_resume_is_exact():
    runs = {}
    for mode in (True, False):
        model, opt, policy, freezer = make_run(asynchronous=mode)
        train(model, freezer, opt, 30)
        policy.close()
        runs[mode] = ([e.step for e in freezer.timeline], [p.detach().clone() for p in model.parameters()])
    assert runs[True][0] == runs[False][0]
    for a, b in zip(runs[True][1], runs[False][1]):
        assert torch.equal(a, b)
    # resume at step 11 (an evaluation in flight) and continue to 30
    model, opt, policy, freezer = make_run()
    train(model, freezer, opt, 11)
    ckpt = {"model": model.state_dict(), "freezer": freezer.state_dict(), "opt": opt.state_dict()}
    policy.close()
    model2, opt2, policy2, freezer2 = make_run()
    model2.load_state_dict(ckpt["model"])
    freezer2.load_state_dict(ckpt["freezer"])
    opt2.load_state_dict(ckpt["opt"])
    train(model2, freezer2, opt2, 30, start=11)
    policy2.close()
    assert [e.step for e in freezer2.timeline] == runs[True][0]
    for a, b in zip(model2.parameters(), runs[True][1]):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("entry, junk", [
    ("windows", "x"), ("windows", [[0.1, float("nan")]] * 4), ("hits", [float("nan")] * 4), ("hits", [-1] * 4),
    ("pending", "x"), ("pending", [0.1] * 3), ("evaluations", None), ("reference", "nan"),
])
def test_a_damaged_state_is_refused_at_load_naming_the_entry(entry, junk):
    # accepted before, then a crash steps later ("too many dimensions 'str'", an IndexError) or
    # NaN fed into the decisions without a word (review49)
    model, opt, policy, freezer = make_run(asynchronous=False)
    train(model, freezer, opt, 7)
    state = copy.deepcopy(freezer.state_dict())
    policy.close()
    if junk == "nan":
        junk = [torch.full_like(t, float("nan")) if t.is_floating_point() else t for t in state["policy_state"][entry]]
        if all(not t.is_floating_point() for t in junk):
            pytest.skip("an integer reference holds no NaN")
    state["policy_state"][entry] = junk
    model2, opt2, policy2, freezer2 = make_run(asynchronous=False)
    with pytest.raises(ValueError, match=f"Egeria: the checkpoint's {entry!r} is not what Egeria saves"):
        freezer2.load_state_dict(state)
    policy2.close()


def test_a_reference_with_an_infinite_buffer_resumes():
    # a causal mask's -inf, an observer's +-inf before its first batch: the reference holds the
    # model's buffers as they are, and its own checkpoint was refused as damaged (review53)
    model, opt, policy, freezer = make_run(asynchronous=False)
    train(model, freezer, opt, 5)
    state = copy.deepcopy(freezer.state_dict())
    policy.close()
    state["policy_state"]["reference"][0] = torch.full_like(state["policy_state"]["reference"][0], float("-inf"))
    model2, opt2, policy2, freezer2 = make_run(asynchronous=False)
    freezer2.load_state_dict(state)
    policy2.close()


def test_defaults_act_on_an_ordinary_run():
    """Default knobs (interval total_steps // 50, warm-up total_steps // 10, tolerance 0.3) on a
    plain run (SGD with momentum, cosine lr, 200 steps): something freezes before the end. At
    the former tolerance 0.1 this run froze nothing, as the demo (375 steps) did."""
    import math

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 5))
    teacher = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 12, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    total = 200
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    policy = Egeria(model, x[:64], asynchronous=False)
    freezer = SmartFreezer(model, opt, policy, example_inputs=x[:2], total_steps=total)
    assert (policy.interval, policy.warmup, policy.tolerance) == (4, 20, 0.3)
    for _ in range(total):
        idx = torch.randint(0, 2048, (64,), generator=g)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        freezer.step()
    assert freezer.num_frozen >= 1 and freezer.timeline[0].step < total * 3 // 4, freezer.report()


def test_evaluations_copy_only_the_tensors_that_changed():
    # frozen tensors are copied once; one written in place later (a resume's load_state_dict)
    # is copied again: the staging buffers always hold the model's values
    model = mlp()
    x = torch.randn(6, 12)
    egeria = Egeria(model, x, interval=1, warmup=0, asynchronous=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, egeria, example_inputs=x)
    freezer.freeze_to(2)
    egeria._copy_weights()
    before = list(egeria._staged)
    model(x).sum().backward()
    opt.step()
    egeria._copy_weights()
    changed = {i for i, (a, b) in enumerate(zip(before, egeria._staged)) if a != b}
    params = list(model.parameters())
    trainable = {i for i, p in enumerate(params) if p.requires_grad}
    frozen = {i for i, p in enumerate(params) if not p.requires_grad}
    assert not changed & frozen and len(frozen) == 4  # the first two Linears' weights and biases
    with torch.no_grad():
        params[0].add_(1.0)
    egeria._copy_weights()
    for staged, tensor in zip(egeria._staging, list(model.parameters()) + list(model.buffers())):
        assert torch.equal(staged, tensor)
    freezer.close()


def test_batch_norm_statistics_reach_the_shadow_at_every_evaluation():
    # batch norm updates its running statistics without bumping their version counter
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(16, 6)
    egeria = Egeria(model, x, interval=1, warmup=0, asynchronous=False)
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), egeria, example_inputs=x)
    for _ in range(3):
        model(torch.randn(16, 6) * 3 + 1)  # train mode: the running statistics move
        egeria._copy_weights()
        assert torch.equal(egeria._staging[-3], model[1].running_mean)
        assert torch.equal(egeria._staging[-2], model[1].running_var)
    freezer.close()


def test_a_module_name_holding_a_plus_is_found():
    # units' names join module names with "+": a ModuleDict key "rgb+depth" was looked up as
    # "depth" (refused, or another module of that name watched)
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.ModuleDict({"rgb+depth": nn.Linear(12, 16)})
            self.body, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.head(torch.relu(self.body(torch.relu(self.stem["rgb+depth"](x)))))

    model = Net()
    x = torch.randn(8, 12)
    policy = Egeria(model, x, interval=1, warmup=0, asynchronous=False)
    SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=policy, example_inputs=x[:2],
                 total_steps=10)
    assert policy._hook_modules[0][0] is dict(policy.shadow.named_modules())["stem.rgb+depth"]


class _ScaledInput(nn.Module):
    """A learned input scale on the model itself: a unit of the root's own parameter."""

    def __init__(self):
        super().__init__()
        self.layers = mlp()
        self.in_scale = nn.Parameter(torch.ones(12))

    def forward(self, x):
        return self.layers(x * self.in_scale)


def test_a_unit_of_a_containers_own_parameter_is_measured_after_its_use():
    """A container's own parameter (torchvision ViT's class token, a learned input scale) is a
    unit whose last module is the container: measured at its output, it read the model's logits
    (the head's distance at every evaluation), and since freezing goes front to back, nothing
    froze (review44). It is measured at the next unit's output now."""
    model = _ScaledInput()
    probe = torch.randn(64, 12, generator=torch.Generator().manual_seed(7))
    policy = Egeria(model, probe, interval=2, warmup=2, window=3, tolerance=0.05, patience=2, ref_refresh=8,
                    asynchronous=False)
    still = [model.in_scale] + list(model.layers[0].parameters()) + list(model.layers[2].parameters())
    opt = torch.optim.SGD([{"params": still, "lr": 1e-6},
                           {"params": list(model.layers[4].parameters()) + list(model.layers[6].parameters()),
                            "lr": 0.5}], momentum=0.9)
    freezer = SmartFreezer(model, opt, policy=policy, example_inputs=probe[:2], decision_delay=0)
    assert [u.name for u in freezer.units][0] == "<root>"
    train(model, freezer, opt, 40)
    policy.close()
    assert freezer.num_frozen == 3, freezer.report()
    assert model.layers[4].weight.requires_grad


class NoisyMLP(nn.Module):
    """Draws random numbers whatever its mode (a VAE's sampling, MC dropout)."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        h = x
        for i, layer in enumerate(self.net):
            h = layer(h)
            if i == 1:
                h = h + 0.1 * torch.randn_like(h)
        return h


def test_a_model_drawing_random_numbers_in_eval_mode_trains_as_without_egeria():
    """Egeria's shadow forwards drew from the global generator (at construction, and on the
    worker thread concurrently with training): such a model's run depended on thread timing and
    differed from the same run frozen by hand (0.15 off, review82). It is evaluated between
    steps, its draws put back."""
    probe = torch.randn(16, 12, generator=torch.Generator().manual_seed(7))
    runs = []
    for with_egeria in (True, True, False):
        torch.manual_seed(0)
        model = NoisyMLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if with_egeria:
            state = torch.get_rng_state()
            policy = Egeria(model, probe, interval=2, warmup=2, window=3, tolerance=5.0, patience=1,
                            ref_refresh=8)
            assert torch.equal(state, torch.get_rng_state())  # construction draws nothing of the run's
            freezer = SmartFreezer(model, opt, policy=policy, example_inputs=probe, decision_delay=0)
        for step in range(30):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(32, 12, generator=g), torch.randint(0, 5, (32,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if with_egeria:
                freezer.step()
            else:  # by hand, where Egeria froze (each unit a Linear and its Tanh)
                for event in runs[0][1]:
                    if event.step == step + 1:
                        model.net[:2 * event.num_frozen].requires_grad_(False)
                        opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"] if p.requires_grad]
        if with_egeria:
            policy.close()
            assert freezer.num_frozen > 0, freezer.report()
        runs.append(([p.detach().clone() for p in model.parameters()], freezer.timeline if with_egeria else None))
    for a, b, c in zip(runs[0][0], runs[1][0], runs[2][0]):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_probe_is_a_copy_of_its_own():
    """The probe was the caller's tensor: a loop that refills one input buffer in place changed
    it at every step, and the worker read it while training wrote it (review82)."""
    buffer = torch.randn(8, 12)
    policy = Egeria(mlp(), buffer)
    buffer.zero_()
    assert policy.probe_args[0].abs().sum() > 0


class _MaskedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, x, mask):
        return self.body(x + mask.softmax(-1))


class _GraphConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp()

    def forward(self, x, adjacency):
        return self.body(torch.sparse.mm(adjacency, x))


def test_an_empty_probe_or_another_model_is_refused():
    """An empty probe made every distance 0/0 and nothing ever froze; an Egeria built on another
    instance of the model measured one that never trains and froze at its first chance (review82)."""
    with pytest.raises(ValueError, match="probe_inputs hold no samples"):
        Egeria(mlp(), torch.randn(0, 12))
    probe = torch.randn(4, 12)
    probe[1, 3] = float("nan")  # every distance was NaN, and nothing ever froze (review92)
    with pytest.raises(ValueError, match="output on probe_inputs holds NaN"):
        Egeria(mlp(), probe)
    Egeria(_MaskedMLP(), (torch.randn(4, 12), torch.triu(torch.full((4, 12), float("-inf")), 1)))  # a mask's -inf
    Egeria(_GraphConv(), (torch.randn(4, 12), torch.eye(4).to_sparse()))  # a sparse adjacency (review94)
    with torch.device("meta"):
        on_meta = mlp()
    with pytest.raises(ValueError, match=r"on the 'meta' device .*after model.to_empty"):
        Egeria(on_meta, torch.randn(4, 12))
    model = mlp()
    policy = Egeria(mlp(), torch.randn(4, 12), interval=2, warmup=2)
    with pytest.raises(ValueError, match="another model than the one SmartFreezer manages"):
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=policy,
                     example_inputs=torch.randn(4, 12))


@pytest.mark.parametrize("reparametrize", ["prune", "weight_norm"])
def test_a_pruned_or_weight_normed_model_is_copied(reparametrize):
    """prune and the old weight_norm keep the weight as an attribute computed from the layer's
    own tensors, which copy.deepcopy refused: Egeria could not be built (review82)."""
    import warnings

    from torch.nn.utils import prune

    model = mlp()
    for layer in (model[0], model[2]):
        if reparametrize == "prune":
            prune.l1_unstructured(layer, "weight", 0.5)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated, still widespread
                torch.nn.utils.weight_norm(layer)
    probe = torch.randn(8, 12)
    policy = Egeria(model, probe, interval=2, warmup=2, window=3, ref_refresh=8, asynchronous=False)
    with torch.no_grad():
        torch.testing.assert_close(policy.shadow(probe), model(probe))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, policy=policy, example_inputs=probe, decision_delay=0)
    train(model, freezer, opt, 8)
    assert policy.overhead()["evaluations"] >= 3


def test_a_failed_evaluation_raises_once():
    """An evaluation that failed on the worker thread raised again at every later decision and
    at every freezer.state_dict(): the run could no longer be checkpointed (review82)."""
    model, opt, policy, freezer = make_run()
    evaluate, calls = policy._evaluate, []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory on the worker")
        return evaluate(*args)

    policy._evaluate = fails_once
    with pytest.raises(RuntimeError, match="out of memory on the worker"):
        train(model, freezer, opt, 12)
    freezer.state_dict()
    train(model, freezer, opt, 30, start=freezer.step_count)
    policy.close()
    assert freezer.num_frozen == 2


def test_a_unit_the_probe_never_reaches_is_named():
    """A training-only auxiliary head has no activation in the eval-mode probe pass: it held
    every unit after it unfrozen for the whole run, without a word (review82: GoogLeNet)."""
    import warnings

    class WithAuxHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()
            self.aux = nn.Linear(16, 5)

        def forward(self, x):
            h = self.body[1](self.body[0](x))
            aux = self.aux(h) if self.training else 0
            for layer in list(self.body)[2:]:
                h = layer(h)
            return h + 0 * aux

    torch.manual_seed(0)
    model = WithAuxHead()
    probe = torch.randn(16, 12)
    policy = Egeria(model, probe, interval=2, warmup=2, window=3, tolerance=50.0, patience=1, ref_refresh=8,
                    asynchronous=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezer = SmartFreezer(model, opt, policy=policy, example_inputs=probe, decision_delay=0)
    assert [u.name for u in freezer.units][1] == "aux"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, freezer, opt, 20)
    named = [str(w.message) for w in caught if "no activation to judge" in str(w.message)]
    assert len(named) == 1 and "unit 1 (aux)" in named[0]
    assert freezer.num_frozen == 1


def _egeria_with_a_nan_at_the_first_refresh(steps, glitch_at=19, checkpoint_at=None, state=None):
    """An MLP under Egeria (evaluations every 5 steps from step 20, each 10th refreshing the
    reference): at ``glitch_at`` one weight is NaN when the freezer steps, and is put right at
    once. Returns the model, the freezer and, with ``checkpoint_at``, the states saved there."""
    torch.manual_seed(0)
    model, probe = mlp(), torch.randn(16, 12, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    policy = Egeria(model, probe, tolerance=0.9, interval=5, window=3, patience=1, ref_refresh=10,
                    asynchronous=False)
    freezer = SmartFreezer(model, opt, policy, example_inputs=probe, total_steps=200)
    if state is not None:
        model.load_state_dict(state[0])
        freezer.load_state_dict(state[2])
        opt.load_state_dict(state[1])
    data = torch.Generator().manual_seed(6)
    batches = [(torch.randn(16, 12, generator=data), torch.randint(0, 3, (16,), generator=data)) for _ in range(steps)]
    saved = None
    for step, (x, y) in enumerate(batches[freezer.step_count:], freezer.step_count):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if step == glitch_at:
            freezer_step_with_a_glitch(freezer, model[0].weight, float("nan"))
        else:
            freezer.step()
        if step + 1 == checkpoint_at:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict(), freezer.state_dict()))
    return model, freezer, saved


def test_a_refresh_that_meets_a_nan_weight_waits_for_the_next_evaluation():
    """A weight NaN at a reference refresh (an overflow put right at once) put NaN into the int8
    reference until the next refresh: freezing came 35-45 steps late, and checkpoints meanwhile
    were refused as "damaged or edited" (review92). The refresh waits one evaluation; a
    checkpoint taken meanwhile resumes exactly."""
    model, freezer, saved = _egeria_with_a_nan_at_the_first_refresh(60, checkpoint_at=22)
    policy = freezer.policy
    assert not any(bool(torch.isnan(t).any()) for t in policy._ref_tensors)
    assert saved[2]["policy_state"]["refresh_owed"] and not policy._refresh_owed
    resumed, resumed_freezer, _ = _egeria_with_a_nan_at_the_first_refresh(60, state=saved)
    assert resumed_freezer.timeline == freezer.timeline
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_close_releases_the_model_copies_and_keeps_the_state():
    # the shadow and the staging buffers (2x the model) outlived freezer.close() until the
    # freezer was collected (review103: 396 MiB for a 132 MiB model); the reference is the
    # policy's state, which state_dict() still reads after close()
    import gc
    import weakref

    model, opt, policy, freezer = make_run(asynchronous=False)
    train(model, freezer, opt, 7)
    before = copy.deepcopy(freezer.state_dict()["policy_state"])
    copies = [weakref.ref(t) for t in (*policy._shadow_tensors, *policy._staging)]
    freezer.close()
    gc.collect()
    assert all(ref() is None for ref in copies)
    after = freezer.state_dict()["policy_state"]
    assert len(after["reference"]) == len(before["reference"])
    for a, b in zip(after["reference"], before["reference"]):
        assert torch.equal(a, b)
    del freezer
    gc.collect()
    with pytest.raises(ValueError, match="closed with its freezer.*new Egeria"):
        SmartFreezer(model, opt, policy=policy, example_inputs=torch.randn(4, 12))
