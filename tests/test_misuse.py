"""Changes around a SmartFreezer after set-up, and misuse of it (issue 17, items 4 and 5):
a re-created optimizer, replaced parameters, a changed model, step() miscounted, use after
close(), two freezers on one model, policies returning something that is not a prefix length."""

import warnings

import pytest
import torch
from torch import nn

from smartfrz_fast import AutoFreeze, FreezeOut, SmartFreezer, StaticFreeze
from smartfrz_fast.policy.base import FreezePolicy

from models import SmallCNN, batch, train_steps


def sgd(model, momentum=0.0):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def held(opt):
    return {id(p) for g in opt.param_groups for p in g["params"]}


def frozen_ids(freezer):
    return {id(p) for u in freezer.units[:freezer.num_frozen] for p in u.parameters}


def run(steps, policy, recreate_at=None, momentum=0.0, seed=0, total_steps=12):
    """``steps`` training steps; at step ``recreate_at`` the optimizer is built anew from
    ``model.parameters()`` (every parameter, frozen ones included), as users do."""
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = sgd(model, momentum)
    freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0)[0], total_steps=total_steps)
    for step in range(steps):
        if step == recreate_at:
            opt = sgd(model, momentum)
        train_steps(model, opt, freezer, 1, start=step)
    return model, opt, freezer


# ---------------------------------------------------------------------- a re-created optimizer


def test_recreated_optimizer_keeps_freezeouts_schedule_and_loses_frozen_parameters():
    reference, _, ref_freezer = run(12, FreezeOut(t0=0.3))
    model, opt, freezer = run(12, FreezeOut(t0=0.3), recreate_at=7)
    assert ref_freezer.num_frozen == freezer.num_frozen >= 1 and freezer.timeline == ref_freezer.timeline
    # plain SGD keeps no state: with the schedule re-applied, the run is the uninterrupted one
    for a, b in zip(weights(reference), weights(model)):
        assert torch.equal(a, b)
    assert freezer.optimizers == [opt]
    assert not frozen_ids(freezer) & held(opt)
    assert all("smartfrz_unit" in g for g in opt.param_groups)


def test_recreated_optimizer_with_momentum_holds_no_state_of_frozen_parameters_and_resumes(tmp_path):
    model, opt, freezer = run(8, StaticFreeze(2, at_step=3), recreate_at=5, momentum=0.9)
    assert freezer.num_frozen == 2 and freezer.optimizers == [opt]
    assert not frozen_ids(freezer) & ({id(p) for p in opt.state} | held(opt))
    # the checkpoint made from the new optimizer resumes (torch used to refuse its groups)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "freezer": freezer.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    model2 = SmallCNN()
    model2.load_state_dict(ckpt["model"])
    opt2 = sgd(model2, 0.9)
    freezer2 = SmartFreezer(model2, opt2, StaticFreeze(2, at_step=3), example_inputs=batch(0)[0])
    freezer2.load_state_dict(ckpt["freezer"])
    opt2.load_state_dict(ckpt["opt"])
    train_steps(model2, opt2, freezer2, 2, start=8)
    train_steps(model, opt, freezer, 2, start=8)
    for a, b in zip(weights(model), weights(model2)):
        assert torch.equal(a, b)


def test_recreated_optimizer_with_a_gradient_policy_keeps_observing_gradients():
    policy = lambda: AutoFreeze(interval=2, percentile=80)  # noqa: E731
    reference, _, ref_freezer = run(12, policy(), total_steps=None)
    model, opt, freezer = run(12, policy(), recreate_at=3, total_steps=None)
    # the gradient hook runs on the new optimizer from its first step: the same decisions
    assert freezer.optimizers == [opt] and freezer.timeline == ref_freezer.timeline
    assert ref_freezer.num_frozen >= 1
    for a, b in zip(weights(reference), weights(model)):
        assert torch.equal(a, b)


def test_an_optimizer_wrapper_or_inner_optimizer_is_the_same_optimizer():
    class Wrapper(torch.optim.Optimizer):  # accelerate's AcceleratedOptimizer: shares the groups
        def __init__(self, inner):
            self.inner = inner
            super().__init__([{"params": [torch.zeros(1, requires_grad=True)]}], {})
            self.param_groups = inner.param_groups

        def step(self, closure=None):
            return self.inner.step(closure)

    for wrap_outer in (True, False):
        model = SmallCNN()
        inner = sgd(model)
        outer = Wrapper(inner)
        given = outer if wrap_outer else inner
        freezer = SmartFreezer(model, given, StaticFreeze(2, at_step=2), example_inputs=batch(0)[0])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            train_steps(model, outer, freezer, 4)
        assert freezer.optimizers == [given] and freezer.num_frozen == 2
        assert freezer._guard.unmatched == 0
        freezer.close()


def test_two_optimizers_stepping_the_same_parameters_with_one_given_is_refused():
    model = SmallCNN()
    given, other = sgd(model), sgd(model)
    freezer = SmartFreezer(model, given, StaticFreeze(1, at_step=2), example_inputs=batch(0)[0])
    with pytest.raises(RuntimeError, match=r"two optimizers step the model's parameters.*\[opt_a, opt_b\]"):
        for step in range(3):
            x, y = batch(step)
            nn.functional.cross_entropy(model(x), y).backward()
            other.step()
            given.step()
            freezer.step()


def test_an_optimizer_of_another_model_is_left_alone():
    model, other_model = SmallCNN(), SmallCNN()
    opt, other = sgd(model), sgd(other_model)
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=batch(0)[0])
    for step in range(3):
        x, y = batch(step)
        nn.functional.cross_entropy(other_model(x), y).backward()
        other.step()
        train_steps(model, opt, freezer, 1, start=step)
    assert freezer.optimizers == [opt] and len(held(other)) == 14


# ---------------------------------------------------------------------- replaced parameters


@pytest.mark.parametrize("how", ["load_state_dict_assign", "setattr", "assign_then_new_optimizer"])
def test_replaced_parameters_stay_frozen_train_and_are_sampled(tmp_path, how):
    from test_smartfrz_policy import predictor_file
    from smartfrz_fast import SmartFRZ

    def make():
        torch.manual_seed(0)
        model = SmallCNN()
        opt = sgd(model, momentum=0.9)
        policy = SmartFRZ(weights=predictor_file(tmp_path / "p.pt", freeze_logit=-20.0))  # never freezes
        freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0)[0], window=4, sample_size=16,
                               sample_every=1)
        train_steps(model, opt, freezer, 3)
        freezer.freeze_to(2)
        return model, opt, freezer

    reference, ref_opt, ref_freezer = make()
    train_steps(reference, ref_opt, ref_freezer, 4, start=3)
    model, opt, freezer = make()
    before = {name: p for name, p in model.named_parameters()}
    if how == "setattr":
        for module in (model.conv1, model.conv3):
            module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=True)
    else:
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    if how == "assign_then_new_optimizer":
        opt = sgd(model, momentum=0.9)
    train_steps(model, opt, freezer, 4, start=3)
    replaced = [n for n, p in model.named_parameters() if p is not before[n]]
    assert replaced
    # the units hold the new tensors; frozen ones stay frozen and unchanged on them
    assert [p for u in freezer.units for p in u.parameters] == list(model.parameters())
    for p in (p for u in freezer.units[:2] for p in u.parameters):
        assert not p.requires_grad and p.grad is None
    assert not frozen_ids(freezer) & held(opt)
    if how != "assign_then_new_optimizer":  # momentum moved with the parameter: the same run
        for a, b in zip(weights(reference), weights(model)):
            assert torch.equal(a, b)
    # the history samples the live weights: its newest row of the head is the head's weights
    history = freezer.history
    assert all(s is p for s, p in zip(history.sources, model.parameters()))
    slot = (history.count - 1) % history.window
    flat = torch.cat([p.detach().reshape(-1) for p in freezer.units[3].parameters])
    assert set(history.history[3, slot, :int(history.valid[3])].tolist()) <= set(flat.tolist())


@pytest.mark.parametrize("change, message", [
    (lambda m: setattr(m.conv2, "weight", nn.Parameter(torch.zeros(8, 8, 1, 1))), r"parameter conv2.weight changed"),
    (lambda m: m.conv2.register_parameter("extra", nn.Parameter(torch.zeros(3))), r"parameter\(s\) added"),
    (lambda m: setattr(m, "extra_block", nn.Linear(10, 10)), r"module\(s\) added: \['extra_block'\]"),
    (lambda m: setattr(m, "conv3", nn.Conv2d(8, 8, 3, padding=1)), r"module\(s\) replaced: \['conv3'\]"),
])
def test_a_changed_model_is_refused_at_the_next_step_with_the_fix(change, message):
    model = SmallCNN()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=batch(0)[0])
    train_steps(model, opt, freezer, 2)
    change(model)
    with pytest.raises(RuntimeError, match=message + r".*Build a new SmartFreezer.*close\(\) this one first"):
        freezer.step()
    with pytest.raises(RuntimeError, match="changed after"):  # and before every optimizer step, until closed
        opt.step()
    freezer.close()
    opt.step()
    SmartFreezer(model, sgd(model), StaticFreeze(1, at_step=2), example_inputs=batch(0)[0])  # the fix works


def test_block_appended_to_a_sequential_is_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=1), example_inputs=torch.randn(2, 4))
    freezer.step()
    model.append(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"module\(s\) added: \['5'\]"):
        freezer.step()


def test_a_module_without_parameters_may_be_added():
    model = SmallCNN()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=batch(0)[0])
    model.act = nn.ReLU()
    train_steps(model, opt, freezer, 3)
    assert freezer.num_frozen == 1


# ---------------------------------------------------------------------- step() misuse


def test_step_twice_per_optimizer_step_warns_once():
    model = SmallCNN()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=1000), example_inputs=batch(0)[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(60):
            x, y = batch(step % 4)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
            freezer.step()
    ours = [w for w in caught if "no optimizer step since the previous call" in str(w.message)]
    assert len(ours) == 1 and "double speed" in str(ours[0].message)


def test_a_few_skipped_optimizer_steps_do_not_warn():
    model = SmallCNN()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=1000), example_inputs=batch(0)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(15):  # a GradScaler skipping the first steps on inf gradients
            freezer.step()
        train_steps(model, opt, freezer, 40)


def test_step_never_called_warns_once():
    model = SmallCNN()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=batch(0)[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(250):
            opt.step()
    ours = [w for w in caught if "since the last SmartFreezer.step()" in str(w.message)]
    assert len(ours) == 1 and freezer.step_count == 0 and "Call freezer.step() once after each optimizer.step()" in str(ours[0].message)


def test_use_after_close_is_refused_and_close_twice_is_fine():
    model = SmallCNN()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=batch(0)[0])
    train_steps(model, opt, freezer, 2)
    state = freezer.state_dict()
    freezer.close()
    freezer.close()
    for call in (freezer.step, lambda: freezer.freeze_to(2), lambda: freezer.load_state_dict(state)):
        with pytest.raises(RuntimeError, match=r"was closed .*Build a new SmartFreezer to go on freezing"):
            call()
    assert "frozen: 1" in freezer.report() and freezer.state_dict()["num_frozen"] == 1  # reading still works
    opt.step()  # its hooks are gone


def test_second_freezer_on_one_model_is_refused_until_the_first_is_closed():
    model = SmallCNN()
    x = batch(0)[0]
    first = SmartFreezer(model, sgd(model), StaticFreeze(1, at_step=2), example_inputs=x)
    for target in (model, model.conv2):  # the model, or a part of it
        with pytest.raises(RuntimeError, match=r"already managed by another SmartFreezer.*Call close\(\) on the first"):
            SmartFreezer(target, sgd(target), StaticFreeze(1, at_step=2), example_inputs=x)
    with pytest.raises(RuntimeError, match="already managed"):  # a parent of it, set up lazily
        SmartFreezer(nn.Sequential(model), sgd(model), StaticFreeze(1, at_step=2))
    first.close()
    second = SmartFreezer(model, sgd(model), StaticFreeze(1, at_step=2), example_inputs=x)
    assert second.plan is not None


# ---------------------------------------------------------------------- policy decisions


class Returns(FreezePolicy):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def decide(self, step, frozen):
        return self.value


@pytest.mark.parametrize("value, error, message", [
    (-3, ValueError, r"Returns.decide returned -3 at step 1: a frozen-prefix length is a number of leading units "
                     r"from 0 to 4"),
    (99, ValueError, r"Returns.decide returned 99 at step 1"),
    (2.7, TypeError, r"Returns.decide returned 2.7 \(float\) at step 1"),
    (float("nan"), TypeError, r"Returns.decide returned nan"),
    ("2", TypeError, r"Returns.decide returned '2' \(str\)"),
    (True, TypeError, r"Returns.decide returned True \(bool\)"),
    (torch.tensor(2.5), TypeError, r"Returns.decide returned a torch.float32 tensor of shape \(\)"),
    (torch.tensor([1, 2]), TypeError, r"torch.int64 tensor of shape \(2,\)"),
    (torch.tensor(-1), ValueError, r"Returns.decide returned -1 at step 1"),
])
def test_a_policy_decision_that_is_not_a_prefix_length_names_the_policy(value, error, message):
    model = SmallCNN()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, Returns(value), example_inputs=batch(0)[0])
    before = weights(model)
    with pytest.raises(error, match=message):
        freezer.step()
    assert freezer.num_frozen == 0 and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model)))


@pytest.mark.parametrize("value", [0, 2, 4, torch.tensor(3), torch.tensor([3], dtype=torch.int32), None])
def test_valid_decisions_still_apply(value):
    import numpy as np

    model = SmallCNN()
    freezer = SmartFreezer(model, sgd(model), Returns(value), example_inputs=batch(0)[0])
    freezer.step()
    expected = 0 if value is None else min(int(value), 3)
    assert freezer.num_frozen == expected
    model2 = SmallCNN()
    freezer2 = SmartFreezer(model2, sgd(model2), Returns(np.int64(2)), example_inputs=batch(0)[0])
    freezer2.step()
    assert freezer2.num_frozen == 2
