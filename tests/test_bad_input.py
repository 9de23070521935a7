"""Bad or unusual input through the public API: a clear error that says what is wrong and what
to do, and nothing lost (model, optimizer and freezer as before a refused call); or, where the
input is legitimate, the right behaviour."""

import sys
import warnings

import pytest
import torch
from torch import nn

from smartfrz_fast import (AutoFreeze, FreezeOut, LinearFreeze, SievingSampler, SmartFreezer, SmartFRZ,
                           SparseMasks, StaticFreeze)
from smartfrz_fast.predictor import PredictorWeightsError

from models import SmallCNN, batch, freezer_step_with_a_glitch, train_steps
from test_smartfrz_policy import predictor_file  # a tiny predictor file: one definition


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def snapshot(model, opt, freezer):
    """What a refused call must leave as it was."""
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "groups": [[id(p) for p in g["params"]] for g in opt.param_groups],
        "opt_state": len(opt.state),
        "freezer": (freezer.step_count, freezer.num_frozen, len(freezer.timeline), len(freezer._pending)),
        "policy": repr(freezer.policy.state_dict()),
        "history": None if freezer.history is None else freezer.history.history.clone(),
    }


def assert_unchanged(before, after):
    for key in ("requires_grad", "groups", "opt_state", "freezer", "policy"):
        assert before[key] == after[key], key
    for k, v in before["weights"].items():
        torch.testing.assert_close(v, after["weights"][k], rtol=0, atol=0, equal_nan=True, msg=k)
    if before["history"] is not None:
        assert torch.equal(before["history"], after["history"])


# ---------------------------------------------------------------------- construction


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(total_steps=2.5), TypeError, "total_steps must be an int or None, got 2.5"),
    (dict(total_steps="100"), TypeError, "total_steps must be an int"),
    (dict(total_steps=0), ValueError, "total_steps must be >= 1 .the number of optimizer steps"),
    (dict(total_steps=-5), ValueError, "total_steps must be >= 1"),
    (dict(keep_trainable=1.5), TypeError, "keep_trainable must be an int, got 1.5"),
    (dict(keep_trainable=-1), ValueError, "keep_trainable must be >= 0"),
    (dict(sample_every=0), ValueError, "sample_every must be >= 1"),
    (dict(window=1), ValueError, "window must be >= 2"),
    (dict(sample_size=0), ValueError, "sample_size must be >= 1"),
    (dict(decision_delay=True), TypeError, "decision_delay must be an int"),
])
def test_engine_settings_are_checked(kwargs, error, message):
    model = SmallCNN()
    with pytest.raises(error, match=message):
        SmartFreezer(model, sgd(model), StaticFreeze(1), example_inputs=batch(0)[0], **kwargs)


def test_numpy_ints_are_accepted():
    np = pytest.importorskip("numpy")
    model = SmallCNN()
    freezer = SmartFreezer(model, sgd(model), FreezeOut(), example_inputs=batch(0)[0], total_steps=np.int64(40),
                           keep_trainable=np.int32(1))
    assert freezer.total_steps == 40 and type(freezer.total_steps) is int


def test_keep_trainable_covering_every_unit_warns_that_nothing_will_freeze():
    model = SmallCNN()
    opt = sgd(model)
    with pytest.warns(UserWarning, match=r"keep_trainable=4 keeps all 4 .* nothing will ever freeze. Lower "
                                         r"keep_trainable \(at most 3"):
        freezer = SmartFreezer(model, opt, LinearFreeze(0.0), example_inputs=batch(0)[0], total_steps=4,
                               keep_trainable=4)
    train_steps(model, opt, freezer, 4)
    assert freezer.num_frozen == 0 and all(p.requires_grad for p in model.parameters())


def test_keep_trainable_over_units_of_single_numbers_names_the_value_that_freezes():
    """Only scalar gates train (ReZero, LLaMA-Adapter's gating): units of single numbers are not
    counted as kept, so every keep_trainable >= 1 froze nothing, and the warning advised 'at most 3',
    which froze nothing either (review76 #6)."""
    class GatedLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.gate = nn.Linear(8, 8).requires_grad_(False), nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return x + self.gate * self.layer(x)

    model = nn.Sequential(*[GatedLayer() for _ in range(4)])
    with pytest.warns(UserWarning, match=r"keep_trainable=1 keeps all .*units of single numbers.* not counted as kept"
                                         r".*\(at most 0 leaves a unit to freeze\)"):
        SmartFreezer(model, sgd(model), LinearFreeze(0.0), example_inputs=torch.randn(2, 8), total_steps=4)


def test_a_model_of_one_unit_warns_that_there_is_nothing_to_freeze():
    # the advice was "lower keep_trainable (at most 0 ...)", which freezes the whole model (review49)
    model = nn.Linear(8, 3)
    with pytest.warns(UserWarning, match=r"the model is one unit \(<root>\), which trains its output: there is "
                                         r"nothing in front of it to freeze") as caught:
        SmartFreezer(model, sgd(model), LinearFreeze(0.0), example_inputs=torch.randn(2, 8), total_steps=4)
    assert not any("Lower keep_trainable" in str(w.message) for w in caught)


def test_model_on_meta_is_refused():
    model = SmallCNN().to("meta")
    with pytest.raises(ValueError, match=r"'meta' device \(not materialised.*model.to_empty"):
        SmartFreezer(model, sgd(model), StaticFreeze(1), example_inputs=batch(0)[0].to("meta"))


def _engine_hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def test_a_set_up_at_the_first_forward_that_raises_raises_again_and_never_trains_unfrozen():
    model = SmallCNN()
    optimizer = sgd(model)
    freezer = SmartFreezer(model, optimizer, StaticFreeze(99))  # no example_inputs: set up at the first forward
    x, y = batch(0)
    for _ in range(2):  # every forward says what is wrong; none trains without the freezer
        with pytest.raises(ValueError, match="num_units=99"):
            model(x)
        with pytest.raises(RuntimeError, match="has not seen the model run yet"):
            freezer.step()
        for call in ("report", "frozen_flops_fraction"):  # named, not an AttributeError on None
            with pytest.raises(RuntimeError, match=rf"has not seen the model run yet.*before calling {call}\(\)"):
                getattr(freezer, call)()
    freezer.close()
    assert _engine_hooks(model) == 0
    freezer = SmartFreezer(model, optimizer, StaticFreeze(1, at_step=1))  # the model is free for a right one
    train_steps(model, optimizer, freezer, 2)
    assert freezer.num_frozen == 1


def test_a_set_up_that_raises_in_the_constructor_leaves_no_hook_on_the_model_or_optimizer():
    model = SmallCNN()
    optimizer = sgd(model)
    with pytest.raises(ValueError, match="num_units=99"):
        SmartFreezer(model, optimizer, StaticFreeze(99), example_inputs=batch(0)[0])
    assert _engine_hooks(model) == 0
    assert not optimizer._optimizer_step_post_hooks and not optimizer._optimizer_load_state_dict_pre_hooks


@pytest.mark.parametrize("inputs", [
    torch.randn(2, 3, 8, 8),  # wrong shape (3 channels)
    torch.randn(2, 1, 8, 8, dtype=torch.float64),  # wrong dtype
    torch.randn(2, 1, 8, 8, device="meta"),  # wrong device
])
def test_example_inputs_the_model_rejects_say_where_they_came_from(inputs):
    model = SmallCNN()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError) as info:
        SmartFreezer(model, sgd(model), StaticFreeze(1), example_inputs=inputs)
    if sys.version_info >= (3, 11):  # exception notes
        assert "example_inputs (a tuple of positional inputs, or one tensor)" in "\n".join(info.value.__notes__)
    assert torch.equal(rng, torch.get_rng_state())
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k


def test_complex_parameters_train_with_schedules_and_are_refused_by_the_history(tmp_path):
    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head((x.to(torch.cfloat) @ self.w).real)

    model = Complex()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=1), example_inputs=torch.randn(3, 4))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    freezer.step()
    assert freezer.num_frozen == 1 and not model.w.requires_grad
    model = Complex()
    with pytest.raises(ValueError, match=r"samples float parameters only.*complex64.*Use a schedule policy"):
        SmartFreezer(model, sgd(model), SmartFRZ(weights=predictor_file(tmp_path / "p.pt")),
                     example_inputs=torch.randn(3, 4), window=4, sample_size=16)


def test_a_parameter_held_by_two_optimizers_leaves_both():
    model = SmallCNN()
    first, second = sgd(model), torch.optim.Adam(model.parameters(), lr=1e-3)
    freezer = SmartFreezer(model, [first, second], StaticFreeze(1, at_step=2), example_inputs=batch(0)[0])
    for step in range(2):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        first.step()
        second.step()
        first.zero_grad()
        freezer.step()
    frozen = set(map(id, freezer.units[0].parameters))
    for opt in (first, second):
        assert not frozen & {id(p) for g in opt.param_groups for p in g["params"]}
        assert not frozen & {id(p) for p in opt.state}
        opt.state_dict()


# ---------------------------------------------------------------------- stepping


@pytest.mark.parametrize("policy, frozen", [
    (lambda: StaticFreeze(2, at_step=1), 2),  # schedules follow the step count alone
    (lambda: LinearFreeze(0.0), 3),  # 4 of 4 steps: every freezable unit
    (lambda: AutoFreeze(interval=1), None),  # no gradients seen: must not fail
])
def test_step_before_any_backward(policy, frozen):
    model = SmallCNN()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, policy(), example_inputs=batch(0)[0], total_steps=4)
    for _ in range(4):
        freezer.step()
    if frozen is not None:
        assert freezer.num_frozen == frozen
    train_steps(model, opt, freezer, 2)  # and training goes on from there


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_record_a_float32_history_and_freeze(tmp_path, dtype):
    model = SmallCNN().to(dtype)
    opt = sgd(model)
    policy = SmartFRZ(weights=predictor_file(tmp_path / "p.pt", freeze_logit=20.0), settle_ratio=None)
    freezer = SmartFreezer(model, opt, policy, example_inputs=batch(0)[0].to(dtype), window=4, sample_size=16,
                           sample_every=1)
    head_at_snapshot = None
    for step in range(5):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x.to(dtype)).float(), y).backward()
        opt.step()
        opt.zero_grad()
        count = freezer.history.count
        freezer.step()
        if freezer.history.count > count:  # (snapshots stop once the prefix is as long as it may be)
            head_at_snapshot = torch.cat([p.detach().reshape(-1) for p in freezer.units[3].parameters]).float()
    assert freezer.history.history.dtype == torch.float32
    assert torch.isfinite(freezer.history.history).all()
    assert freezer.num_frozen == freezer.max_frozen
    # the head (never frozen): its newest snapshot is its weights at that step, upcast
    slot = (freezer.history.count - 1) % 4
    k = int(freezer.history.valid[3])
    assert set(freezer.history.history[3, slot, :k].tolist()) <= set(head_at_snapshot.tolist())


def test_freeze_to_checks_its_argument_and_is_idempotent():
    model = SmallCNN()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=100), example_inputs=batch(0)[0])
    for bad in (2.7, "3", None, True, torch.tensor(True)):
        with pytest.raises(TypeError, match="freeze_to expects a number of units"):
            freezer.freeze_to(bad)
    with pytest.raises(ValueError, match="freeze_to expects a number of units >= 0, got -3"):
        freezer.freeze_to(-3)
    assert freezer.num_frozen == 0 and all(p.requires_grad for p in model.parameters())
    assert freezer.freeze_to(torch.tensor(2)) == 2  # a policy's decision tensor
    hooks = len(freezer._eval_hooks)
    assert freezer.freeze_to(2) == 2 and freezer.freeze_to(1) == 2  # never unfreezes, never twice
    assert len(freezer.timeline) == 1 and len(freezer._eval_hooks) == hooks
    assert freezer.freeze_to(100) == 3  # clamped to max_frozen


# ---------------------------------------------------------------------- checkpoints


def trained(policy=None, steps=3, **kwargs):
    model = SmallCNN()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, policy or StaticFreeze(1, at_step=2), example_inputs=batch(0)[0], **kwargs)
    train_steps(model, opt, freezer, steps)
    return freezer


def fresh(policy=None, **kwargs):
    model = SmallCNN()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, policy or StaticFreeze(1, at_step=2), example_inputs=batch(0)[0], **kwargs)
    return model, opt, freezer


@pytest.mark.parametrize("key", ["signature", "settings", "policy", "policy_state", "step", "num_frozen",
                                 "timeline", "pending", "history"])
def test_truncated_checkpoint_is_refused_and_changes_nothing(key):
    state = trained().state_dict()
    del state[key]
    model, opt, freezer = fresh()
    before = snapshot(model, opt, freezer)
    with pytest.raises(ValueError, match=rf"lacks \['{key}'\]: it is truncated"):
        freezer.load_state_dict(state)
    assert_unchanged(before, snapshot(model, opt, freezer))
    freezer.load_state_dict(trained().state_dict())  # and a good one still loads
    assert freezer.num_frozen == 1


@pytest.mark.parametrize("edit, message", [
    (dict(num_frozen="1"), "corrupt: step=3, num_frozen='1'"),
    (dict(num_frozen=9), "num_frozen=9 .a model of 4 units"),
    (dict(num_frozen=-1), "num_frozen=-1"),
    (dict(step=-2), "step=-2"),
    (dict(timeline=[{"step": 2}]), "corrupt timeline or pending list"),
    (dict(pending=[(4,)]), "corrupt timeline or pending list"),
])
def test_corrupt_checkpoint_values_are_refused_and_change_nothing(edit, message):
    state = {**trained().state_dict(), **edit}
    model, opt, freezer = fresh()
    before = snapshot(model, opt, freezer)
    with pytest.raises(ValueError, match=message):
        freezer.load_state_dict(state)
    assert_unchanged(before, snapshot(model, opt, freezer))


def test_checkpoint_with_other_engine_settings_is_refused():
    state = trained().state_dict()
    for kwargs, message in [(dict(keep_trainable=2), "made with keep_trainable=1; this SmartFreezer has "
                                                     "keep_trainable=2. Construct it with the checkpoint's"),
                            (dict(seed=3), "seed=0; .* seed=3"),
                            (dict(decision_delay=0), "decision_delay=1; .* decision_delay=0")]:
        model, opt, freezer = fresh(**kwargs)
        before = snapshot(model, opt, freezer)
        with pytest.raises(ValueError, match=message):
            freezer.load_state_dict(state)
        assert_unchanged(before, snapshot(model, opt, freezer))


def test_smartfrz_resumed_with_another_total_steps_names_sample_every(tmp_path):
    weights = predictor_file(tmp_path / "p.pt")
    kw = dict(window=4, sample_size=16)
    state = trained(SmartFRZ(weights=weights), total_steps=240, **kw).state_dict()  # sample_every 2
    model, opt, freezer = fresh(SmartFRZ(weights=weights), total_steps=1200, **kw)  # sample_every 10
    with pytest.raises(ValueError, match="sample_every=2; .* sample_every=10.*pass the same total_steps"):
        freezer.load_state_dict(state)
    model, opt, freezer = fresh(SmartFRZ(weights=weights), total_steps=1200, sample_every=2, **kw)
    freezer.load_state_dict(state)
    assert freezer.step_count == 3 and freezer.history.count == 1


def test_a_resume_with_another_run_length_names_total_steps_for_derived_intervals():
    # "checkpoint was made with interval=10, this run has interval=20", about a knob never set
    state = trained(AutoFreeze(), steps=5, total_steps=100).state_dict()
    model, opt, freezer = fresh(AutoFreeze(), total_steps=200)
    with pytest.raises(ValueError, match=r"interval=10, this run has interval=20 \(total_steps=200 // "
                       r"num_intervals=10: the run's length changed\?\)\. Construct AutoFreeze with interval=10"):
        freezer.load_state_dict(state)


def test_refused_policy_state_leaves_the_policy_and_history_as_they_were():
    state = trained(AutoFreeze(interval=2), steps=5).state_dict()
    model, opt, freezer = fresh(AutoFreeze(interval=3))
    train_steps(model, opt, freezer, 2)  # accumulators hold something of their own
    freezer.step_count = 0  # only a fresh freezer may load: pretend, to see the policy kept
    before = snapshot(model, opt, freezer)
    with pytest.raises(ValueError, match="interval=2, this run has interval=3"):
        freezer.load_state_dict(state)
    assert_unchanged(before, snapshot(model, opt, freezer))


def test_other_policy_settings_resume_with_a_warning():
    state = trained(StaticFreeze(1, at_step=2)).state_dict()
    model, opt, freezer = fresh(StaticFreeze(2, at_step=5))
    with pytest.warns(UserWarning, match=r"policy was StaticFreeze\(num_units=1, at_step=2\), this run's is "
                                         r"StaticFreeze\(num_units=2, at_step=5\)"):
        freezer.load_state_dict(state)
    assert freezer.num_frozen == 1 and freezer.step_count == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh(StaticFreeze(1, at_step=2))[2].load_state_dict(state)  # same settings: silent


def test_optimizer_loaded_before_the_freezer_says_which_order():
    model = SmallCNN()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=batch(0)[0])
    train_steps(model, opt, freezer, 3)
    saved = {"freezer": freezer.state_dict(), "opt": opt.state_dict()}
    model, opt, freezer = fresh()
    with pytest.raises(ValueError, match="saved after layers froze does. Load the freezer's state first"):
        opt.load_state_dict(saved["opt"])
    freezer.load_state_dict(saved["freezer"])
    opt.load_state_dict(saved["opt"])  # the documented order
    assert freezer.num_frozen == 1


def test_another_total_steps_resumes_with_a_warning():
    # FreezeOut's schedule (and SmartFRZ's pace) follows total_steps: the resumed run would not
    # continue as the saved one
    state = trained(FreezeOut(), total_steps=48).state_dict()
    model, opt, freezer = fresh(FreezeOut(), total_steps=96)
    with pytest.warns(UserWarning, match="made with total_steps=48, this run has total_steps=96"):
        freezer.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh(FreezeOut(), total_steps=48)[2].load_state_dict(state)  # the same length: silent
        del state["total_steps"]  # a checkpoint from before the check: silent
        fresh(FreezeOut(), total_steps=96)[2].load_state_dict(state)


def test_checkpoint_that_would_freeze_nan_weights_is_refused_before_anything_changes():
    state = trained().state_dict()
    model, opt, freezer = fresh()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    before = snapshot(model, opt, freezer)
    with pytest.raises(ValueError, match=r"NaN or inf weights in this model \(\['conv1\+bn1'\]\): load the "
                                         "model's state_dict"):
        freezer.load_state_dict(state)
    assert_unchanged(before, snapshot(model, opt, freezer))


def test_checkpoint_from_a_model_with_more_units_is_refused():
    class Bigger(SmallCNN):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(10, 10)

        def forward(self, x):
            return self.extra(super().forward(x))

    model = Bigger()
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=batch(0)[0])
    train_steps(model, opt, freezer, 3)
    model, opt, other = fresh()
    before = snapshot(model, opt, other)
    with pytest.raises(ValueError, match=r"different model \(the checkpoint has 5 units, this model 4\)"):
        other.load_state_dict(freezer.state_dict())
    assert_unchanged(before, snapshot(model, opt, other))


# ---------------------------------------------------------------------- predictor files


def test_predictor_with_nan_weights_or_a_foreign_provenance_is_refused(tmp_path):
    good = predictor_file(tmp_path / "good.pt")
    from smartfrz_fast.predictor.model import _digest

    blob = torch.load(good, weights_only=True)
    blob["state_dict"]["key.0.weight"][0, 0] = float("nan")
    blob["digest"] = _digest(blob)  # consistent: a diverged training run, not a corrupt file
    torch.save(blob, tmp_path / "nan.pt")
    with pytest.raises(PredictorWeightsError, match=r"NaN or inf weights \(\['key.0.weight'\]\).*Retrain it"):
        SmartFRZ(weights=tmp_path / "nan.pt")
    blob = torch.load(good, weights_only=True)
    blob["provenance"] = "made by hand"
    torch.save(blob, tmp_path / "prov.pt")
    with pytest.raises(PredictorWeightsError, match="provenance of type str"):
        SmartFRZ(weights=tmp_path / "prov.pt")


@pytest.mark.parametrize("content", [b"", b"hello", None, bytes(range(256)) * 16])
def test_empty_text_or_directory_predictor_file_is_refused(tmp_path, content):
    path = tmp_path / "weights"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    match = "a folder, not a predictor file" if content is None else "unreadable.*Pass a file written by save_predictor"
    with pytest.raises(PredictorWeightsError, match=match) as info:
        SmartFRZ(weights=path)
    assert "Python objects" not in str(info.value)  # random bytes were said to hold some (review92)


def test_a_bad_smartfrz_predictor_variable_is_named(tmp_path, monkeypatch):
    # the user passed nothing: the error must say where the file name came from, and what to do
    monkeypatch.setenv("SMARTFRZ_PREDICTOR", "")
    with pytest.raises(PredictorWeightsError, match="SMARTFRZ_PREDICTOR is set but empty"):
        SmartFRZ()
    monkeypatch.setenv("SMARTFRZ_PREDICTOR", str(tmp_path / "absent.pt"))
    with pytest.raises(PredictorWeightsError, match=r"absent.pt \(from \$SMARTFRZ_PREDICTOR\).*unset it"):
        SmartFRZ()
    garbage = tmp_path / "garbage.pt"
    torch.save({"model": nn.Linear(2, 2)}, garbage)  # a pickled module: not loaded, and not advised to be
    monkeypatch.setenv("SMARTFRZ_PREDICTOR", str(garbage))
    with pytest.raises(PredictorWeightsError, match="from .SMARTFRZ_PREDICTOR. are unreadable .it holds Python "
                                                    "objects besides tensors") as info:
        SmartFRZ()
    assert "weights_only" not in str(info.value)


def test_a_predictor_configuration_of_other_types_is_refused(tmp_path):
    from smartfrz_fast.predictor.model import AttentionPredictor, PredictorConfig, save_predictor

    path = tmp_path / "p.pt"
    save_predictor(AttentionPredictor(PredictorConfig(sample_size=8, hidden=4, embed=4, head_hidden=4)), path, {})
    blob = torch.load(path, weights_only=True)
    blob["config"]["window"] = "30"
    torch.save(blob, path)
    with pytest.raises(PredictorWeightsError, match="configuration with \\{'window': '30'\\}"):
        SmartFRZ(weights=path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold="0.5"), "threshold is a probability in .0, 1., got '0.5'"),
    (dict(evaluate_every=2.5), "evaluate_every is a number of steps >= 1, or None, got 2.5"),
    (dict(evaluate_every="3"), "evaluate_every .* got '3'"),
])
def test_smartfrz_settings_of_the_wrong_type(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SmartFRZ(weights=predictor_file(tmp_path / "p.pt"), **kwargs)


# ---------------------------------------------------------------------- SparseMasks, SievingSampler


def test_sparse_masks_update_refuses_values_other_than_0_and_1():
    model = SmallCNN()
    masks = SparseMasks(model, {"conv2.weight": torch.rand(model.conv2.weight.shape) > 0.5})
    before = masks.bool_mask("conv2.weight").clone()
    with pytest.raises(ValueError, match="SparseMasks.update: mask for 'conv2.weight' must be bool or 0/1"):
        masks.update({"conv2.weight": torch.full_like(model.conv2.weight, 0.5)})
    assert torch.equal(before, masks.bool_mask("conv2.weight"))


def test_sparse_masks_checkpoint_of_a_broadcastable_shape_is_refused_and_changes_nothing():
    model = SmallCNN()
    g = torch.Generator().manual_seed(0)
    masks = SparseMasks(model, {n: torch.rand(getattr(model, n[:5]).weight.shape, generator=g) > 0.5
                                for n in ("conv2.weight", "conv3.weight")})
    before = {n: masks.bool_mask(n).clone() for n in masks.params}
    state = masks.state_dict()
    state["masks"]["conv2.weight"] = torch.ones_like(state["masks"]["conv2.weight"])
    state["masks"]["conv3.weight"] = torch.ones(3, dtype=torch.bool)  # would broadcast into (8, 8, 3, 3)
    with pytest.raises(ValueError, match=r"mask for 'conv3.weight' is \(3,\), the parameter is \(8, 8, 3, 3\)"):
        masks.load_state_dict(state)
    for n, m in before.items():
        assert torch.equal(m, masks.bool_mask(n)), n


@pytest.mark.parametrize("ids, error, message", [
    (torch.tensor([-1]), IndexError, r"must be in \[0, 10\), got -1..-1"),
    (torch.tensor([3, 10]), IndexError, r"must be in \[0, 10\), got 3..10"),
    (torch.tensor([1.0]), TypeError, "sample ids must be integers .dataset indices., got torch.float32"),
])
def test_sieving_sampler_refuses_ids_that_are_not_dataset_indices(ids, error, message):
    sampler = SievingSampler(10)
    with pytest.raises(error, match=message):
        sampler.record(ids, torch.ones(ids.numel()))
    assert torch.isinf(sampler.loss).all()  # nothing recorded (a -1 used to land on sample 9)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("loss"), r"lacks \['loss'\]"),
    (lambda s: s.update(loss=torch.ones(3)), "per-sample losses are not a tensor of shape .10,."),
])
def test_sieving_sampler_corrupt_checkpoint_changes_nothing(edit, message):
    saved = SievingSampler(10, seed=0)
    list(iter(saved))
    saved.record(torch.arange(10), torch.arange(10.0))
    list(iter(saved))  # a rotation: the active set moved
    state = saved.state_dict()
    edit(state)
    sampler = SievingSampler(10, seed=0)
    before = sampler.state_dict()
    with pytest.raises(ValueError, match=message):
        sampler.load_state_dict(state)
    after = sampler.state_dict()
    assert after["active"] == before["active"] and after["pool"] == before["pool"]
    assert torch.equal(after["loss"], before["loss"]) and after["epoch"] == before["epoch"]


# ---------------------------------------------------------------------- CLIs


@pytest.mark.parametrize("args, message", [
    (["--input-shape", "3,32,32"], "--input-shape applies only with --model"),
    (["--input-dtype", "int64", "--input-high", "7"], "--input-dtype, --input-high apply only with --model"),
    (["--device", "nonsense"], "'nonsense' is not a torch device"),
    (["--json", "/nonexistent_dir_x/out.json"], "its folder does not exist"),
    # every unit frozen: measured for minutes, then the last row's backward raised (all lost)
    (["--keep-trainable", "0"], "--keep-trainable must be at least 1"),
])
def test_profile_cli_refuses_before_measuring(capsys, args, message):
    from smartfrz_fast import profile

    with pytest.raises(SystemExit) as exit_info:
        profile.main(["--quick", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_profile_cli_checks_the_predictor_file_first(tmp_path, capsys):
    from smartfrz_fast import profile

    (tmp_path / "bad.pt").write_bytes(b"not a predictor")
    assert profile.main(["--quick", "--policies", "smartfrz", "--smartfrz-weights", str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err
    assert "--smartfrz-weights" in err and "unreadable" in err and "measuring" not in err


def test_profile_cli_checks_the_predictor_named_by_the_environment_first(tmp_path, capsys, monkeypatch):
    # $SMARTFRZ_PREDICTOR was read only when SmartFRZ was built, after every other measurement:
    # a traceback and exit code 1, no JSON written (review37)
    from smartfrz_fast import profile

    (tmp_path / "bad.pt").write_bytes(b"not a predictor")
    monkeypatch.setenv("SMARTFRZ_PREDICTOR", str(tmp_path / "bad.pt"))
    assert profile.main(["--quick", "--policies", "smartfrz"]) == 2
    err = capsys.readouterr().err
    assert "SMARTFRZ_PREDICTOR" in err and "measuring" not in err


@pytest.mark.parametrize("args", [["bogus"], ["info", "extra"]])
def test_cli_bad_command(capsys, args):
    from smartfrz_fast import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and ("smartfrz-fast: error" in err or "smartfrz-fast info: error" in err)


def test_one_policy_object_in_two_freezers_is_refused():
    x = batch(0)[0]
    policy = StaticFreeze(1, at_step=2)
    model_a, model_b = SmallCNN(), SmallCNN()
    freezer_a = SmartFreezer(model_a, sgd(model_a), policy, example_inputs=x)
    with pytest.raises(ValueError, match="already serves another SmartFreezer"):
        SmartFreezer(model_b, sgd(model_b), policy, example_inputs=x)
    # set up lazily (at the first forward): refused there, before anything changes
    lazy_policy = StaticFreeze(1, at_step=2)
    model_c = SmallCNN()
    lazy_b = SmartFreezer(model_b, sgd(model_b), lazy_policy)
    lazy_c = SmartFreezer(model_c, sgd(model_c), lazy_policy)
    model_b(x)
    with pytest.raises(ValueError, match="already serves another SmartFreezer"):
        model_c(x)
    assert lazy_c.plan is None and lazy_b.plan is not None and freezer_a.plan is not None
    # a freezer whose set-up failed (an optimizer of another model) leaves the policy free
    fresh, model_d = StaticFreeze(1, at_step=2), SmallCNN()
    with pytest.raises(ValueError, match="does not hold"):
        SmartFreezer(model_d, sgd(SmallCNN()), fresh, example_inputs=x)
    SmartFreezer(model_d, sgd(model_d), fresh, example_inputs=x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_freeze_time_finite_check_agrees_with_isfinite(fresh_seed, dtype):
    # one host sync for every unit's weights (a sync and an isfinite() copy per tensor cost 292 ms
    # of a 300 ms freeze of BERT-base's encoder): the largest magnitude is finite exactly when
    # every weight is, even at the dtype's largest finite value (a sum would overflow)
    from types import SimpleNamespace

    from smartfrz_fast.engine import _all_finite

    g = torch.Generator().manual_seed(fresh_seed)
    units = []
    for i in range(12):
        params = [torch.randn(int(torch.randint(0, 40, (), generator=g)), generator=g).to(dtype) for _ in range(3)]
        params.append(torch.tensor(1.0, dtype=dtype))  # 0-dim
        kind = i % 4
        if kind and params[0].numel():
            params[0][0] = (float("nan"), float("inf"), float("-inf"))[kind - 1]
        params[1] = torch.full_like(params[1], torch.finfo(dtype).max)  # finite, as large as it gets
        units.append(SimpleNamespace(parameters=params))
    expected = [all(bool(torch.isfinite(p).all()) for p in u.parameters) for u in units]
    assert _all_finite(units) == expected and _all_finite([]) == []


def test_an_example_batch_of_no_samples_is_refused():
    """Taken before: every unit measured 0 FLOPs, and the report said 0 % saved (review49)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="a batch of 0 samples"):
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                     example_inputs=torch.randn(0, 4), total_steps=10)


def _mlp_with_a_glitch(steps, glitch=float("inf"), glitch_at=19, state=None, **policy):
    """A 6-layer MLP under SmartFRZ, snapshot at every step: at ``glitch_at`` one weight of the
    first layer is ``glitch`` when the freezer snapshots it, and is put right at once (an
    overflow rolled back). ``state``: (model, optimizer, freezer) states to resume from first."""
    torch.manual_seed(0)
    model = nn.Sequential(*[layer for _ in range(5) for layer in (nn.Linear(8, 8), nn.Tanh())], nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    freezer = SmartFreezer(model, opt, SmartFRZ(min_progress=0.0, min_flops_share=0.0, **policy),
                           example_inputs=torch.randn(4, 8), total_steps=120, sample_every=1)
    start = 0
    if state is not None:
        model.load_state_dict(state[0])
        freezer.load_state_dict(state[2])
        opt.load_state_dict(state[1])
        start = freezer.step_count
    data = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 8, generator=data), torch.randint(0, 3, (16,), generator=data)) for _ in range(steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step, (x, y) in enumerate(batches[start:], start):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if step == glitch_at:
                freezer_step_with_a_glitch(freezer, model[0].weight, glitch)
            else:
                freezer.step()
    return model, opt, freezer


@pytest.mark.parametrize("glitch", [float("inf"), float("-inf"), float("nan")])
def test_one_non_finite_snapshot_does_not_count_the_unit_as_settled(glitch):
    """An inf snapshot made the first window's movement inf, SmartFRZ's settle reference for the
    unit, and the unit counted as settled for the rest of the run: it froze units 0-3 at steps
    50-80 where the clean run froze none, even at threshold 1e-6 (review92). Now as with NaN:
    that window is no reference, and the run freezes as the clean one."""
    _, _, clean = _mlp_with_a_glitch(120, glitch=0.0, glitch_at=-1, threshold=1e-6)
    _, _, glitched = _mlp_with_a_glitch(120, glitch=glitch, threshold=1e-6)
    assert bool(torch.isfinite(glitched.policy._first_move[0]))
    assert [(e.step, e.num_frozen) for e in glitched.timeline] == [(e.step, e.num_frozen) for e in clean.timeline]


def test_a_checkpoint_whose_history_holds_a_non_finite_snapshot_resumes_exactly():
    """Every checkpoint for a window's length after a snapshot taken while a weight was inf was
    refused as "corrupt, or from a run that diverged" (review92: a quarter of a default run): the
    library wrote it, and the run had not diverged. It loads, with a warning, and the resumed run
    equals the uninterrupted one."""
    whole, _, whole_freezer = _mlp_with_a_glitch(60)
    model, opt, freezer = _mlp_with_a_glitch(40)
    state = (model.state_dict(), opt.state_dict(), freezer.state_dict())
    assert not bool(torch.isfinite(state[2]["history"]["history"]).all())
    with pytest.warns(UserWarning, match=r"weight history holds 1 NaN or inf values.*kept as the run had them"):
        resumed, _, resumed_freezer = _mlp_with_a_glitch(60, state=state)
    assert resumed_freezer.timeline == whole_freezer.timeline
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_an_inf_settle_reference_saved_by_an_older_version_is_no_reference():
    """A checkpoint saved before the fix holds the inf reference that counted the unit as settled
    for good: loaded as it was, the resumed run froze at once (review94)."""
    _, _, freezer = _mlp_with_a_glitch(40)
    state = freezer.state_dict()
    state["policy_state"]["first_move"][0] = float("inf")
    _, _, fresh = _mlp_with_a_glitch(0)
    fresh.load_state_dict(state)
    assert bool(torch.isnan(fresh.policy._first_move[0])) and bool(torch.isfinite(fresh.policy._first_move[1]))


def test_a_state_dict_kept_in_memory_does_not_follow_the_run():
    """The weight history's state on the CPU was the live ring itself: a rollback from a state
    kept in memory resumed with the later snapshots (review94: every unit frozen 40 steps early)."""
    _, _, freezer = _mlp_with_a_glitch(30, glitch_at=-1)
    state = freezer.state_dict()
    kept = state["history"]["history"].clone()
    freezer.policy.context.history.history.add_(1.0)  # as later snapshots overwrite the ring
    assert torch.equal(state["history"]["history"], kept)


def test_a_failing_set_up_forward_says_what_the_example_inputs_may_have_got_wrong():
    # example_inputs=next(iter(loader)) (inputs and labels) failed inside the user's forward with a
    # bare TypeError; a NamedTuple of positional inputs is one input since review97 (review98, review100)
    import collections

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    with pytest.raises(TypeError) as caught:
        SmartFreezer(model, opt, StaticFreeze(1), example_inputs=(x, y))
    assert "next(iter(loader))[0]" in "".join(getattr(caught.value, "__notes__", []))
    Pair = collections.namedtuple("Pair", ["a", "b"])

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, a, b):
            return self.l2(torch.relu(self.l1(a + b)))

    model = TwoInputs()
    with pytest.raises(TypeError) as caught:
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1), example_inputs=Pair(x, x))
    assert "pass tuple(batch)" in "".join(getattr(caught.value, "__notes__", []))
    SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1), example_inputs=tuple(Pair(x, x)))
