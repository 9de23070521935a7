"""Patterns from other people's training code: quantization-aware training, the old-style
spectral norm and users' hooks on frozen layers, a GAN whose discriminator runs twice a step.
Each is compared with the same training without the library (the prefix frozen by hand)."""

import warnings

import pytest
import torch
from torch import nn

from smartfrz_fast import SmartFreezer, StaticFreeze
from smartfrz_fast.cache import ActivationCache
from smartfrz_fast.units import preserved_state

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
            out = forward(X[ids], ids) if use_lib else m(X[ids])
            nn.functional.cross_entropy(out, Y[ids]).backward()
            opt.step()
            opt.zero_grad()
            if use_lib:
                freezer.step()
            elif step + 1 == 4:  # by hand: the two layers frozen, in eval at every forward after
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
    model = nn.ModuleDict({"bn": bn, "grown": grown})
    mean = bn.running_mean.clone()
    with preserved_state(model):
        bn(torch.randn(8, 4))
        grown.stat.resize_(3).fill_(1.0)
    assert torch.equal(bn.running_mean, mean) and (bn.running_mean._version, bn.running_var._version) == versions
    assert grown.stat.shape == (0,)
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
            out = forward(X[ids], ids) if use_lib else m(X[ids])
            nn.functional.cross_entropy(out, Y[ids]).backward()
            opt.step()
            opt.zero_grad()
            if use_lib:
                freezer.step()
            elif step + 1 == 4:
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
