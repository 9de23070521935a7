"""The frozen prefix's hooks: which modules get one, what copies of the model get, how the calls
of a module called inside and after the prefix are numbered."""

import copy
import inspect
import re
import types
import warnings

import pytest
import torch
from torch import nn

from models import train_cached_steps
from smartfrz_fast import SmartFreezer, StaticFreeze
from smartfrz_fast.frozen import MODE_BLIND, mode_blind


def _forward_code(cls) -> str:
    forward = next(k.__dict__["forward"] for k in cls.__mro__ if "forward" in k.__dict__)
    return re.sub(r'""".*?"""', "", inspect.getsource(forward), flags=re.S)


def test_mode_blind_classes_never_read_their_flag():
    # the list is only safe while torch's forwards ignore `training`; a torch upgrade that adds
    # a read (as Dropout, BatchNorm, MultiheadAttention have) must take the class off it
    assert len(MODE_BLIND) > 50
    for cls in MODE_BLIND:
        assert "training" not in _forward_code(cls), cls.__name__


class ModeLinear(nn.Linear):
    """A subclass that reads its mode: not mode-blind, whatever its base."""

    def forward(self, x):
        return super().forward(x) * (2.0 if self.training else 1.0)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.scaled = nn.Linear(5, 5), nn.GELU(), ModeLinear(5, 5)
        self.attn_drop = nn.Dropout(0.5)  # never called: the parent reads its rate with its own flag

    def forward(self, x):
        p = self.attn_drop.p if self.training else 0.0
        return nn.functional.dropout(self.scaled(self.act(self.fc(x))), p, True)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), nn.Linear(5, 2))


def test_only_modules_that_read_their_mode_get_a_hook():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=torch.randn(4, 5))
    freezer.freeze_to(2)  # units: each Linear; the first block's two are its whole call
    first = model[0]
    hooked = {m for m in model.modules() if m._forward_pre_hooks}
    # Block and ModeLinear read `training`, a Dropout may (this one is never called); fc and GELU cannot
    assert hooked == {first, first.scaled, first.attn_drop}
    assert not mode_blind(first.scaled) and mode_blind(first.fc)
    model.train()
    x = torch.randn(4, 5)
    torch.manual_seed(1)
    out = model[0](x)
    torch.manual_seed(1)
    model[0].eval()
    expected = model[0](x)  # the frozen block as a fixed function: eval throughout
    model.train()
    assert torch.equal(out, expected)
    assert model[1].training and model[1].scaled.training  # the trainable block keeps its mode
    freezer.close()


def test_freeze_events_give_the_same_modes_as_one_freeze():
    # eval_modules caches each module's uncalled descendants: two events must end as one
    stepwise, direct = _model(), _model()
    for model, cuts in ((stepwise, (2, 4)), (direct, (4,))):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=1), example_inputs=torch.randn(4, 5),
                               keep_trainable=0)
        for cut in cuts:
            freezer.freeze_to(cut)
        model.train()
        model(torch.randn(4, 5))
    assert [m.training for m in stepwise.modules()] == [m.training for m in direct.modules()]
    assert not stepwise[1].training and not stepwise[1].scaled.training


class TiedLM(nn.Module):
    """A tied embedding: with shared_parameters="train" its reads in the prefix are detached."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.body = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(0.3))
                                   for _ in range(3)])
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        for layer in self.body:
            h = torch.relu(layer(h))
        return self.head(h)


def test_copies_of_the_model_are_plain_models(tmp_path):
    # deepcopy (EMA, AveragedModel) and torch.save(model) used to carry the engine's hooks: a
    # pickling error (lambdas), and copies whose frozen BatchNorms update_bn could not re-estimate
    import copy

    from torch.optim.swa_utils import AveragedModel, update_bn

    model = TiedLM()
    ids = torch.randint(0, 11, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=ids)
    freezer.freeze_to(3)
    assert freezer.plan.split_shared(3)  # the tied weight is read inside and after the prefix
    torch.save(model, tmp_path / "model.pt")  # raised: cannot pickle a local lambda
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    swa = AveragedModel(model)
    ema = copy.deepcopy(model)
    for copied in (loaded, swa.module, ema):
        copied.train()
        copied(ids)
        assert all(m.training for m in copied.modules())  # no hook forced eval in the copy
    update_bn([ids, (ids + 1) % 11], swa)
    bn = swa.module.body[0][1]
    assert bn.num_batches_tracked == 2 and not torch.equal(bn.running_var, torch.ones(6))  # re-estimated
    model.train()
    model(ids)
    assert not model.body[0][1].training  # the original keeps its frozen prefix in eval
    freezer.close()


def test_a_copy_made_before_set_up_does_not_set_up_the_original(tmp_path):
    import copy

    model = TiedLM()
    ids = torch.randint(0, 11, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1))  # units found at the first forward
    twin = copy.deepcopy(model)
    twin_freezer = SmartFreezer(twin, torch.optim.SGD(twin.parameters(), lr=0.1), StaticFreeze(2, at_step=1))
    twin(ids)
    assert freezer.plan is None and twin_freezer.plan is not None
    assert not twin_freezer.plan.shared or all(s.name == "emb.weight" for s in twin_freezer.plan.shared)
    twin_freezer.freeze_to(2)
    assert not twin.body[0][0].weight.requires_grad and model.body[0][0].weight.requires_grad
    model(ids)
    assert freezer.plan is not None
    freezer.close()
    twin_freezer.close()


class SharedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.drop = nn.Linear(8, 8), nn.Dropout(0.2)
        self.flags = []

    def forward(self, x):
        self.flags.append(self.training)
        return x + self.drop(torch.relu(self.lin(x)))


class Recurrent(nn.Module):
    """One block called after each of several layers (ALBERT-like), optionally checkpointed, or
    a data-dependent number of times."""

    def __init__(self, checkpointed=False):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.shared = nn.Linear(8, 8), SharedBlock()
        self.mids = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.head = nn.Linear(8, 3)
        self.checkpointed = checkpointed

    def call(self, h):
        if self.checkpointed:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.shared, h, use_reentrant=False)
        return self.shared(h)

    def forward(self, x, loops=None):
        h = self.call(self.emb(x))
        for mid in self.mids if loops is None else [self.mids[0]] * loops:
            h = self.call(mid(h))
        return self.head(h)


def _grads(model, x, mode, cut, **kwargs):
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1, at_step=1),
                           example_inputs=x, shared_parameters=mode)
    freezer.freeze_to(cut)
    model.train()
    model.shared.flags.clear()
    torch.manual_seed(5)
    model(x, **kwargs).square().mean().backward()
    freezer.close()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["train", "freeze"])
def test_checkpoint_recomputes_calls_after_the_prefix_as_they_ran(mode):
    # the recompute in backward counted as a new call, wrapped to a frozen number and ran in eval:
    # CheckpointError (dropout saves a mask in train mode only) or other gradients
    x = torch.randn(6, 8)
    plain = _grads(Recurrent(), x, mode, cut=3)  # emb, shared's first call, mids.0: the cut is between its calls
    checkpointed = _grads(Recurrent(checkpointed=True), x, mode, cut=3)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], msg=name)


class SharedDropout(nn.Module):
    """One dropout after every layer (l1, l2 frozen), one checkpointed segment: ``l2`` and ``l3``
    ("across": it holds the prefix's end) or ``l3`` alone ("after"), which also applies the
    dropout to a tensor that needs no grad (a stochastic-depth mask of ones)."""

    def __init__(self, segment):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2, self.l3, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        self.drop = nn.Dropout(0.5)
        self.segment = segment

    def second(self, h):
        return self.drop(torch.relu(self.l2(h)))

    def third(self, h):
        h = torch.relu(self.l3(h))
        return self.drop(h * self.drop(h.new_ones(h.shape[0], 1)))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = self.drop(torch.relu(self.l1(x)))
        if self.segment == "across":
            h = checkpoint(lambda h: self.third(self.second(h)), h, use_reentrant=False)
        elif self.segment == "after":
            h = checkpoint(self.third, self.second(h), use_reentrant=False)
        else:
            h = self.third(self.second(h))
        return self.head(h)


def _shared_dropout_grads(segment, x):
    model = SharedDropout(segment)
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(2), example_inputs=x)
    freezer.freeze_to(2)
    model.train()
    torch.manual_seed(5)
    model(x).square().mean().backward()
    freezer.close()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_a_checkpoint_after_the_prefix_recomputes_a_shared_dropout_as_it_ran():
    # a recomputed call on a tensor that needs no grad (a mask of ones) lies after the prefix
    # too: taken for the prefix's, it ran in eval (l3's gradient off by 0.014)
    x = torch.randn(16, 16)
    plain, checkpointed = _shared_dropout_grads(None, x), _shared_dropout_grads("after", x)
    assert plain.keys() == checkpointed.keys() == {"l3.weight", "l3.bias", "head.weight", "head.bias"}
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)


def test_a_checkpoint_across_the_prefixs_end_with_a_shared_dropout_warns():
    # its recompute runs the prefix's call of the dropout in train mode: l3's gradient differed by
    # 0.068 from training without checkpointing, silently
    with pytest.warns(UserWarning, match=r"'drop' \(Dropout\) is called both in the frozen prefix and after it.*"
                      "runs inside torch.utils.checkpoint"):
        _shared_dropout_grads("across", torch.randn(16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _shared_dropout_grads("after", torch.randn(16, 16))


def test_calls_beyond_the_traced_ones_lie_after_the_prefix():
    # traced with 2 loop turns, run with 4: the extra calls wrapped to "frozen" numbers, ran in
    # eval and were detached
    x = torch.randn(6, 8)
    model = Recurrent()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1, at_step=1),
                           example_inputs=(x, 2))
    freezer.freeze_to(2)  # emb and the block's first call
    model.train()
    model.shared.flags.clear()
    model(x, 4).square().mean().backward()
    assert model.shared.flags == [False, True, True, True, True]
    assert model.mids[0].weight.grad is not None and model.shared.lin.weight.grad is not None
    freezer.close()


class RecordingDropout(nn.Dropout):
    def __init__(self):
        super().__init__(0.3)
        self.flags = []

    def forward(self, x):
        self.flags.append(self.training)
        return super().forward(x)


class LoopedEncoderDecoder(nn.Module):
    """One dropout at every step of an encoder's loop and of a decoder's, as many steps as the
    input has (a hand-written RNN seq2seq), and a tied input embedding read by both loops. The
    decoder's dropout comes right before its layer: traced in eval mode, that call has no ops and
    sits at the prefix's end."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.drop = RecordingDropout()
        self.enc, self.dec, self.head = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, source, target):
        h = source.new_zeros(source.shape[0], 8)
        for t in range(source.shape[1]):
            h = torch.tanh(self.enc(torch.cat([self.drop(self.embed(source[:, t])), h], -1)))
        outputs = []
        for t in range(target.shape[1]):
            h = torch.tanh(self.dec(self.drop(torch.cat([self.embed(target[:, t]), h], -1))))
            outputs.append(self.head(h))
        return torch.stack(outputs, 1)


def _looped_reference_loss(model, source, target):
    """The loss with the encoder frozen, by hand: its steps and the decoder's first embedding
    read (before the first trainable layer: in the prefix, as traced) pass no gradient."""
    with torch.no_grad():
        h = source.new_zeros(source.shape[0], 8)
        for t in range(source.shape[1]):
            h = torch.tanh(model.enc(torch.cat([model.embed(source[:, t]), h], -1)))
        first = model.embed(target[:, 0])
    outputs = []
    for t in range(target.shape[1]):
        h = torch.tanh(model.dec(torch.cat([first if t == 0 else model.embed(target[:, t]), h], -1)))
        outputs.append(model.head(h))
    return torch.stack(outputs, 1).square().mean()


@pytest.mark.parametrize("source_steps, target_steps", [(5, 2), (1, 4), (3, 3)])
@pytest.mark.parametrize("set_up_in", ["train", "eval"])
def test_a_loop_in_the_prefix_run_for_more_or_fewer_steps_than_traced(source_steps, target_steps, set_up_in):
    # traced with 3 + 3 steps, the dropout's calls were told apart by their number: 5 encoder
    # steps ran the last 2 in train mode (and passed the tied embedding gradient), 1 ran the
    # decoder's 2nd and 3rd in eval (and cut their embedding reads' gradient); set up in eval mode
    # (a Hugging Face model as from_pretrained returns it), the dropout still was
    model, reference = LoopedEncoderDecoder(), LoopedEncoderDecoder()
    model.train(set_up_in == "train")
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1, at_step=1),
                           example_inputs=(torch.randn(2, 3, 4), torch.randn(2, 3, 4)))
    assert [u.name for u in freezer.units][:3] == ["embed", "enc", "dec"]
    with pytest.warns(UserWarning, match="keep training"):
        freezer.freeze_to(2)
    source, target = torch.randn(2, source_steps, 4), torch.randn(2, target_steps, 4)
    model.train()
    model.drop.flags.clear()
    model(source, target).square().mean().backward()
    # the decoder's first dropout lies before its first layer: in the prefix, as traced
    assert model.drop.flags == [False] * (source_steps + 1) + [True] * (target_steps - 1)
    model.zero_grad()
    model.eval()
    reference.eval()
    model(source, target).square().mean().backward()
    _looped_reference_loss(reference, source, target).backward()
    assert model.enc.weight.grad is None
    for name in ("embed.weight", "dec.weight", "head.weight"):
        torch.testing.assert_close(model.get_parameter(name).grad, reference.get_parameter(name).grad, msg=name)
    freezer.close()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_loop_in_the_prefix_under_a_compiled_forward(backend):
    # compiled, calls were still told apart by number: the tied embedding's gradient was off
    for source_steps, target_steps in ((5, 2), (1, 4)):
        model, reference = LoopedEncoderDecoder(), LoopedEncoderDecoder()
        freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1, at_step=1),
                               example_inputs=(torch.randn(2, 3, 4), torch.randn(2, 3, 4)))
        with pytest.warns(UserWarning, match="keep training"):
            freezer.freeze_to(2)
        source, target = torch.randn(2, source_steps, 4), torch.randn(2, target_steps, 4)
        model.eval()
        reference.eval()
        torch.compile(model, backend=backend, dynamic=False)(source, target).square().mean().backward()
        _looped_reference_loss(reference, source, target).backward()
        for name in ("embed.weight", "dec.weight"):
            torch.testing.assert_close(model.get_parameter(name).grad, reference.get_parameter(name).grad, msg=name)
        freezer.close()
        torch._dynamo.reset()


class LayerScaleBlock(nn.Module):
    """A block whose own forward reads a layer scale after its sub-layers (CaiT, BEiT): with
    the sub-layers frozen, the first trainable op lies in the block's call, which started in
    the prefix."""

    def __init__(self, drop):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))
        self.drop = drop

    def forward(self, x):
        return x + self.drop(self.gamma * self.fc2(self.drop(torch.relu(self.fc1(x)))))


class LayerScaleNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.drop = RecordingDropout()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([LayerScaleBlock(self.drop) for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_a_cut_inside_a_block_that_reads_its_own_layer_scale():
    # the block's call was taken for the prefix's end: the dropout inside its frozen sub-layers
    # ran in train mode
    model = LayerScaleNet()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1, at_step=1),
                           example_inputs=torch.randn(4, 4))
    assert [u.name for u in freezer.units][:4] == ["embed", "blocks.0.fc1", "blocks.0.fc2", "blocks.0"]
    freezer.freeze_to(3)
    model.train()
    model.drop.flags.clear()
    model(torch.randn(4, 4)).sum().backward()
    assert model.drop.flags == [False, True, True, True]
    freezer.close()


class LayerDropNet(nn.Module):
    """One projection and one dropout shared by every layer; LayerDrop skips layers on a step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.proj, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
        self.drop = RecordingDropout()

    def forward(self, x, skip=()):
        h = self.drop(self.proj(self.embed(x)))
        for i, layer in enumerate(self.layers):
            if i not in skip:
                h = self.drop(self.proj(torch.relu(layer(h))))
        return self.head(h)


def test_the_first_trainable_layer_skipped_on_a_step():
    # LayerDrop skipped layers.1, the first trainable unit: nothing told the prefix was over, the
    # later layers' dropout ran in eval and their reads of the shared projection were detached
    x = torch.randn(4, 4)
    model, reference = LayerDropNet(), LayerDropNet()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1, at_step=1),
                           example_inputs=x)
    cut = [u.name for u in freezer.units].index("layers.1")
    with pytest.warns(UserWarning, match="keep training"):
        freezer.freeze_to(cut)
    model.train()
    model.drop.flags.clear()
    model(x, skip=(1,)).square().mean().backward()
    assert model.drop.flags == [False, False, True, True]
    model.zero_grad()
    model.eval()
    model(x, skip=(1,)).square().mean().backward()
    with torch.no_grad():
        h = reference.proj(torch.relu(reference.layers[0](reference.proj(reference.embed(x)))))
    for i in (2, 3):
        h = reference.proj(torch.relu(reference.layers[i](h)))
    reference.head(h).square().mean().backward()
    for name in ("proj.weight", "layers.2.weight", "head.weight"):
        torch.testing.assert_close(model.get_parameter(name).grad, reference.get_parameter(name).grad, msg=name)
    freezer.close()


def test_an_input_that_needs_a_gradient_gets_it_through_a_detached_call():
    # the prefix's call of a block that keeps training (ALBERT-like) had its output detached,
    # cutting the input's gradient too: FreeLB / FGSM got a wrong or no x.grad
    x = torch.randn(6, 8)
    model = Recurrent()
    reference = copy.deepcopy(model)
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1, at_step=1),
                           example_inputs=x)
    freezer.freeze_to(3)  # emb, the block's first call, mids.0
    model.eval()
    reference.eval()
    model(x).square().mean().backward()
    later_reads_only = model.shared.lin.weight.grad.clone()
    model.zero_grad()
    attacked, attacked_reference = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    model(attacked).square().mean().backward()
    reference(attacked_reference).square().mean().backward()
    torch.testing.assert_close(attacked.grad, attacked_reference.grad)
    torch.testing.assert_close(model.shared.lin.weight.grad, later_reads_only)  # the prefix's read: none
    assert model.shared.lin._parameters["weight"] is freezer.units[1].parameters[0]  # put back
    freezer.close()


def test_a_dataclass_output_is_detached_too():
    # a tied weight read in the prefix by a module returning a plain dataclass leaked gradient
    from dataclasses import dataclass

    @dataclass
    class Out:
        hidden: torch.Tensor
        note: str = "x"

    class Reader(nn.Module):
        def __init__(self, emb):
            super().__init__()
            self.emb = emb

        def forward(self, ids):  # reads the weight itself: its own output is the one detached
            return Out(nn.functional.embedding(ids, self.emb.weight))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            emb = nn.Embedding(7, 4)
            self.reader, self.mid = Reader(emb), nn.Linear(4, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.mid(self.reader(ids).hidden)))

    model, ids = Model(), torch.randint(0, 7, (5,))
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1, at_step=1),
                           example_inputs=ids)
    freezer.freeze_to(1)  # the embedding's unit; the tied weight keeps training through the head
    model(ids).square().mean().backward()
    grad = model.head.weight.grad.clone()
    model.zero_grad()
    hidden = model.reader.emb(ids).detach()  # what the head alone gives it
    model.head(torch.relu(model.mid(hidden))).square().mean().backward()
    assert torch.equal(grad, model.head.weight.grad)
    freezer.close()


class _OnlineAndTarget(nn.Module):
    """BYOL / mean teacher: an EMA target (frozen by the user, BatchNorm in train mode) called in
    the same forward, before the online network."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.target = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        self.target.requires_grad_(False)
        self.online = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        with torch.no_grad():
            t = self.target(x)
        return self.online(x), t


def test_a_user_frozen_module_in_train_mode_taken_to_eval_warns():
    """The prefix runs every module called inside it in eval, a user-frozen target network too:
    its BatchNorm statistics stop. Said once, with the fix (manage only the online network)."""
    model = _OnlineAndTarget()
    freezer = SmartFreezer(model, torch.optim.SGD(model.online.parameters(), lr=0.1), StaticFreeze(1),
                           example_inputs=torch.randn(4, 8))
    with pytest.warns(UserWarning, match=r"left in train mode: target.1 \(BatchNorm1d\)") as caught:
        freezer.freeze_to(1)
    assert "give SmartFreezer the part of the model that trains" in str(caught[-1].message)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        freezer.freeze_to(2)  # once
    online = _OnlineAndTarget().online  # managed alone: the target is not the freezer's business
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SmartFreezer(online, torch.optim.SGD(online.parameters(), lr=0.1), StaticFreeze(1),
                     example_inputs=torch.randn(4, 8)).freeze_to(2)


class _SinusoidalPositions(nn.Embedding):
    """A fixed sinusoidal table (Marian's, which Hugging Face makes requires_grad=False): an
    nn.Embedding subclass whose forward never reads the mode."""

    def forward(self, x):
        return super().forward(torch.arange(x.shape[1], device=x.device)).expand(x.shape[0], -1, -1)


def test_a_user_frozen_module_that_never_reads_its_mode_is_not_warned_about():
    # the warning listed Marian's sinusoidal tables ("their norm statistics stop moving, their
    # dropout is off"): the user froze nothing, and the module has neither
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos = nn.Embedding(10, 8), _SinusoidalPositions(6, 8)
            self.pos.requires_grad_(False)
            self.layers = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, ids):
            return self.layers(self.emb(ids) + self.pos(ids)).mean(1)

    model = Net().train()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                           example_inputs=torch.randint(0, 10, (2, 6)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        freezer.freeze_to(2)
    assert not model.pos.training  # still held in eval, as every module called in the prefix


def test_a_user_frozen_module_whose_forward_is_decorated_is_still_warned_about():
    # the mode check read @torch.no_grad()'s wrapper, not the forward that reads self.training
    class NoisyStem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Linear(8, 8)

        @torch.no_grad()
        def forward(self, x):
            return self.conv(x) + (0.1 * torch.randn_like(x) if self.training else 0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.body, self.head = NoisyStem(), nn.Linear(8, 8), nn.Linear(8, 2)
            self.stem.requires_grad_(False)

        def forward(self, x):
            return self.head(torch.relu(self.body(self.stem(x))))

    model = Net().train()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                           example_inputs=torch.randn(2, 8))
    with pytest.warns(UserWarning, match=r"left in train mode: stem \(NoisyStem\)"):
        freezer.freeze_to(1)


class _RandomFlip(nn.Module):
    """A train-time augmentation inside the model (kornia / torchvision style): off in eval."""

    def forward(self, x):
        if not self.training:
            return x
        return torch.where(torch.rand(x.shape[0], 1) < 0.5, x.flip(-1), x)


@pytest.mark.parametrize("cache", [False, True])
def test_an_augmentation_before_the_first_layer_keeps_running_once_the_stem_freezes(cache):
    """A module before every layer is the input's, not the frozen prefix's: held in eval with the
    stem, the model's own augmentation ran in 2 of 10 training forwards, silently (review50). The
    run equals the stem frozen by hand; the cache, seeing a module in train mode, caches nothing."""
    from smartfrz_fast.cache import ActivationCache

    x, y = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3

    def run(freezer_on):
        torch.manual_seed(0)
        model = nn.Sequential(_RandomFlip(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=x[:2], total_steps=12) \
            if freezer_on else None
        forward = ActivationCache(freezer, num_samples=32, deterministic=True, storage="memory").wrap() \
            if cache and freezer_on else (lambda inputs, ids: model(inputs))
        torch.manual_seed(5)
        for step in range(12):
            if not freezer_on and step == 1:
                model[1].requires_grad_(False)
                model[3].requires_grad_(False)
            ids = torch.arange(step % 4 * 8, step % 4 * 8 + 8)
            nn.functional.cross_entropy(forward(x[ids], ids), y[ids]).backward()
            opt.step()
            opt.zero_grad()
            if freezer is not None:
                freezer.step()
        assert model[0].training
        return model

    by_hand, frozen = run(False), run(True)
    for a, b in zip(by_hand.parameters(), frozen.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _OwnDrawsNet(nn.Module):
    """Draws its augmentation from a generator of its own, for runs that reproduce."""

    def __init__(self, kind):
        super().__init__()
        import random

        import numpy

        self.kind = kind
        self.generator = {"torch": lambda: torch.Generator().manual_seed(123),
                          "numpy": lambda: numpy.random.default_rng(123),
                          "numpy RandomState": lambda: numpy.random.RandomState(123),
                          "python": lambda: random.Random(123),
                          "in a list": lambda: torch.Generator().manual_seed(123),
                          "in an object": lambda: torch.Generator().manual_seed(123),
                          "python SystemRandom": lambda: random.SystemRandom()}[kind]()
        if kind == "in a list":
            self.generators = [self.__dict__.pop("generator")]
        elif kind == "in an object":
            self.augmentation = types.SimpleNamespace(generator=self.__dict__.pop("generator"))
        self.stem, self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        if self.training:
            if self.kind in ("torch", "in a list", "in an object"):
                generator = {"torch": lambda: self.generator, "in a list": lambda: self.generators[0],
                             "in an object": lambda: self.augmentation.generator}[self.kind]()
                flip = torch.rand(x.shape[0], 1, generator=generator) < 0.5
            elif self.kind.startswith("python"):
                flip = torch.tensor([[self.generator.random() < 0.5] for _ in range(x.shape[0])])
            else:
                flip = torch.from_numpy(self.generator.random((x.shape[0], 1)) < 0.5)
            x = torch.where(flip, x.flip(-1), x)
        return self.head(torch.tanh(self.body(torch.tanh(self.stem(x)))))


@pytest.mark.parametrize("kind", ["torch", "numpy", "numpy RandomState", "python", "in a list", "in an object",
                                  "python SystemRandom"])
@pytest.mark.parametrize("cache", [False, True])
def test_a_generator_the_model_holds_is_not_advanced_by_the_engines_own_forwards(kind, cache):
    """The set-up's traced forward and the cache's checks restored torch's, numpy's and Python's
    global generators but drew from the model's own: a run with the freezer saw other draws than
    the same run with the layers frozen by hand (review50)."""
    from smartfrz_fast.cache import ActivationCache

    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3

    def run(freezer_on):
        torch.manual_seed(0)
        model = _OwnDrawsNet(kind)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=x[:8], total_steps=8) \
            if freezer_on else None
        forward = ActivationCache(freezer, num_samples=16, deterministic=True).wrap() if cache and freezer_on \
            else (lambda inputs, ids: model(inputs))
        losses = []
        for step in range(8):
            if not freezer_on and step == 2:
                model.stem.requires_grad_(False)
            ids = torch.arange(8) + 8 * (step % 2)
            loss = nn.functional.cross_entropy(forward(x[ids], ids), y[ids])
            loss.backward()
            opt.step()
            opt.zero_grad()
            if freezer is not None:
                freezer.step()
            losses.append(loss.item())
        return losses

    if kind == "python SystemRandom":  # the operating system's draws: nothing to put back, nothing to fail
        run(True)
    else:
        assert run(True) == run(False)


def test_a_stem_the_user_froze_is_a_layer_of_the_prefix_not_the_inputs():
    """Only what runs before any parameter is read is the input's: a stem the user froze before
    building the freezer (conv + batch norm, a LoRA base, frozen embeddings) is still held in eval
    with the prefix, and cached with it (treated as the input's, it cut the cache to 1 block of 12
    on a CNN and to none on a BERT; review53)."""
    from smartfrz_fast.cache import ActivationCache

    torch.manual_seed(0)
    model = nn.Sequential(_RandomFlip(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    model[1:3].requires_grad_(False)
    model[0].eval()  # an augmentation switched off by the user: cacheable
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=torch.randn(4, 6), total_steps=8)
    cache = ActivationCache(freezer, num_samples=16, deterministic=True)
    cached = cache.wrap()
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"left in train mode: 2 \(BatchNorm1d\)"):
        train_cached_steps(cached, opt, freezer, x, 4)
    assert not model[2].training and cache.boundary == 8, cache.describe()  # all but the head


class _PositionTable(nn.Module):
    """A table kept as a plain tensor attribute beside its length, rebuilt when the length changes."""

    def __init__(self, length):
        super().__init__()
        self.length, self.table = length, torch.linspace(0, 1, length)

    def forward(self, x):
        if x.shape[1] != self.length:
            self.table, self.length = torch.linspace(0, 1, x.shape[1]), x.shape[1]
        return x + self.table[:, None]


def test_a_look_puts_back_a_tensor_attribute_with_the_values_beside_it():
    """The set-up's trace on a batch of another length put the length back but kept the new
    table: the next forward crashed, or read the wrong rows silently (review54)."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), _PositionTable(16), nn.Linear(8, 8), nn.Linear(8, 3))

    x = torch.randn(8, 16, 4, generator=torch.Generator().manual_seed(1))
    plain, model = build(), build()
    SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                 example_inputs=torch.randn(4, 24, 4))
    assert model[1].length == 16 and model[1].table.shape == (16,)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


class _SharedSettingsBlock(nn.Module):
    """Reads a dict of settings that every block shares with the loop, and keeps its output."""

    def __init__(self, settings):
        super().__init__()
        self.lin, self.settings, self.last = nn.Linear(6, 6), settings, None

    def forward(self, x):
        self.last = torch.tanh(self.lin(x)) / self.settings["temperature"]
        return self.last


def test_a_look_puts_back_only_what_changed_and_lists_and_dicts_in_place():
    """A look put a copy of every list and dict back once anything changed (here each block's
    `self.last`): the blocks lost the dict they share with the loop, which anneals it, and saw
    the set-up's temperature for the whole run (review55)."""
    settings = {"temperature": 1.0}
    model = nn.Sequential(*[_SharedSettingsBlock(settings) for _ in range(3)], nn.Linear(6, 2))
    SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1), example_inputs=torch.randn(4, 6))
    assert all(block.settings is settings for block in model[:3])


def test_an_attribute_a_look_sets_for_the_first_time_is_taken_away_again():
    # `if not hasattr(self, "initialized")`: a data-dependent initialisation at the first forward
    # (ActNorm) must run at the user's first forward, on the user's batch, not at set-up's look
    class ActNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(6))

        def forward(self, x):
            if not hasattr(self, "initialized"):
                with torch.no_grad():
                    self.scale.copy_(1 / x.std(0))
                self.initialized = True
            return x * self.scale

    model = nn.Sequential(nn.Linear(6, 6), ActNorm(), nn.Linear(6, 2))
    SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1), example_inputs=torch.randn(4, 6))
    assert not hasattr(model[1], "initialized")


def test_a_parametrized_module_of_the_users_is_looked_at_as_the_users():
    """register_parametrization swaps the module's class for one torch makes: looks took it for
    torch's own and skipped its counter and generator (review55)."""
    from torch.nn.utils import parametrizations

    class Noisy(nn.Linear):
        def __init__(self):
            super().__init__(6, 6)
            self.calls, self.generator = 0, torch.Generator().manual_seed(1)

        def forward(self, x):
            self.calls += 1
            return super().forward(x) + 0.01 * torch.randn(x.shape, generator=self.generator)

    model = nn.Sequential(parametrizations.weight_norm(Noisy()), nn.Linear(6, 2))
    state = model[0].generator.get_state()
    SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1), example_inputs=torch.randn(4, 6))
    assert model[0].calls == 0 and torch.equal(model[0].generator.get_state(), state)


def _modes_seen(module: nn.Module, log: list) -> None:
    """Log the mode ``module`` runs in at each call (a hook placed after the engine's)."""
    module.register_forward_pre_hook(lambda m, args: log.append(m.training))


class _IdleExpert(nn.Module):
    """A layer with an expert (Linear + BatchNorm) that only inputs with x[:, 0] > 0 reach."""

    def __init__(self):
        super().__init__()
        self.main = nn.Linear(8, 8)
        self.expert = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))

    def forward(self, x):
        h = self.main(x)
        routed = x[:, 0] > 0
        if int(routed.sum()) > 1:
            h = h.clone()
            h[routed] = h[routed] + self.expert(x[routed])
        return h


def test_an_expert_no_token_reached_at_set_up_trains_in_the_models_mode():
    """It is not managed (it keeps training), but once its layer froze the engine held it in eval
    as an uncalled part of a frozen module: its BatchNorm trained on running statistics that no
    longer moved (1e-2 off the same freeze by hand, review67)."""
    torch.manual_seed(0)
    model = nn.Sequential(_IdleExpert(), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(16, 8)
    x[:, 0] = -1.0  # no input reaches the expert at set-up
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the expert's parameters are not managed
        freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1, at_step=0),
                               example_inputs=x, total_steps=10)
    freezer.step()
    assert freezer.num_frozen == 1 and model[0].expert[0].weight.requires_grad
    modes, before = [], model[0].expert[1].running_mean.clone()
    _modes_seen(model[0].expert[1], modes)
    model.train()
    model(torch.randn(16, 8).abs()).sum().backward()
    assert modes == [True] and not torch.equal(model[0].expert[1].running_mean, before)


class _Turns(nn.Module):
    """A loop of ``turns`` turns (set by the loop: the set-up batch runs fewer than training),
    each through a shared layer and its own adapter."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        self.shared = nn.Linear(16, 16)
        self.adapters = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))
        self.turns = 2

    def forward(self, x):
        h = self.emb(x)
        for adapter in self.adapters[:self.turns]:
            h = adapter(torch.tanh(self.shared(h)))
        return self.head(h)


def test_a_frozen_layer_read_by_more_turns_than_at_set_up_is_warned_about():
    """Traced over 2 turns, a layer read every turn froze whole (every traced read lay in the
    prefix); a 6-turn batch reads its frozen weights after the prefix too, where the set-up batch
    showed no read: warned once, naming the fix (review67)."""
    torch.manual_seed(0)
    model = _Turns()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(3, at_step=0),
                               example_inputs=torch.randn(4, 8), total_steps=10)
    freezer.step()
    assert not model.shared.weight.requires_grad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(4, 8))  # 2 turns, as at set-up: nothing to say
        model.turns = 6
        model(torch.randn(4, 8))
        model(torch.randn(4, 8))
    said = [str(w.message) for w in caught if "longest path" in str(w.message)]
    assert len(said) == 1 and "'shared'" in said[0], [str(w.message) for w in caught]
