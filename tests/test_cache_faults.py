"""Storage faults: found at construction where they can be, otherwise the cache turns off with
ONE warning naming the cause and training goes on through the plain forward; no file of the
user's is ever deleted or overwritten. And sample ids reused for different inputs, told apart
from a prefix that is not deterministic.

Real faults where this machine has them: a path under a regular file, /sys (EACCES even for
root), RLIMIT_FSIZE and RLIMIT_AS in a child process (SIGXFSZ ignored). Simulated where it has
none (no tmpfs can be mounted, no read-only folder stops root): ENOSPC, EDQUOT and EROFS by
making posix_fallocate / os.open raise them, MemAvailable by patching its reader."""

import argparse
import collections
import errno
import multiprocessing
import os
import resource
import signal
import warnings

import numpy
import pytest
import torch
from torch import nn

from smartfrz_fast import SmartFreezer, StaticFreeze
from smartfrz_fast.cache import ActivationCache
from smartfrz_fast.cache import storage as storage_mod
from tests.models import LayerStack, train_cached_steps, with_and_without_cache
from tests.test_cache import N, X, Y, chain_model, ready_cache

_ctx = multiprocessing.get_context("forkserver")


def train(cache_args=None, steps=12, deepen_at=6):
    """Freeze one unit at step 1, two at ``deepen_at``; returns (model, cache, warnings)."""
    model = chain_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, 1), example_inputs=X[:2], total_steps=100)
    cache = None if cache_args is None else ActivationCache(
        freezer, **{"num_samples": N, "deterministic": True, **cache_args})
    forward = model if cache is None else cache.wrap()
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            if step == deepen_at:
                freezer.freeze_to(2)
            ids = torch.randperm(N, generator=g)[:10]
            out = forward(X[ids], ids) if cache is not None else forward(X[ids])
            loss = nn.functional.cross_entropy(out, Y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
            freezer.step()
    return model, cache, [str(w.message) for w in caught if "ActivationCache" in str(w.message)]


@pytest.fixture(scope="module")
def plain():
    return train()[0].state_dict()


def same_weights(model_or_state, reference):
    """The plain run's weights, to a CPU conv's last bit: a cached row was computed in another
    batch size than the plain forward's (the conv then rounds differently, 1e-7 here)."""
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    return all(float((p - reference[name]).abs().max()) < 1e-5 for name, p in state.items())


# ------------------------------------------------------------------ at construction
def test_bad_paths_fail_at_construction(tmp_path):
    model = chain_model()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=StaticFreeze(1, 1),
                           example_inputs=X[:2])
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    cases = [(str(user_file / "cache.bin"), NotADirectoryError, "lies under .*notes.txt.*regular file"),
             (str(tmp_path), IsADirectoryError, "is a directory"),
             (str(user_file), FileExistsError, "without an activation cache header.*never overwrites"),
             ("/sys/smartfrz_cache_test.bin", OSError, r"cannot create the cache file in '/sys' \(Permission")]
    if os.access("/sys", os.W_OK) and not os.path.exists("/sys/kernel"):
        cases.pop()
    for path, error, match in cases:
        with pytest.raises(error, match=match):
            ActivationCache(freezer, num_samples=N, deterministic=True, storage="mmap", path=path)
    assert user_file.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def _limited(kind: str, limit: int, cache_args: dict, out: str):
    """In a child: train under a resource limit, report what happened."""
    if kind == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else going past the limit kills the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    else:  # ``limit``: room left above this process's current address space
        size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (size + limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    torch.set_num_threads(1)
    try:
        model, cache, caught = train(cache_args)
        result = {"weights": model.state_dict(), "warnings": caught, "enabled": cache.enabled,
                  "reason": cache.reason, "boundary": cache.boundary, "error": None}
    except Exception as exc:  # reported to the test
        result = {"error": f"{type(exc).__name__}: {exc}"}
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
    torch.save(result, out)


def run_limited(kind, limit, cache_args, tmp_path):
    out = str(tmp_path / "result.pt")
    proc = _ctx.Process(target=_limited, args=(kind, limit, cache_args, out))
    proc.start()
    proc.join(300)
    assert proc.exitcode == 0, proc.exitcode
    result = torch.load(out, weights_only=False)
    assert result["error"] is None, result["error"]
    return result


def test_a_file_size_limit(plain, tmp_path):
    path = str(tmp_path / "c.bin")
    # max_bytes beyond the limit: found at construction
    model = chain_model()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=StaticFreeze(1, 1),
                           example_inputs=X[:2])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(OSError, match="RLIMIT_FSIZE"):
            ActivationCache(freezer, num_samples=N, deterministic=True, storage="mmap", path=path,
                            max_bytes=2 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    # A limit the first file fits (4 KiB header + 40 rows of 1 KiB) but not the deeper one (1.25 KiB
    # rows): the cache turns off at the deeper freeze, with one warning, the run goes on.
    result = run_limited("fsize", 50_000, dict(storage="mmap", path=path), tmp_path)
    assert not result["enabled"] and len(result["warnings"]) == 1, result["warnings"]
    assert "[Errno 27]" in result["reason"] and "RLIMIT_FSIZE" in result["reason"]
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "result.pt"]  # the old file stays; no half-made one
    assert same_weights(result["weights"], plain)
    # A limit not even the first file fits: off at the first freeze
    os.unlink(path)
    result = run_limited("fsize", 20_000, dict(storage="mmap", path=path), tmp_path)
    assert not result["enabled"] and len(result["warnings"]) == 1 and "RLIMIT_FSIZE" in result["reason"]
    assert same_weights(result["weights"], plain)


def test_host_memory_runs_out(plain, tmp_path):
    # Real: an address-space limit 1 GiB above the child's size, and rows that need 4 GiB (the
    # kernel's MemAvailable does not see the limit): torch's CPU allocator fails ("can't allocate
    # memory") when the cache allocates its rows at the first freeze.
    result = run_limited("as", 1 << 30, dict(storage="memory", num_samples=4_000_000), tmp_path)
    assert not result["enabled"] and len(result["warnings"]) == 1, result["warnings"]
    assert "can't allocate memory" in result["reason"]
    assert same_weights(result["weights"], plain)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_a_storage_fault_at_the_deeper_freeze_turns_the_cache_off(code, plain, tmp_path, monkeypatch):
    # Simulated: the second file (the move to the deeper boundary) cannot be made.
    calls = {"n": 0}
    real_open = os.open

    def failing_open(name, flags, *args):
        if str(name).startswith(f"{path}.smartfrz-tmp-") and flags & os.O_CREAT:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(code, os.strerror(code), name)
        return real_open(name, flags, *args)

    path = tmp_path / "c.bin"
    monkeypatch.setattr(storage_mod.os, "open", failing_open)
    user_next = tmp_path / "c.bin.next"  # a file of the user's that an old version deleted
    user_next.write_text("mine")
    model, cache, caught = train(dict(storage="mmap", path=str(path)))
    assert calls["n"] == 2 and not cache.enabled and len(caught) == 1, caught
    assert f"[Errno {code}]" in caught[0] and "moving the cached rows" in caught[0]
    assert same_weights(model, plain)  # the plain forward went on, every later step too
    assert sorted(os.listdir(tmp_path)) == ["c.bin", "c.bin.next"] and user_next.read_text() == "mine"


def test_no_room_in_host_memory_turns_the_cache_off(plain, monkeypatch):
    monkeypatch.setattr(storage_mod, "host_memory_available", lambda: 10_000)
    model, cache, caught = train(dict(storage="memory"))
    assert not cache.enabled and len(caught) == 1 and "GiB of host memory" in caught[0]
    assert same_weights(model, plain)


def test_an_index_larger_than_host_memory_is_refused_at_construction(monkeypatch):
    # num_samples=1e11 ended in torch's "DefaultCPUAllocator: can't allocate memory" from deep
    # inside the cache, naming neither the setting nor the size (review92 F7)
    from smartfrz_fast.cache import core as core_mod

    monkeypatch.setattr(core_mod, "host_memory_available", lambda: 2**30)
    model = chain_model()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                           example_inputs=X[:4])
    with pytest.raises(MemoryError, match=r"num_samples=1000000000 needs an index of 8\.4 GiB .* 1\.0 GiB is avail"):
        ActivationCache(freezer, num_samples=10**9, max_bytes=10**6, deterministic=True)
    ActivationCache(freezer, num_samples=10**6, deterministic=True)  # 9 MB: fine


def test_the_users_files_beside_the_cache_are_left_alone(plain, tmp_path):
    path = tmp_path / "c.bin"
    mine = {"c.bin.next": "next", "c.bin.smartfrz-tmp-0000": "looks like ours, is not"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    model, cache, caught = train(dict(storage="mmap", path=str(path)))
    assert cache.active and cache.stats["migrated"] > 0 and caught == []
    assert same_weights(model, plain)
    assert sorted(os.listdir(tmp_path)) == sorted(["c.bin", *mine])
    assert all((tmp_path / name).read_text() == text for name, text in mine.items())


def test_a_cache_file_deleted_under_the_run_turns_the_cache_off_at_the_checkpoint(plain, tmp_path):
    # the rows are still served from the unlinked file; the checkpoint could not make them
    # durable and raised FileNotFoundError, which ended the run
    path = tmp_path / "c.bin"
    model, cache, caught = train(dict(storage="mmap", path=str(path)))
    assert cache.active and caught == []
    os.unlink(path)
    with pytest.warns(UserWarning, match="making the cached rows durable for a checkpoint failed"):
        state = cache.state_dict()
    assert not cache.enabled and state["enabled"] is False and state["fingerprint"] is None
    assert same_weights(model, plain)


def test_a_host_store_freed_gives_the_heap_back(monkeypatch):
    # each deeper freeze frees a multi-MB store; glibc kept the pages (review103: a cache capped
    # at 8 MiB left the process 190 MB larger after 24 freezes): freed stores trim the heap
    trims = []
    monkeypatch.setattr(storage_mod, "_malloc_trim", lambda pad: trims.append(pad) or 1)
    cache, wrapped = ready_cache(frozen=1)
    wrapped(X[:10], torch.arange(10))
    assert trims == []
    cache.freezer.freeze_to(2)  # the rows move to a deeper cut: the old store goes
    assert cache.stats["migrated"] == 10 and trims == [0]
    cache.close()
    assert trims == [0, 0]
    monkeypatch.undo()
    storage_mod.trim_host_heap()  # glibc's here; elsewhere it does nothing


# ------------------------------------------------------------------ ids reused
def _audited(cache_kwargs=None):
    cache, wrapped = ready_cache(audit_rows=N, **(cache_kwargs or {}))
    wrapped(X[:10], torch.arange(10))  # stored
    return cache, wrapped


def test_an_id_given_to_another_input_is_computed_again_never_served():
    # ids 0..9 again, for other samples (a dataset swapped under the same ids, or ids that are
    # not per sample): each such row is recomputed and replaced, with one warning
    cache, wrapped = _audited()
    plain = cache.freezer.model
    with pytest.warns(UserWarning, match=r"sample id 0 came with another input than its cached row"):
        out = wrapped(X[10:20], torch.arange(10))
    assert cache.enabled and cache.stats["input_changed"] == 10
    torch.testing.assert_close(out, plain(X[10:20]), rtol=0, atol=0)
    # the replaced rows serve their new inputs
    hits = cache.stats["hits"]
    torch.testing.assert_close(wrapped(X[10:20], torch.arange(10)), plain(X[10:20]), rtol=0, atol=0)
    assert cache.stats["hits"] == hits + 10
    # inputs that change every time (ids not per sample, random augmentation): off once more than
    # half of the dataset changed in two epochs in a row
    with pytest.warns(UserWarning, match=r"in two epochs in a row, more than half of the 40 samples the cache holds came "
                      r"back with other inputs.*random augmentation\?\), or one sample id is given to several.*"
                      r"stays off for the rest of the run.*made once that part is over"):
        for start in range(0, 4 * N, 10):
            wrapped(X[start % N:start % N + 10] + 1.0 + start, torch.arange(10))
    assert not cache.enabled


def test_a_dataset_swapped_now_and_then_keeps_the_cache_on():
    # a curriculum: each stage's inputs are stable for a few epochs; every swap changes every row
    # once. Counted over the run, the second swap turned the cache off for good
    cache, wrapped = ready_cache(audit_rows=N)
    plain = cache.freezer.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the first swap's one warning
        for stage in range(4):
            data = X + stage
            for epoch in range(3):
                for start in range(0, N, 10):
                    ids = torch.arange(start, start + 10)
                    torch.testing.assert_close(wrapped(data[ids], ids), plain(data[ids]), rtol=0, atol=0)
    assert cache.enabled and cache.stats["input_changed"] == 3 * N, cache.describe()


def test_a_cache_made_after_an_input_ramp_serves_the_stable_epochs():
    # inputs scaled up over the first epochs turn a cache made at the start off for good (the
    # message says so); one made once the ramp is over serves every later epoch, and the run's
    # weights are those of the run without a cache
    def run(cache_from_epoch):
        model = chain_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, 1), example_inputs=X[:2], total_steps=100)
        cache = forward = None
        g = torch.Generator().manual_seed(1)
        for epoch in range(8):
            if epoch == cache_from_epoch:
                cache = ActivationCache(freezer, num_samples=N, deterministic=True, audit_rows=N)
                forward = cache.wrap()
            data = X * min(1.0, 0.25 * (epoch + 1))  # the ramp ends after epoch 3
            for ids in torch.randperm(N, generator=g).split(10):
                out = forward(data[ids], ids) if cache is not None else model(data[ids])
                nn.functional.cross_entropy(out, Y[ids]).backward()
                opt.step()
                opt.zero_grad()
                freezer.step()
        return model, cache

    plain, _ = run(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        early_model, early = run(0)
    assert not early.enabled and any("stays off for the rest of the run" in str(w.message) for w in caught)
    late_model, late = run(4)
    assert late.enabled and late.stats["hits"] >= 3 * N and late.stats["input_changed"] == 0, late.describe()
    for model in (early_model, late_model):
        for a, b in zip(plain.parameters(), model.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


class _TargetFirst(nn.Module):
    """BYOL's shape: a target network the loop moves towards the online one after every step
    (an EMA, never trained by the optimizer), called before the online network."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.online = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                    nn.Linear(16, 10))
        self.target = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).requires_grad_(False)

    def forward(self, x):
        with torch.no_grad():
            t = self.target(x)
        return self.online(x) + t


def _ema_run(use_cache, ema_every, num_samples=N):
    model = _TargetFirst()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, 1), example_inputs=X[:2], total_steps=100)
    cache = ActivationCache(freezer, num_samples=num_samples, deterministic=True) if use_cache else None
    forward = cache.wrap() if use_cache else None
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(24):
            ids = torch.randperm(N, generator=g)[:10]
            out = forward(X[ids], ids) if use_cache else model(X[ids])
            nn.functional.cross_entropy(out, Y[ids]).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
            if step % ema_every == 0:
                with torch.no_grad():
                    model.target[1].weight.mul_(0.9).add_(0.1 * model.online[1].weight[:10])
    return model, cache, [str(w.message) for w in caught]


def test_a_prefix_written_at_every_step_turns_the_cache_off():
    # the cut falls after the target network (called first, never trained): its EMA update
    # dropped every row at every step, and the cache made rows no step read at 5x the time of
    # none (review98 #10); after such drops in a row over a whole pass it turns off, naming the tensor
    plain, _, _ = _ema_run(False, ema_every=1)
    model, cache, caught = _ema_run(True, ema_every=1)
    assert not cache.enabled and cache.stats["weights_changed"] == 5, cache.describe()  # a pass of 4 steps
    assert any("target.1.weight of the cached frozen prefix changed in place 5 times in a row, over a whole pass "
               "over the samples, before any cached row was read" in w and "EMA" in w for w in caught), caught
    for a, b in zip(plain.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a pass is over the samples the cache sees: num_samples far above them (a subset, a DDP
    # rank's share) kept it on for good, checksumming the prefix at every step (review108)
    _, cache, _ = _ema_run(True, ema_every=1, num_samples=100 * N)
    assert not cache.enabled and cache.stats["weights_changed"] <= 8, cache.describe()


def test_a_prefix_written_now_and_then_keeps_the_cache_on():
    # a write every 8 steps (two epochs of 4 batches): the rows made in between are read first
    plain, _, _ = _ema_run(False, ema_every=8)
    model, cache, caught = _ema_run(True, ema_every=8)
    assert cache.enabled and cache.stats["weights_changed"] == 2 and cache.stats["hits"] > 0, cache.describe()
    assert same_weights(model, plain.state_dict())  # rows computed in other batch sizes


def test_writes_that_stop_within_a_pass_keep_the_cache_on():
    # nn.Embedding(max_norm=...) renormalises, in its forward, each row it looks up above the
    # norm: in the first pass after the freeze every step wrote a few rows, and four such writes
    # in a row turned the cache off for good (review106). The writes stop within that pass; the
    # rows made after them serve the next ones
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(400, 16, max_norm=1.0)
            self.l1, self.l2, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

        def forward(self, tokens):
            return self.head(torch.relu(self.l2(torch.relu(self.l1(self.emb(tokens).mean(1))))))

    n, batch = 128, 16
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 400, (n, 8), generator=g), torch.randint(0, 4, (n,), generator=g)

    def run(use_cache):
        torch.manual_seed(0)
        model = Bag()
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2 * n // batch), example_inputs=tokens[:batch],
                               total_steps=6 * n // batch)
        cache = ActivationCache(freezer, num_samples=n, deterministic=True) if use_cache else None
        forward = cache.wrap() if use_cache else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for epoch in range(6):
                for ids in torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).split(batch):
                    out = forward(tokens[ids], ids) if use_cache else model(tokens[ids])
                    nn.functional.cross_entropy(out, labels[ids]).backward()
                    opt.step()
                    opt.zero_grad()
                    freezer.step()
        return model, cache

    plain, _ = run(False)
    model, cache = run(True)
    assert cache.enabled and cache.stats["weights_changed"] >= 4 and cache.stats["hits"] >= 2 * n, cache.describe()
    assert same_weights(model, plain.state_dict())


class _Scaled(nn.Module):
    """A model that takes a batch-wide value besides its per-sample input: ``scale`` (read by the
    frozen prefix: an annealed input scale) and ``count`` (read only after it, as Hugging Face's
    num_items_in_batch is read by the loss)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x, scale, count):
        if isinstance(scale, torch.Tensor):
            scale = scale.clamp(max=1.0)
        else:  # a clamp hides a change one way: the read probe nudges both ways
            scale = min(float(scale), 1.0)
        return self.head(self.b(self.a(x * scale))) / count


@pytest.mark.parametrize("make", [float, torch.tensor, numpy.float32], ids=["number", "0-dim tensor", "numpy"])
def test_a_batch_wide_input_the_prefix_reads_recomputes_the_rows_when_it_changes(make):
    # it was left out of the input checksum: rows of the old scale were served until an audit
    # (with audit_rows=0, for the rest of the run)
    model = _Scaled()
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(2, 1),
                           example_inputs=(x[:2], make(1.0), make(8.0)), total_steps=100)
    freezer.freeze_to(2)
    cache = ActivationCache(freezer, num_samples=16, deterministic=True, audit_rows=0)
    forward = cache.wrap()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(8):
            ids = torch.arange(8 * (step % 2), 8 * (step % 2) + 8)
            scale, count = make(1.0 - 0.5 * (step // 4)), make(8.0 + step)  # the scale anneals once
            with torch.no_grad():
                expected = model(x[ids], scale, count)
            torch.testing.assert_close(forward((x[ids], scale, count), ids), expected, rtol=0, atol=0)
    # the count, read after the cut, changes every step and costs no hit; the scale's change
    # recomputes each row once
    assert cache.stats["hits"] == 32 and cache.stats["input_changed"] == 16, cache.describe()


def test_a_python_list_of_one_value_per_sample_is_not_split_but_run_whole():
    # a collate that returns lengths as a list: the missed samples were computed with the whole
    # batch's list, so sample j got the length of batch position j, and that row was served later
    class MaskedBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x, lengths):  # sample i masked by lengths[i]
            h = torch.relu(self.lin(x))
            return h * torch.stack([torch.arange(h.shape[1]) < lengths[i] for i in range(h.shape[0])]).unsqueeze(-1)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.head = MaskedBlock(), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x, lengths):
            return self.head(torch.relu(self.b(self.a(x, lengths))).sum(1))

    model = Masked()
    x = torch.randn(16, 5, 6, generator=torch.Generator().manual_seed(0))
    lengths = [1 + i % 5 for i in range(16)]
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(2, 1),
                           example_inputs=(x[:4], lengths[:4]), total_steps=100)
    freezer.freeze_to(2)
    cache = ActivationCache(freezer, num_samples=16, deterministic=True, audit_rows=0)
    forward = cache.wrap()
    with pytest.warns(UserWarning, match="a Python list of one value or tensor per sample"):
        for ids in (torch.arange(8), torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])):
            with torch.no_grad():
                expected = model(x[ids], [lengths[i] for i in ids])
            torch.testing.assert_close(forward((x[ids], [lengths[i] for i in ids]), ids), expected, rtol=0, atol=0)
    assert cache.stats["bypassed"] == 2


def test_at_batch_size_one_a_batch_wide_input_the_prefix_does_not_read_costs_no_hit():
    # the read probe needed two samples: with one, HF's num_items_in_batch changed every row's sum
    model = _Scaled()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(2, 1),
                           example_inputs=(x[:1], 1.0, 1.0), total_steps=100)
    freezer.freeze_to(2)
    cache = ActivationCache(freezer, num_samples=4, deterministic=True)
    forward = cache.wrap()
    for step in range(8):
        ids = torch.tensor([step % 4])
        forward((x[ids], 1.0, float(step + 1)), ids)
    assert cache.stats["hits"] == 4 and cache.stats["misses"] == 4, cache.describe()


class _Lengths:
    """A plain class (no pytree node) holding per-sample tensors."""

    def __init__(self, x):
        self.x = x


@pytest.mark.parametrize("extra, bypassed", [
    (lambda ids: [torch.ones(int(i) % 3 + 1) for i in ids], True),  # a list of one tensor per sample
    (lambda ids: _Lengths(torch.ones(len(ids))), True),  # an object pytree does not know
    (lambda ids: (len(ids), 3), False),  # a tuple is a setting, even as long as the batch
    # a vocabulary object of 20 000 words: data, no tensor (taken for one that holds tensors: review53)
    (lambda ids: _Lengths([_Lengths(str(i)) for i in range(20_000)]), False),
    (lambda ids: _Lengths(_Lengths(_Lengths([[[torch.ones(len(ids))]]]))), True),  # a tensor 6 levels down
])
def test_inputs_the_cache_cannot_split_run_the_whole_model(extra, bypassed):
    class Takes(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x, extra):
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    model = Takes()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(2, 1),
                           example_inputs=(x[:2], extra(torch.arange(2))), total_steps=100)
    freezer.freeze_to(2)
    cache = ActivationCache(freezer, num_samples=8, deterministic=True)
    forward = cache.wrap()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for ids in (torch.tensor([0, 1]), torch.tensor([0, 1])):
            torch.testing.assert_close(forward((x[ids], extra(ids)), ids), model(x[ids], None), rtol=0, atol=0)
    assert (cache.stats["bypassed"] == 2) == bypassed, cache.describe()
    assert any("cannot split" in str(w.message) or "can neither split" in str(w.message) for w in caught) == bypassed


def test_random_augmentation_turns_a_cache_smaller_than_the_dataset_off():
    # the rule "more than half of the dataset's rows changed" could never fire with max_bytes
    # holding a third of it
    cache, wrapped = ready_cache(audit_rows=0, max_bytes=14 * 1036)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in range(6):
            for start in range(0, N, 10):
                ids = torch.arange(start, start + 10)
                wrapped(X[ids] + torch.randn_like(X[ids]), ids)
    assert not cache.enabled and "random augmentation" in cache.reason, cache.describe()


def test_inputs_the_prefix_does_not_read_may_change():
    # pseudo-labels passed to the model, renewed every epoch: the input checksum leaves out what
    # the prefix does not read, so rows are still served (every one was a miss)
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x, labels):
            return nn.functional.cross_entropy(self.head(torch.tanh(self.b(torch.tanh(self.a(x))))), labels)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    model = WithLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(2, 1), example_inputs=(x[:2], y[:2]), total_steps=100)
    cache = ActivationCache(freezer, num_samples=16, deterministic=True)
    forward = cache.wrap()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(6):
            ids = torch.arange(8 * (step % 2), 8 * (step % 2) + 8)
            forward(x[ids], ids, labels=(y[ids] + step) % 3).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    assert cache.stats["hits"] == 24 and cache.stats["input_changed"] == 0, cache.describe()


def test_a_prefix_changed_in_place_drops_its_rows():
    # a frozen buffer (or weight) written in place behind the cache's back (load_state_dict
    # mid-run, weights copied in): rows made from the old values are dropped, never served; a
    # buffer sets the cache up again (it may change what the prefix computes)
    cache, wrapped = _audited()
    model = cache.freezer.model
    with torch.no_grad():
        model[1].running_mean.add_(1.0)
    with pytest.warns(UserWarning, match=r"1.running_mean of the cached frozen prefix changed in place"):
        out = wrapped(X[:10], torch.arange(10))
    assert cache.enabled and cache.stats["weights_changed"] == 1
    torch.testing.assert_close(out, model(X[:10]), rtol=0, atol=0)
    torch.testing.assert_close(wrapped(X[:10], torch.arange(10)), model(X[:10]), rtol=0, atol=0)
    assert cache.active and cache.rows_cached == 10
    # a write that leaves the values as they were (DDP's buffer broadcast) drops nothing
    rows = cache.rows_cached
    with torch.no_grad():
        model[1].running_mean.copy_(model[1].running_mean.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped(X[:10], torch.arange(10))
    assert cache.rows_cached == rows and cache.stats["weights_changed"] == 1


def test_a_buffer_changed_in_place_under_an_mmap_cache_with_reuse(tmp_path):
    # the cache sets itself up again after a buffer change: it reopened its own stale file
    # (reuse=True) and the next forward raised "made for a different fingerprint"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=1), example_inputs=torch.randn(8, 16), total_steps=40)
    cache = ActivationCache(freezer, num_samples=64, deterministic=True, storage="mmap",
                            path=str(tmp_path / "rows.bin"), reuse=True)
    forward, x = cache.wrap(), torch.randn(64, 16)
    for step in range(12):
        if step == 6:  # another checkpoint's statistics loaded mid-run
            state = model.state_dict()
            state["1.running_mean"] = state["1.running_mean"] + 0.5
            model.load_state_dict(state)
        ids = torch.arange(16 * (step % 4), 16 * (step % 4) + 16)
        forward(x[ids], ids).sum().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert cache.active and cache.stats["weights_changed"] == 1 and cache.stats["hits"] > 0, cache.describe()
    ids = torch.arange(16)
    torch.testing.assert_close(forward(x[ids], ids), model(x[ids]), rtol=0, atol=0)  # rows of the new statistics


def test_a_prefix_changed_in_place_before_a_deeper_freeze_is_not_migrated():
    # the write came between two forwards and a deeper freeze came first: the stale rows were
    # pushed through the newly frozen blocks and the new store took the new weights as its own
    model = chain_model()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.05), policy=StaticFreeze(1, 10 ** 6),
                           example_inputs=X[:2], total_steps=100)
    freezer.freeze_to(1)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True, audit_rows=0)
    wrapped = cache.wrap()
    wrapped(X[:10], torch.arange(10))  # stored
    with torch.no_grad():
        model[0].weight.add_(0.5)
    with pytest.warns(UserWarning, match=r"0.weight of the cached frozen prefix changed in place"):
        freezer.freeze_to(2)
    assert cache.stats["weights_changed"] == 1 and cache.stats["migrated"] == 0
    torch.testing.assert_close(wrapped(X[:10], torch.arange(10)), model(X[:10]), rtol=0, atol=0)


def test_module_swap_sees_a_buffer_of_the_prefix_changed_in_place():
    # the swap's blocks hold loose parameters: a BatchNorm's running statistics written in place
    # (another checkpoint's statistics loaded) were not watched, and stale rows were served
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.act = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()
            self.b, self.act2, self.head = nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)

        def forward(self, x):
            if bool(x.abs().sum() >= 0):  # data-dependent: fx cannot trace it
                x = self.act(self.bn(self.a(x)))
            return self.head(self.act2(self.b(x)))

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = Branchy()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.0), StaticFreeze(2, 1),
                           example_inputs=x[:2], total_steps=100)
    cache = ActivationCache(freezer, num_samples=16, deterministic=True, audit_rows=0)
    forward, ids = cache.wrap(), torch.arange(16)
    for _ in range(3):
        forward(x, ids).sum().backward()
        freezer.step()
    assert cache.chain.how == "module swap" and cache.boundary >= 2 and cache.stats["hits"] > 0, cache.describe()
    with torch.no_grad():
        model.bn.running_mean.add_(1.0)
    with pytest.warns(UserWarning, match=r"bn.running_mean of the cached frozen prefix changed in place"):
        out = forward(x, ids)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_an_input_the_prefix_reads_counts_though_a_trainable_block_hides_it():
    # the look at which inputs the prefix reads compared only the output before the last block:
    # a trainable ReLU that was dead on the 4 samples hid both inputs, and an edited input was
    # then served its old row
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.head = nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 2)
            with torch.no_grad():
                self.mid[0].weight.fill_(-1.0)
                self.mid[0].bias.fill_(-100.0)

        def forward(self, x, gain):
            return self.head(self.mid(self.emb(x) * gain[:, None]))

    x, gain = torch.rand(8, 4), torch.arange(1.0, 9.0)
    model = Net()
    freezer = SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.0), StaticFreeze(1, 1),
                           example_inputs=(x[:2], gain[:2]), total_steps=100)
    cache = ActivationCache(freezer, num_samples=8, deterministic=True, audit_rows=0)
    forward, ids = cache.wrap(), torch.arange(8)
    for _ in range(3):
        forward((x, gain), ids).sum().backward()
        freezer.step()
    with torch.no_grad():
        model.mid[0].bias.fill_(100.0)  # the trainable layer moved on
    edited = gain.clone()
    edited[0] = -5.0
    with pytest.warns(UserWarning, match="sample id 0 came with another input"):
        out = forward((x, edited), ids)
    torch.testing.assert_close(out, model(x, edited), rtol=0, atol=0)


def test_a_prefix_changed_through_data_is_caught_by_the_audit():
    # .data writes are invisible to torch's version counter: the audit is the net
    cache, wrapped = _audited()
    cache.freezer.model[1].running_mean.data.add_(1.0)
    with pytest.warns(UserWarning, match=r"Sample id 0 came with the same input its row was cached from, yet "
                      "the frozen prefix now computes something else.*through .data"):
        wrapped(X[:10], torch.arange(10))
    assert not cache.enabled


def test_a_nan_written_into_the_prefix_through_data_is_named_by_the_audit():
    # the audit blamed a prefix that is not deterministic ("results nan apart (allowed nan)")
    cache, wrapped = _audited()
    cache.freezer.model[0].weight.data[0, 0, 1, 1] = float("nan")
    with pytest.warns(UserWarning, match=r"now computes NaN or inf for sample 0, whose cached row is finite.*"
                      r"written through .data"):
        wrapped(X[:10], torch.arange(10))
    assert not cache.enabled


def test_functional_call_with_other_prefix_weights_runs_them_not_the_cached_rows():
    # functional_call(cached_model, {perturbed weights}, ...) was served the rows of the model's own
    # weights (loss 2.10 where the perturbed model's is 12.60), caught only if an audit fell on it
    from torch.func import functional_call

    cache, wrapped = _audited()
    plain = cache.freezer.model
    assert cache.active and cache.boundary > 0
    perturbed = {name: p + 0.5 for name, p in wrapped.named_parameters()}
    with pytest.warns(UserWarning, match="other tensors in place of the cached prefix's parameters"):
        out = functional_call(wrapped, perturbed, (X[:10], torch.arange(10)))
    expected = functional_call(plain, {n: p + 0.5 for n, p in plain.named_parameters()}, (X[:10],))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert cache.stats["bypassed"] == 1
    hits = cache.stats["hits"]
    torch.testing.assert_close(wrapped(X[:10], torch.arange(10)), plain(X[:10]), rtol=0, atol=0)
    assert cache.stats["hits"] == hits + 10  # its own weights back: served again
    # the same other weights at several forwards in a row (taken for a replacement that stays: the
    # cache sets up again on them), then the model's own again: each forward computes its own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for weights in ["perturbed"] * 4 + ["own"] * 4 + ["perturbed", "own"] * 2:
            if weights == "perturbed":
                out = functional_call(wrapped, perturbed, (X[:10], torch.arange(10)))
                torch.testing.assert_close(out, expected, rtol=0, atol=0)
            else:
                torch.testing.assert_close(wrapped(X[:10], torch.arange(10)), plain(X[:10]), rtol=0, atol=0)


def test_per_sample_gradients_through_the_cached_model_run_the_whole_model():
    # vmap over the cached model failed in the cache's id check with torch's generic vmap error
    from torch.func import functional_call, grad, vmap

    cache, wrapped = _audited()
    plain = cache.freezer.model

    def per_sample(model, with_ids):
        params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}

        def loss(params, x, y, i):
            args = (x[None], i[None]) if with_ids else (x[None],)
            return nn.functional.cross_entropy(functional_call(model, params, args), y[None])

        return vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, X[:6], Y[:6], torch.arange(6))

    with pytest.warns(UserWarning, match="inside torch.func's vmap or grad runs the whole model"):
        through_cache = per_sample(wrapped, True)
    direct = per_sample(plain, False)
    for name, g in direct.items():
        torch.testing.assert_close(through_cache[f"model.{name}"], g, rtol=0, atol=0)


def test_one_id_twice_in_a_batch_with_two_inputs_is_reported_once():
    cache, wrapped = ready_cache()
    ids = torch.tensor([0, 1, 2, 0])
    with pytest.warns(UserWarning, match="sample id 0 appears twice in one batch with two different inputs"):
        wrapped(X[:4], ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapped(X[4:8], torch.tensor([5, 6, 7, 5]))  # once per run
        wrapped(torch.cat([X[8:9], X[8:9]]), torch.tensor([8, 8]))  # the same input twice: fine


class LoRA(nn.Module):
    def __init__(self, width=12, rank=2):
        super().__init__()
        self.base = nn.Linear(width, width)
        self.a, self.b = nn.Linear(width, rank, bias=False), nn.Linear(rank, width, bias=False)
        nn.init.normal_(self.b.weight, std=0.1)
        self.base.requires_grad_(False)  # the user's choice before the freezer: in no unit

    def forward(self, x):
        return torch.relu(self.base(x) + self.b(self.a(x)))


def test_a_layer_the_user_lets_train_again_inside_the_cached_prefix_trains():
    # a base weight frozen by the user before set-up and made trainable later (a second phase)
    # never moved with the cache: the rows passed it no gradient, while without the cache it
    # trained through the frozen units (as the freezer's own warning says)
    torch.manual_seed(0)
    model = nn.Sequential(LoRA(), LoRA(), LoRA(), nn.Linear(12, 3))
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(4, at_step=3), example_inputs=x[:8], total_steps=40)
    cache = ActivationCache(freezer, num_samples=32, deterministic=True)
    cached = cache.wrap()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(12):
            ids = torch.arange((step % 4) * 8, (step % 4) * 8 + 8)
            nn.functional.cross_entropy(cached(x[ids], ids), y[ids]).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
            if step == 7:
                assert cache.boundary > 0 and cache.stats["hits"] > 0  # block 0 was served from rows
                model[0].base.requires_grad_(True)
                before = model[0].base.weight.detach().clone()
    assert not torch.equal(before, model[0].base.weight)
    assert any("0.base.weight, inside the cached frozen prefix, trains now" in str(w.message) for w in caught)
    assert cache.enabled and cache.boundary == 0, cache.describe()


class _Job:
    """A small MLP trained 8 samples a step over 32 (sample ids for the cache), with a StaticFreeze
    of ``frozen`` units at ``at_step`` and, with ``cache``, an ActivationCache in memory."""

    def __init__(self, widths, frozen, at_step, cache=False, momentum=0.0, scale=1.0, activation=nn.ReLU,
                 **cache_kwargs):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(32, 16, generator=g) * scale, torch.randint(0, 4, (32,), generator=g)
        torch.manual_seed(0)
        layers, width = [], 16
        for out in widths:
            layers += [nn.Linear(width, out), activation()]
            width = out
        self.model = nn.Sequential(*layers, nn.Linear(width, 4))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=momentum)
        self.freezer = SmartFreezer(self.model, self.opt, StaticFreeze(frozen, at_step=at_step),
                                    example_inputs=self.x[:8], total_steps=16)
        self.cache = ActivationCache(self.freezer, num_samples=32, deterministic=True, storage="memory",
                                     **cache_kwargs) if cache else None
        self.forward = self.cache.wrap() if cache else (lambda inputs, ids: self.model(inputs))

    def train(self, steps, before_step=lambda step: None, after_step=lambda step: None):
        for step in range(steps):
            before_step(step)
            ids = torch.arange(step * 8, step * 8 + 8) % 32
            nn.functional.cross_entropy(self.forward(self.x[ids], ids), self.y[ids]).backward()
            self.opt.step()
            self.opt.zero_grad()
            self.freezer.step()
            after_step(step)
        return self


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("held_layers, frozen_by_freezer", [((2, 4), 1), ((0,), 0)])
def test_layers_the_user_holds_frozen_are_no_part_of_the_cached_prefix(held_layers, frozen_by_freezer):
    """The cache cut through every leading layer that needed no gradient, whatever the freezer
    had frozen: layers the user's code held frozen for a warm-up were cached, and once released
    they never trained again, silently (review41)."""
    def run(cache):
        job = _Job((32, 32, 32), frozen_by_freezer, at_step=3, cache=cache, momentum=0.9)
        for i in held_layers:  # a warm-up of the head: the body held frozen by hand, after set-up
            job.model[i].requires_grad_(False)

        def release(step):
            if step == 8:
                for i in held_layers:
                    job.model[i].requires_grad_(True)
        return job.train(16, before_step=release)

    expected, got = run(False), run(True)
    _same_weights(expected.model, got.model)
    assert (got.cache.stats["hits"] > 0) == (frozen_by_freezer > 0)


def test_parameters_replaced_in_the_prefix_are_cached_again_once_refrozen():
    """A frozen weight replaced by a new Parameter: the forward that first met it (trainable until
    the freezer's next step froze it again) cut before it, and the cache cached nothing for the
    rest of the run, saying the parameter kept training in no unit (review39, review41)."""
    job, cuts = _Job((32, 32), 2, at_step=1, cache=True), []

    def replace(step):
        if step == 6:
            job.model[0].weight = nn.Parameter(job.model[0].weight.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job.train(12, before_step=replace, after_step=lambda step: cuts.append(job.cache.boundary))
    assert cuts[5] > 0 and cuts[-1] == cuts[5] and not job.model[0].weight.requires_grad
    assert "in no unit" not in job.cache.describe()


def _cast_there_and_back(widths, **job_kwargs):
    """The same run without and with the cache, model.half(); model.float() before step 6."""
    def run(cache):
        job = _Job(widths, 2, at_step=1, cache=cache, momentum=0.9, **job_kwargs)

        def cast(step):
            if step == 6:
                job.model.half()
                job.model.float()
        return job.train(16, before_step=cast)

    expected = run(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = run(True)
    _same_weights(expected.model, got.model)
    return expected, got


@pytest.mark.parametrize("edit", [
    lambda m: m.insert(len(m), nn.Tanh()),  # after the trainable head
    lambda m: m.insert(3, nn.Tanh()),  # inside the cached prefix
    lambda m: m.pop(len(m) - 1),  # the head
    lambda m: m.__delitem__(2),  # a ReLU of the cached prefix
], ids=["insert at the end", "insert in the prefix", "pop the head", "del in the prefix"])
def test_a_sequential_edited_without_registration_sets_the_cache_up_again(edit):
    # nn.Sequential's insert writes _modules directly, pop and del go through delattr: no
    # registration hook fires, and the cache ran its old chain, 0.01-0.13 off the edited model, at
    # every forward, while describe() said it was on (review49)
    cache, cached = ready_cache(frozen=2, storage="memory")
    model = cache.freezer.module
    ids = torch.arange(10)
    cached(X[ids], ids)
    cached(X[ids], ids)
    assert cache.stats["hits"] == 10
    edit(model)
    with pytest.warns(UserWarning, match="modules or parameters changed since the cache was set up"):
        out = cached(X[ids], ids)
    torch.testing.assert_close(out, model(X[ids]), rtol=0, atol=0)
    torch.testing.assert_close(cached(X[ids], ids), model(X[ids]), rtol=0, atol=0)


def test_a_cast_there_and_back_drops_the_rows_it_made_stale():
    """model.half(); model.float() between two steps (a half-precision save or evaluation) sets
    .data twice: no version bump, float32 again, the values rounded. The rows made from the old
    values went on being served (3.4e-5 in weights with the audit off; review41)."""
    _, got = _cast_there_and_back((64, 64), scale=3.0, activation=nn.Tanh, audit_rows=0)
    assert got.cache.stats["weights_changed"] == 1 and got.cache.stats["hits"] > 0


def test_buffers_a_cast_replaced_are_cached_again():
    """model.half(); model.float() with batch norm in the cached prefix: a cast sets new buffer
    tensors (parameters keep theirs), which looked like torch.func.functional_call's swap at every
    later forward: the whole model ran for the rest of the run while describe() said the cache
    was on (review41)."""
    expected, got = _cast_there_and_back((32, 32), activation=lambda: nn.Sequential(nn.BatchNorm1d(32), nn.ReLU()))
    for a, b in zip(expected.model.buffers(), got.model.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert got.cache.stats["bypassed"] == 1 and got.cache.stats["hits"] > 8


def test_an_ema_evaluated_through_functional_call_keeps_the_rows():
    """An EMA's weights (one dict for the run) evaluated through torch.func.functional_call on
    three batches at each epoch's end: the same tensors at two swapped-out forwards were taken for
    a replacement that stays, and every row was dropped at each evaluation (review48)."""
    from torch.func import functional_call

    model = chain_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(2, 1), example_inputs=X[:2], total_steps=100)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True, storage="memory")
    cached = cache.wrap()
    ema = {n: t.detach().clone() for n, t in [*cached.named_parameters(), *cached.named_buffers()]}
    prefix = next(n for n, _ in cached.named_parameters())[:-len("0.weight")]  # the wrapper's name for the model
    hits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the swapped-out forwards' note
        for epoch in range(3):
            before = cache.stats["hits"]
            for start in range(0, N, 10):
                ids = torch.arange(start, start + 10)
                nn.functional.cross_entropy(cached(X[ids], ids), Y[ids]).backward()
                opt.step()
                opt.zero_grad()
                freezer.step()
            hits.append(cache.stats["hits"] - before)
            for start in range(0, 30, 10):
                ids = torch.arange(start, start + 10)
                torch.testing.assert_close(functional_call(cached, ema, (X[ids], ids)),
                                           functional_call(model, {n[len(prefix):]: t for n, t in ema.items()},
                                                           (X[ids],)), rtol=0, atol=0)
    assert hits == [0, 30, N], hits  # the first 10 samples went through before the freeze at step 1
    assert cache.stats["bypassed"] == 9


def test_the_cut_goes_back_once_the_hook_that_stopped_it_is_removed():
    """A forward hook placed on a frozen module for a while (a one-off feature dump): the cache
    cut before it, as it must, and stayed there until the next freeze after the hook was removed,
    still naming the hook (review41)."""
    job, cuts, handles = _Job((32, 32), 2, at_step=1, cache=True), [], []

    def hook_for_a_step(step):
        if step == 6:
            handles.append(job.model[2].register_forward_hook(lambda module, args, out: None))
        if step == 7:
            handles.pop().remove()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job.train(12, before_step=hook_for_a_step, after_step=lambda step: cuts.append(job.cache.boundary))
    assert cuts[5] == cuts[-1] > cuts[6] and "hook" not in job.cache.describe()


def test_a_hook_placed_in_the_prefix_as_the_one_that_stopped_the_cut_goes_runs_at_once():
    """The removed hook's re-cut ran before the look at new hooks: a hook placed inside the cached
    prefix in the same step was skipped for one forward, its rows served (review42)."""
    job, calls, per_step = _Job((32, 32, 32), 3, at_step=1, cache=True), [], []
    stopping = job.model[4].register_forward_hook(lambda module, args, out: None)  # the cut stops before it

    def move_the_hook(step):
        if step == 8:  # every row is cached by now
            stopping.remove()
            job.model[0].register_forward_hook(lambda module, args, out: calls.append(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        job.train(11, before_step=move_the_hook, after_step=lambda step: per_step.append(len(calls)))
    assert per_step[7] == 0 and per_step[10] > per_step[9] > per_step[8] > per_step[7]


class _Keys:  # as transformers' DynamicLayer
    def __init__(self, keys):
        self.keys = keys


class _KeyCache:  # as transformers' DynamicCache: its tensors one level below its attributes
    def __init__(self):
        self.layers = []

    def add(self, keys):
        self.layers.append(_Keys(keys))

    def all_keys(self):
        return [layer.keys for layer in self.layers]


class _PairCache:  # the legacy format kept in an object: [(keys, values), ...]
    def __init__(self):
        self.pairs = []

    def add(self, keys):
        self.pairs.append((keys, keys + 1))

    def all_keys(self):
        return [k for k, _ in self.pairs]


class _SlotCache:  # __slots__: no __dict__
    __slots__ = ("keys",)

    def __init__(self):
        self.keys = collections.deque()

    def add(self, keys):
        self.keys.append(keys)

    def all_keys(self):
        return list(self.keys)


class _DeepCache:  # dicts of lists of objects, four levels down, and a link back to itself
    def __init__(self):
        self.store = {"layers": []}
        self.root = self

    def add(self, keys):
        self.store["layers"].append(_Keys(_Keys(keys)))

    def all_keys(self):
        return [layer.keys.keys for layer in self.store["layers"]]


class _CachingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, key_cache):
        h = torch.relu(self.lin(x))
        key_cache.add(h * 2)
        return h, key_cache


class _CachingNet(nn.Module):
    def __init__(self, kind=_KeyCache):
        super().__init__()
        self.kind = kind
        self.b0, self.b1, self.head = _CachingBlock(), _CachingBlock(), nn.Linear(8, 3)

    def forward(self, x):
        h, key_cache = self.b0(x, self.kind())
        h, key_cache = self.b1(h, key_cache)
        return self.head(h), key_cache


@pytest.mark.parametrize("kind", [_KeyCache, _PairCache, _SlotCache, _DeepCache])
def test_an_object_returned_with_its_tensors_a_level_down_is_this_batchs(kind):
    """A frozen block returning an object that keeps per-sample tensors below its attributes (a
    Llama's DynamicCache with use_cache=True): the object recorded when the cut was checked, for 4
    other samples, was returned at every later step (review47); so it was where the tensors sat in
    (key, value) tuples, in slots, in a deque or further down (review48), and a link back to the
    object itself made the output comparison recurse without end."""
    def run(cached):
        torch.manual_seed(0)
        model = _CachingNet(kind)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=torch.randn(8, 8),
                               total_steps=8)
        cache = ActivationCache(freezer, num_samples=16, deterministic=True) if cached else None
        forward, keys = cache.wrap() if cached else None, []
        for step in range(4):
            x = torch.randn(8, 8, generator=torch.Generator().manual_seed(10 + step % 2))
            ids = torch.arange(8) + 8 * (step % 2)
            out, key_cache = forward(x, ids) if cached else model(x)
            out.sum().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
            keys.append([k.detach().clone() for k in key_cache.all_keys()])
        return keys, cache

    expected, _ = run(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, cache = run(True)
    assert f"is no cut because it returns a {kind.__name__}" in cache.describe(), cache.describe()
    assert "use_cache=False" in cache.describe()
    for step_expected, step_got in zip(expected, got):
        assert len(step_expected) == len(step_got)
        for a, b in zip(step_expected, step_got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _cached_around(block):
    """Linear, ``block`` (8 -> 8), Linear, head; the first three units freeze at step 1, an
    activation cache over 16 samples: (model, optimizer, freezer, cache, cached model, inputs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), block, nn.Linear(8, 8), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(3, at_step=1), example_inputs=torch.randn(4, 8), total_steps=20)
    cache = ActivationCache(freezer, num_samples=16, deterministic=True)
    return model, opt, freezer, cache, cache.wrap(), torch.randn(16, 8, generator=torch.Generator().manual_seed(1))


def _with_and_without_cache(make_model, frozen=3, steps=8, before_step=None):
    """Train ``make_model()`` (8 -> 3 features) for ``steps`` steps on the same batches, without and
    with the activation cache, its first ``frozen`` units frozen at step 1; ``before_step(model,
    step)`` runs before each forward (the loop changing something). Checks that the weights
    agree, and returns ((model, None), (model, cache))."""
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    runs = []
    for use_cache in (False, True):
        torch.manual_seed(0)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = SmartFreezer(model, opt, StaticFreeze(frozen, at_step=1), example_inputs=torch.randn(4, 8),
                               total_steps=20)
        cache = ActivationCache(freezer, num_samples=16, deterministic=True) if use_cache else None
        forward = cache.wrap() if use_cache else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(steps):
                if before_step is not None:
                    before_step(model, step)
                ids = torch.arange(8) + 8 * (step % 2)
                out = forward(x[ids], ids) if use_cache else model(x[ids])
                out.pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                freezer.step()
        runs.append((model, cache))
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    return runs


class _KeepsFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        self.features = torch.tanh(self.lin(x))  # read by the loss after the forward
        return self.features


def test_a_frozen_block_that_writes_what_the_loss_reads_is_not_cached_past():
    """A frozen block keeping `self.features` for a probe loss: served from rows, it kept an old
    batch's features, and the probe trained on them against this batch's labels (review55)."""
    model, opt, freezer, cache, cached, x = _cached_around(_KeepsFeatures())
    for step in range(6):
        ids = torch.arange(8) + 8 * (step % 2)
        out = cached(x[ids], ids)
        with torch.no_grad():
            torch.testing.assert_close(model[1].features, torch.tanh(model[1].lin(model[0](x[ids]))))
        out.sum().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert cache.boundary <= 1 and "writes '1.features' in its forward" in cache.describe(), cache.describe()


class _Memo(nn.Module):
    """Sets a table once, at its first call (a rotary table, ActNorm's flag): no per-call state."""

    def __init__(self):
        super().__init__()
        self.lin, self.scale = nn.Linear(8, 8), None

    def forward(self, x):
        if self.scale is None:
            self.scale = torch.full((8,), 0.5)
        return torch.tanh(self.lin(x)) * self.scale


def test_a_value_set_once_at_the_first_call_costs_no_caching():
    """A first-call memo in a frozen block made it a writer (review56)."""
    model, opt, freezer, cache, cached, x = _cached_around(_Memo())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no set-up again
        train_cached_steps(cached, opt, freezer, x, 6)
    assert cache.boundary == 3 and cache.stats["hits"] > 0, cache.describe()


class _Summary(nn.Module):
    """Keeps a number computed from its batch (a statistic logged or read by the loss)."""

    def __init__(self, kind):
        super().__init__()
        self.lin, self.kind, self.last = nn.Linear(8, 8), kind, 0.0

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        self.last = h.mean().item() if self.kind == "mean" else h.shape[0]
        return h


@pytest.mark.parametrize("kind", ["mean"])
def test_a_value_computed_from_the_batch_is_a_write_at_every_call(kind):
    """Set-up's two looks ran on the same batch, so `self.last = x.mean().item()` came out equal
    twice and was taken for a memo: served from rows, the block kept another batch's value
    (review57). A value of the batch size alone is taken for a memo rebuilt per batch size (an
    RNN's zero initial state; documented)."""
    model, opt, freezer, cache, cached, x = _cached_around(_Summary(kind))
    seen = []
    for step in range(6):
        ids = torch.arange(8 if step % 3 else 5) + 8 * (step % 2)
        with torch.no_grad():  # this forward's weights
            h = torch.tanh(model[1].lin(model[0](x[ids])))
        cached(x[ids], ids).sum().backward()
        seen.append((model[1].last, h.mean().item() if kind == "mean" else h.shape[0]))
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert all(got == pytest.approx(want) for got, want in seen), seen
    assert cache.boundary <= 1 and "writes '1.last'" in cache.describe(), cache.describe()


class _OptionalScale(nn.Module):
    """Reads an attribute the loop may set later, with a default: a trace keeps the default."""

    def __init__(self, on_config):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head, self.on_config = nn.Linear(8, 3), on_config
        self.config = argparse.Namespace(hidden=8)

    def forward(self, x):
        scale = getattr(self.config if self.on_config else self, "scale", 1.0)
        return self.head(torch.relu(self.body(x))) * scale


@pytest.mark.parametrize("on_config", [False, True])
def test_an_attribute_the_loop_sets_for_the_first_time_reaches_the_torch_fx_chain(on_config):
    """`getattr(self, "scale", 1.0)`: the trace folded 1.0 into the graph of the trainable head,
    and a `model.scale = 3.0` set for the first time mid-run was ignored ("a trace cannot have read
    it"): head weights 7x off (review57). The cache sets up again on the model's own forward."""
    def set_scale(model, step):
        if step == 4:
            (model.config if on_config else model).scale = 3.0

    _with_and_without_cache(lambda: _OptionalScale(on_config), before_step=set_scale)


class _WarmUpHead(nn.Module):
    """A trainable head with its own step counter (a warm-up written in the module)."""

    def __init__(self):
        super().__init__()
        self.lin, self.t = nn.Linear(8, 3), 0

    def forward(self, x):
        self.t += 1
        return self.lin(x) * min(1.0, self.t / 4)


def test_a_trainable_head_with_its_own_counter_is_cached_in_front_of():
    """The module swap's check ran its passes from one Python state: the head's counter moved
    between them, the outputs differed, and the model was called nondeterministic in eval mode:
    nothing cached (review57). Each pass now starts from the same state."""
    (plain, _), (model, cache) = _with_and_without_cache(
        lambda: nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), _WarmUpHead()))
    assert plain[3].t == model[3].t == 8
    assert cache.boundary == 3 and cache.stats["hits"] > 0, cache.describe()


class _Tap(nn.Module):
    """Appends its output to a list the loop reads (a feature tap for a probe)."""

    def __init__(self, feats):
        super().__init__()
        self.lin, self.feats = nn.Linear(8, 8), feats

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        self.feats.append(h)
        return h


class _Accumulates(nn.Module):
    """Adds to a state object that every block holds (an auxiliary loss the loss reads)."""

    def __init__(self, state):
        super().__init__()
        self.lin, self.state = nn.Linear(8, 8), state

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        self.state.aux = self.state.aux + float(h.pow(2).mean())
        return h


class _CentredHead(nn.Module):
    """Centres its logits with an EMA kept as a plain tensor, updated in place in training."""

    def __init__(self):
        super().__init__()
        self.lin, self.center = nn.Linear(8, 3), torch.zeros(3)

    def forward(self, x):
        out = self.lin(x)
        if self.training:
            self.center.mul_(0.9).add_(0.1 * out.detach().mean(0))
        return out - self.center


@pytest.mark.parametrize("kind", ["tap", "shared_state", "ema_head"])
def test_python_state_other_than_plain_values_is_seen_and_put_back(kind):
    """A list of tensors a frozen block appends to, a state object blocks share, and a tensor kept
    as a plain attribute updated in place were not seen as writes (the cache served past them:
    the probe read a 4-row tensor a set-up look left) and the set-up's looks left their changes
    in the model (an EMA head: weights 1 % off with nothing cached) (review57)."""
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    runs = []
    for use_cache in (False, True):
        torch.manual_seed(0)
        feats, state = [], argparse.Namespace(aux=0.0)
        if kind == "tap":
            model = nn.Sequential(nn.Linear(8, 8), _Tap(feats), nn.Linear(8, 8), nn.Linear(8, 3))
        elif kind == "shared_state":
            model = nn.Sequential(_Accumulates(state), _Accumulates(state), nn.Linear(8, 8), nn.Linear(8, 3))
        else:
            model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), _CentredHead())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = SmartFreezer(model, opt, StaticFreeze(3, at_step=1), example_inputs=torch.randn(4, 8),
                               total_steps=20)
        forward = ActivationCache(freezer, num_samples=16, deterministic=True).wrap() if use_cache else None
        seen = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(8):
                ids = torch.arange(8) + 8 * (step % 2)
                state.aux = 0.0
                out = forward(x[ids], ids) if use_cache else model(x[ids])
                loss = out.pow(2).mean()
                if kind == "tap":
                    loss = loss + feats[-1].sum() * 0.0 + model[3](feats[-1]).pow(2).mean()
                    seen.append(feats[-1].shape[0])
                elif kind == "shared_state":
                    seen.append(round(state.aux, 6))
                loss.backward()
                opt.step()
                opt.zero_grad()
                freezer.step()
        runs.append(([p.detach().clone() for p in model.parameters()], seen))
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert runs[0][1] == runs[1][1]


class _LazyInitialState(nn.Module):
    """A GRU whose zero initial state is built lazily and rebuilt when the batch size changes."""

    def __init__(self):
        super().__init__()
        self.gru, self.h0 = nn.GRU(8, 16, batch_first=True), None

    def forward(self, x):
        if self.h0 is None or self.h0.shape[1] != x.shape[0]:
            self.h0 = torch.zeros(1, x.shape[0], 16)
        return self.gru(x, self.h0)[0]


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.enc, self.b, self.head = nn.Linear(8, 8), _LazyInitialState(), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.b(self.enc(torch.relu(self.a(x)))[:, -1])))


class _KeepsMax(nn.Module):
    """Keeps its batch's largest activation, which a later trainable layer reads."""

    def __init__(self, sink):
        super().__init__()
        self.lin, self.sink = nn.Linear(8, 8), sink

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        self.sink.amax = h.abs().max().item()
        return h


class _ScaledByMax(nn.Module):
    def __init__(self, source):
        super().__init__()
        self.lin, self.source = nn.Linear(8, 3), source

    def forward(self, x):
        return self.lin(x) * self.source.amax


@pytest.mark.parametrize("kind", ["lazy_memo", "batch_max"])
def test_set_up_looks_tell_a_memo_per_batch_size_from_a_value_of_the_batch(kind):
    """review61: a memo built lazily in forward (an RNN's zero state) was written as a torch.fx
    proxy by the trace, which then failed and left it there: every later forward crashed; a memo
    rebuilt per batch size was taken for a write at every call (the second look ran on n-1
    samples); and a batch maximum, the same on samples 1..n-1, was taken for none (served stale:
    weights 1.5e-2 off). The looks now run batches of the same size made of one sample."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, 8, generator=g) if kind == "lazy_memo" else torch.randn(32, 8, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    runs = []
    for use_cache in (False, True):
        torch.manual_seed(0)
        if kind == "lazy_memo":
            model = _Recurrent()
        else:
            sink = argparse.Namespace(amax=1.0)
            model = nn.Sequential(nn.Linear(8, 8), _KeepsMax(sink), nn.Linear(8, 8), _ScaledByMax(sink))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        freezer = SmartFreezer(model, opt, StaticFreeze(2 if kind == "lazy_memo" else 3, at_step=2),
                               example_inputs=x[:4], total_steps=20)
        cache = ActivationCache(freezer, num_samples=32, deterministic=True) if use_cache else None
        forward = cache.wrap() if use_cache else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(12):
                ids = torch.arange(8) + 8 * (step % 4)
                out = forward(x[ids], ids) if use_cache else model(x[ids])
                torch.nn.functional.cross_entropy(out, y[ids]).backward()
                opt.step()
                opt.zero_grad()
                freezer.step()
        runs.append(([p.detach().clone() for p in model.parameters()], cache))
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    cache = runs[1][1]
    if kind == "lazy_memo":  # cached past the GRU whose memo follows the batch size
        assert cache.boundary >= 2 and cache.stats["hits"] > 0, cache.describe()
    else:
        assert "writes 'sink.amax'" in cache.describe() or "amax" in cache.describe(), cache.describe()


class _ConfigScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head, self.config = nn.Linear(8, 3), argparse.Namespace(scale=1.0)

    def forward(self, x):
        return self.head(torch.relu(self.body(x))) * self.config.scale


def test_a_config_object_replaced_whole_reaches_the_torch_fx_chain():
    """Only the fields of the config object present at set-up were watched: `model.config =
    Config(scale=3.0)` left the trace's 1.0 in the trainable head's graph (review61)."""
    def replace_config(model, step):
        if step == 4:
            model.config = argparse.Namespace(scale=3.0)

    _with_and_without_cache(_ConfigScale, before_step=replace_config)


class _TableMemo(nn.Module):
    """Memoises a table on self at its first call: made under an evaluation's inference_mode, it is
    an inference tensor, which has no version counter."""

    def __init__(self):
        super().__init__()
        self.lin, self.table = nn.Linear(8, 8), None

    def forward(self, x):
        if self.table is None:
            self.table = torch.linspace(0.5, 1.5, 8)
        return torch.tanh(self.lin(x)) + self.table  # (an addition saves no tensor for backward)


def test_a_tensor_memoised_under_inference_mode_is_watched_by_identity():
    """Set-up read its version and crashed ("Inference tensors do not track version counter"),
    and the cache turned off blaming torch.fx (review62)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), _TableMemo(), nn.Linear(8, 8), nn.Linear(8, 3))
    with torch.inference_mode():
        model(torch.randn(4, 8))  # an evaluation before training
    model, opt, freezer, cache, cached, x = _cached_around(model[1])
    train_cached_steps(cached, opt, freezer, x, 4)
    assert cache.enabled and cache.stats["hits"] > 0, cache.describe()


def test_a_large_tensor_attribute_is_followed_without_a_copy():
    """Every look copied every tensor kept as a plain attribute: a 256 MB table cost 500 MB and a
    second per step (review62); above 16 MB one is followed by identity and version only."""
    from smartfrz_fast import units

    module = nn.Linear(2, 2)
    module.small, module.large = torch.zeros(4), torch.zeros(units._MAX_COPIED_BYTES // 4 + 1)
    kept = units._watched_fields(module)
    assert kept["small"][1][2] is not None and kept["large"][1][2] is None
    module.large.add_(1.0)  # a write in place is still seen
    assert units._differs(module.large, kept["large"][0], kept["large"][1])


class _CountingHead(nn.Module):
    """A trainable head that writes a buffer at every forward, eval mode too (a step counter kept
    as a buffer, an observation normaliser's running mean)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 3)
        self.register_buffer("t", torch.zeros(()))

    def forward(self, x):
        self.t += 1
        return self.lin(x) * torch.clamp(self.t / 4, max=1.0)


def test_a_trainable_head_writing_a_buffer_is_cached_in_front_of():
    """202e17d put back only Python values between the module swap's passes: a head writing a
    buffer at every call made the passes differ, and nothing was cached, the message advising to
    keep the module after the frozen prefix, where it was (review65). The passes start from the
    same buffers again; a buffer the skipped blocks write is still named."""
    (plain, _), (model, cache) = _with_and_without_cache(
        lambda: LayerStack(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), _CountingHead()))
    assert int(plain.layers[3].t) == int(model.layers[3].t) == 8
    assert cache.boundary == 3 and cache.stats["hits"] > 0, cache.describe()



class _Context:
    """State the blocks share (one object every block holds)."""

    def __init__(self):
        self.gate, self.seen = None, None


def _keep_seen(context, h):
    context.seen = h


class _ReadsContext(nn.Module):
    def __init__(self, context, writes):
        super().__init__()
        self.lin, self.context, self.writes = nn.Linear(8, 8), context, writes

    def forward(self, h):
        h = torch.tanh(self.lin(h)) * self.context.gate
        if self.writes:
            self.context.seen = h  # the head reads it
        return h


class _WritesContextThroughHelper(_ReadsContext):
    def forward(self, h):
        h = torch.tanh(self.lin(h)) * self.context.gate
        _keep_seen(self.context, h)  # a write this forward's code does not set itself
        return h


class _SharedContextNet(nn.Module):
    """The root writes a per-sample gate into a context every block holds and reads; block
    ``writer`` (if any) writes what the head reads into it too, ``how``: in its own forward, through
    a helper function, or its own forward called by the root as ``.forward`` (no hooks run)."""

    def __init__(self, writer=None, how="itself"):
        super().__init__()
        self.context, self.writer, self.how = _Context(), writer, how
        self.first = nn.Linear(8, 8)
        self.blocks = nn.ModuleList(
            (_WritesContextThroughHelper if how == "helper" and i == writer else _ReadsContext)(self.context, i == writer)
            for i in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        self.context.gate, self.context.seen = torch.sigmoid(x[:, :1]), None
        h = self.first(x)
        for i, block in enumerate(self.blocks):
            h = block.forward(h) if self.how == "forward" and i == self.writer else block(h)
        return self.head(h if self.context.seen is None else h + self.context.seen)


@pytest.mark.parametrize("writer, how, cached_blocks", [
    (None, "", 7),  # only the root writes: every frozen block is cached (first, then each block's lin and rest)
    (1, "itself", 4),  # blocks.1 writes what the head reads: the cut stops before it, not before blocks.0
    (2, "itself", 6),
    (1, "helper", 2),  # which module wrote cannot be told: every holder is a writer, as before
    (1, "forward", 4),  # blocks.1's code runs as the root's: only its lin is cached, the write still runs
])
def test_a_write_into_a_context_the_blocks_share_stops_the_cut_at_its_writer(writer, how, cached_blocks):
    """A write into an object several modules hold was credited to every holder: the root writing
    its blocks' shared context stopped the cut at the first block (review62 #6). The set-up look
    now tells which forward wrote it where that forward's code sets it."""
    (_, _), (model, cache) = _with_and_without_cache(lambda: _SharedContextNet(writer, how), frozen=4)
    assert cache.boundary == cached_blocks and cache.stats["hits"] > 0, cache.describe()
    if how in ("itself", "helper"):
        assert f"'blocks.{writer if how == 'itself' else 0}' writes '" in cache.describe(), cache.describe()


class _EarlyExit(nn.Module):
    """A batch with a hard sample runs every block, an all-easy one only the first."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for block in self.blocks[:len(self.blocks) if bool((x[:, 0] > 0).any()) else 1]:
            h = torch.relu(block(h))
        return self.head(h)


class _SkipsMiddle(_EarlyExit):
    """An all-easy batch skips blocks 1 and 2 but runs the rest: it reaches the cut by another path."""

    def forward(self, x):
        hard = bool((x[:, 0] > 0).any())
        h = torch.relu(self.stem(x))
        for i, block in enumerate(self.blocks):
            if hard or i not in (1, 2):
                h = torch.relu(block(h))
        return self.head(h)


class _Halting(_EarlyExit):
    """Stops after the first block whose output's norm passes a threshold (adaptive computation)."""

    def halts(self, norms):
        return float(norms.min()) > 1.5

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for block in self.blocks:
            h = torch.relu(block(h))
            if self.halts(h.norm(dim=-1)):
                break
        return self.head(h)


class _HaltingByList(_Halting):
    def halts(self, norms):
        return min(norms.tolist()) > 1.5


class _HaltingByNumpy(_Halting):
    def halts(self, norms):
        return norms.detach().numpy().min() > 1.5


class _HaltingByNonzero(_Halting):
    def halts(self, norms):
        return (norms <= 1.5).nonzero().shape[0] == 0  # the test is in the shape of a tensor


class _HaltingByMask(_Halting):
    def halts(self, norms):
        return len(norms[norms <= 1.5]) == 0


_HALTING = (_Halting, _HaltingByList, _HaltingByNumpy, _HaltingByNonzero, _HaltingByMask)


@pytest.mark.parametrize("make_model", [_EarlyExit, _SkipsMiddle, *_HALTING])
@pytest.mark.parametrize("easy_first", [False, True])
def test_a_forward_that_stops_before_the_cut_runs_the_whole_model(make_model, easy_first):
    """An early exit (or a halting test) before the cached cut: a batch whose rows were all cached
    got the stand-ins' placeholders in place of the blocks it did run (weights 1.6e-2 off), one with
    new samples crashed (review67). The forward now runs whole for such a batch, and a value read
    into Python before the cut (the halting test) keeps the blocks it reads running, also one read
    by `.tolist()`, `.numpy()` or the shape of a `nonzero()` or a boolean mask (those were not seen:
    0.19 off). A batch that
    reaches the cut without running a block the rows stand in for (a branch) runs whole too:
    served rows made on the other path were 5e-3 off until an audit (review68)."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    x[:8, 0], x[8:, 0] = 1.0, -1.0  # 0-7 hard, 8-15 easy
    if make_model in _HALTING:
        x[8:] *= 6  # large inputs halt after one block
    mixed = [torch.tensor([0, 1, 2, 3, 8, 9, 10, 11]), torch.tensor([4, 5, 6, 7, 12, 13, 14, 15])]
    easy = torch.arange(8, 16)
    batches = [mixed[0], easy, mixed[1], mixed[0], easy] if easy_first else [*mixed, *mixed, easy, mixed[0], easy, easy]
    frozen = 5 if make_model is _SkipsMiddle else 4  # the cut after blocks.3: the skipped blocks before it
    _, _, cache = with_and_without_cache(make_model, lambda ids: x[ids], y, batches, frozen)
    assert cache.boundary > 0 and cache.stats["hits"] + cache.stats["misses"] > 0, cache.describe()
    if make_model not in _HALTING:
        assert cache.stats["bypassed"] > 0, cache.describe()


class _AdapterOnSomeBatches(_EarlyExit):
    """The root runs a trainable adapter on the input of all-hard batches only; the first batch
    is mixed, so set-up never records it."""

    def __init__(self):
        super().__init__()
        self.adapter = nn.Linear(8, 8)

    def forward(self, x):
        if bool((x[:, 0] > 0).all()):
            x = x + self.adapter(x)
        h = torch.relu(self.stem(x))
        for block in self.blocks:
            h = torch.relu(block(h))
        return self.head(h)


def test_a_trainable_module_set_up_never_saw_runs_its_batches_whole_and_keeps_the_cache():
    """A trainable module the recording never entered, run by the model's own code before the
    cached blocks on some batches, turned the cache off for the rest of the run (review67 #6);
    those batches now run the whole model and the others are still served."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    x[:8, 0], x[8:, 0] = 1.0, -1.0  # 0-7 hard, 8-15 easy
    mixed, hard = torch.tensor([0, 1, 8, 9, 10, 11, 12, 13]), torch.arange(8)
    batches = [mixed, mixed, hard, mixed, hard, mixed, mixed]
    _, model, cache = with_and_without_cache(_AdapterOnSomeBatches, lambda ids: x[ids], y, batches, frozen=4)
    assert cache.enabled and cache.boundary > 0, cache.describe()
    assert cache.stats["bypassed"] == 2 and cache.stats["hits"] >= 16, cache.describe()
    assert "the latest forward that ran the whole model: module adapter, which" in cache.describe()


class _Reparameterise(nn.Module):
    def forward(self, stats):
        mu, log_var = stats.chunk(2, dim=1)
        return mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)  # in every mode


class _VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 8)
        self.sample, self.dec = _Reparameterise(), nn.Linear(4, 3)

    def forward(self, x):
        return self.dec(self.sample(self.head(self.enc(x))))


def test_a_random_draw_after_the_cut_leaves_the_frozen_encoder_cached():
    """A draw after the frozen blocks (a VAE's reparameterisation, diffusion noise drawn in the
    forward) made the set-up's check see two passes differ and cache nothing (review70): each
    pass now draws from the same generator state, where a draw before the cut still shows."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    batches = [torch.randperm(16, generator=generator)[:8] for _ in range(8)]
    _, _, cache = with_and_without_cache(_VAE, lambda ids: x[ids], y, batches, frozen=3)
    assert cache.boundary > 0 and cache.stats["hits"] > 0, cache.describe()


class _BranchOnTheBatch(nn.Module):
    """A branch on the whole batch in the model's own code, between frozen blocks."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        hard = bool((x[:, 0] > 0).all())
        h = torch.relu(self.a(x))
        if hard:
            h = h * 3.0 + 1.0
        return self.head(torch.relu(self.c(torch.relu(self.b(h)))))


def test_a_branch_on_the_whole_batch_is_caught_by_the_audit_before_it_trains_on_a_wrong_row():
    """The per-sample check passes on all-easy batches; a later mixed batch computed its missed
    hard samples apart, which took the branch the whole batch does not, and the audits
    recomputed served rows among the hits alone, agreeing with them (weights 2.5e-2 off,
    review73). The audit now recomputes the whole batch and checks the rows just computed for
    its misses too: the cut goes before the branch."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 8, generator=generator), torch.randint(0, 3, (24,), generator=generator)
    x[:8, 0], x[8:, 0] = 1.0, -1.0  # 0-7 hard
    easy = torch.arange(8, 24)
    batches = [easy[:8], easy[8:], easy[:8]] + [torch.tensor([0, 1, 2, 3, 8, 9, 10, 11]),
                                                torch.tensor([4, 5, 6, 7, 12, 13, 14, 15])] * 6
    _, _, cache = with_and_without_cache(_BranchOnTheBatch, lambda ids: x[ids], y, batches, frozen=3)
    assert cache.boundary == 1 and cache.stats["hits"] > 0, cache.describe()


class _NanToNum(nn.Linear):
    def forward(self, x):
        return super().forward(torch.nan_to_num(x))


def _nan_tolerant():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), _NanToNum(16, 16), nn.ReLU(), nn.Linear(16, 3))


def test_a_row_holding_nan_that_the_trainable_layers_clear_is_no_audit_failure():
    """A sample with a NaN feature, cleared by nan_to_num after the frozen layers: the audit's
    new checks of two recomputes against each other (the misses, the determinism look) took
    NaN for a difference and turned the cache off as "not deterministic" (review75)."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    x[20, 3] = float("nan")
    r = torch.arange
    batches = [r(0, 8), r(0, 8), r(8, 16), torch.tensor([0, 1, 2, 3, 20, 21, 22, 23]), r(24, 32), r(4, 12)] + \
        [r(0, 8), r(8, 16), r(16, 24), r(24, 32)] * 3
    _, _, cache = with_and_without_cache(_nan_tolerant, lambda ids: x[ids], y, batches, frozen=2)
    assert cache.enabled and cache.stats["hits"] > 50, cache.describe()


class _SqueezedFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1)
        self.lin, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin(self.pool(torch.relu(self.conv(x))).squeeze())))


def test_a_squeeze_that_drops_the_batch_dimension_of_one_sample_is_named():
    """`pool(x).squeeze()` in a frozen block: a sample computed alone (a part of the per-sample
    check at a batch of 9, a single miss) has no batch dimension; 988e023 crashed with an
    IndexError, the first fix blamed pad_packed_sequence (review73)."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(18, 3, 6, 6, generator=generator), torch.randint(0, 3, (18,), generator=generator)
    batches = [torch.arange(9), torch.arange(9, 18)] * 3
    _, _, cache = with_and_without_cache(_SqueezedFeatures, lambda ids: x[ids], y, batches, frozen=3)
    assert "a squeeze() in the frozen layers drops the batch dimension" in cache.describe(), cache.describe()


class _TapsIntoContext(nn.Module):
    def __init__(self, context, taps):
        super().__init__()
        self.lin, self.context, self.taps = nn.Linear(8, 8), context, taps

    def forward(self, h):
        h = torch.tanh(self.lin(h))
        if self.taps:
            self.context.aux["feats"].append(h)  # into a list inside a dict the root made
        return h


class _NestedContextNet(nn.Module):
    """The root gives the shared context a fresh dict of lists at every forward; blocks.1 appends
    its output to a list in it, which the root's head reads."""

    def __init__(self):
        super().__init__()
        self.context = _Context()
        self.first, self.head, self.aux_head = nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(8, 3)
        self.blocks = nn.ModuleList(_TapsIntoContext(self.context, i == 1) for i in range(3))

    def forward(self, x):
        self.context.aux = {"feats": []}
        h = self.first(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h) + sum(self.aux_head(f) for f in self.context.aux["feats"])


def test_a_write_inside_a_nested_container_of_a_shared_context_counts_for_every_holder():
    """The set-up look saw the root rebind the context's dict but not the block's append inside
    it, credited the root alone, and the cut went past the tapping block: cached steps read an
    empty list (0.116 off, review68). A container holding containers is every holder's again."""
    (_, _), (model, cache) = _with_and_without_cache(_NestedContextNet, frozen=4)
    assert cache.boundary == 2 and "writes '" in cache.describe(), cache.describe()


class _TwoDomains(nn.Module):
    """A parameter-free norm per domain, chosen by the batch, between frozen layers."""

    def __init__(self):
        super().__init__()
        self.stem, self.mid, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.norm_a, self.norm_b = nn.BatchNorm1d(16, affine=False), nn.BatchNorm1d(16, affine=False)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = self.norm_a(h) if x[:, 0].mean() > 0 else self.norm_b(h)
        return self.head(torch.relu(self.mid(h)))


def test_a_module_set_up_never_called_that_runs_inside_the_prefix_runs_the_whole_model():
    """Domain B's norm, never called at set-up, runs in train mode inside the prefix (its
    statistics move), where cached rows were made in eval: cache and no cache drifted apart until
    an audit, or for good with a dropout (review67). A module the recording never ran, called
    between the blocks the rows stand in for, takes the batch off the recorded path: it runs whole."""
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    x[:16, 0], x[16:, 0] = 1.0, -1.0
    batches = [torch.arange(0, 8), torch.arange(8, 16), torch.arange(0, 8), torch.arange(16, 24),
               torch.arange(8, 16), torch.arange(24, 32)]
    plain, model, cache = with_and_without_cache(_TwoDomains, lambda ids: x[ids], y, batches, frozen=2)
    assert torch.equal(plain.norm_b.running_mean, model.norm_b.running_mean)
    assert cache.enabled and cache.stats["bypassed"] > 0 and cache.stats["hits"] > 0, cache.describe()


class _Checkpointable(nn.Module):
    """Blocks with BatchNorm, checkpointed two at a time when ``grad_checkpointing`` is on (as
    timm's models switch it)."""

    def __init__(self, untraceable=False):
        super().__init__()
        self.stem, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())
                                      for _ in range(4)))
        self.grad_checkpointing, self.untraceable = False, untraceable

    def forward(self, x):
        h = self.stem(x)
        if self.untraceable and float(x.abs().sum()) < 0:  # a host read: no torch.fx trace, the module swap
            h = -h
        if self.grad_checkpointing:
            h = torch.utils.checkpoint.checkpoint_sequential(self.blocks, 2, h, use_reentrant=False)
        else:
            h = self.blocks(h)
        return self.head(h)


@pytest.mark.parametrize("switched_at, untraceable", [(0, False), (4, False), (4, True)])
def test_checkpointing_switched_on_sets_the_cache_up_again(switched_at, untraceable):
    """A chain that calls the blocks itself (torch.fx, timm's ResNet/ViT/ConvNeXt) left the model's
    checkpointing out: its memory saving gone, a trainable BatchNorm's statistics not updated again
    in the recomputation (0.18 off); and one switched on after set-up kept a cut inside a
    recomputed segment (2e-3 off, review66). Checkpointing on means the module swap, and switching
    it sets the cache up again."""
    import torch.utils.checkpoint  # noqa: F401

    def switch(model, step):
        model.grad_checkpointing = step >= switched_at

    (plain, _), (model, cache) = _with_and_without_cache(lambda: _Checkpointable(untraceable), frozen=2, steps=8,
                                                         before_step=switch)
    for a, b in zip(plain.buffers(), model.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert cache.chain.how == "module swap" and cache.stats["hits"] > 0, cache.describe()


class _ImageList(nn.Module):
    """Takes a list of images (torchvision's detection models do), one tensor per sample."""

    def __init__(self):
        super().__init__()
        self.conv, self.mid, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, images):
        return self.head(torch.relu(self.mid(torch.stack([self.conv(image).mean((1, 2)) for image in images]))))


@pytest.mark.parametrize("batch", [2, 3, 4])
def test_a_list_of_images_is_one_sample_each_whatever_their_channels(batch):
    """The batch size was read from the first image's channels (3): a batch of 2 or 4 images was
    refused for its sample ids, one of 3 ran whole (review66). Each is a list of one tensor per
    sample now, which runs whole, saying to stack them."""
    torch.manual_seed(0)
    model = _ImageList()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    images = [torch.randn(3, 8 + i, 8) for i in range(batch)]
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=0), example_inputs=(images,), total_steps=4)
    cache = ActivationCache(freezer, num_samples=8, deterministic=True)
    cached = cache.wrap()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            cached(images, torch.arange(batch)).sum().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    assert cache.stats["bypassed"] == 1 and cache.stats["hits"] + cache.stats["misses"] == 0, cache.describe()
    assert any("images of different sizes" in str(w.message) for w in caught), [str(w.message) for w in caught]


class _TrainingOnlyInputDropout(nn.Module):
    """Calls a dropout on its input in training only (the recording, in eval, never calls it)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.0)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if self.training:
            x = self.drop(x)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def test_a_module_called_only_in_training_before_the_prefix_costs_no_caching():
    """Before the first block the rows stand in for, a module the recording never ran is the
    input's (an augmentation): a guard on such modules turned the cache off (review69)."""
    (_, _), (model, cache) = _with_and_without_cache(_TrainingOnlyInputDropout, frozen=3)
    assert cache.enabled and cache.boundary > 0 and cache.stats["bypassed"] == 0, cache.describe()


def test_a_global_forward_hook_of_the_users_runs_the_whole_model():
    """A hook registered for every module (to tap a frozen block's output for a loss) got
    placeholders, or nothing, on cached steps (review69): such forwards run the whole model."""
    from torch.nn.modules.module import register_module_forward_hook

    taps = []
    handle = register_module_forward_hook(lambda module, args, out: taps.append(module) if module is tapped else None)
    try:
        tapped = None

        def make():
            nonlocal tapped
            model = LayerStack(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3))
            tapped = model.layers[1]
            return model

        (_, _), (model, cache) = _with_and_without_cache(make, frozen=3)
    finally:
        handle.remove()
    assert cache.stats["hits"] == 0 and cache.stats["bypassed"] > 0, cache.describe()
    assert "global forward hook" in cache.describe()



def test_switching_checkpointing_off_for_validation_keeps_the_rows():
    """The checkpointing switch was looked at on every forward: a validation pass through the
    cached model that turned it off (and on again after) dropped every row (review69)."""
    torch.manual_seed(0)
    model = _Checkpointable(untraceable=True)
    model.grad_checkpointing = True
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(3, at_step=1), example_inputs=torch.randn(4, 8), total_steps=20)
    cache = ActivationCache(freezer, num_samples=16, deterministic=True)
    cached, x = cache.wrap(), torch.randn(16, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(8):
            ids = torch.arange(8) + 8 * (step % 2)
            cached(x[ids], ids).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
            model.grad_checkpointing = False  # validation without it
            model.eval()
            with torch.no_grad():
                cached(x[:4], torch.arange(4))
            model.train()
            model.grad_checkpointing = True
    assert not any("switched on or off" in str(w.message) for w in caught)
    assert cache.stats["hits"] >= 40, cache.describe()


class _Finite(nn.Module):
    def forward(self, x):
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def test_rows_with_nan_or_inf_are_not_cached_and_turn_nothing_off():
    """Samples whose frozen-prefix rows hold inf or NaN (an input with inf; the trainable layers
    clear them): the per-sample check compared NaN with NaN and took the prefix for one that mixes
    samples (the cache off, review78), an audit that met such a row turned the cache off, and a
    resumed cache called them damaged. They are not cached: those samples run the prefix each time."""
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    batches = [p[i:i + 16] for p in [torch.randperm(64, generator=g) for _ in range(4)] for i in range(0, 64, 16)]
    inputs[batches[1][:5], 0] = float("inf")  # not in the first batch, which trains the prefix
    make = lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),  # noqa: E731
                                 nn.Sequential(_Finite(), nn.Linear(32, 4)))
    _, _, cache = with_and_without_cache(make, lambda ids: inputs[ids], targets, batches, frozen=2, audit_rows=16)
    assert cache.enabled and cache.stats["hits"] > 0 and cache.stats["audited"] > 0
    assert cache.stats["not_finite"] >= 5 and cache.stats["stored"] == 64 - 5 and cache.stats["bad_rows"] == 0


def test_an_embedding_the_user_froze_before_the_freezer_and_trains_again_is_named_as_such():
    """Frozen by the user before the freezer was built (so in no unit), then trained again (ULMFiT's
    last stage): the cache cut before it, saying the example forward had not read it and advising
    requires_grad=False on it, which would stop the layer the user just chose to train (review76 #3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 16),
                          nn.ReLU(), nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tokens, targets = torch.randint(0, 20, (32, 4)), torch.randint(0, 4, (32,))
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=tokens[:8], total_steps=12)
    cache = ActivationCache(freezer, num_samples=32, deterministic=True)
    forward = cache.wrap()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(8):
            if step == 4:
                model[0].weight.requires_grad_(True)
            ids = torch.arange(8 * (step % 4), 8 * (step % 4) + 8)
            nn.functional.cross_entropy(forward(tokens[ids], ids), targets[ids]).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    said = cache.describe()
    assert "0.weight had requires_grad=False when the freezer was built" in said, said
    assert "did not read it" not in said


class _ProbeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop = nn.Linear(32, 32), nn.Dropout(0.0)

    def forward(self, x):
        return x + self.drop(torch.relu(self.fc(x)))


def test_a_backbone_frozen_by_the_user_in_train_mode_is_named_whole_for_eval():
    """A linear probe (the backbone frozen by the user, the model in train mode as loops keep it):
    the cache cut before the backbone's first dropout and advised .eval() on it, then on the next
    module, one at a time (review76 #4: a ViT probe 20x faster with backbone.eval()). The advice
    names the largest module around it with nothing to train, and that advice caches the backbone."""
    torch.manual_seed(0)
    model = nn.Sequential(collections.OrderedDict(
        backbone=nn.Sequential(nn.Linear(16, 32), _ProbeBlock(), _ProbeBlock()), head=nn.Linear(32, 4)))
    model.backbone.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    inputs, targets = torch.randn(32, 16), torch.randint(0, 4, (32,))
    freezer = SmartFreezer(model, opt, StaticFreeze(0), example_inputs=inputs[:4])
    cache = ActivationCache(freezer, num_samples=32, deterministic=True)
    forward = cache.wrap()

    def epoch():
        for start in range(0, 32, 8):
            ids = torch.arange(start, start + 8)
            nn.functional.cross_entropy(forward(inputs[ids], ids), targets[ids]).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        epoch()
        assert "Call .eval() on 'backbone', the largest module around it with nothing to train" in cache.describe()
        model.backbone.eval()
        epoch()
        epoch()
    assert cache.cut_note is None and cache.stats["hits"] == 32, cache.describe()


def test_a_pass_that_re_estimates_the_frozen_norms_runs_whole_and_keeps_the_cut():
    """update_bn's pass through the cached model (Lightning's StochasticWeightAveraging runs it as a
    training epoch): the freezer lets the frozen norms run in train mode for it, the per-sample
    checks took their batch statistics for samples that mix, cut before each block in turn, and
    the cut stayed there (review79 #10: 7 warnings, 1 of 8 blocks cached after)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16),
                          nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=torch.randn(4, 8))
    cache = ActivationCache(freezer, num_samples=16, deterministic=True)
    cached, x = cache.wrap(), torch.randn(16, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_cached_steps(cached, opt, freezer, x, 4)
        boundary = cache.boundary
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
        for norm in norms:  # what update_bn does first
            norm.reset_running_stats()
            norm.momentum = None
        for ids in (torch.arange(8), torch.arange(8, 16)):
            cached(x[ids], ids)
        for norm in norms:
            norm.momentum = 0.1
        train_cached_steps(cached, opt, freezer, x, 4)
    assert boundary > 0 and cache.boundary == boundary and cache.enabled and cache.stats["bypassed"] == 2
    assert not any("depends on the other samples" in str(w.message) for w in caught)


def test_frozen_norms_that_keep_a_cumulative_average_are_cached():
    """BatchNorm(momentum=None) keeps a cumulative average: an ordinary setting the cache took for
    update_bn's pass, running every forward whole (review81: 0 hits against 2496)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=None), nn.ReLU(), nn.Linear(16, 16),
                          nn.BatchNorm1d(16, momentum=None), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=torch.randn(4, 8))
    cache = ActivationCache(freezer, num_samples=16, deterministic=True)
    train_cached_steps(cache.wrap(), opt, freezer, torch.randn(16, 8), 6)
    assert cache.stats["hits"] > 0 and cache.stats["bypassed"] == 0, cache.describe()


def test_a_validation_pass_does_not_move_the_cut_a_train_mode_module_stopped():
    """A backbone the user froze, a dropout in it left in train mode (the cut stops before it) and a
    validation pass through the cached model each epoch (model.eval(), then model.train()): the
    eval pass moved the cut past the dropout and the next training forward back, dropping the rows
    every epoch (review81: 0 hits against 1024)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    model[:6].requires_grad_(False)  # the backbone
    opt = torch.optim.SGD(model[7].parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(0), example_inputs=torch.randn(4, 16))
    cache = ActivationCache(freezer, num_samples=16, deterministic=True)
    cached, x = cache.wrap(), torch.randn(16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            model.train()
            train_cached_steps(cached, opt, freezer, x, 2)
            boundary = cache.boundary
            model.eval()
            with torch.no_grad():
                cached(x[:8], torch.arange(8))
    assert cache.boundary == boundary > 0 and cache.stats["hits"] > 0 and cache.stats["stored"] == 16, cache.describe()
