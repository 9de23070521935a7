"""Resuming a run with the activation cache on: a run interrupted at a checkpoint and resumed
with fresh objects ends with bit-identical weights to an uninterrupted one (fp32 cache); saved
rows come back only when they belong to the resumed model and boundary."""

import os
import warnings

import pytest
import torch
from torch import nn

from smartfrz_fast import SmartFreezer, StaticFreeze
from smartfrz_fast.cache import ActivationCache
from tests.test_cache import N, X, Y, chain_model

TOTAL, SPLIT, DEEPEN_AT = 36, 14, 22  # 4 steps an epoch; the freeze at step 3, a deeper one at 22
_g = torch.Generator().manual_seed(9)
BATCHES = [p[i:i + 10] for p in [torch.randperm(N, generator=_g) for _ in range(TOTAL // 4)] for i in range(0, N, 10)]


def build(**cache_args):
    model = chain_model(dropout=0.2)  # dropout inside the cached prefix: held off by eval mode
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, 3), example_inputs=X[:2], total_steps=TOTAL)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True, **cache_args)
    return model, opt, freezer, cache


def run(model, opt, freezer, cache, start, stop):
    wrapped = cache.wrap()
    torch.manual_seed(100 + start)  # the suffix has no dropout; the RNG state must not matter anyway
    for step in range(start, stop):
        if step == DEEPEN_AT:
            freezer.freeze_to(2)
        ids = BATCHES[step]
        loss = nn.functional.cross_entropy(wrapped(X[ids], ids), Y[ids])
        opt.zero_grad()
        loss.backward()
        opt.step()
        freezer.step()


def checkpoint(path, model, opt, freezer, cache, rows):
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "freezer": freezer.state_dict(),
                "cache": cache.state_dict(rows=rows)}, path)


def resume(ckpt_path, assign=False, **cache_args):
    model, opt, freezer, cache = build(**cache_args)
    ckpt = torch.load(ckpt_path, weights_only=False)
    model.load_state_dict(ckpt["model"], assign=assign)
    freezer.load_state_dict(ckpt["freezer"])  # before the optimizer: it removes frozen params
    opt.load_state_dict(ckpt["optimizer"])
    cache.load_state_dict(ckpt["cache"])
    return model, opt, freezer, cache


CASES = {  # name: (cache args, save rows, rows restored at resume)
    "memory-refill": (dict(storage="memory", dtype="fp32"), False, False),
    "memory-rows": (dict(storage="memory", dtype="fp32"), True, True),
    "memory-rows-fp8": (dict(storage="memory", dtype="fp8"), True, True),
    "mmap": (dict(storage="mmap", dtype="fp32"), False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_is_bit_identical(case, tmp_path):
    args, rows, restored = CASES[case]
    paths = {}
    if args["storage"] == "mmap":
        paths = {"a": dict(path=str(tmp_path / "a.bin")), "b": dict(path=str(tmp_path / "b.bin"))}
    full = build(**args, **paths.get("a", {}))
    run(*full, 0, TOTAL)

    part = build(**args, **paths.get("b", {}))
    run(*part, 0, SPLIT)
    checkpoint(tmp_path / "ckpt.pt", *part, rows=rows)
    before = dict(part[3].stats)
    part[3].close()  # the interrupted process ends here
    del part
    resumed = resume(tmp_path / "ckpt.pt", **args, **paths.get("b", {}))
    run(*resumed, SPLIT, TOTAL)

    for (name, p), q in zip(full[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(p, q), f"{name} differs after resume"
    cache, reference = resumed[3], full[3]
    assert cache.active and cache.boundary == reference.boundary == 8
    assert before["hits"] > 0 and before["stored"] == N  # the checkpoint had a full cache to save
    if restored:  # the same hits and misses as the uninterrupted run: nothing was recomputed
        assert cache.stats == reference.stats, (cache.stats, reference.stats)
    else:  # rows refilled after the resume: the first epoch misses again
        assert cache.stats["misses"] == reference.stats["misses"] + N


def test_a_model_loaded_with_assign_true_resumes_bit_identical_with_no_warning(tmp_path):
    # load_state_dict(assign=True) replaces the parameters before the freezer's state freezes
    # them: the state froze the old tensors, the first forward raised on the cache's rows ("this
    # run caches 0 blocks"), and without rows the first step warned that frozen ones were replaced
    full = build(storage="memory")
    run(*full, 0, TOTAL)
    part = build(storage="memory")
    run(*part, 0, SPLIT)
    checkpoint(tmp_path / "ckpt.pt", *part, rows=True)
    resumed = resume(tmp_path / "ckpt.pt", assign=True, storage="memory")
    frozen = [p for _, p in resumed[2].plan.frozen_parameters(resumed[2].num_frozen)]
    assert frozen and not any(p.requires_grad for p in frozen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(*resumed, SPLIT, TOTAL)
    for (name, p), q in zip(full[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(p, q), f"{name} differs after resume"
    assert resumed[3].stats == full[3].stats


def test_rows_state_is_exact_and_small_without_rows():
    model, opt, freezer, cache = build(storage="memory", dtype="bf16")
    run(model, opt, freezer, cache, 0, 8)
    light, heavy = cache.state_dict(), cache.state_dict(rows=True)
    assert light["rows"] is None and light["boundary"] == 4 and light["fingerprint"] is None  # no weight pass
    assert heavy["fingerprint"]["boundary"] == 4 and heavy["row_shape"] == [4, 8, 8]
    data = cache._store.export_rows()["data"]
    assert heavy["rows"]["data"].dtype == torch.bfloat16 and heavy["rows"]["ids"].numel() == N
    assert torch.equal(heavy["rows"]["data"].view(torch.int16), data.view(torch.int16))


def test_a_checkpoint_before_the_first_forward_keeps_the_loaded_state(tmp_path):
    model, opt, freezer, cache = build(storage="memory", dtype="fp32")
    run(model, opt, freezer, cache, 0, SPLIT)
    checkpoint(tmp_path / "ckpt.pt", model, opt, freezer, cache, rows=True)
    resumed = resume(tmp_path / "ckpt.pt", storage="memory", dtype="fp32")
    again = resumed[3].state_dict(rows=True)  # saved again at once, before any step
    assert again["boundary"] == 4 and again["rows"]["ids"].numel() == N


def test_rows_from_other_weights_are_refused(tmp_path):
    model, opt, freezer, cache = build(storage="memory", dtype="fp32")
    run(model, opt, freezer, cache, 0, SPLIT)
    checkpoint(tmp_path / "ckpt.pt", model, opt, freezer, cache, rows=True)
    resumed = resume(tmp_path / "ckpt.pt", storage="memory", dtype="fp32")
    with torch.no_grad():
        resumed[0][0].weight.add_(1.0)  # the frozen prefix is not the checkpoint's any more
    with pytest.raises(ValueError, match="different prefix_weights"):
        run(*resumed, SPLIT, SPLIT + 1)


def test_mmap_file_moved_past_the_checkpoint_is_rebuilt_and_another_runs_refused(tmp_path):
    # The interrupted run went on past a deeper freeze before it stopped: its cache file now
    # holds rows of another boundary. It is this run's own file (the same lineage): the resume
    # replaces it with an empty one at the checkpoint's boundary, and ends as the uninterrupted run.
    path = str(tmp_path / "c.bin")
    full = build(storage="mmap", dtype="fp32", path=str(tmp_path / "full.bin"))
    run(*full, 0, TOTAL)
    part = build(storage="mmap", dtype="fp32", path=path)
    run(*part, 0, SPLIT)
    checkpoint(tmp_path / "ckpt.pt", *part, rows=False)
    run(*part, SPLIT, DEEPEN_AT + 2)
    part[3].close()
    resumed = resume(tmp_path / "ckpt.pt", storage="mmap", dtype="fp32", path=path)
    with pytest.warns(UserWarning, match=r"c\.bin went on past the checkpoint .* refills"):
        run(*resumed, SPLIT, TOTAL)
    for (name, p), q in zip(full[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(p, q), f"{name} differs after resume"
    assert resumed[3].stats["misses"] > full[3].stats["misses"]  # the rows refilled
    resumed[3].close()  # (two open caches of one file are refused)
    # A file of another run (another lineage) in its place is refused, never replaced.
    other = build(storage="mmap", dtype="fp32", path=str(tmp_path / "other.bin"))
    run(*other, 0, DEEPEN_AT + 2)
    other[3].close()
    os.replace(tmp_path / "other.bin", path)
    before = open(path, "rb").read()
    resumed = resume(tmp_path / "ckpt.pt", storage="mmap", dtype="fp32", path=path)
    with pytest.raises(ValueError, match=r"c\.bin now belongs to another run.*delete the file"):
        run(*resumed, SPLIT, SPLIT + 1)
    assert open(path, "rb").read() == before


def test_settings_must_match_and_state_is_checked(tmp_path):
    model, opt, freezer, cache = build(storage="memory", dtype="fp32")
    run(model, opt, freezer, cache, 0, 6)
    state = cache.state_dict()
    _, _, _, other = build(storage="memory", dtype="bf16")
    with pytest.raises(ValueError, match="dtype=.*float32.*Construct the cache with the checkpoint's settings.*leave the cache's state out"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not an ActivationCache state_dict"):
        other.load_state_dict({"boundary": 3})
    _, _, _, fresh = build(storage="memory", dtype="fp32")
    truncated = {k: v for k, v in state.items() if k != "seen"}
    with pytest.raises(ValueError, match=r"lacks \['seen'\]"):
        fresh.load_state_dict(truncated)
    assert fresh.stats["hits"] == 0  # nothing was taken from the refused state
    fresh.load_state_dict(state)
    with pytest.raises(RuntimeError, match="fresh cache"):
        cache.load_state_dict(state)  # this one has run already


def test_a_cache_the_audit_turned_off_stays_off(tmp_path):
    model, opt, freezer, cache = build(storage="memory", dtype="fp32")
    cache.enabled, cache.reason = False, "audit: the cached activation of sample 3 differs"
    state = cache.state_dict()
    _, _, _, fresh = build(storage="memory", dtype="fp32")
    fresh.load_state_dict(state)
    assert not fresh.enabled and fresh.reason.startswith("audit")


def test_a_storage_fault_is_not_carried_into_the_resumed_run(tmp_path, monkeypatch):
    """A full disk turned the cache off, and the checkpoint carried that: a run resumed on a new
    path, on a disk with room, kept the cache off for good, without a word (review87). Only a
    verdict on the data or model (the audit's) is carried."""
    import errno

    from smartfrz_fast.cache import storage as storage_mod

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_mod.os, "posix_fallocate", no_space)
    part = build(storage="mmap", dtype="fp32", path=str(tmp_path / "small" / "c.bin"))
    with pytest.warns(UserWarning, match=r"ActivationCache is off .*\[Errno 28\]"):
        run(*part, 0, SPLIT)
    assert not part[3].enabled
    checkpoint(tmp_path / "ckpt.pt", *part, rows=False)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="interrupted run's cache was off .*tries its storage again"):
        resumed = resume(tmp_path / "ckpt.pt", storage="mmap", dtype="fp32", path=str(tmp_path / "big" / "c.bin"))
    run(*resumed, SPLIT, SPLIT + 8)
    assert resumed[3].enabled and resumed[3].stats["hits"] > 0, resumed[3].describe()
