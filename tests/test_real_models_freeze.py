"""Freezing on real architectures built from their libraries' configs (tests/real_models.py):
about half the units freeze on every one of them, tied embeddings included; report() says what
froze; frozen parameters get no gradient and no optimizer state; the frozen prefix is a fixed
function in train mode, whatever regulariser the library uses (dropout modules, functional
attention dropout, stochastic depth), across model.eval()/train() and a checkpoint resume."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from real_models import ALL_MODELS, MORE_MODELS, build
from smartfrz_fast import SmartFreezer
from smartfrz_fast.frozen import mode_blind
from smartfrz_fast.policy import StaticFreeze
from smartfrz_fast.units import describe_shared, shared_groups

TIED = ("gpt2_tied", "llama_tied", "t5", "mamba_tied")
CASES = [(name, "train") for name in ALL_MODELS + MORE_MODELS] + [(name, "freeze") for name in TIED]


class HalfFreeze(StaticFreeze):
    """StaticFreeze of half the model's units, after the first step."""

    def __init__(self):
        super().__init__(0, at_step=1)

    def bind(self, context):
        self.num_units = context.num_units // 2
        super().bind(context)


def frozen_outputs(freezer, model, inputs):
    """The output of every module of the frozen units (its first call: ALBERT calls its layer
    again after the prefix; not those that contain a trainable unit's module, as Mamba's mixer
    holds its out_proj), and the inputs of the first trainable unit's first module (what the
    prefix feeds on), in one forward pass."""
    seen, first = [], {}
    k = freezer.num_frozen
    trainable = {id(m) for u in freezer.units[k:] for m in u.modules}
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(first.setdefault(id(m), out)))
             for u in freezer.units[:k] for m in u.modules if not any(id(d) in trainable for d in m.modules())]
    hooks.append(freezer.units[k].modules[0].register_forward_pre_hook(
        lambda m, a: seen.append(first.setdefault(-1, a))))
    try:
        args, kwargs = inputs
        model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return [t for t in torch.utils._pytree.tree_flatten(seen)[0] if isinstance(t, torch.Tensor)]


def assert_deterministic(freezer, model, inputs, seed):
    model.train()
    torch.manual_seed(seed)
    first = frozen_outputs(freezer, model, inputs)
    torch.manual_seed(seed + 1)  # other dropout masks, if anything in the prefix drew one
    second = frozen_outputs(freezer, model, inputs)
    assert first and len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert not a.requires_grad, f"frozen output {i} needs grad: the frozen prefix is in the backward pass"
        assert torch.equal(a, b), f"frozen output {i} differs between two train-mode forwards " \
                                  f"(max {float((a.float() - b.float()).abs().max()):.3g})"


def train_step(real, model, opt, step):
    args, kwargs = real.batch(step)
    opt.zero_grad()
    real.loss(model(*args, **kwargs), step).backward()
    return args, kwargs


@pytest.mark.parametrize("name,mode", CASES)
def test_half_the_units_freeze_and_the_prefix_is_fixed(name, mode, fresh_seed):
    torch.set_num_threads(1)
    real = build(name)
    model = real.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args, kwargs = real.batch(0)
    freezer = SmartFreezer(model, opt, HalfFreeze(), example_inputs=args, example_kwargs=kwargs,
                           shared_parameters=mode)
    units = freezer.units
    assert not freezer.plan.head_outputs, f"{name}: no output of it is a head's before the trunk's end"
    half = len(units) // 2
    train_step(real, model, opt, 0)
    opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        freezer.step()
    assert freezer.num_frozen == half, f"{name}: froze {freezer.num_frozen} of {len(units)} units, asked {half}"
    split = freezer.plan.split_shared(half)
    shared_warnings = [w for w in caught if "froze units 0-" in str(w.message)]
    assert len(shared_warnings) == len(shared_groups(split)), [str(w.message) for w in caught]
    if name in TIED:
        assert any(s.parameter is model.get_input_embeddings().weight for s in split)

    still = {id(s.parameter) for s in split} if mode == "train" else set()
    frozen = [(n, p) for u in units[:half] for n, p in zip(u.param_names, u.parameters) if id(p) not in still]
    trainable = [p for u in units[half:] for p in u.parameters] + [s.parameter for s in split
                                                                   if id(s.parameter) in still]
    frozen_values = [p.detach().clone() for _, p in frozen]

    # report(): what froze, the fraction of parameters, and every split shared parameter
    report = freezer.report()
    assert f"units: {len(units)}, frozen: {half}," in report
    assert units[half - 1].name in report
    fraction = sum(p.numel() for _, p in frozen) / sum(u.num_params for u in units)
    assert abs(freezer.frozen_param_fraction() - fraction) < 1e-12
    assert f"{fraction:.1%}" in report
    for group in shared_groups(split):
        assert f"shared ({mode}): {describe_shared(group, units)}" in report

    for step in (1, 2):
        train_step(real, model, opt, step)
        for n, p in frozen:
            assert not p.requires_grad and p.grad is None, n
        assert any(p.grad is not None for p in trainable)
        opt.step()
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    for (n, p), before in zip(frozen, frozen_values):
        assert id(p) not in held and p not in opt.state, n
        assert torch.equal(p, before), f"frozen {n} changed"
    for s in split:
        assert (s.parameter.grad is not None) == (mode == "train"), s.name

    inputs = real.batch(3)
    assert_deterministic(freezer, model, inputs, fresh_seed)
    model.eval()
    model.train()  # must neither undo the frozen prefix's eval nor leave the trainable part in eval
    assert_deterministic(freezer, model, inputs, fresh_seed + 7)
    # exactly the prefix's modules run in eval in a train-mode forward, nothing else
    always, partly = freezer.plan.eval_modules(half)  # partly: ALBERT's layer, first calls in eval
    ran = {}

    def record(module, args, output):  # the flag its first call ran with (hooks that restore it run later)
        ran.setdefault(id(module), module.training)

    hook = nn.modules.module.register_module_forward_hook(record)
    try:
        frozen_outputs(freezer, model, inputs)
    finally:
        hook.remove()
    # torch's mode-blind modules (Linear, Conv, activations) get their flag once or not at all
    held = {id(m) for m in [*always, *partly] if not mode_blind(m)}
    ran_in_eval = {key for key, training in ran.items() if not training}
    assert held & set(ran) <= ran_in_eval <= {id(m) for m in [*always, *partly]}
    assert units[half].modules[0].training
    freezer.close()


@pytest.mark.parametrize("name", ["gpt2_tied", "efficientnet_b0", "albert"])
def test_resume_reproduces_the_frozen_prefix(name, tmp_path):
    """A resumed run (fresh model, model + optimizer + freezer state) runs the frozen prefix in
    eval, keeps the same shared parameters training, and continues as the original run."""
    torch.set_num_threads(1)
    runs = []
    for resumed in (False, True):
        real = build(name)
        model = real.model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        args, kwargs = real.batch(0)
        freezer = SmartFreezer(model, opt, HalfFreeze(), example_inputs=args, example_kwargs=kwargs)
        if resumed:
            state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
            model.load_state_dict(state["model"])
            freezer.load_state_dict(state["freezer"])
            opt.load_state_dict(state["opt"])
        else:
            for step in (0, 1):
                train_step(real, model, opt, step)
                opt.step()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    freezer.step()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "freezer": freezer.state_dict()},
                       tmp_path / "ckpt.pt")
        assert freezer.num_frozen == len(freezer.units) // 2
        torch.manual_seed(5)
        train_step(real, model, opt, 2)
        opt.step()
        torch.manual_seed(6)
        runs.append((frozen_outputs(freezer, model, real.batch(3)),
                     [p.detach().clone() for p in model.parameters()],
                     [m.training for m in model.modules()]))
    (out_a, params_a, modes_a), (out_b, params_b, modes_b) = runs
    assert modes_a == modes_b
    assert all(torch.equal(a, b) for a, b in zip(out_a, out_b))
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


class Head(nn.Module):
    def forward(self, x):
        return x


def test_hugging_face_batch_dict_is_keyword_inputs():
    real = build("bert")
    model = real.model
    args, kwargs = real.batch(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(3), example_inputs=dict(kwargs))
    assert len(freezer.units) == 29
    freezer.close()  # one open freezer per model
    with pytest.raises(ValueError, match=r"\['labels'\] are given both"):
        SmartFreezer(model, opt, StaticFreeze(3), example_inputs=dict(kwargs),
                     example_kwargs={"labels": kwargs["labels"]})


class TakesADict(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, batch):
        return self.head(self.fc(batch["x"]))


def test_a_dict_the_forward_takes_whole_stays_one_positional_input():
    model = TakesADict()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                           example_inputs={"x": torch.randn(3, 4)})
    assert [u.name for u in freezer.units] == ["fc", "head"]


def test_albert_warns_once_per_shared_group():
    real = build("albert")
    model = real.model
    args, kwargs = real.batch(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        freezer = SmartFreezer(model, opt, StaticFreeze(0), example_inputs=args, example_kwargs=kwargs)
        assert not [w for w in caught if "SmartFreezer" in str(w.message)]
        assert freezer.freeze_to(6) == 6  # inside the shared layer's first call
    messages = [str(w.message) for w in caught if "SmartFreezer" in str(w.message)]
    assert len(messages) == 1 and len(messages[0]) < 700, messages
    assert "albert_layers.0.attention.query.weight" in messages[0] and "more" in messages[0]


def test_a_cut_train_mode_cannot_make_is_refused_out_loud():
    """Mamba's mixer reads A_log at several points of one call: shared_parameters="train" cannot
    cut inside that call (its reads there cannot be detached), so the prefix stops before it,
    and both the warning and report() say why; "freeze" cuts there."""
    real = build("mamba_tied")
    args, kwargs = real.batch(0)
    for mode, expected in (("train", 2), ("freeze", 4)):
        model = build("mamba_tied").model
        freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(0),
                               example_inputs=args, example_kwargs=kwargs, shared_parameters=mode)
        # D, which the mixer first reads after dt_proj ran, trains until dt_proj's unit freezes
        assert freezer.units[2].param_names == ["backbone.layers.0.mixer.A_log"]
        assert freezer.units[5].param_names[-1] == "backbone.layers.0.mixer.D"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert freezer.freeze_to(4) == expected
        messages = " ".join(str(w.message) for w in caught)
        if mode == "train":
            assert "asked to freeze 4 units, froze 2" in messages and "backbone.layers.0.mixer.A_log" in messages
            assert "asked to freeze 4 units, froze 2" in freezer.report()
            assert freezer.freeze_to(7) == 7 and "asked to freeze" not in freezer.report()
        else:
            assert "froze with the prefix" in messages and "asked" not in messages


def test_a_head_before_another_is_named_in_a_pretraining_model():
    """BERT's pre-training model calls its masked-LM head before the next-sentence head: frozen
    with the prefix, the masked-LM output stops learning while the other head trains (review74 #1)."""
    import transformers

    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    model = transformers.BertForPreTraining(config).train()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(0),
                           example_kwargs={"input_ids": torch.randint(0, 96, (2, 12))})
    assert [(path, freezer.units[head].name) for path, head in freezer.plan.head_outputs] == [
        ("['prediction_logits']", "cls.predictions.transform.LayerNorm+cls.predictions")]
    with pytest.warns(UserWarning, match=r"output\['prediction_logits'\] .* is made by frozen units alone"):
        freezer.freeze_to(len(freezer.units) - 1)
