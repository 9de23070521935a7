"""The activation cache in real training loops: same weights, agreement, audit, boundary moves,
capacity, storage tiers, and bad input."""

import copy
import errno
import os
import time
import warnings
import weakref

import pytest
import torch
from torch import nn

from smartfrz_fast import SmartFreezer, StaticFreeze
from smartfrz_fast.cache import ActivationCache, IndexedDataset
from smartfrz_fast.cache import storage as storage_mod
from tests.models import SmallCNN, train_cached_steps, with_and_without_cache

N = 40
X = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(5))
Y = torch.randint(0, 10, (N,), generator=torch.Generator().manual_seed(6))


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05)


def chain_model(dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(dropout),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 8 * 8, 10),
    )


def train(model, cache_args=None, epochs=6, deepen_at=3, first=1, deepen_to=2, augment=None,
          use_ids=True, dtype=torch.float32, autocast=False, lazy=False):
    model = model.to(dtype)
    data = X.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(first, 3), example_inputs=None if lazy else data[:2],
                           total_steps=100)
    cache = None
    forward = model
    if cache_args is not None:
        cache = ActivationCache(freezer, num_samples=N, **cache_args)
        wrapped = cache.wrap()
        forward = wrapped
    g = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        perm = torch.randperm(N, generator=g)
        for i in range(0, N, 10):
            ids = perm[i:i + 10]
            x = data[ids] if augment is None else augment(data[ids])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = forward(x, ids) if cache is not None else forward(x)
            loss = nn.functional.cross_entropy(out.float(), Y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
            freezer.step()
        if epoch == deepen_at:
            freezer.freeze_to(deepen_to)
    return model, cache, freezer


def assert_same_weights(a, b, exact=True):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, msg=name)


@pytest.mark.parametrize("storage", ["memory", "mmap"])
def test_training_with_cache_gives_the_same_weights(storage, tmp_path):
    plain, _, _ = train(chain_model())
    args = dict(deterministic=True, storage=storage, dtype="fp32")
    if storage == "mmap":
        args["path"] = str(tmp_path / "cache.bin")
    cached, cache, _ = train(chain_model(), args)
    assert cache.active and cache.boundary == 8  # conv, bn, relu, dropout, conv, bn, relu, flatten
    assert cache.stats["hits"] > 0 and cache.stats["migrated"] == N
    assert_same_weights(plain, cached)  # fp32 storage, deterministic CPU run: bit for bit


def test_the_freezers_report_says_what_the_cache_skipped():
    # report() counts the frozen units' backward only; nothing said that the cache skipped their
    # forward too (59 % reported where 80 % of the run's FLOPs were saved)
    _, cache, freezer = train(chain_model(), dict(deterministic=True))
    hits, seen = cache.stats["hits"], cache.stats["hits"] + cache.stats["misses"]
    assert hits > 0
    assert f"activation cache: {hits} of {seen} samples since it started were served from it" in freezer.report()
    cache.stats["bypassed"] += 1  # (a validation forward)
    copied = copy.deepcopy(cache)  # a copy holds no chain: it said all its forwards ran whole
    assert "ran the whole model" not in copied.describe()
    cache.close()
    assert "activation cache" not in freezer.report()


def test_cache_with_units_found_at_the_first_forward():
    # the freezer's deferred set-up hook counted as the user's: the cache turned itself off
    plain, _, _ = train(chain_model())
    cached, cache, _ = train(chain_model(), dict(deterministic=True, dtype="fp32"), lazy=True)
    assert cache.active and cache.stats["hits"] > 0, cache.describe()
    assert_same_weights(plain, cached)


def test_first_cached_forward_under_inference_mode_then_training():
    # a validation pass right after a freeze made the store of inference tensors; now such a
    # pass (train mode, no gradient: no training step) neither reads nor stores rows
    model = chain_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, 1), example_inputs=X[:2], total_steps=10)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True)
    forward = cache.wrap()
    ids = torch.arange(10)
    forward(X[ids], ids)  # the cache sets up; its store comes at the first forward after a freeze
    freezer.freeze_to(1)
    with torch.inference_mode(), pytest.warns(UserWarning, match="no_grad.*inference_mode"):
        forward(X[ids], ids)
    assert cache.stats["bypassed"] == 1 and cache.rows_cached == 0
    for step in range(3):
        ids = torch.arange(10 * (step % 2), 10 * (step % 2) + 10)  # misses, then hits
        nn.functional.cross_entropy(forward(X[ids], ids), Y[ids]).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert cache.active and cache.stats["hits"] > 0, cache.describe()


def test_validation_through_the_cache_neither_reads_nor_stores_rows():
    # a validation set's ids 0..n-1 name training samples: in eval mode they were served (and
    # stored) training rows
    model, cache, freezer = train(chain_model(), dict(deterministic=True, dtype="fp32"), epochs=2, deepen_at=9)
    hits, stored = cache.stats["hits"], cache.stats["stored"]
    other = torch.randn(10, 1, 8, 8)  # other samples under ids the training set uses
    ids = torch.arange(10)
    model.eval()
    with pytest.warns(UserWarning, match="eval mode"):
        out = cache.wrap()(other, ids)
    assert torch.equal(out, model(other))
    assert (cache.stats["hits"], cache.stats["stored"], cache.stats["bypassed"]) == (hits, stored, 1)
    freezer.close()


def test_closing_the_freezer_turns_the_cache_off():
    # after close() the prefix's BatchNorms follow model.train() again: eval-mode rows are stale
    model, cache, freezer = train(chain_model(), dict(deterministic=True, dtype="fp32"), epochs=2, deepen_at=9)
    assert cache.active and freezer.num_frozen == 1
    freezer.close()
    model.train()
    ids = torch.arange(10)
    with pytest.warns(UserWarning, match="SmartFreezer was closed"):
        out = cache.wrap()(X[ids], ids)
    assert not cache.active
    assert torch.equal(out, model(X[ids]))  # the whole model, its BatchNorms in train mode


@pytest.mark.parametrize("storage", ["memory", "mmap"])
def test_float64_model_with_default_storage_gives_the_same_weights(storage, tmp_path):
    # the default storage is exact for the model's own precision: float64 rows for a float64
    # model (float32 rows would round every cached activation)
    plain, _, _ = train(chain_model(), dtype=torch.float64)
    args = dict(deterministic=True, storage=storage)
    if storage == "mmap":
        args["path"] = str(tmp_path / "cache.bin")
    cached, cache, _ = train(chain_model(), args, dtype=torch.float64)
    assert cache.storage_dtype == torch.float64 and cache.stats["hits"] > 0
    assert_same_weights(plain, cached)


def test_resume_with_another_storage_dtype_says_which_to_pass():
    # a float64 model's checkpoint cached in fp32 (the default before fp64 rows existed)
    _, cache, freezer = train(chain_model(), dict(deterministic=True, dtype="fp32"), epochs=2, dtype=torch.float64)
    fresh = ActivationCache(freezer, num_samples=N, deterministic=True)  # default: fp64 for this model
    with pytest.raises(ValueError, match="pass dtype='fp32'"):
        fresh.load_state_dict(cache.state_dict())


def test_dropout_in_the_frozen_prefix_cached_and_uncached_agree():
    # The engine turns off the dropout inside the frozen prefix, as the cache's eval mode does:
    # training with and without the cache gives the same weights (before the freeze both run
    # the plain model with dropout on, drawing the same masks).
    plain, _, freezer = train(chain_model(dropout=0.5))
    assert freezer.units[0].dropout_modules == [plain[3]] and not plain[3].training
    cached, cache, _ = train(chain_model(dropout=0.5), dict(deterministic=True))
    assert cache.active and cache.stats["hits"] > 0
    assert_same_weights(plain, cached)


def _user_frozen_stem_run(cached, stem_in_eval=False, train_again_at=None):
    """The user froze the stem (conv + BatchNorm + dropout) before building the freezer, and left it
    in train mode (plain fine-tuning does); the freezer freezes nothing in these 12 steps."""
    model = chain_model(dropout=0.3)
    for p in list(model[0].parameters()) + list(model[1].parameters()):
        p.requires_grad_(False)
    if stem_in_eval:
        model[:4].eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, at_step=10**6), example_inputs=X[:2], total_steps=100)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True) if cached else None
    forward = cache.wrap() if cached else (lambda x, ids: model(x))
    torch.manual_seed(3)
    boundaries = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(12):
            if step == train_again_at:
                model.train()  # an epoch's model.train() puts the stem back in train mode
            ids = torch.arange(10 * (step % 4), 10 * (step % 4) + 10)
            out = forward(X[ids], ids)
            nn.functional.cross_entropy(out, Y[ids]).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
            boundaries.append(cache.boundary if cached else None)
    return model, cache, boundaries, [str(w.message) for w in caught]


def test_a_stem_the_user_froze_in_train_mode_is_not_cached_in_eval_mode():
    # it used to be cached from the first step and run in eval mode: its dropout and batch
    # statistics stopped, and training differed from the first step with nothing frozen
    plain = _user_frozen_stem_run(False)[0]
    cached, cache, boundaries, _ = _user_frozen_stem_run(True)
    assert_same_weights(plain, cached)
    assert set(boundaries) == {1}  # the conv alone: its BatchNorm runs in train mode
    assert "BatchNorm2d '1' has no trainable parameter but runs in train mode" in cache.describe(), \
        cache.describe()


def test_a_stem_the_user_froze_in_eval_mode_is_cached_until_it_trains_again():
    plain = _user_frozen_stem_run(False, stem_in_eval=True, train_again_at=6)[0]
    cached, cache, boundaries, caught = _user_frozen_stem_run(True, stem_in_eval=True, train_again_at=6)
    assert_same_weights(plain, cached)
    assert boundaries[0] == 4 and boundaries[-1] == 1, boundaries  # conv, norm, relu, dropout; then the conv
    assert sum("is in train mode now" in w for w in caught) == 1, caught


def test_fx_model_with_cache_gives_the_same_weights():
    def make():
        torch.manual_seed(0)
        return SmallCNN()

    plain, _, _ = train(make())
    cached, cache, _ = train(make(), dict(deterministic=True))
    assert cache.chain.how == "torch.fx" and cache.stats["hits"] > 0
    assert_same_weights(plain, cached, exact=False)


def test_a_front_module_in_train_mode_that_stops_every_cut_is_warned():
    # a deterministic input normalisation before the first layer: the cache cached nothing for a
    # whole run and only describe() said why (review97); .eval() on it caches
    class Normalize(nn.Module):
        def forward(self, x):
            return (x - 0.5) / 2.0

    def run(evaluated):
        model = nn.Sequential(Normalize(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=torch.randn(4, 6))
        if evaluated:
            model[0].eval()
        cache = ActivationCache(freezer, num_samples=8, deterministic=True)
        forward, x = cache.wrap(), torch.randn(8, 6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(6):
                ids = torch.arange(4) + 4 * (step % 2)
                forward(x[ids], ids).sum().backward()
                opt.step()
                opt.zero_grad()
                freezer.step()
        return cache, [str(w.message) for w in caught if "caches nothing" in str(w.message)]

    cache, said = run(False)
    assert cache.stats["hits"] == 0 and len(said) == 1 and "Normalize" in said[0] and ".eval()" in said[0], said
    cache, said = run(True)
    assert cache.stats["hits"] > 0 and said == []


def test_a_packed_rnn_that_stops_the_cut_is_named_as_such():
    # describe() said the GRU "returns a tensor it was given (... as eval-mode dropout ...)" (review99)
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.proj, self.rnn, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.GRU(8, 8, batch_first=True), \
                nn.Linear(8, 3)

        def forward(self, tokens, lengths):
            h = self.proj(self.emb(tokens))
            packed = nn.utils.rnn.pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
            return self.head(out)

    tokens = torch.randint(0, 20, (8, 5), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([5, 4, 3, 5, 2, 5, 1, 4])
    model = Tagger()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(3, at_step=1), example_inputs=(tokens, lengths))
    cache = ActivationCache(freezer, num_samples=8, deterministic=True)
    forward = cache.wrap()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            forward((tokens, lengths), torch.arange(8)).sum().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    assert "rnn returns a PackedSequence" in cache.describe() and "eval-mode dropout" not in cache.describe()


def test_a_sequence_first_prefix_is_named_as_such():
    # an nn.LSTM with its default batch_first=False inside a batch-first model: the cache blamed
    # pad_packed_sequence without total_length=, which the model did not use (review99)
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.mid, self.head = nn.Embedding(20, 8), nn.LSTM(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, tokens):
            h, _ = self.rnn(self.emb(tokens).transpose(0, 1))
            return self.head(torch.relu(self.mid(h))).transpose(0, 1)  # sequence-first until the end

    tokens = torch.randint(0, 20, (8, 5), generator=torch.Generator().manual_seed(0))
    model = Tagger()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(3, at_step=1), example_inputs=tokens)
    cache = ActivationCache(freezer, num_samples=8, deterministic=True)
    forward = cache.wrap()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            forward(tokens, torch.arange(8)).sum().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    said = " ".join(str(w.message) for w in caught) + cache.describe()
    assert "holds the batch in dimension 1 too" in said and "batch_first=True" in said, said
    assert "total_length" not in said


@pytest.mark.parametrize("kind", ["sparse", "nested", "dataclass", "namedtuple"])
def test_inputs_the_cache_cannot_split_run_the_whole_model(kind):
    # a sparse bag of words or a jagged batch crashed the first forward in the set-up's split; a
    # dataclass as the only input raised "no tensor with a batch dimension"; a NamedTuple was
    # splatted into the forward's arguments (review97). Now: the whole model, one warning (the
    # NamedTuple: cached, one input)
    import collections
    import dataclasses

    Pair = collections.namedtuple("Pair", ["x", "w"])

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, inp):
            if kind == "sparse":
                h = torch.sparse.mm(inp, self.a.weight.t()) + self.a.bias
            elif kind == "nested":
                h = self.a(inp).to_padded_tensor(0.0).mean(1)
            else:
                h = self.a(inp.x * (inp.w[:, None] if kind == "namedtuple" else 1))
            return self.c(torch.relu(self.b(torch.relu(h))))

    x = torch.randn(8, 6)
    inp = {"sparse": (x * (x > 0.5)).to_sparse(),
           "nested": torch.nested.nested_tensor([torch.randn(i + 1, 6) for i in range(8)], layout=torch.jagged),
           "dataclass": Batch(x), "namedtuple": Pair(x, torch.ones(8))}[kind]
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=1), example_inputs=(inp,) if kind != "namedtuple" else inp)
    cache = ActivationCache(freezer, num_samples=8, deterministic=True)
    forward = cache.wrap()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            forward(inp if kind == "namedtuple" else (inp,), torch.arange(8)).sum().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    said = [str(w.message) for w in caught if "ActivationCache" in str(w.message)]
    if kind == "namedtuple":
        assert cache.active and cache.stats["bypassed"] == 0 and said == [], said
    else:
        assert cache.stats["bypassed"] == 3 and len(said) == 1, said
        assert {"dataclass": "Batch, an object", "sparse": "sparse_coo tensor", "nested": "nested tensor"}[kind] in said[0]


@pytest.mark.parametrize("tied", [False, True])
def test_the_caches_no_grad_passes_leave_no_weight_cast_in_autocasts_cache(tied):
    # the cache's looks and prefix runs under no_grad, inside the user's autocast, left bf16 casts
    # of trainable weights (an nn.MultiheadAttention's in_proj_weight; a tied embedding the frozen
    # prefix reads) in autocast's cast cache; the training forward took them, without grad_fn:
    # those weights got no gradient that step, 6.5e-3 to 2.1e-2 off the uncached run (review99)
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
            self.head = nn.Linear(16, 20)
            if tied:
                self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.relu(self.enc(self.emb(x))))

    x = torch.randint(0, 20, (16, 6), generator=torch.Generator().manual_seed(0))
    runs = []
    for cached in (False, True):
        torch.manual_seed(0)
        model = Tagger()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=x[:4])
        forward = ActivationCache(freezer, num_samples=16, deterministic=True).wrap() if cached else \
            (lambda inp, ids: model(inp))
        missing = []
        for step in range(5):
            ids = torch.arange(8) + 8 * (step % 2)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(forward(x[ids], ids).float().flatten(0, 1), x[ids].flatten())
            loss.backward()
            missing += [(step, n) for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            opt.step()
            opt.zero_grad()
            freezer.step()
        runs.append(({n: p.detach().clone() for n, p in model.named_parameters()}, missing))
    (plain, plain_missing), (cached, cached_missing) = runs
    assert plain_missing == [] and cached_missing == [], cached_missing
    for name in plain:
        assert torch.equal(plain[name], cached[name]), name


def test_cache_under_autocast_moves_rows_in_their_precision_and_bypasses_others():
    # Rows made under bf16 autocast go through the newly frozen fp32 blocks of a deeper freeze
    # (applied from freezer.step(), outside the user's autocast) in bf16, as training computes
    # them; a forward in another precision runs the whole model, never served bf16 rows.
    plain, _, _ = train(chain_model(), autocast=True)
    cached, cache, _ = train(chain_model(), dict(deterministic=True), autocast=True)
    assert cache.active and cache.boundary == 8 and cache.stats["migrated"] == N and cache.stats["hits"] > 0
    assert cache.stats["bypassed"] == 0
    assert_same_weights(plain, cached, exact=False)
    ids = torch.arange(10)  # (train mode: a forward in eval mode is a validation, never served)
    with pytest.warns(UserWarning, match="autocast off, while the cached rows were computed with autocast torch.bfloat16"):
        out = cache.wrap()(X[ids], ids)
    assert out.dtype == torch.float32 and torch.equal(out, cached(X[ids]))
    assert cache.stats["bypassed"] == 1
    state = cache.state_dict(rows=True)
    assert state["fingerprint"]["autocast"] == "torch.bfloat16"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the rows' own precision: served
        hits = cache.stats["hits"]
        cache.wrap()(X[ids], ids)
    assert cache.stats["hits"] == hits + 10 and cache.stats["bypassed"] == 1


class CountingMLP(nn.Module):
    """Counts its training forwards in a buffer, in Python: a trace would run that once."""

    def __init__(self, in_place):
        super().__init__()
        self.in_place = in_place
        self.l1, self.l2, self.out = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            if self.in_place:
                self.count.add_(1)
            else:
                self.count += 1  # also sets the attribute again (the same tensor)
        return self.out(torch.relu(self.l2(torch.relu(self.l1(x.flatten(1))))))


@pytest.mark.parametrize("in_place", [True, False])
def test_a_forward_that_updates_its_own_buffer_is_not_traced_away(in_place):
    import warnings

    torch.manual_seed(0)
    plain, _, _ = train(CountingMLP(in_place))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the model changed" warning for a buffer updated in place
        cached, cache, _ = train(CountingMLP(in_place), dict(deterministic=True))
    assert cache.chain is not None and cache.chain.how != "torch.fx"
    assert int(cached.count) == int(plain.count) == 6 * 4


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_cached_rows_agree_with_recomputed(dtype, tmp_path):
    model, cache, _ = train(chain_model(dropout=0.5), dict(deterministic=True, dtype=dtype), epochs=5)
    model.train()  # as in training: the frozen blocks still run in eval mode
    ids, slots = cache._store.cached_slots()
    assert ids.numel() == N
    cached = cache._store.read(slots, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        model.eval()
        fresh = model[:cache.boundary](X[ids])
    # rows stored at the first boundary and pushed through later blocks carry their storage
    # rounding through those blocks: the audit's per-dtype tolerances
    tol = {"fp32": 1e-5, "bf16": 2 ** -7, "fp8": 2 ** -3}[dtype]
    err = (cached - fresh).abs().flatten(1).amax(1)
    assert (err <= tol * fresh.abs().flatten(1).amax(1) + 1e-6).all(), err.max()


def test_cached_forward_equals_model_forward_in_eval_of_frozen_blocks():
    model, cache, freezer = train(chain_model(dropout=0.5), dict(deterministic=True), epochs=5)
    wrapped = cache.wrap()
    ids = torch.arange(N)
    model.train()
    for m in model[:cache.boundary]:
        m.eval()  # what the cache does for frozen blocks
    torch.manual_seed(3)
    with torch.no_grad():
        expected = model(X)
    model.train()
    torch.manual_seed(3)
    hits = cache.stats["hits"]
    got = wrapped(X, ids).detach()  # with grad: a train-mode forward under no_grad is not served
    assert cache.stats["hits"] == hits + N
    torch.testing.assert_close(got, expected)


def test_audit_turns_cache_off_on_random_augmentation():
    noise = torch.Generator().manual_seed(9)

    def augment(x):
        return x + 0.5 * torch.randn(x.shape, generator=noise)

    with pytest.warns(UserWarning, match="ActivationCache turned off: audit"):
        model, cache, freezer = train(chain_model(), dict(deterministic=True), augment=augment)
    assert not cache.active and "random augmentation" in cache.reason
    assert cache._store is None  # memory released
    assert freezer.num_frozen == 2  # freezing went on (both conv units)


def test_one_id_twice_in_a_batch_with_a_changed_input_serves_neither_position_a_wrong_row():
    # the changed position's slot was freed and taken by its new row in the same forward, and
    # the other position (the row's own input, counted a hit) then read the new row
    model = chain_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(2, 0), example_inputs=X[:2], total_steps=100)
    freezer.freeze_to(2)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True, audit_rows=0)
    run = cache.wrap()
    model.train()
    run(X[:10], torch.arange(10))  # rows of samples 0..9
    x = torch.cat([X[5:6], X[20:21]])  # id 5 with its own input, then with another one
    with pytest.warns(UserWarning, match="appears twice in one batch"):
        out = run(x, torch.tensor([5, 5]))
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


def test_undeclared_inputs_leave_cache_off():
    plain, _, _ = train(chain_model())
    model, cache, freezer = train(chain_model(), dict(deterministic=False))
    assert not cache.active and "deterministic=True" in cache.describe()
    assert_same_weights(plain, model)


@pytest.mark.parametrize("dtype", ["fp32", "fp8"])
def test_capacity_limit_recomputes_the_rest(dtype):
    per_row = 5 * 8 * 8 * {"fp32": 4, "fp8": 1}[dtype] + 12  # data, scale, two checksums
    plain, _, _ = train(chain_model())
    model, cache, _ = train(chain_model(), dict(deterministic=True, dtype=dtype, max_bytes=12 * per_row + 3))
    assert cache._store.capacity == 12 and cache.rows_cached == 12
    assert cache.stats["over_capacity"] > 0
    if dtype == "fp32":
        assert_same_weights(plain, model)


def test_boundary_move_pushes_cached_rows_through_new_blocks():
    model, cache, freezer = train(chain_model(), dict(deterministic=True), epochs=4, deepen_at=1)
    assert cache.stats["migrated"] == N and cache.boundary == 8
    ids, slots = cache._store.cached_slots()
    cached = cache._store.read(slots, torch.float32, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(cached, model[:8](X[ids]), rtol=1e-5, atol=1e-6)


def test_indexed_dataset_with_a_dataloader():
    data = torch.utils.data.TensorDataset(X, Y)
    loader = torch.utils.data.DataLoader(IndexedDataset(data), batch_size=8, shuffle=True)
    model = chain_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(2, 1), example_inputs=X[:2], total_steps=50)
    cache = ActivationCache(freezer, num_samples=len(data), deterministic=True, dtype="bf16")
    wrapped = cache.wrap()
    for _ in range(2):
        for x, y, ids in loader:
            assert torch.equal(x, X[ids]) and torch.equal(y, Y[ids])
            nn.functional.cross_entropy(wrapped(x, ids), y).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    assert cache.rows_cached == N and cache.stats["hits"] > 0
    assert IndexedDataset([5, 6])[1] == (6, 1)


def test_describe_says_when_every_forward_ran_the_whole_model():
    """Training with the whole model in eval mode (frozen batch norm fine-tuning) runs no step
    through the cache; describe() said "activation cache on: 4/9 blocks cached" (review50)."""
    cache, wrapped = ready_cache(storage="memory")
    cache.freezer.module.eval()
    with pytest.warns(UserWarning, match="model in eval mode"):
        for start in (0, 8):
            wrapped(X[start:start + 8], torch.arange(start, start + 8)).sum().backward()
    assert cache.describe().startswith("activation cache on: 8/9 blocks cached"), cache.describe()
    assert "every forward since it set up ran the whole model, none through the cache (the latest: a forward with " \
        "the model in eval mode" in cache.describe()
    cache.freezer.module.train()
    wrapped(X[:8], torch.arange(8))
    assert "every forward" not in cache.describe()


def test_model_without_chain_still_freezes():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(64, 8)
            self.b = nn.Linear(8, 10)

        def forward(self, x):  # fx cannot trace it, and no module call to swap (weights read directly)
            h = nn.functional.linear(x.flatten(1), self.a.weight, self.a.bias)
            if h.sum() > 0:
                h = h * 1.0
            return nn.functional.linear(h, self.b.weight, self.b.bias)

    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, 1), example_inputs=X[:2], total_steps=10)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True)
    wrapped = cache.wrap()
    with pytest.warns(UserWarning, match="ActivationCache is off .*no block boundary"):
        nn.functional.cross_entropy(wrapped(X[:4], torch.arange(4)), Y[:4]).backward()
    opt.step()
    freezer.step()
    nn.functional.cross_entropy(wrapped(X[:4], torch.arange(4)), Y[:4]).backward()
    assert freezer.num_frozen == 1 and not model.a.weight.requires_grad
    assert "blocks=" in cache.describe()


# ------------------------------------------------------------------ bad input
def ready_cache(frozen=2, **kwargs):
    model = chain_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(2, 1), example_inputs=X[:2], total_steps=10)
    freezer.freeze_to(frozen)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True, **kwargs)
    return cache, cache.wrap()


def registration_hooks():
    """torch's process-wide module/parameter/buffer registration hooks (other tests' may be there)."""
    from torch.nn.modules import module as module_lib

    return [h for kind in ("module", "parameter", "buffer")
            for h in getattr(module_lib, f"_global_{kind}_registration_hooks").values()]


def placed_since(before):
    return [h for h in registration_hooks() if all(h is not b for b in before)]


def still_there(hooks):
    return [h for h in registration_hooks() if any(h is mine for mine in hooks)]


def test_a_closed_or_dropped_cache_lets_go_of_its_rows_and_hooks():
    # a notebook cell re-run builds a second cache on the same freezer: the first, dropped, must
    # not live on in the freezer's listeners (with its rows, migrated at every freeze) nor leave
    # torch's process-wide registration hooks behind (every later module built runs them)
    import gc

    cache, wrapped = ready_cache(frozen=1)
    freezer = cache.freezer
    before = registration_hooks()  # the freezer's own included; the cache's come at its first forward
    wrapped(X[:8], torch.arange(8))
    hooks = placed_since(before)
    assert cache.rows_cached == 8 and len(hooks) == 3
    dropped = weakref.ref(cache)
    del cache, wrapped
    gc.collect()
    assert dropped() is None and not still_there(hooks)
    again = ActivationCache(freezer, num_samples=N, deterministic=True)
    run = again.wrap()
    before = registration_hooks()
    run(X[:8], torch.arange(8))
    hooks = placed_since(before)
    cut = again.boundary
    again.close()
    assert len(hooks) == 3 and not still_there(hooks) and again.rows_cached == 0
    assert again.describe().startswith("activation cache closed; before that: activation cache on: 4/9 blocks")
    torch.testing.assert_close(run(X[:8], torch.arange(8)), freezer.model(X[:8]))  # the whole model runs
    freezer.freeze_to(2)  # a closed cache is told of no freeze
    assert cut > 0 and again.boundary == cut and again.stats["migrated"] == 0


def test_a_state_taken_after_close_resumes_a_cache_that_is_on():
    cache, wrapped = ready_cache()
    for _ in range(2):
        wrapped(X[:8], torch.arange(8))
    cache.close()  # the rows freed at the end of a run, then the checkpoint
    freezer_state, cache_state = cache.freezer.state_dict(), cache.state_dict()
    resumed, run = ready_cache(frozen=0)
    resumed.freezer.load_state_dict(freezer_state)
    resumed.load_state_dict(cache_state)
    for _ in range(2):  # refills, then serves
        out = run(X[:8], torch.arange(8))
    assert resumed.enabled and resumed.stats["hits"] >= 8, resumed.describe()
    torch.testing.assert_close(out, resumed.freezer.model(X[:8]))


@pytest.mark.parametrize("first", [True, False])
def test_a_batch_of_no_samples_runs_the_model(first):
    """A collate that filtered every sample out, or a rank's shard run dry, gives an empty batch:
    the plain model returns an empty output, and the cache raised from its input checksum (under
    DDP the other rank then died with "Connection closed by peer", review83)."""
    cache, wrapped = ready_cache(frozen=1)
    if not first:
        wrapped(X[:8], torch.arange(8))
    none = torch.arange(0)
    out = wrapped(X[none], none)
    assert out.shape == (0, *wrapped.model(X[:1]).shape[1:])
    for _ in range(2):  # sets up, stores and serves as before
        out = wrapped(X[:8], torch.arange(8))
    assert cache.stats["hits"] >= 8
    torch.testing.assert_close(out, wrapped.model(X[:8]))


def test_a_deep_copy_of_a_cached_model_runs_its_own_modules():
    # copy.deepcopy(cache.wrap()) (a fork of the run): the copy's cache found its blocks again?
    # Its chain called the original model's modules, so once the two differ its rows were wrong
    cache, wrapped = ready_cache(frozen=1)
    ids = torch.arange(8)
    wrapped(X[:8], ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the input structure's TreeSpec is not copied: torch warned (review78)
        twin = copy.deepcopy(wrapped)
    assert twin.cache.rows_cached == 0  # refills: its rows are its own
    with torch.no_grad():
        for p in cache.freezer.model.parameters():
            p.add_(0.5)  # the original moves on
    for _ in range(2):  # fills, then serves
        out = twin(X[:8], ids)
    assert twin.cache.boundary > 0 and twin.cache.rows_cached == 8, twin.cache.describe()
    torch.testing.assert_close(out, twin.model(X[:8]))
    twin.cache.freezer.freeze_to(2)  # the copy's cache follows the copy's freezer
    out = twin(X[:8], ids)
    assert twin.cache.stats["migrated"] == 8
    torch.testing.assert_close(out, twin.model(X[:8]))


def test_a_deep_copy_of_an_mmap_cache_keeps_off_the_originals_file(tmp_path):
    path = str(tmp_path / "rows.bin")
    cache, wrapped = ready_cache(frozen=1, storage="mmap", path=path)
    for _ in range(2):
        wrapped(X[:8], torch.arange(8))
    twin = copy.deepcopy(wrapped)
    assert twin.cache.rows_cached == 0 and twin.cache.path != path
    for _ in range(2):
        out = twin(X[:8], torch.arange(8))
    assert twin.cache.stats["hits"] - cache.stats["hits"] == 8 and os.path.exists(twin.cache.path)
    torch.testing.assert_close(out, twin.model(X[:8]))
    hits = cache.stats["hits"]
    wrapped(X[:8], torch.arange(8))  # the original's file still holds its rows
    assert cache.stats["hits"] == hits + 8


class SequenceFirst(nn.Module):  # nn.Transformer's layout: x [T, B, D], padding mask [B, T]
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x, mask):
        h = torch.relu(self.b(torch.relu(self.a(x.transpose(0, 1)))))
        return self.c((h * (1 - mask)[..., None]).mean(1))


def test_a_sequence_first_input_is_refused_beside_a_batch_first_mask():
    model = SequenceFirst()
    x, mask = torch.randn(5, 8, 6), torch.zeros(8, 5)
    freezer = SmartFreezer(model, sgd(model), StaticFreeze(1, 1000), example_inputs=(x[:, :2], mask[:2]),
                           total_steps=100)
    freezer.freeze_to(1)
    wrapped = ActivationCache(freezer, num_samples=N, deterministic=True).wrap()
    with pytest.raises(ValueError, match="got 8 sample ids for a batch of 5 .* sequence-first"):
        wrapped((x, mask), torch.arange(8))


class GraphBatch(nn.Module):
    """The nodes of every graph of the batch concatenated, one pooled row per graph; a Python
    int of the graph count, so that fx cannot trace it (the module swap records it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.conv, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x, graph_of_node):
        h = torch.relu(self.conv(torch.relu(self.inp(x))))
        return self.head(torch.zeros(int(graph_of_node.max()) + 1, 8).index_add_(0, graph_of_node, h))


def test_a_batch_of_graphs_with_one_id_per_graph_is_refused_with_why():
    # the module swap split the 24 nodes by the 4 ids at set-up, failed with an IndexError, and
    # the cache turned off advising blocks=[...], which cannot help
    model = GraphBatch()
    x, graph_of_node = torch.randn(24, 6), torch.arange(4).repeat_interleave(6)
    freezer = SmartFreezer(model, sgd(model), StaticFreeze(1), example_inputs=(x, graph_of_node), total_steps=100)
    freezer.freeze_to(2)
    wrapped = ActivationCache(freezer, num_samples=N, deterministic=True).wrap()
    with pytest.raises(ValueError, match="got 4 sample ids for a batch of 24 .* the nodes of a batch of graphs"):
        wrapped((x, graph_of_node), torch.arange(4))


class SharedTable(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()

    def forward(self, x, table, output_attentions=False):  # no Hugging Face model: the flag is its own
        h = self.act1(self.fc1(x) + table.sum(0))  # every sample reads the whole table
        out = self.head(self.act2(self.fc2(h)))
        return out * 2 if output_attentions else out


def shared_table_run(table_rows, audit_rows=4):
    """A SharedTable model with its first unit frozen, a [table_rows, 6] table and its cache."""
    model, x, table = SharedTable(), torch.randn(N, 6), torch.randn(table_rows, 6)
    freezer = SmartFreezer(model, sgd(model), StaticFreeze(1, 1000), example_inputs=(x[:4], table), total_steps=100)
    freezer.freeze_to(1)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True, audit_rows=audit_rows)
    return model, x, table, cache, cache.wrap()


@pytest.mark.parametrize("first_batch", [8, 12])
@pytest.mark.parametrize("audit_rows", [0, 4])
def test_an_input_the_batch_shares_with_the_batch_length_is_no_cut(audit_rows, first_batch):
    # a [T, D] table with T == batch size looks per-sample: computing only the missed samples split
    # it, and those rows were wrong (kept with audit_rows=0; the audit blamed nondeterminism). The
    # check runs per batch size: a first batch of another size does not vouch for the table. The
    # cache cuts before the block that reads the table (here after fc1) or, with no such cut, is off
    model, x, table, cache, wrapped = shared_table_run(8, audit_rows=audit_rows)
    with pytest.warns(UserWarning, match="depends on the other samples of its batch.*T == batch size"):
        for step in range(6):
            ids = torch.arange(first_batch if step == 0 else 8) + 4 * step  # half hits, half misses
            out = wrapped((x[ids], table), ids)
            with torch.no_grad():
                torch.testing.assert_close(out, model(x[ids], table))
    assert not cache.enabled or "failed the per-sample check" in cache.describe()


class Seq2SeqGRU(nn.Module):
    """An encoder GRU whose final state [1, B, H] (batch in dimension 1) is the only value live
    after it: torch.fx's chain offers a cut there, with no row per sample in dimension 0."""

    def __init__(self):
        super().__init__()
        self.src_emb, self.enc = nn.Embedding(20, 8), nn.GRU(8, 16, batch_first=True)
        self.tgt_emb, self.dec, self.out = nn.Embedding(20, 8), nn.GRU(8, 16, batch_first=True), nn.Linear(16, 20)

    def forward(self, src, tgt_in):
        _, h = self.enc(self.src_emb(src))
        o, _ = self.dec(self.tgt_emb(tgt_in), h)  # teacher forcing
        return self.out(o)


class MessagePassing(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_lin, self.nb_lin = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h, edge_index):
        src, dst = edge_index
        return torch.relu(self.self_lin(h) + torch.zeros_like(h).index_add_(0, dst, self.nb_lin(h)[src]))


class NodeClassifier(nn.Module):
    """Per-node encoder layers, then message passing, which mixes the nodes (the samples)."""

    def __init__(self):
        super().__init__()
        self.enc, self.enc2, self.mp1, self.mp2 = nn.Linear(8, 16), nn.Linear(16, 16), MessagePassing(16), MessagePassing(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x, edge_index):
        h = torch.relu(self.enc2(torch.relu(self.enc(x))))
        return self.head(self.mp2(self.mp1(h, edge_index), edge_index))


@pytest.mark.parametrize("case", ["seq2seq_deeper_freeze", "seq2seq_both_at_once", "graph_deeper_freeze"])
def test_a_cut_that_fails_the_per_sample_check_keeps_the_cut_before_it(case, fresh_seed):
    """A deeper freeze to a cut whose rows are not per sample (an encoder GRU's final state
    [1, B, H]; message passing mixing the nodes) crashed freezer.step() moving the rows (an
    IndexError) or turned the whole cache off; it now caches up to the block before that cut,
    and trains exactly as without the cache."""
    if case.startswith("seq2seq"):
        n, batch = 16, 4
        src = torch.randint(2, 20, (n, 6))
        tgt_in = torch.cat([torch.ones(n, 1, dtype=torch.long), src.flip(1)[:, :-1]], 1)
        target = src.flip(1)
        make, inputs_of = Seq2SeqGRU, (lambda ids: (src[ids], tgt_in[ids]))

        def loss_of(out, ids):
            return torch.nn.functional.cross_entropy(out.reshape(-1, 20), target[ids].reshape(-1))
    else:
        n, batch = 24, 24  # the whole graph each step
        x, edge_index, labels = torch.randn(n, 8), torch.randint(0, n, (2, 80)), torch.randint(0, 3, (n,))
        make, inputs_of = NodeClassifier, (lambda ids: (x[ids], edge_index))

        def loss_of(out, ids):
            return torch.nn.functional.cross_entropy(out, labels[ids])
    first, deeper = {"seq2seq_deeper_freeze": (1, 2), "seq2seq_both_at_once": (2, None),
                     "graph_deeper_freeze": (2, 4)}[case]
    order = [torch.randperm(n)[:batch] for _ in range(24)]
    weights, caches = [], []
    for cached in (False, True):
        torch.manual_seed(fresh_seed)
        model = make()
        optimizer = sgd(model)
        freezer = SmartFreezer(model, optimizer, StaticFreeze(first, at_step=2),
                               example_inputs=inputs_of(order[0]), total_steps=len(order))
        cache = ActivationCache(freezer, num_samples=n, deterministic=True) if cached else None
        forward = cache.wrap() if cached else (lambda inputs, ids: model(*inputs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step, ids in enumerate(order):
                loss_of(forward(inputs_of(ids), ids), ids).backward()
                optimizer.step()
                optimizer.zero_grad()
                freezer.step()
                if deeper is not None and step == 9:
                    hits_before = cache.stats["hits"] if cached else 0
                    freezer.freeze_to(deeper)
        weights.append([p.detach().clone() for p in model.parameters()])
        caches.append(cache)
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    cache = caches[1]
    assert cache.enabled and cache.boundary >= 1, cache.describe()
    assert "failed the per-sample check" in cache.describe()
    if deeper is not None:
        assert cache.stats["hits"] > hits_before, cache.describe()  # still served after the deeper freeze


# the cut's own checks must hold; lr and tolerance as this file's other runs
_CUT_CHECKS_ONLY = dict(lr=0.05, tolerance=1e-6, audit_rows=0)


class GroupMean(nn.Module):
    """A layer, then an average over the samples of the batch in the same group (a speaker, a
    session): a row depends on the groupmates its batch happens to hold."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, h, group):
        same = (group[:, None] == group[None, :]).float()
        return torch.relu(same @ self.lin(h) / same.sum(1, keepdim=True))


class GroupMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.mix, self.head = nn.Linear(8, 16), GroupMean(), nn.Linear(16, 3)

    def forward(self, x, group):
        return self.head(self.mix(torch.relu(self.enc(x)), group))


class PackedLSTM(nn.Module):
    """A packed LSTM over tokens padded to one length: its output is as long as the batch's
    longest sequence unless ``total_length`` is given."""

    def __init__(self, total_length):
        super().__init__()
        self.total_length, self.rnn = total_length, nn.LSTM(8, 16, batch_first=True)

    def forward(self, h, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(h, lengths, batch_first=True,
                                                   enforce_sorted=self.total_length is not None)
        return nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True,
                                                total_length=self.total_length)[0]


class PackedEncoder(nn.Module):
    """Embedding, packed LSTM, a mean over the valid steps."""

    def __init__(self, total_length):
        super().__init__()
        self.emb, self.enc, self.head = nn.Embedding(20, 8), PackedLSTM(total_length), nn.Linear(16, 3)

    def forward(self, tokens, lengths):
        return self.head(self.enc(self.emb(tokens), lengths).sum(1) / lengths[:, None])


def test_a_prefix_mixing_samples_the_first_of_the_batch_is_not_mixed_with_is_caught(fresh_seed):
    """The per-sample check compared the batch with the batch less its first sample: mixing
    among the others went unseen, and rows made with one batch's groupmates were served in
    others (weights 6e-2 to 1.3e-1 off with message passing over a batch's nodes, review71). Every
    two samples now lie apart in one of the parts computed alone."""
    n = 40
    x, y = torch.randn(n, 8), torch.randint(0, 3, (n,))
    group = torch.arange(n) // 2
    group[0] = -1  # alone in every batch: mixing never involves it
    first = torch.tensor([0, 1, 2, 3, 4, 9, 12, 13])  # groupmates among the others only
    batches = [first, first] + [torch.randperm(n)[:8] for _ in range(12)]
    _, _, cache = with_and_without_cache(GroupMixer, lambda ids: (x[ids], group[ids]), y, batches, frozen=2,
                                         **_CUT_CHECKS_ONLY)
    assert cache.enabled and cache.boundary == 1 and "failed the per-sample check" in cache.describe(), \
        cache.describe()
    assert cache.stats["hits"] > 0, cache.describe()


@pytest.mark.parametrize("total_length", [None, 10])
def test_a_prefix_whose_output_length_follows_the_batch_is_cut_before(total_length, fresh_seed):
    """Inputs padded to one length, but pad_packed_sequence without total_length= gives an
    output as long as the batch's longest: the missed samples, computed apart, got another
    shape than the cached rows and training stopped with a ValueError saying to pad to one
    length (review71). The cache now cuts before that block. With total_length= and batches
    sorted by length (enforce_sorted=True, the default) the rows are per sample: the per-sample
    check kept reversing the batch, which the model refused, so nothing past the LSTM was
    cached."""
    n, length = 32, 10
    lengths = torch.randint(3, length + 1, (n,))
    lengths[:4] = length
    tokens = torch.randint(1, 20, (n, length)) * (torch.arange(length) < lengths[:, None])
    y = torch.randint(0, 3, (n,))

    def by_length(ids):
        return ids[torch.argsort(lengths[ids], descending=True, stable=True)]

    batches = [by_length(torch.cat([torch.arange(2), torch.randperm(n - 2)[:6] + 2])) for _ in range(14)]
    _, _, cache = with_and_without_cache(lambda: PackedEncoder(total_length),
                                         lambda ids: (tokens[ids], lengths[ids]), y, batches, frozen=2, **_CUT_CHECKS_ONLY)
    assert cache.enabled and cache.stats["hits"] > 0, cache.describe()
    assert f"cut after {'emb' if total_length is None else 'enc'})" in cache.describe(), cache.describe()


def test_a_batch_of_one_beside_an_input_the_batch_shares():
    # the last batch of an epoch holds one sample: the shared [T, D] table after it is no batch
    model, x, table, cache, wrapped = shared_table_run(8)
    for _ in range(2):
        out = wrapped((x[5:6], table), torch.tensor([5]))
    assert cache.stats["hits"] == 1, cache.describe()
    torch.testing.assert_close(out, model(x[5:6], table))


def test_a_flag_named_like_hugging_faces_is_a_plain_input_elsewhere():
    model, x, table, cache, wrapped = shared_table_run(1)
    for _ in range(2):
        out = wrapped((x[:8], table), torch.arange(8), output_attentions=True)
    assert cache.stats["hits"] == 8 and cache.stats["bypassed"] == 0
    torch.testing.assert_close(out, model(x[:8], table, output_attentions=True))


def test_bad_sample_ids():
    cache, wrapped = ready_cache()
    with pytest.raises(IndexError, match=r"sample ids \[40, -1\] are outside \[0, 40\)"):
        wrapped(X[:4], torch.tensor([0, 40, -1, 3]))
    with pytest.raises(ValueError, match="got 3 sample ids for a batch of 4"):
        wrapped(X[:4], torch.arange(3))
    with pytest.raises(TypeError, match="must be integers"):
        wrapped(X[:4], torch.arange(4).float())


def test_bad_sample_ids_fail_before_anything_is_frozen():
    # Checked from the first step (host ids cost nothing to check), not first at the freeze.
    model = chain_model()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.05), policy=StaticFreeze(2, 5),
                           example_inputs=X[:2], total_steps=10)
    wrapped = ActivationCache(freezer, num_samples=N, deterministic=True).wrap()
    wrapped(X[:4], torch.arange(4))
    with pytest.raises(IndexError, match=r"sample ids \[-1\] are outside"):
        wrapped(X[:4], torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match="got 2 sample ids for a batch of 4"):
        wrapped(X[:4], [0, 1])


def test_a_batch_of_another_input_shape_runs_the_whole_model():
    """Rows have one shape: a batch of another per-sample shape (multi-resolution training, a
    model cast to bf16) is neither served nor stored; it runs the whole model, with a warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    tokens = torch.randn(N, 5, 8)
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.05), policy=StaticFreeze(2, 1),
                           example_inputs=tokens[:2], total_steps=10)
    freezer.freeze_to(2)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True)
    wrapped = cache.wrap()
    wrapped(tokens[:4], torch.arange(4))
    longer = torch.randn(2, 7, 8)  # samples 0 and 1 again, at another length
    with pytest.warns(UserWarning, match=r"per-sample input shapes/dtypes \[\(\(7, 8\), torch.float32\)\]"):
        out = wrapped(longer, torch.arange(2))
    torch.testing.assert_close(out, model(longer))
    torch.testing.assert_close(wrapped(tokens[:4], torch.arange(4)), model(tokens[:4]))  # served again
    assert cache.stats["bypassed"] == 1 and cache.stats["hits"] == 4 and cache.enabled


def test_bad_arguments():
    model = chain_model()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=StaticFreeze(1, 1),
                           example_inputs=X[:2])
    with pytest.raises(ValueError, match="storage must be one of"):
        ActivationCache(freezer, num_samples=N, deterministic=True, storage="disk")
    with pytest.raises(ValueError, match="dtype must be one of"):
        ActivationCache(freezer, num_samples=N, deterministic=True, dtype="fp16")
    with pytest.raises(ValueError, match="needs path="):
        ActivationCache(freezer, num_samples=N, deterministic=True, storage="mmap")
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        ActivationCache(freezer, num_samples=0, deterministic=True)
    with pytest.raises(ValueError, match="pinned_read must be one of"):
        ActivationCache(freezer, num_samples=N, deterministic=True, storage="pinned", pinned_read="dma")
    # refused here, not with a bare TypeError at the first freeze that fills the budget (review49)
    with pytest.raises(TypeError, match=r"max_bytes is a number of bytes \(an int, or a float such as 4e9\)"):
        ActivationCache(freezer, num_samples=N, deterministic=True, max_bytes="1GB")
    for rows in (2.5, None):
        with pytest.raises(TypeError, match="audit_rows is a number of rows"):
            ActivationCache(freezer, num_samples=N, deterministic=True, audit_rows=rows)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        ActivationCache(freezer, num_samples=True, deterministic=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda', but this machine has no CUDA device"):
            ActivationCache(freezer, num_samples=N, deterministic=True, device="cuda")
    if not torch.cuda.is_available():
        cache = ActivationCache(freezer, num_samples=N, deterministic=True, storage="pinned")
        freezer.freeze_to(1)
        with pytest.raises(RuntimeError, match="storage='pinned' .* needs one"):
            cache.wrap()(X[:4], torch.arange(4))


@pytest.mark.parametrize("storage", ["memory", "mmap"])
def test_a_budget_written_as_a_float_or_a_numpy_number_is_taken(storage, tmp_path):
    # max_bytes=4e9 passed the constructor and crashed at the first freeze whose rows the budget
    # capped: "empty() takes 1 positional argument" in memory, "'float' object cannot be
    # interpreted as an integer" or "int64 is not JSON serializable" in a file (review49)
    np = pytest.importorskip("numpy")
    for budget in (1e4, np.float64(1e4), np.int64(10_000)):  # about 9 of the 40 rows
        model = chain_model()
        freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=StaticFreeze(1, 1),
                               example_inputs=X[:2])
        cache = ActivationCache(freezer, num_samples=np.int64(N), deterministic=True, max_bytes=budget,
                                storage=storage, path=str(tmp_path / f"c{type(budget).__name__}.bin"))
        assert type(cache.max_bytes) is int and type(cache.num_samples) is int
        freezer.freeze_to(1)
        wrapped = cache.wrap()
        torch.testing.assert_close(wrapped(X, torch.arange(N)), model(X), rtol=0, atol=0)
        assert 0 < cache.rows_cached < N, cache.describe()
        cache.close()


def test_mmap_file_reuse_and_mismatch(tmp_path):
    path = str(tmp_path / "c.bin")
    cache, wrapped = ready_cache(storage="mmap", path=path)
    out = wrapped(X, torch.arange(N))
    assert cache.rows_cached == N and os.path.getsize(path) > N * 5 * 64
    state = cache.freezer.model.state_dict()
    # the same model and boundary reopen the file: every sample is a hit at once; the first cache,
    # still open, lets the file go (two writers of one file served each other's rows, review87)
    cache2, wrapped2 = ready_cache(storage="mmap", path=path, reuse=True)
    assert cache.enabled  # (built, not opened yet: nothing taken over, review89)
    cache2.freezer.model.load_state_dict(state)
    with pytest.warns(UserWarning, match="ActivationCache is off .*another ActivationCache of this process "
                      "opened its file"):
        torch.testing.assert_close(wrapped2(X, torch.arange(N)), out)
    assert not cache.enabled
    assert cache2.stats["hits"] == N and cache2.stats["misses"] == 0
    cache2.close()
    third, wrapped3 = ready_cache(storage="mmap", path=path)
    with pytest.warns(UserWarning, match="ActivationCache is off .*already exists and is not this run's.*reuse=True"):
        wrapped3(X[:2], torch.arange(2))  # (it raised out of the first freeze's step, review87)
    assert not third.enabled
    # another model's weights, another boundary: with reuse=True the stale file is replaced, with
    # a warning naming what differs (it raised at the first freeze, mid-training: review87)
    other, wrapped3 = ready_cache(storage="mmap", path=path, reuse=True)
    with torch.no_grad():
        other.freezer.model[0].weight.add_(1.0)
    with pytest.warns(UserWarning, match=r"different fingerprint \(\{\"prefix_weights\".*is replaced"):
        torch.testing.assert_close(wrapped3(X[:2], torch.arange(2)), other.freezer.model(X[:2]))
    for _ in range(2):
        out = wrapped3(X, torch.arange(N))
    assert other.stats["hits"] >= N and other.rows_cached == N
    torch.testing.assert_close(out, other.freezer.model(X))
    other.close()
    model = chain_model()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=StaticFreeze(1, 1),
                           example_inputs=X[:2])
    freezer.freeze_to(1)
    cache4 = ActivationCache(freezer, num_samples=N, deterministic=True, storage="mmap", path=path, reuse=True)
    with pytest.warns(UserWarning, match=r"different fingerprint.*\"boundary\".*is replaced"):
        cache4.wrap()(X[:2], torch.arange(2))
    not_a_cache = tmp_path / "junk.bin"
    not_a_cache.write_bytes(b"\0" * 8192)
    with pytest.raises(FileExistsError, match="without an activation cache header"):
        ready_cache(storage="mmap", path=str(not_a_cache), reuse=True)  # never overwritten


def test_a_file_another_process_holds_is_not_written(tmp_path):
    """Two caches writing one mmap file (two jobs with reuse=True, a requeued run beside the old
    one) handed out the same rows and served each other's: weights 7e-3 to 2.5e-2 off, the cache
    on, the warnings blaming the data (review87). Each holds the file locked; another turns off."""
    from smartfrz_fast.cache import storage as storage_mod

    path = str(tmp_path / "c.bin")
    first, wrapped = ready_cache(storage="mmap", path=path)
    wrapped(X, torch.arange(N))
    first.close()
    held = storage_mod.lock_file(path)  # as another process's cache holds it
    try:
        second, wrapped2 = ready_cache(storage="mmap", path=path, reuse=True)
        with pytest.warns(UserWarning, match="ActivationCache is off .*open in another activation cache"):
            out = wrapped2(X[:8], torch.arange(8))
        assert not second.enabled
        torch.testing.assert_close(out, second.freezer.model(X[:8]))
    finally:
        os.close(held)


def test_a_file_lock_goes_with_a_failure_and_stays_out_of_forked_children(tmp_path, monkeypatch):
    """A failure after the lock was taken (an mmap the OS refused) kept it: every later cache on
    the file was refused. A forked child (a DataLoader worker) kept the parent's lock after the
    parent let the file go (review89)."""
    import multiprocessing

    from smartfrz_fast.cache import storage as storage_mod

    path = str(tmp_path / "c.bin")
    first, wrapped = ready_cache(storage="mmap", path=path)
    wrapped(X, torch.arange(N))
    first.close()

    def refused(self, *args):
        raise RuntimeError("unable to mmap 4096 bytes from file: Cannot allocate memory (12)")

    monkeypatch.setattr(storage_mod.MmapStorage, "_map", refused)
    second, wrapped2 = ready_cache(storage="mmap", path=path, reuse=True)
    with pytest.warns(UserWarning, match="ActivationCache is off .*unable to mmap"):
        wrapped2(X[:8], torch.arange(8))  # a storage fault, not an exception out of the forward
    monkeypatch.undo()
    held = storage_mod.lock_file(path)  # free again
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(3,))
    child.start()  # holds a copy of every descriptor the parent has
    try:
        os.close(held)
        os.close(storage_mod.lock_file(path))  # the child's copy did not keep the lock
    finally:
        child.terminate()
        child.join()


def test_a_cache_dropped_without_close_lets_its_file_go(tmp_path):
    """A cache dropped without close() (a notebook's failed run, a sweep's trial) held its file's
    lock until the process ended: a resume or the next run on the file, in the same process,
    trained with the cache off, told "the file is open in another activation cache" (review92)."""
    import gc

    path = str(tmp_path / "c.bin")
    first, wrapped = ready_cache(storage="mmap", path=path)
    wrapped(X, torch.arange(N))
    del first, wrapped
    gc.collect()
    second, wrapped2 = ready_cache(storage="mmap", path=path, reuse=True)
    out = wrapped2(X, torch.arange(N))
    assert second.enabled and second.stats["hits"] == N, second.describe()
    torch.testing.assert_close(out, second.freezer.model(X))
    second.close()


def test_a_cache_takes_a_file_over_only_when_it_opens_it(tmp_path):
    """Another cache built on a running cache's path turned the running one off at construction,
    even one that never opens the file (deterministic=False, reuse=False meeting the file, a
    constructor that raised) (review89)."""
    path = str(tmp_path / "c.bin")
    running, wrapped = ready_cache(storage="mmap", path=path)
    wrapped(X, torch.arange(N))
    model = chain_model()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.05), policy=StaticFreeze(2, 1),
                           example_inputs=X[:2])
    freezer.freeze_to(2)
    ActivationCache(freezer, num_samples=N, deterministic=False, storage="mmap", path=path).wrap()(
        X[:8], torch.arange(8))
    other, wrapped_other = ready_cache(storage="mmap", path=path)
    with pytest.warns(UserWarning, match="already exists and is not this run's"):
        wrapped_other(X[:8], torch.arange(8))
    assert running.enabled and not other.enabled
    wrapped(X, torch.arange(N))
    assert running.stats["hits"] == N


def test_an_input_that_requires_grad_gets_its_gradient():
    cache, wrapped = ready_cache()
    wrapped(X, torch.arange(N))  # every row cached
    x = X[:4].clone().requires_grad_(True)
    with pytest.warns(UserWarning, match="an input requires grad"):
        wrapped(x, torch.arange(4)).sum().backward()
    assert cache.stats["bypassed"] == 1
    plain = X[:4].clone().requires_grad_(True)
    cache.freezer.model(plain).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, plain.grad)


def test_a_checkpoint_does_not_take_another_runs_file_at_its_path(tmp_path):
    # two runs of the same frozen backbone on other data, one path: the resumed run must not
    # be served the other run's rows (same fingerprint, other lineage)
    path = str(tmp_path / "c.bin")
    cache, wrapped = ready_cache(storage="mmap", path=path, audit_rows=0)
    wrapped(X, torch.arange(N))
    state = cache.state_dict()
    cache.close()
    os.remove(path)
    other, wrapped_other = ready_cache(storage="mmap", path=path, audit_rows=0)
    wrapped_other(-X, torch.arange(N))
    other.close()
    resumed, wrapped_resumed = ready_cache(storage="mmap", path=path, audit_rows=0, reuse=True)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="now belongs to another run"):
        wrapped_resumed(X, torch.arange(N))


def test_a_full_disk_at_the_first_freeze_turns_the_cache_off(tmp_path, monkeypatch):
    # No tmpfs can be mounted here: the full disk is simulated (posix_fallocate raising ENOSPC,
    # then a disk_usage that reports 1000 bytes free). tests/test_cache_faults.py has real faults.
    path = tmp_path / "c.bin"

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    for patch in [(storage_mod.os, "posix_fallocate", no_space),
                  (storage_mod.shutil, "disk_usage", lambda p: type("Usage", (), {"free": 1000}))]:
        monkeypatch.setattr(*patch)
        cache, wrapped = ready_cache(storage="mmap", path=str(path))
        with pytest.warns(UserWarning, match="ActivationCache is off .*creating the cache's storage failed: "
                          r"\[Errno 28\].*(disk holding .* is full|MiB free)") as caught:
            out = wrapped(X[:4], torch.arange(4))
        assert len([w for w in caught if "ActivationCache" in str(w.message)]) == 1
        assert not cache.enabled and "Errno 28" in cache.reason
        torch.testing.assert_close(out, cache.freezer.model(X[:4]))  # the plain forward went on
        assert os.listdir(tmp_path) == []  # no half-made file left behind
        monkeypatch.undo()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_pinned_reads_by_kernel_and_by_copy_agree(dtype):
    # The two ways rows leave pinned memory (bench/bench_pinned_read.py times them) deliver the
    # same bits as the plain GPU-memory tier, prefetched or not.
    from smartfrz_fast.cache.storage import PinnedStorage, Storage, storage_dtype

    cuda, shape = torch.device("cuda"), (3, 5, 7)
    stores = [Storage(40, shape, storage_dtype(dtype), 32, cuda)] + [
        PinnedStorage(40, shape, storage_dtype(dtype), 32, cuda, read=read) for read in ("copy", "kernel")]
    values, ids = torch.randn(40, *shape, device=cuda) * 10, torch.randperm(40)
    for store in stores:
        slots = store.allocate(ids)  # 32 rows fit, 8 do not
        store.write(slots[slots >= 0], values[ids[slots >= 0]])
    batch = ids[:32][torch.randperm(32)[:9]]
    reads = []
    for store in stores:
        store.prefetch(batch, torch.float32, cuda)
        reads.append((store.read(store.lookup(batch), torch.float32, cuda),
                      store.read(store.lookup(batch.flip(0)), torch.float32, cuda)))  # not prefetched
    for prefetched, direct in reads[1:]:
        assert torch.equal(prefetched, reads[0][0]) and torch.equal(direct, reads[0][1])
    with pytest.raises(ValueError, match="read must be one of"):
        PinnedStorage(4, shape, torch.float32, 4, cuda, read="zero-copy")


@pytest.mark.gpu
@pytest.mark.parametrize("tier, pinned_read", [("memory", "copy"), ("pinned", "copy"), ("pinned", "kernel")])
def test_gpu_tiers_match_cpu(tier, pinned_read):
    torch.manual_seed(0)
    model = chain_model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(2, 1), example_inputs=X[:2].cuda(), total_steps=10)
    freezer.freeze_to(2)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True, storage=tier, dtype="fp8",
                            pinned_read=pinned_read)
    wrapped = cache.wrap()
    ids = torch.arange(N)
    first = wrapped(X.cuda(), ids)
    batches = [(X[i:i + 8].cuda(), ids[i:i + 8]) for i in range(0, N, 8)]
    outs = [wrapped(x, i) for x, i in cache.prefetching(batches)]
    assert cache.stats["hits"] == N
    torch.testing.assert_close(torch.cat(outs), first, rtol=0.15, atol=0.05)


@pytest.mark.parametrize("hook_on", ["frozen conv", "frozen relu"])
def test_a_user_hook_inside_the_frozen_prefix_sees_every_batch(hook_on):
    """A forward hook on a frozen layer (a feature-matching loss, activation statistics) must
    run on every batch: cached rows would skip it, so the cache cuts before the hooked layer
    and says so; torch's own spectral_norm pre-hook does not count as a user's hook."""
    model = chain_model()
    model[0] = nn.utils.spectral_norm(model[0])
    seen = []
    model[4 if hook_on == "frozen conv" else 2].register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(2, 1), example_inputs=X[:2], total_steps=100)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True)
    run = cache.wrap()
    for step in range(6):
        ids = torch.arange(8) + 8 * (step % 2)
        seen.clear()
        out = run(X[ids], ids)
        # (set-up checks the chain against the model, looks for Python state on 7 samples, and the
        # first cached forward looks at which inputs the prefix reads, on 4: more calls at the
        # first two steps)
        assert seen == [8] if step > 1 else seen[-1] == 8 and set(seen) <= {4, 7, 8}, (step, seen, cache.describe())
        nn.functional.cross_entropy(out, Y[ids]).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert cache.stats["hits"] > 0 and cache.boundary >= 1, cache.describe()
    assert "forward hook you placed on" in cache.describe(), cache.describe()


def test_a_pruned_layer_in_the_frozen_prefix_is_cached():
    # torch.nn.utils.prune's pre-hook (weight = weight_orig * mask, SpFDE's masks) only
    # recomputes the layer's weight: it counted as a user's hook and nothing was cached
    model = chain_model()
    nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    _, cache, _ = train(model, dict(deterministic=True))
    assert cache.active and cache.boundary >= 1 and cache.stats["hits"] > 0, cache.describe()


def test_hugging_faces_input_require_grads_hook_marks_the_served_rows():
    """``enable_input_require_grads`` (gradient checkpointing, adapters) hooks the embeddings to
    mark their output as requiring grad; the cache caches past it and marks the rows it serves."""
    model = chain_model()

    def make_inputs_require_grads(module, args, output):  # Hugging Face's hook, by its name
        output.requires_grad_(True)

    model[0].register_forward_hook(make_inputs_require_grads)
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.05), policy=StaticFreeze(2, 1),
                           example_inputs=X[:2], total_steps=10)
    freezer.freeze_to(2)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True)
    run = cache.wrap()
    served = []
    model[8].register_forward_pre_hook(lambda m, args: served.append(args[0].requires_grad))
    for _ in range(2):  # a miss, then a hit
        run(X[:4], torch.arange(4))
    assert cache.boundary == 8 and cache.stats["hits"] == 4, cache.describe()
    assert served[-2:] == [True, True]  # (before them, the set-up check of the chain, without grad)


class KeywordModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = chain_model()

    def forward(self, pixels, scale=1.0):
        return self.body(pixels) * scale


def test_a_dict_of_keyword_inputs_is_a_batch_as_in_example_inputs():
    # `cached(batch_dict, ids)` (a Hugging Face batch, as example_inputs takes it) went into the
    # model's first parameter whole and failed there
    model = KeywordModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(2, 1), example_inputs={"pixels": X[:2]}, total_steps=10)
    freezer.freeze_to(2)
    cached = ActivationCache(freezer, num_samples=N, deterministic=True).wrap()
    ids = torch.arange(8)
    for _ in range(2):  # stores, then serves
        out = cached({"pixels": X[ids], "scale": 2.0}, ids)
    torch.testing.assert_close(out, model(X[ids], scale=2.0))
    assert cached.cache.stats["hits"] == 8


class KeywordsModel(KeywordModel):  # transformers 5's forwards take output_hidden_states etc. as **kwargs
    def forward(self, pixels, scale=1.0, **kwargs):
        return self.body(pixels) * scale * kwargs.get("gain", 1.0)


def test_a_dict_of_keyword_inputs_may_hold_keys_the_forward_takes_as_kwargs():
    model = KeywordsModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(2, 1), example_inputs={"pixels": X[:2], "gain": 1.0},
                           total_steps=10)
    freezer.freeze_to(2)
    cached = ActivationCache(freezer, num_samples=N, deterministic=True).wrap()
    ids = torch.arange(8)
    for _ in range(2):
        out = cached({"pixels": X[ids], "gain": 3.0}, ids)
    torch.testing.assert_close(out, model(X[ids], gain=3.0))
    assert cached.cache.stats["hits"] == 8


def test_a_resumed_cache_keeps_the_cut_before_a_block_that_mixes_samples(tmp_path):
    """The cut found not per sample was not saved: the resumed cache moved its rows through the
    mixing block, failed the check again and dropped them (review61)."""
    torch.manual_seed(0)
    x, edge_index, labels = torch.randn(24, 8), torch.randint(0, 24, (2, 80)), torch.randint(0, 3, (24,))

    def build():
        torch.manual_seed(0)
        model = NodeClassifier()
        opt = sgd(model)
        freezer = SmartFreezer(model, opt, StaticFreeze(4, at_step=2), example_inputs=(x, edge_index), total_steps=20)
        return model, opt, freezer, ActivationCache(freezer, num_samples=24, deterministic=True)

    model, opt, freezer, cache = build()
    forward = cache.wrap()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            torch.nn.functional.cross_entropy(forward((x, edge_index), torch.arange(24)), labels).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    assert cache.state_dict()["mixing_cut"] is not None, cache.describe()
    saved = (model.state_dict(), freezer.state_dict(), opt.state_dict(), cache.state_dict())
    model2, opt2, freezer2, cache2 = build()
    model2.load_state_dict(saved[0])
    freezer2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    cache2.load_state_dict(saved[3])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no second failed check
        cache2.wrap()((x, edge_index), torch.arange(24))
    assert cache2.boundary == cache.boundary and "failed the per-sample check" in cache2.describe()


class _RandomShift(nn.Module):
    """An augmentation inside the model, before its first layer."""

    def forward(self, x):
        return x + torch.randn_like(x) * 0.1 if self.training else x


def test_an_augmentation_before_the_first_layer_is_named_as_such():
    """describe() told to call .eval() on it and that the cache would go deeper once the freezer
    froze it: advice that stops the augmentation, and a freeze that never comes (review50)."""
    torch.manual_seed(0)
    model = nn.Sequential(_RandomShift(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = sgd(model)
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=torch.randn(4, 6), total_steps=20)
    cache = ActivationCache(freezer, num_samples=16, deterministic=True)
    cached = cache.wrap()
    x = torch.randn(16, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_cached_steps(cached, opt, freezer, x, 4)
    note = cache.describe()
    assert "runs in train mode before the model's first layer (an augmentation" in note, note
    assert "once the freezer freezes it" not in note and cache.stats["hits"] == 0, note
