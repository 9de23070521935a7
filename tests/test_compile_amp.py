"""torch.compile, AMP (GradScaler) and activation checkpointing under progressive freezing."""

import re
import warnings

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.utils.checkpoint import checkpoint

from smartfrz_fast import FreezePolicy, SmartFreezer, StaticFreeze
from smartfrz_fast.compile import FreezeAwareGradScaler, check_grads_after_freeze, compile_blocks, scaler_step

from models import collector_off

WIDTH, BLOCKS = 8, 12


class OneMorePerStep(FreezePolicy):
    name = "one_more_per_step"

    def decide(self, step, frozen):
        return frozen + 1


class Block(nn.Module):
    """Two units: fc1+ln, fc2."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return x + 0.5 * self.fc2(torch.tanh(self.ln(self.fc1(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x):
        for block in self.blocks:  # one frame when compiled whole: guards on every parameter
            x = block(x)
        return self.head(x)


def train(model, steps, compile_fn=None, policy=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy or OneMorePerStep(), example_inputs=torch.randn(4, WIDTH))
    if compile_fn is not None:
        compile_fn(model, freezer)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        loss = model(torch.randn(4, WIDTH, generator=g)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
        losses.append(loss.item())
    return freezer, losses


@pytest.fixture
def dynamo_strict():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def test_whole_model_compile_hits_the_recompile_limit(dynamo_strict):
    # The trap compile_blocks avoids: one compiled frame guards on all 25 units' requires_grad
    # and recompiles at every freeze. torch 2.11's dynamo does not guard on a parameter's
    # requires_grad: no recompile, no limit, and training must then still match eager.
    counter = CompileCounter()
    try:
        _, losses = train(Net(), 2 * BLOCKS, lambda model, freezer: model.compile(backend=counter))
    except Exception as exc:  # torch 2.13
        assert re.search("recompile_limit|cache_size_limit", str(exc)), exc
        assert counter.frame_count == 8
    else:
        assert counter.frame_count == 1, torch.__version__
        torch.testing.assert_close(losses, train(Net(), 2 * BLOCKS)[1], rtol=1e-6, atol=1e-7)


def test_compile_blocks_progressive_freeze(dynamo_strict):
    # 24 freezes of a 12-block model (one unit per step: each block is first half frozen,
    # then whole). Each block is its own compiled region; frozen blocks return to eager.
    counter = CompileCounter()
    compiled = {}

    def compile_fn(model, freezer):
        compiled["blocks"] = compile_blocks(model.blocks, freezer, backend=counter)

    with torch._dynamo.config.patch(recompile_limit=4):  # far below the 24 freezes
        freezer, losses = train(Net(), 2 * BLOCKS + 2, compile_fn)
    assert freezer.num_frozen == 2 * BLOCKS  # everything but the head
    blocks = compiled["blocks"]
    assert blocks.eager == [True] * BLOCKS
    assert all(b._compiled_call_impl is None for b in blocks.blocks)
    # Each unit frozen inside a block and the block's input stopping to need grad each force a
    # graph: units-per-block + 1 = 3, shared by the 12 identical blocks (same code, one cache).
    assert 1 <= counter.frame_count <= 3
    # Same training as eager with the same freezes (the "eager" dynamo backend runs the same ops).
    _, eager_losses = train(Net(), 2 * BLOCKS + 2)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("order", ["blocks compiled first", "units found at the first forward"])
def test_blocks_compiled_before_the_units_are_found_still_compile(dynamo_strict, order):
    # finding the units runs a forward under a dispatch mode: through compiled blocks, dynamo
    # would refuse and mark their code skipped for good (every block silently eager)
    counter = CompileCounter()
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if order == "blocks compiled first":
        blocks = compile_blocks(model.blocks, None, backend=counter)
        freezer = SmartFreezer(model, opt, OneMorePerStep(), example_inputs=torch.randn(4, WIDTH))
    else:
        freezer = SmartFreezer(model, opt, OneMorePerStep())  # set-up at the first forward
        blocks = compile_blocks(model.blocks, freezer, backend=counter)
    for step in range(2):
        model(torch.randn(4, WIDTH)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert counter.frame_count >= 1 and len(freezer.units) == 2 * BLOCKS + 1
    assert all(b._compiled_call_impl is not None for b in blocks.blocks[1:])


def test_compile_blocks_warns_that_torchs_own_module_classes_do_not_compile():
    blocks = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()), Block()]
    with pytest.warns(UserWarning, match=r"blocks 0 \(Sequential\) are torch's own module classes"):
        compile_blocks(blocks, None, backend="eager")


class ThreeUnitBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, x):
        return x + self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class StemBlockHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.block, self.head = nn.Linear(WIDTH, WIDTH), ThreeUnitBlock(), nn.Linear(WIDTH, 3)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_compile_blocks_recompiles_once_per_unit_frozen_inside_a_block(dynamo_strict):
    # stem frozen (the block's input stops needing grad), then a, then b: 4 graphs for a
    # 3-unit block (units + 1); c frozen sends the whole block back to eager.
    counter = CompileCounter()
    freezer, losses = train(StemBlockHead(), 6, lambda model, f: compile_blocks([model.block], f, backend=counter))
    assert freezer.num_frozen == 4
    # 4 where dynamo guards on requires_grad (torch 2.13); torch 2.11 does not (see above): 2
    assert counter.frame_count in (4, 2), (counter.frame_count, torch.__version__)
    torch.testing.assert_close(losses, train(StemBlockHead(), 6)[1], rtol=1e-6, atol=1e-7)


def test_a_freezer_with_compiled_blocks_is_freed_when_dropped(dynamo_strict):
    # compile_blocks' freeze listener held the freezer, which holds the listener: a dropped
    # freezer lived on until Python's collector ran, its frozen layers held in eval
    import weakref

    def trial():
        freezer, _ = train(StemBlockHead(), 2, lambda model, f: compile_blocks([model.block], f, backend="eager"))
        assert freezer.num_frozen == 2
        return weakref.ref(freezer)

    with collector_off():
        assert trial()() is None


def test_compile_blocks_warns_when_a_block_has_recompile_limit_units(dynamo_strict):
    model = StemBlockHead()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), OneMorePerStep(),
                           example_inputs=torch.randn(2, WIDTH))
    with torch._dynamo.config.patch(recompile_limit=3):
        with pytest.warns(UserWarning, match=r"block 0 \(ThreeUnitBlock\) holds 3 freezable units.*recompile_limit=3"):
            compile_blocks([model.block], freezer, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_blocks([model.block], freezer, backend="eager")  # limit 8: room enough


def test_compile_blocks_rejects_bad_input():
    with pytest.raises(TypeError, match="non-empty sequence of nn.Module"):
        compile_blocks([])


# ---------------------------------------------------------------- AMP: GradScaler
def two_optimizer_setup(scaler_cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 3))
    first = torch.optim.SGD(model[0].parameters(), lr=0.05)  # e.g. the embedding's optimizer
    rest = torch.optim.SGD([*model[2].parameters(), *model[4].parameters()], lr=0.05)
    freezer = SmartFreezer(model, [first, rest], StaticFreeze(1, at_step=2), example_inputs=torch.randn(4, WIDTH))
    return model, first, rest, freezer, scaler_cls("cpu", init_scale=2.0 ** 8)


def amp_step(model, scaler, step):
    g = torch.Generator().manual_seed(step)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(4, WIDTH, generator=g)).float().square().mean()
    scaler.scale(loss).backward()


def train_until_first_optimizer_is_frozen(model, first, rest, freezer, scaler):
    """Two plain AMP steps; StaticFreeze(1, at_step=2) then empties ``first``."""
    for step in range(2):
        amp_step(model, scaler, step)
        for opt in (first, rest):
            scaler.step(opt)
        scaler.update()
        for opt in (first, rest):
            opt.zero_grad()
        freezer.step()
    assert freezer.num_frozen == 1 and not first.param_groups[0]["params"]


def test_plain_gradscaler_raises_on_a_fully_frozen_optimizer():
    # The trap: documents why scaler_step / FreezeAwareGradScaler exist (torch 2.13, CPU).
    model, first, rest, freezer, scaler = two_optimizer_setup(torch.amp.GradScaler)
    train_until_first_optimizer_is_frozen(model, first, rest, freezer, scaler)
    amp_step(model, scaler, 2)
    with pytest.raises(AssertionError, match="No inf checks"):
        scaler.step(first)


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("how", ["scaler_step", "FreezeAwareGradScaler"])
def test_gradscaler_with_an_optimizer_left_without_gradients(how, enabled):
    # enabled=False (AMP switched off, or "cuda" on a machine without a GPU): the scaler keeps no
    # per-optimizer records, and skipping must not reach for them (it raised AttributeError).
    cls = FreezeAwareGradScaler if how == "FreezeAwareGradScaler" else torch.amp.GradScaler
    model, first, rest, freezer, scaler = two_optimizer_setup(cls)
    if not enabled:
        scaler = cls("cpu", enabled=False)
    before = model[0].weight.detach().clone()
    for step in range(6):
        amp_step(model, scaler, step)
        scaler.unscale_(first)  # as for gradient clipping: must not break the skip either
        for opt in (first, rest):
            scaler_step(scaler, opt) if how == "scaler_step" else scaler.step(opt)
        scaler.update()
        for opt in (first, rest):
            opt.zero_grad()
        freezer.step()
        if step == 1:
            frozen_weight = model[0].weight.detach().clone()
            head_before = model[4].weight.detach().clone()
    assert freezer.num_frozen == 1
    assert not torch.equal(frozen_weight, before)  # trained before the freeze ...
    assert torch.equal(model[0].weight, frozen_weight)  # ... and not after
    assert not torch.equal(model[4].weight, head_before)  # the rest keeps training
    assert scaler.get_scale() == (2.0 ** 8 if enabled else 1.0)  # no overflow seen, no growth yet


def test_update_after_every_optimizer_was_skipped():
    # After the freeze, step only the fully frozen optimizer: nothing steps at all. A plain
    # GradScaler (with scaler_step) then fails in update(); FreezeAwareGradScaler keeps the scale.
    for cls in (torch.amp.GradScaler, FreezeAwareGradScaler):
        model, first, rest, freezer, scaler = two_optimizer_setup(cls)
        train_until_first_optimizer_is_frozen(model, first, rest, freezer, scaler)
        scale = scaler.get_scale()
        amp_step(model, scaler, 2)
        scaler_step(scaler, first)
        if cls is torch.amp.GradScaler:
            with pytest.raises(AssertionError, match="No inf checks were recorded prior to update"):
                scaler.update()
        else:
            scaler.update()
            assert scaler.get_scale() == scale
            rest.zero_grad()  # the next step goes on normally
            amp_step(model, scaler, 3)
            before = model[4].weight.detach().clone()
            for opt in (first, rest):
                scaler.step(opt)
            scaler.update()
            assert not torch.equal(model[4].weight, before)


def test_freeze_aware_scaler_update_with_nothing_stepped():
    scaler = FreezeAwareGradScaler("cpu", init_scale=4.0)
    p = nn.Parameter(torch.ones(2), requires_grad=False)
    opt = torch.optim.SGD([p], lr=0.1)
    opt.param_groups[0]["params"] = []  # as freezing leaves it
    assert scaler.step(opt) is None
    scaler.update()  # plain GradScaler: "No inf checks were recorded prior to update."
    assert scaler.get_scale() == 4.0


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, FreezeAwareGradScaler])
def test_freezeout_with_a_fused_optimizer_and_a_grad_scaler(scaler_cls):
    """GradScaler reads the signature of a fused optimizer's step; FreezeOut's wrapped step had
    none ("ValueError: no signature found for builtin", review72). Fused and not, the runs agree."""
    from smartfrz_fast import FreezeOut

    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=None if fused else False)
        freezer = SmartFreezer(model, opt, FreezeOut(t0=0.2), example_inputs=torch.randn(4, 8), total_steps=20)
        scaler = scaler_cls("cpu", init_scale=8.0)
        for step in range(20):
            torch.manual_seed(step)
            x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            freezer.step()
        assert freezer.num_frozen > 0
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- activation checkpointing
class CheckpointedNet(nn.Module):
    def __init__(self, use_reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(WIDTH, WIDTH)
        self.body = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
        self.head = nn.Linear(WIDTH, 3)
        self.use_reentrant = use_reentrant

    def forward(self, x):
        x = torch.tanh(self.stem(x))
        if self.use_reentrant is not None:
            x = checkpoint(self.body, x, use_reentrant=self.use_reentrant)
        else:
            x = self.body(x)
        return self.head(x)


def run_checkpointed(use_reentrant, steps=5, explicit_check=False, closure=False, set_to_none=True):
    """``closure``: the backward runs inside ``optimizer.step(closure)``, as Lightning runs it."""
    model = CheckpointedNet(use_reentrant)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=torch.randn(4, WIDTH))
    if explicit_check:  # the freezer checks by default; asking again adds nothing
        check_grads_after_freeze(freezer)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(4, WIDTH, generator=g)

        def loss():
            opt.zero_grad(set_to_none=set_to_none)
            out = model(x).square().mean()
            out.backward()
            return out
        if closure:
            opt.step(loss)
        else:
            loss()
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
        freezer.step()
    return model


def test_the_no_gradient_check_sees_the_step_of_a_closure():
    # Lightning runs the backward inside optimizer.step(closure): a check before the step saw
    # the previous step's gradients, warned on healthy runs and missed reentrant checkpointing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_checkpointed(use_reentrant=False, closure=True)
    with pytest.warns(UserWarning, match=r"received no gradient.*use_reentrant=False"):
        run_checkpointed(use_reentrant=True, closure=True)
    # zero_grad(set_to_none=False) leaves zero gradients, not None: still no gradient
    with pytest.warns(UserWarning, match=r"received no gradient.*use_reentrant=False"):
        run_checkpointed(use_reentrant=True, set_to_none=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_checkpointed(use_reentrant=False, set_to_none=False)


def test_non_reentrant_checkpoint_trains_the_suffix_after_a_freeze():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from us or from torch
        ckpt = run_checkpointed(use_reentrant=False)
    plain = run_checkpointed(use_reentrant=None)
    for (name, a), b in zip(ckpt.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_reentrant_checkpoint_on_a_frozen_prefix_trains_nothing_and_is_flagged():
    initial = CheckpointedNet(None).body.state_dict()
    with pytest.warns(UserWarning, match=r"received no gradient.*use_reentrant=False"):  # by default
        model = run_checkpointed(use_reentrant=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_checkpointed(use_reentrant=True, explicit_check=True)
    assert sum("received no gradient" in str(w.message) for w in caught) == 1
    plain = run_checkpointed(use_reentrant=None)
    # The checkpointed body trained for the two steps before the freeze, then stopped.
    after_two = run_checkpointed(use_reentrant=None, steps=2).body.state_dict()
    for k, v in model.body.state_dict().items():
        assert not torch.equal(v, initial[k])
        torch.testing.assert_close(v, after_two[k], rtol=0, atol=0)
        assert not torch.equal(v, plain.body.state_dict()[k])


class CheckpointedBlock(nn.Module):
    def __init__(self, use_checkpoint):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        inner = lambda h: torch.tanh(self.linear(h))  # noqa: E731
        return checkpoint(inner, x, use_reentrant=False) if self.use_checkpoint else inner(x)


def test_non_reentrant_checkpoint_on_top_of_a_cached_prefix():
    """Checkpointed blocks after a frozen, cached prefix train exactly as plain blocks do."""
    from smartfrz_fast.cache import ActivationCache

    data = torch.randn(12, WIDTH, generator=torch.Generator().manual_seed(3))
    results = []
    for cached in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(*[CheckpointedBlock(cached) for _ in range(4)], nn.Linear(WIDTH, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=data[:2])
        forward = model
        if cached:
            cache = ActivationCache(freezer, num_samples=len(data), deterministic=True)
            forward = cache.wrap()
        for step in range(6):
            ids = torch.arange(step % 3 * 4, step % 3 * 4 + 4)
            out = forward(data[ids], ids) if cached else forward(data[ids])
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
        if cached:
            assert cache.boundary == 2 and cache.stats["hits"] >= 8
        results.append(model.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("compile_how", ["blocks", "whole", "whole_in_place", "blocks_after_set_up"])
def test_the_cache_runs_compiled_blocks_and_turns_off_for_a_whole_compiled_model(dynamo_strict, compile_how):
    """With compile_blocks the cache runs the compiled blocks after the cached prefix (same
    weights as eager training without a cache); a model compiled whole is run as it is, the cache
    off with the reason. In place (model.compile()) the cache stayed on, its torch.fx chain never
    running the compiled model again; compile_blocks after the cache set up its torch.fx chain
    compiled blocks that never ran (review32): the cache now sets up again, on the module swap."""
    from smartfrz_fast.cache import ActivationCache

    batches = [torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def train_epochs(how):
        torch.manual_seed(0)
        model = nn.Sequential(*[Block() for _ in range(4)], nn.Linear(WIDTH, 3))
        if how == "blocks_after_set_up":  # a forward of its own: the cache cuts it with torch.fx
            model = Looped(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        freezer = SmartFreezer(model, opt, StaticFreeze(4, at_step=1), example_inputs=batches[0])  # 2 blocks
        counter, cache, forward = CompileCounter(), None, model
        if how == "blocks":
            compile_blocks(list(model), freezer, backend=counter)
        if how == "whole_in_place":
            model.compile(backend=counter)
        if how is not None:
            target = torch.compile(model, backend=counter) if how == "whole" else model
            cache = ActivationCache(freezer, num_samples=12, deterministic=True)
            forward = cache.wrap(target)
        for epoch in range(3):
            if how == "blocks_after_set_up" and epoch == 1:
                assert cache.chain.how == "torch.fx"
                with pytest.warns(UserWarning, match="compiled in place after the cache set up its torch.fx chain"):
                    compile_blocks(list(model.layers[:4]), freezer, backend=counter)
                    forward(batches[0], torch.arange(4))
            for i, x in enumerate(batches):
                out = forward(x) if cache is None else forward(x, torch.arange(4 * i, 4 * i + 4))
                out.square().mean().backward()
                opt.step()
                opt.zero_grad()
                freezer.step()
        return model, cache, counter

    eager, _, _ = train_epochs(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the whole-compiled model's "cache is off" warning
        model, cache, counter = train_epochs(compile_how)
    assert counter.frame_count > 0
    if compile_how == "blocks":
        assert cache.active and cache.boundary == 2 and cache.stats["hits"] > 0, cache.describe()
    elif compile_how == "blocks_after_set_up":  # the swap's blocks are finer: cut after the second block
        assert cache.active and cache.chain.how == "module swap" and cache.stats["hits"] > 0, cache.describe()
        assert "cut after layers.1" in cache.describe()
    else:
        assert not cache.active and "compile_blocks" in cache.reason
    for p, q in zip(eager.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)



def test_a_leaf_compiled_after_set_up_keeps_the_torch_fx_chain_and_its_rows(dynamo_strict):
    # the fx chain calls leaf modules as modules (their compiled call runs): compiling one after
    # set-up dropped every cached row and set the same chain up again, with a wrong warning
    from smartfrz_fast.cache import ActivationCache

    torch.manual_seed(0)
    model = Looped(nn.Sequential(*[Block() for _ in range(4)], nn.Linear(WIDTH, 3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, StaticFreeze(4, at_step=1), example_inputs=torch.randn(4, WIDTH))
    cache = ActivationCache(freezer, num_samples=8, deterministic=True)
    forward = cache.wrap(model)
    xs = [torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for epoch in range(3):
        if epoch == 2:
            model.layers[0].fc1.compile(backend=CompileCounter())  # a Linear: a leaf the chain calls
        for i, x in enumerate(xs):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no "cached rows are dropped"
                forward(x, torch.arange(4 * i, 4 * i + 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    assert cache.chain.how == "torch.fx" and cache.stats["stored"] == 8 and cache.stats["hits"] == 12


def test_a_ddp_wrapper_compiled_in_place_runs_compiled_and_the_cache_says_off(one_rank_group, dynamo_strict):
    # the cache runs inside DDP's forward, never through the wrapper's compiled call: ddp.compile()
    # then ran 0 compiled graphs, with the cache on
    from smartfrz_fast.cache import ActivationCache
    from smartfrz_fast.distributed import FreezableDDP

    torch.manual_seed(0)
    ddp = FreezableDDP(nn.Sequential(*[Block() for _ in range(3)], nn.Linear(WIDTH, 3)))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    freezer = SmartFreezer(ddp, opt, StaticFreeze(2, at_step=1), example_inputs=torch.randn(4, WIDTH))
    counter = CompileCounter()
    ddp.compile(backend=counter)
    cache = ActivationCache(freezer, num_samples=8, deterministic=True)
    forward = cache.wrap(ddp)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for i in range(2):
            forward(torch.randn(4, WIDTH), torch.arange(4 * i, 4 * i + 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    assert not cache.active and "compiled" in cache.reason and counter.frame_count > 0


class Looped(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.a(torch.relu(self.b(torch.relu(self.a(x)))))))


def test_units_found_under_autocast_see_a_layer_called_twice():
    # set up at the first forward of an AMP loop, the second call of `a` took autocast's cached
    # bf16 copy of its weight, the tracer never saw it read again, and freezing unit 0 froze `a`
    # whole: its call after `b` stopped training
    torch.manual_seed(0)
    model = CalledTwice()
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, at_step=1), total_steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
            if step == 1:
                after_freeze = model.a.weight.detach().clone()
    assert freezer.num_frozen == 1 and sorted(s.name for s in freezer.plan.shared) == ["a.bias", "a.weight"]
    assert model.a.weight.requires_grad and not torch.equal(after_freeze, model.a.weight)


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, WIDTH)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(WIDTH, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.blocks(self.emb(tokens)))


@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_model_compiled_before_a_freeze_detaches_the_shared_reads(fullgraph):
    # the freeze of the embedding's unit (tied to the head, shared_parameters="train") placed
    # hooks, and the graph compiled before it, which does not guard on hooks, kept running
    # without them: the tied weight's gradient was that of a run where nothing froze (0.5 off);
    # with fullgraph=True the hook's look at the autograd graph task crashed dynamo
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 11, (4, 5), generator=g), torch.randint(0, 11, (4, 5), generator=g))
               for _ in range(3)]

    def grad_after_freeze(compiled):
        torch.manual_seed(0)
        model = TiedHead()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=1), example_inputs=batches[0][0])
        forward = torch.compile(model, backend="eager", fullgraph=fullgraph) if compiled else model
        for step, (x, y) in enumerate(batches):
            nn.functional.cross_entropy(forward(x).flatten(0, 1), y.flatten()).backward()
            if step == len(batches) - 1:
                return model.emb.weight.grad.clone(), freezer
            opt.step()
            opt.zero_grad()
            freezer.step()

    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):  # torch's default, restored after
        torch._dynamo.reset()
        eager, freezer = grad_after_freeze(False)
        assert freezer.num_frozen == 1 and freezer.model.emb.weight.requires_grad
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled, _ = grad_after_freeze(True)
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-6)


def test_freezeout_with_a_compiled_optimizer_step_keeps_the_groups_flags():
    # FreezeOut splits the groups per unit around each step; dynamo sets capturable=True on the
    # groups it traces, and the split copied it back into the user's CPU Adam group, whose next
    # step (after a freeze: a recompile) raised "If capturable=True, params and state_steps must
    # be on supported devices"
    from smartfrz_fast import FreezeOut

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 6), torch.randint(0, 2, (8,))
    freezer = SmartFreezer(model, opt, FreezeOut(), example_inputs=x, total_steps=8)
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(8):
            nn.functional.cross_entropy(model(x), y).backward()
            step()
            opt.zero_grad()
            freezer.step()
    torch._dynamo.reset()
    assert freezer.num_frozen >= 1 and opt.param_groups[0]["capturable"] is False


def test_the_freezers_global_optimizer_hooks_run_outside_a_traced_step(monkeypatch):
    """Traced into torch.compile(optimizer.step), the global hooks' loop over the live freezers
    was read by position, and a freezer of an earlier run collected during tracing made dynamo
    fail with IndexError (review84: a sweep in one process). They run eagerly (dynamo.disable)."""
    import torch._dynamo

    from smartfrz_fast import guards

    ran_outside = []

    def disable(fn):
        def eager(*args):
            ran_outside.append(fn.__name__)
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
            return fn(*args)
        return eager

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=1), example_inputs=torch.randn(2, 4))
    monkeypatch.setattr(torch._dynamo, "disable", disable)
    for hook in (guards._before_optimizer_step, guards._after_optimizer_step):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        hook(opt, (), {})
    assert ran_outside == ["_before_optimizer_step", "_after_optimizer_step"]
    assert freezer._guard.optimizer_steps == 1  # the bookkeeping ran


@pytest.mark.parametrize("order", ["freezer_on_the_compiled_model", "compiled_after_a_lazy_freezer"])
def test_a_set_up_through_a_compiled_model_leaves_it_compiled(order):
    # the units were found by a forward through the compiled wrapper (or inside its first
    # compiled call): dynamo then skipped the model's forward for the rest of the process (it
    # ran eagerly, silently, and so did later compiles of the class), and the units were named
    # "_orig_mod.*", so the state did not load on the same model uncompiled
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    class Small(nn.Module):  # a class of this test's own: its compiled code is this test's
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(), Block())

        def forward(self, x):
            return self.blocks(x)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, WIDTH)
    if order == "freezer_on_the_compiled_model":
        compiled = torch.compile(model, backend="eager")
        freezer = SmartFreezer(compiled, opt, StaticFreeze(1, at_step=10**6), example_inputs=x)
    else:
        freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=10**6))
        compiled = torch.compile(model, backend="eager")
    for _ in range(2):
        compiled(x).sum().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert len(_debug_get_cache_entry_list(Small.forward)) == 1
    assert freezer.units[0].name == "blocks.0.fc1+blocks.0.ln"
    other = Small()
    plain = SmartFreezer(other, torch.optim.SGD(other.parameters(), lr=0.1), StaticFreeze(1, at_step=10**6),
                         example_inputs=x)
    plain.load_state_dict(freezer.state_dict())
    # a state saved by a freezer on the wrapper before it managed the module inside
    state = freezer.state_dict()
    state["signature"] = [("+".join("_orig_mod." + part for part in name.split("+")),
                           [("_orig_mod." + n, shape) for n, shape in params]) for name, params in state["signature"]]
    other = Small()
    SmartFreezer(other, torch.optim.SGD(other.parameters(), lr=0.1), StaticFreeze(1, at_step=10**6),
                 example_inputs=x).load_state_dict(state)
    torch._dynamo.reset()


class ReluTwice(nn.Module):
    """torchvision's BasicBlock calls its one ReLU twice: a mode-blind module partly in a prefix."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 2)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.head(self.relu(self.fc2(self.relu(self.fc1(x)))))


def test_the_hook_guards_change_only_for_hooks_that_matter_and_reset_only_after_a_compile(monkeypatch):
    # torch.optim imports dynamo, so "imported" meant every plain run: a ReLU called twice made
    # the freezer turn the hook guards on and reset dynamo, recompiling whatever else the process
    # had compiled
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    monkeypatch.setitem(torch._dynamo.utils.counters["stats"], "unique_graphs", 0)  # nothing compiled yet
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        model = ReluTwice()
        freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                               example_inputs=torch.randn(2, WIDTH))
        freezer.freeze_to(1)
        assert torch._dynamo.config.skip_nnmodule_hook_guards and not resets
        tied = TiedHead()
        freezer = SmartFreezer(tied, torch.optim.SGD(tied.parameters(), lr=0.1), StaticFreeze(1),
                               example_inputs=torch.randint(0, 11, (2, 5)))
        freezer.freeze_to(1)  # detaches the tied weight's read in the prefix: the guards must see it
        assert not torch._dynamo.config.skip_nnmodule_hook_guards and not resets


def test_a_compiled_function_in_the_forward_still_compiles_after_set_up():
    # set-up traces the forward under a dispatch mode: dynamo refused the compiled function there
    # and marked its code skipped for the process, so it ran eagerly ever after, silently
    runs = {"graph": 0}

    def counting_backend(gm, example_inputs):
        def run(*args):
            runs["graph"] += 1
            return gm.forward(*args)
        return run

    @torch.compile(backend=counting_backend)
    def scaled_gelu(x):
        return torch.nn.functional.gelu(x) * 1.5

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return x + scaled_gelu(self.fc(x))

    model = nn.Sequential(Layer(), Layer(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=torch.randn(4, 8), total_steps=10)
    for _ in range(3):
        nn.functional.cross_entropy(model(torch.randn(4, 8)), torch.randint(0, 3, (4,))).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert runs["graph"] >= 6  # two calls a forward, three forwards: the compiled graph ran


def test_a_dead_relu_after_the_prefix_is_not_blamed_on_checkpointing_alone():
    """A unit whose ReLU fires for no sample gets a gradient of zeros: the warning blamed
    reentrant checkpointing alone (review43). It says a gradient of zeros may be the model's own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # dead: no sample makes it fire, so unit 1 gets zeros
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=1), example_inputs=torch.randn(2, 4))
    with pytest.warns(UserWarning, match=r"received no gradient \(all zeros\).*the model's own"):
        for _ in range(3):
            model(torch.randn(5, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()


class _EmptyPrompt(nn.Module):
    """A zero-length prompt table read in forward (prefix tuning with no prompt tokens)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 16)
        self.prompt = nn.Parameter(torch.zeros(0, 16))
        self.second = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.second(torch.relu(self.first(x)) + self.prompt.sum(0))))


def test_a_unit_of_empty_tensors_is_not_said_to_receive_no_gradient():
    """An empty parameter has no gradient to receive: each freeze warned that the unit holding it
    got none, pointing at reentrant checkpointing (review92)."""
    from smartfrz_fast import LinearFreeze

    model = _EmptyPrompt()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, LinearFreeze(freeze_start=0.2), example_inputs=torch.randn(4, 8),
                           total_steps=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(20):
            nn.functional.cross_entropy(model(torch.randn(8, 8)), torch.randint(0, 3, (8,))).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    assert freezer.num_frozen >= 2
    assert not [w for w in caught if "received no gradient" in str(w.message)]
