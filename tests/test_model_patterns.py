"""Patterns from other people's training code: quantization-aware training, the old-style
spectral norm and users' hooks on frozen layers, a GAN whose discriminator runs twice a step.
Each is compared with the same training without the library (the prefix frozen by hand)."""

import random
import warnings

import pytest
import torch
from torch import nn

from smartfrz_fast import SmartFreezer, StaticFreeze
from smartfrz_fast.cache import ActivationCache
from smartfrz_fast.units import discover_units, preserved_state

tq = pytest.importorskip("torch.ao.quantization")

g = torch.Generator().manual_seed(0)
X, Y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
BATCHES = [p[i:i + 16] for p in [torch.randperm(64, generator=g) for _ in range(4)] for i in range(0, 64, 16)]


@pytest.fixture(autouse=True)
def _quiet_quantization():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao.quantization's own notice
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        yield


def _update(out, target, opt, freezer=None) -> None:
    nn.functional.cross_entropy(out, target).backward()
    opt.step()
    opt.zero_grad()
    if freezer is not None:
        freezer.step()


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa if sa[k].is_floating_point())


# ------------------------------------------------------------------ train/eval seen by users' hooks


def _spectral_mlp():
    torch.manual_seed(0)
    sn = nn.utils.spectral_norm
    return nn.Sequential(sn(nn.Linear(16, 32)), nn.ReLU(), sn(nn.Linear(32, 32)), nn.ReLU(), nn.Linear(32, 32),
                         nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("cached", [False, True], ids=["freezer", "cache"])
def test_old_style_spectral_norm_in_the_frozen_prefix_stays_fixed_after_model_train(cached):
    # the old-style spectral_norm's pre-hook runs a power iteration when its layer is in train
    # mode; a frozen nn.Linear was set to eval once, with no hook, and model.train() at each epoch
    # turned it back: the frozen layer's u (and W / sigma) kept moving, and the cache (rows made
    # in eval mode) trained to other weights than the freezer alone
    def run(use_lib):
        m = _spectral_mlp()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        if use_lib:
            freezer = SmartFreezer(m, opt, StaticFreeze(2, at_step=4), example_inputs=X[:4], total_steps=16)
            forward = ActivationCache(freezer, num_samples=64, deterministic=True).wrap() if cached else \
                (lambda x, ids: m(x))
        u_at_freeze = None
        for step, ids in enumerate(BATCHES):
            if step % 4 == 0:
                m.train()  # each epoch
            _update(forward(X[ids], ids) if use_lib else m(X[ids]), Y[ids], opt, freezer if use_lib else None)
            if not use_lib and step + 1 == 4:  # by hand: the two layers frozen, in eval at every forward after
                for layer in (m[0], m[2]):
                    layer.requires_grad_(False)
                    layer.register_forward_pre_hook(lambda module, args: setattr(module, "training", False),
                                                    prepend=True)
            if step + 1 == 4:
                u_at_freeze = m[0].weight_u.clone()
        return m, u_at_freeze

    lib, u_at_freeze = run(True)
    ref, _ = run(False)
    assert torch.equal(lib[0].weight_u, u_at_freeze)
    assert _max_diff(lib, ref) < 1e-6


def test_a_users_pre_hook_that_reads_training_sees_a_frozen_layer_in_eval():
    # input dropout placed by the user's pre-hook on a plain nn.Linear (DropConnect style): frozen,
    # that layer must compute a fixed function of its input after model.train() too
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def input_dropout(module, args):
        return (nn.functional.dropout(args[0], 0.5, module.training),)

    m[0].register_forward_pre_hook(input_dropout)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    freezer = SmartFreezer(m, opt, StaticFreeze(1, at_step=1), example_inputs=X[:4], total_steps=8)
    for ids in BATCHES[:2]:
        nn.functional.cross_entropy(m(X[ids]), Y[ids]).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert freezer.num_frozen == 1
    m.train()
    with torch.no_grad():
        assert torch.equal(m[0](X[:8]), m[0](X[:8]))


# ------------------------------------------------------------------ a GAN's discriminator


def _discriminator():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.LeakyReLU(0.2), nn.Linear(32, 32),
                         nn.BatchNorm1d(32), nn.LeakyReLU(0.2), nn.Linear(32, 1))


def test_a_gan_discriminator_with_batchnorm_runs_the_fake_batch_before_the_cached_real_one():
    # D(fake) first, then the cached D(real), one backward: the cache's look-only passes (set-up,
    # the check at each freeze) put BatchNorm's running statistics back with a version bump, and
    # the backward of D(fake), which saved them, failed ("modified by an inplace operation")
    bce = nn.functional.binary_cross_entropy_with_logits
    fakes = torch.randn(len(BATCHES), 16, 16, generator=torch.Generator().manual_seed(2))

    def run(cached):
        d = _discriminator()
        opt = torch.optim.Adam(d.parameters(), lr=1e-3)
        freezer = SmartFreezer(d, opt, StaticFreeze(1, at_step=4), example_inputs=X[:4], total_steps=16)
        forward = ActivationCache(freezer, num_samples=64, deterministic=True).wrap() if cached else \
            (lambda x, ids: d(x))
        for step, ids in enumerate(BATCHES):
            d_fake = d(fakes[step])
            d_real = forward(X[ids], ids)
            (bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
        return d

    assert _max_diff(run(True), run(False)) < 1e-5


def test_a_look_only_pass_leaves_buffer_versions_and_shapes_as_they_were():
    bn = nn.BatchNorm1d(4)
    out = bn(torch.randn(8, 4))  # the graph saves the running statistics
    versions = bn.running_mean._version, bn.running_var._version
    grown = nn.Module()
    grown.register_buffer("stat", torch.empty(0))  # resized by its first forward (an observer)
    grown.register_buffer("adjacency", torch.eye(3).to_sparse())  # a graph network's (no torch.equal)
    grown.register_buffer("shape_only", torch.empty(2, device="meta"))
    model = nn.ModuleDict({"bn": bn, "grown": grown})
    mean = bn.running_mean.clone()
    with preserved_state(model):
        bn(torch.randn(8, 4))
        grown.stat.resize_(3).fill_(1.0)
        grown.adjacency = grown.adjacency * 2
    assert torch.equal(bn.running_mean, mean) and (bn.running_mean._version, bn.running_var._version) == versions
    assert grown.stat.shape == (0,) and torch.equal(grown.adjacency.to_dense(), torch.eye(3))
    out.sum().backward()  # failed before: the statistics' versions had moved


# ------------------------------------------------------------------ quantization-aware training


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.c3(self.c2(self.c1(self.quant(x))))
        return self.fc(self.dequant(x).mean((2, 3)))


def _qat_convnet(fuse: bool) -> nn.Module:
    torch.manual_seed(0)
    model = ConvNet().train()
    if fuse:
        model = tq.fuse_modules_qat(model, [[f"c{i}.0", f"c{i}.1", f"c{i}.2"] for i in (1, 2, 3)])
    model.qconfig = tq.get_default_qat_qconfig("x86")
    return tq.prepare_qat(model)


class _WritesItsParameters(nn.Module):
    """A forward that writes into parameters: an EMA codebook kept as a parameter (VQ-VAE), a
    decay under no_grad, torch's own Embedding max_norm renorm, a storage rebound by `.data =`."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6, max_norm=0.5)
        self.code = nn.Parameter(torch.randn(4, 6), requires_grad=False)
        self.l1, self.l2 = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, tokens):
        h = self.emb(tokens).mean(1)
        if self.training:
            with torch.no_grad():
                self.code.mul_(0.9).add_(0.1 * h.mean(0))
                self.l1.weight.mul_(0.99)
            self.l2.weight.data = self.l2.weight.data.clamp(-0.3, 0.3)
        return self.l2(torch.tanh(self.l1(h - self.code[0])))


def test_set_up_leaves_parameters_the_forward_writes_as_they_were():
    # the set-up trace put buffers back but not parameters: SmartFreezer(...) alone moved a
    # codebook by 0.22 and nn.Embedding(max_norm=1) rows by 3.4 (review98); without
    # example_inputs the first step then applied an update twice
    torch.manual_seed(0)
    model = _WritesItsParameters()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    storage = model.l2.weight.untyped_storage().data_ptr()
    SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                 example_inputs=torch.randint(0, 10, (8, 5)))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert model.l2.weight.untyped_storage().data_ptr() == storage


def test_the_caches_looks_leave_parameters_the_forward_writes_as_they_were():
    # the cache's checks ran the forward more often: weights 0.0056 off the uncached run, and its
    # note blamed "a random op" (review98)
    tokens = torch.randint(0, 10, (16, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    runs = []
    for cached in (False, True):
        torch.manual_seed(0)
        model = _WritesItsParameters()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=2), example_inputs=tokens[:4])
        forward = ActivationCache(freezer, num_samples=16, deterministic=True).wrap() if cached else \
            (lambda x, ids: model(x))
        for step in range(8):
            ids = torch.arange(8) + 8 * (step % 2)
            nn.functional.cross_entropy(forward(tokens[ids], ids), y[ids]).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
        runs.append({name: p.detach().clone() for name, p in model.named_parameters()})
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_a_parameter_write_switched_on_after_set_up_is_said_and_put_back_from_then_on():
    # the looks put back only the parameters the set-up saw written: a decay the loop switches on
    # later ran once more per look, silently (review102)
    from smartfrz_fast.units import preserved_state

    class Decaying(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head, self.decay = nn.Linear(4, 8), nn.Linear(8, 2), False

        def forward(self, x):
            if self.decay:
                with torch.no_grad():
                    self.head.weight.mul_(0.5)
            return self.head(torch.relu(self.a(x)))

    model = Decaying()
    SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1), example_inputs=torch.randn(2, 4))
    model.decay = True
    with pytest.warns(UserWarning, match=r"wrote parameter\(s\) \['head.weight'\] in place during a pass"):
        with preserved_state(model):
            model(torch.randn(2, 4))
    before = model.head.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with preserved_state(model):
            model(torch.randn(2, 4))
    assert torch.equal(model.head.weight, before)


@pytest.mark.parametrize("write", ["clamp", "decay", "data-clamp", "view-clamp", "row-zero", "view-of-view",
                                   "unbind"])
def test_weights_written_at_the_top_of_the_forward_keep_their_layers_units(write):
    # weight clipping (or a decay) under no_grad at the top of the forward counted as each
    # weight's first read: every unit began at the clipping, the biases and every FLOP joined the
    # last unit, and with the default shared_parameters every freeze was refused (review98)
    class Clipped(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x):
            if self.training and write == "data-clamp":  # the original WGAN's clipping, through .data
                for p in self.parameters():
                    p.data.clamp_(-0.15, 0.15)
            elif self.training:
                with torch.no_grad():  # (through a view: review100)
                    for layer in (self.l1, self.l2, self.l3):
                        if write == "view-clamp":
                            layer.weight.view(-1).clamp_(-0.15, 0.15)
                        elif write == "row-zero":
                            layer.weight[0] = 0.0
                        elif write == "view-of-view":  # (review102)
                            layer.weight.t()[0].zero_()
                        elif write == "unbind":
                            for row in layer.weight.unbind(0):
                                row.clamp_(-0.15, 0.15)
                        else:
                            layer.weight.clamp_(-0.15, 0.15) if write == "clamp" else layer.weight.mul_(0.99)
            return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))

    model = Clipped()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(2),
                           example_inputs=torch.randn(4, 6))
    assert [sorted(u.param_names) for u in freezer.units] == [["l1.bias", "l1.weight"], ["l2.bias", "l2.weight"],
                                                              ["l3.bias", "l3.weight"]]
    assert all(u.forward_flops > 0 for u in freezer.units)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        freezer.freeze_to(2)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["l3.weight", "l3.bias"]


def test_a_qat_model_sets_up_without_a_warm_up_forward():
    # per-channel weight observers start empty and their first forward resizes them: the set-up's
    # look-only pass failed to put them back ("size of tensor a (8) must match ... (0)") and the
    # error blamed example_inputs
    model = _qat_convnet(fuse=False)
    empty = {n: tuple(b.shape) for n, b in model.named_buffers()}
    x = torch.randn(4, 3, 8, 8)
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.01), StaticFreeze(1, at_step=1),
                           example_inputs=x, total_steps=4)
    assert freezer.plan is not None and {n: tuple(b.shape) for n, b in model.named_buffers()} == empty


def test_a_fused_qat_conv_bn_is_one_unit_with_its_norm():
    # a QAT ConvBn2d reads its bn's scale first (folded into the conv weight): the norm went to the
    # unit before, mixing neighbouring layers, and the freeze stopped short or froze a layer that trains
    model = _qat_convnet(fuse=True)
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.01), StaticFreeze(2, at_step=1),
                           example_inputs=torch.randn(4, 3, 8, 8), total_steps=4)
    assert [u.name for u in freezer.units] == ["c1.0.bn+c1.0", "c2.0.bn+c2.0", "c3.0.bn+c3.0", "fc"]
    freezer.freeze_to(2)
    assert freezer.num_frozen == 2 and model.c3[0].bn.weight.requires_grad


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))))


def test_quantization_observers_turned_back_on_in_a_cached_prefix_are_not_served_stale_rows():
    # observers off, two layers frozen and cached, observers on again (a calibration phase): the
    # default fused fake-quant writes its statistics without a version bump, and the cache served
    # rows made with the old ones (audit_rows=0: silently)
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    def run(use_lib):
        torch.manual_seed(0)
        m = prepare_qat_fx(Mlp().train(), tq.get_default_qat_qconfig_mapping("x86"), example_inputs=(X[:4],))
        with torch.no_grad():
            m(X[:4])
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        if use_lib:
            freezer = SmartFreezer(m, opt, StaticFreeze(2, at_step=4), example_inputs=X[:4], total_steps=32)
            forward = ActivationCache(freezer, num_samples=64, deterministic=True, audit_rows=0).wrap()
        for step, ids in enumerate(BATCHES + BATCHES):
            if step == 2:
                m.apply(tq.disable_observer)
            if step == 10:
                m.apply(tq.enable_observer)
            _update(forward(X[ids], ids) if use_lib else m(X[ids]), Y[ids], opt, freezer if use_lib else None)
            if not use_lib and step + 1 == 4:
                m.l1.requires_grad_(False)
                m.l2.requires_grad_(False)
        return m

    assert _max_diff(run(True), run(False)) < 1e-5


def test_the_cache_names_quantization_observers_as_such():
    # eager prepare_qat hooks its observers onto the layers: the cache cuts before them, and
    # said "a forward hook you placed ... Remove the hook"
    model = _qat_convnet(fuse=False)
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=x[:4], total_steps=8)
    cache = ActivationCache(freezer, num_samples=16, deterministic=True)
    forward = cache.wrap()
    for _ in range(3):
        forward(x, torch.arange(16)).sum().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    said = cache.describe()
    assert "quantization observers" in said and "you placed" not in said, said


# ------------------------------------------------------------------ one module used at several places


class Branchy(nn.Module):
    """A dropout shared by every layer, and a data-dependent branch (fx cannot trace it: the
    cache takes the module swap)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.a1, self.a2, self.a3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        if bool(x.abs().sum() >= 0):
            x = self.drop(self.a1(self.l1(x)))
        x = self.drop(self.a2(self.l2(x)))
        return self.head(self.drop(self.a3(self.l3(x))))


class _Block(nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.lin, self.act, self.drop = nn.Linear(16, 16), nn.ReLU(), drop

    def forward(self, x):
        return self.drop(self.act(self.lin(x)))


class NestedBranchy(nn.Module):
    """Blocks that hold one shared dropout, in a data-dependent loop (the module swap): the
    swapped-out prefix block's call of the dropout is skipped on cached steps."""

    def __init__(self):
        super().__init__()
        drop = nn.Dropout(0.5)
        self.blocks, self.head = nn.ModuleList([_Block(drop) for _ in range(3)]), nn.Linear(16, 4)

    def forward(self, x):
        if bool(x.abs().sum() >= 0):
            for block in self.blocks:
                x = block(x)
        return self.head(x)


def _shared_dropout_sequential():
    drop = nn.Dropout(0.5)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), drop, nn.Linear(16, 16), nn.ReLU(), drop,
                         nn.Linear(16, 16), nn.ReLU(), drop, nn.Linear(16, 4))


@pytest.mark.parametrize("make", [_shared_dropout_sequential, Branchy, NestedBranchy],
                         ids=["sequential", "module-swap", "module-swap-nested"])
def test_a_dropout_shared_by_the_frozen_prefix_and_the_trainable_layers_keeps_dropping_on_cached_steps(make):
    # the nn.Sequential chain listed a child registered twice once (named_children()), so a
    # reused dropout dropped out of the cached forward, and the engine numbered the trainable
    # layers' calls of it from 0 on cached steps: no dropout on every cached step, silently
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=1), example_inputs=X[:8], total_steps=100)
    cache = ActivationCache(freezer, num_samples=64, deterministic=True)
    forward = cache.wrap()
    for step in range(8):  # every sample seen: rows cached
        ids = BATCHES[step % len(BATCHES)]
        nn.functional.cross_entropy(forward(X[ids], ids), Y[ids]).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    model.train()
    ids = BATCHES[0]
    hits = cache.stats["hits"]
    torch.manual_seed(1)
    cached = forward(X[ids], ids)
    assert cache.stats["hits"] == hits + len(ids), cache.describe()
    assert (cache.chain.how == "module swap") == (make is not _shared_dropout_sequential)
    torch.manual_seed(1)
    whole = model(X[ids])  # the freezer alone: the same dropout masks, drawn in the same order
    torch.testing.assert_close(cached, whole, rtol=1e-6, atol=1e-6)
    torch.manual_seed(2)
    assert not torch.equal(forward(X[ids], ids), cached)  # it drops


# ------------------------------------------------------------------ optimizer wrappers


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation as its reference implementation (davda54/sam) writes it:
    it shares its base optimizer's groups and keeps its own state (``old_p``)."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self):
        norm = torch.norm(torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]
                                       if p.grad is not None]))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["old_p"] = p.data.clone()
                    p.add_(p.grad * (group["rho"] / (norm + 1e-12)))
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()  # SAM's own step() is never called in this style
        self.zero_grad()


def _sam_run(policy, give, steps=16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    given = {"sam": sam, "base": sam.base_optimizer, "both": [sam, sam.base_optimizer]}[give]
    freezer = SmartFreezer(model, given, policy, example_inputs=X[:4], total_steps=max(steps, 4))
    for step in range(steps):
        ids = BATCHES[step % len(BATCHES)]
        for _ in range(2):
            nn.functional.cross_entropy(model(X[ids]), Y[ids]).backward()
            sam.first_step() if _ == 0 else sam.second_step()
        freezer.step()
    return model, sam, freezer


@pytest.mark.parametrize("give", ["sam", "both"])
def test_a_sam_optimizer_is_followed_through_its_base_optimizer(give):
    # given SAM, the freezer hooked SAM's step(), which first_step/second_step never call: FreezeOut's
    # per-unit lrs were never applied (and AutoFreeze saw no gradients, the freezer warned of a
    # loop without optimizer steps); given both, FreezeOut scaled each lr twice
    from smartfrz_fast import FreezeOut

    reference, _, _ = _sam_run(FreezeOut(t0=0.5), "base")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model, sam, freezer = _sam_run(FreezeOut(t0=0.5), give)
    assert freezer.optimizers == [sam.base_optimizer] and freezer.num_frozen >= 1
    assert _max_diff(model, reference) == 0.0
    frozen = {id(p) for _, p in freezer.plan.frozen_parameters(freezer.num_frozen)}
    assert not frozen & {id(p) for p in sam.state} and not frozen & {id(p) for p in sam.base_optimizer.state}
    sam.state_dict(), sam.base_optimizer.state_dict()  # a frozen parameter's state left behind failed these


class _StepSAM(SAM):
    """SAM used through ``step(closure)``."""

    def step(self, closure):
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()


def test_a_wrapper_with_its_own_list_of_the_inner_groups_is_followed_once():
    # a SAM that keeps its own list of the base optimizer's group dicts: the guard took each of
    # its steps for a re-created optimizer and adopted it again (hooks piling up, FreezeOut's
    # groups left split)
    from smartfrz_fast import FreezeOut

    class ListSAM(_StepSAM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.param_groups = list(self.base_optimizer.param_groups)

    def run(cls):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        sam = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        freezer = SmartFreezer(model, sam, FreezeOut(t0=0.5), example_inputs=X[:4], total_steps=12)
        for step in range(12):
            ids = BATCHES[step % len(BATCHES)]

            def closure():
                loss = nn.functional.cross_entropy(model(X[ids]), Y[ids])
                loss.backward()
                return loss

            closure()
            sam.step(closure)
            freezer.step()
        return model, sam, freezer

    model, sam, freezer = run(ListSAM)
    reference, _, _ = run(_StepSAM)
    assert len(sam.base_optimizer.param_groups) == 1 and freezer.optimizers == [sam.base_optimizer]
    assert _max_diff(model, reference) == 0.0


def test_a_sam_state_loaded_before_the_freezers_gets_the_freezers_message():
    model, sam, freezer = _sam_run(StaticFreeze(2, at_step=2), "sam", steps=4)
    saved, freezer_state = sam.state_dict(), freezer.state_dict()
    _, sam2, freezer2 = _sam_run(StaticFreeze(2, at_step=2), "sam", steps=0)
    with pytest.raises(ValueError, match="Load the freezer's state first"):
        sam2.load_state_dict(saved)
    freezer2.load_state_dict(freezer_state)


def test_a_gradient_policy_sees_the_steps_of_a_sam_optimizer():
    from smartfrz_fast import AutoFreeze

    _, _, reference = _sam_run(AutoFreeze(interval=2, percentile=80), "base", steps=24)
    _, _, freezer = _sam_run(AutoFreeze(interval=2, percentile=80), "sam", steps=24)
    assert reference.num_frozen >= 1 and freezer.timeline == reference.timeline


def test_a_wrapper_built_without_optimizer_init_is_accepted():
    # accelerate's AcceleratedOptimizer and timm's Lookahead skip Optimizer.__init__: the freezer's
    # hooks had nowhere to go ("no attribute '_optimizer_step_post_hooks'")
    class Lookahead(torch.optim.Optimizer):
        def __init__(self, base, alpha=0.5, k=2):  # noqa: super().__init__ skipped on purpose
            self._base_optimizer, self.alpha, self.k, self.steps = base, alpha, k, 0
            self.param_groups, self.defaults, self.state = base.param_groups, base.defaults, base.state
            # as timm's: what torch's step wrapper reads, and not the load_state_dict hooks' dicts
            self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

        @torch.no_grad()
        def step(self, closure=None):
            loss = self._base_optimizer.step(closure)
            self.steps += 1
            for group in self.param_groups:
                for p in group["params"]:
                    slow = self.state[p].setdefault("slow", p.detach().clone())
                    if self.steps % self.k == 0:
                        slow.add_(p - slow, alpha=self.alpha)
                        p.copy_(slow)
            return loss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-2))
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=X[:4], total_steps=8)
    for step in range(4):
        ids = BATCHES[step]
        nn.functional.cross_entropy(model(X[ids]), Y[ids]).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    frozen = {id(p) for p in model[0].parameters()}
    assert freezer.num_frozen == 1 and freezer.optimizers == [opt._base_optimizer]
    assert not frozen & {id(p) for p in opt.state}
    opt._base_optimizer.state_dict()


def test_accelerates_prepared_optimizer_is_accepted():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    accelerator = accelerate.Accelerator(cpu=True)
    try:
        model, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        assert isinstance(opt, accelerate.optimizer.AcceleratedOptimizer)
        freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=X[:4], total_steps=8)
        for step in range(4):
            ids = BATCHES[step]
            accelerator.backward(nn.functional.cross_entropy(model(X[ids]), Y[ids]))
            opt.step()
            opt.zero_grad()
            freezer.step()
        assert freezer.num_frozen == 1 and freezer.optimizers == [opt.optimizer]
        assert not {id(p) for p in model[0].parameters()} & {id(p) for p in opt.optimizer.state}
        opt.state_dict()
    finally:
        accelerate.state.AcceleratorState._reset_state(True)  # the process-wide state other tests build


class LayerDropNet(nn.Module):
    """LayerDrop (Wav2Vec2, BART: a layer skipped where a uniform draw falls below p; with
    torch or Python) and stochastic depth (timm's DropPath: a Bernoulli keep mask per sample)."""

    def __init__(self, p=0.9):
        super().__init__()
        self.p = p
        self.stem = nn.Linear(6, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.stem(x)
        for i, layer in enumerate(self.layers):
            if i % 3 == 1:
                if self.training and torch.rand([]) < self.p:
                    continue
                h = layer(h)
            elif i % 3 == 2:  # LayerDrop drawn with Python (older Hugging Face code)
                if self.training and random.random() < self.p:
                    continue
                h = layer(h)
            else:
                keep = x.new_empty(x.shape[0], 1).bernoulli_(1 - self.p) if self.training else 1.0
                h = h + layer(h) * keep
        return self.head(h)


def test_units_of_a_model_that_drops_layers_at_random_hold_every_layer():
    # the set-up trace ran in train mode and took the model's draws: a skipped layer's parameters
    # were in no unit (never frozen, warned as unmanaged), a different set each run
    for seed in range(5):
        torch.manual_seed(seed)
        random.seed(seed)
        model, x = LayerDropNet(), torch.randn(4, 6)
        state = torch.get_rng_state()
        plan = discover_units(model, (x,))
        assert [u.name for u in plan.units] == ["stem", *[f"layers.{i}" for i in range(6)], "head"]
        assert not plan.untraced_parameters and torch.equal(torch.get_rng_state(), state)
        assert random.random() == random.Random(seed).random()  # Python's generator as it was


def test_a_lazy_layer_initialised_in_the_set_up_trace_keeps_its_random_init():
    # the trace's draws that keep every layer also took a lazy layer's kaiming_uniform_: every
    # weight and bias of it was 0.999
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 3))
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                           example_inputs=torch.randn(4, 8))
    model(torch.randn(4, 8))  # the user's first forward materialises it; set-up follows it
    assert freezer.plan is not None
    assert model[2].weight.unique().numel() == 16 * 16 and model[2].bias.unique().numel() == 16
    assert model[2].weight.abs().max() <= 0.25  # kaiming_uniform_'s bound for 16 inputs


class _PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32, padding_idx=0)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True), 3)
        self.head = nn.Linear(32, 10)

    def forward(self, tokens, padding):
        return self.head(self.enc(self.emb(tokens), src_key_padding_mask=padding)[:, 0])


def _padded_batch(n):
    """Token ids of n sequences of 3-12 tokens, padded to 12 (id 0), the padding mask, labels."""
    torch.manual_seed(0)
    tokens = torch.randint(1, 50, (n, 12))
    padding = torch.arange(12)[None] >= torch.randint(3, 13, (n,))[:, None]
    tokens[padding] = 0
    return tokens, padding, torch.randint(0, 10, (n,))


def _padded_encoder_frozen(units, tokens, padding):
    """A _PaddedEncoder, its optimizer and a freezer that freezes ``units`` after the first step."""
    model = _PaddedEncoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, opt, SmartFreezer(model, opt, policy=StaticFreeze(units, at_step=1),
                                    example_inputs=(tokens, padding), total_steps=10)


def test_a_padded_transformer_encoder_trains_with_its_first_layer_frozen():
    # torch's encoder (enable_nested_tensor=True, the default) turns a padded batch into a nested
    # tensor when its first layer is in eval mode; the engine holds a frozen layer in eval, and
    # the next layer, still training, failed on it ("MultiheadAttention does not support
    # NestedTensor outside of its fast path") at the first forward after the freeze
    tokens, padding, y = _padded_batch(8)
    model, opt, freezer = _padded_encoder_frozen(5, tokens, padding)
    for _ in range(3):
        nn.functional.cross_entropy(model(tokens, padding), y).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert freezer.num_frozen == 5 and not model.enc.use_nested_tensor
    freezer.close()
    assert model.enc.use_nested_tensor  # the user's setting back


def test_the_cache_says_when_the_frozen_prefix_ends_inside_a_block_the_chain_keeps_whole():
    # torch.fx keeps torch.nn's TransformerEncoder as one call: with two of its three layers
    # frozen the cache cut after the embedding, and describe() gave no reason
    tokens, padding, y = _padded_batch(16)
    model, opt, freezer = _padded_encoder_frozen(9, tokens, padding)
    cache = ActivationCache(freezer, num_samples=16, deterministic=True, storage="memory")
    cached = cache.wrap()
    for step in range(3):
        ids = torch.arange(8) + 8 * (step % 2)
        nn.functional.cross_entropy(cached((tokens[ids], padding[ids]), ids), y[ids]).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert cache.boundary == 1
    assert "frozen prefix ends inside block" in cache.describe() and "8 of its 12 units frozen" in cache.describe()
