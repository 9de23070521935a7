"""A training run with an mmap activation cache that checkpoints every step, for
tests/test_cache_crash.py: the test kills it (SIGKILL) at random moments and inside row writes,
migrations and checkpoint writes, resumes it from its last checkpoint, and compares the final
weights with an uninterrupted run's.

``run(out, crash)`` trains from ``out/ckpt.pt`` if it exists, else from scratch, to the end
(``out/final.pt``). ``crash`` (test-only faults, injected here by patching, not in the library):
  {"write": k}   SIGKILL itself halfway through the k-th row write (data half written)
  {"save": k}    SIGKILL itself halfway through writing the k-th checkpoint
  {"commit": k}  SIGKILL itself just after the k-th cache file commit (a move to a deeper boundary
                 done, its checkpoint not yet written)
  {"slow": s}    sleep s seconds halfway through every row write (so that outside kills land there)
It appends one line per counted event to ``out/events`` ("write", "save", "commit") so that the
test knows how many there are to aim at.
"""

import io
import os
import signal
import time
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  (the optimizer imports it: here, once, in the forkserver)
from torch import nn

from smartfrz_fast import SmartFreezer, StaticFreeze
from smartfrz_fast.cache import ActivationCache
from smartfrz_fast.cache import core as core_mod
from smartfrz_fast.cache import storage as storage_mod

N, TOTAL, DEEPEN_AT, BATCH = 24, 16, 9, 8  # 3 steps an epoch; freeze 1 unit at step 2, 2 units at 9
X = torch.randn(N, 1, 6, 6, generator=torch.Generator().manual_seed(5))
Y = torch.randint(0, 5, (N,), generator=torch.Generator().manual_seed(6))
_g = torch.Generator().manual_seed(9)
BATCHES = [p[i:i + BATCH] for p in [torch.randperm(N, generator=_g) for _ in range(TOTAL // 3 + 1)]
           for i in range(0, N, BATCH)]


def build(out: Path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, 2), example_inputs=X[:2], total_steps=TOTAL)
    cache = ActivationCache(freezer, num_samples=N, deterministic=True, storage="mmap", dtype="fp32",
                            path=str(out / "cache.bin"), audit_rows=2)
    return model, opt, freezer, cache


def _event(out: Path, kind: str) -> int:
    """Count an event (in the file: the count survives kills); returns its number from 1."""
    with open(out / "events", "a") as f:
        f.write(kind + "\n")
    return sum(1 for line in open(out / "events") if line.strip() == kind)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_faults(out: Path, crash: dict) -> None:
    core_mod.MIGRATE_CHUNK = BATCH  # the move to the deeper boundary in several writes, to kill between
    real_ops = storage_mod._ops()

    class Ops:
        def __getattr__(self, name):
            return getattr(real_ops, name)

        @staticmethod
        def cache_store(values, slots, data, scales):
            n = _event(out, "write")
            half = max(1, values.shape[0] // 2)
            real_ops.cache_store(values[:half], slots[:half], data, scales)
            if crash.get("write") == n:
                _die()
            if crash.get("slow"):
                time.sleep(crash["slow"])
            real_ops.cache_store(values[half:], slots[half:], data, scales)

    storage_mod._ops = lambda: Ops()
    commit = storage_mod.MmapStorage.commit

    def commit_then_maybe_die(self, path):
        commit(self, path)
        if crash.get("commit") == _event(out, "commit"):
            _die()

    storage_mod.MmapStorage.commit = commit_then_maybe_die


def save_checkpoint(out: Path, step: int, model, opt, freezer, cache, crash: dict) -> None:
    state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "freezer": freezer.state_dict(), "cache": cache.state_dict()}  # the cache file is flushed first
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    n = _event(out, "save")
    tmp = out / "ckpt.pt.tmp"
    with open(tmp, "wb") as f:
        f.write(data[:len(data) // 2])
        if crash.get("save") == n:
            f.flush()
            _die()
        f.write(data[len(data) // 2:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / "ckpt.pt")  # the checkpoint is either the old one or this one


def run(out, crash=None) -> None:
    out, crash = Path(out), crash or {}
    torch.set_num_threads(1)
    install_faults(out, crash)
    model, opt, freezer, cache = build(out)
    start = 0
    if (out / "ckpt.pt").exists():
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        model.load_state_dict(ckpt["model"])
        freezer.load_state_dict(ckpt["freezer"])
        opt.load_state_dict(ckpt["optimizer"])
        cache.load_state_dict(ckpt["cache"])
        start = ckpt["step"]
    wrapped = cache.wrap()
    for step in range(start, TOTAL):
        if step == DEEPEN_AT:
            freezer.freeze_to(2)
        ids = BATCHES[step]
        loss = nn.functional.cross_entropy(wrapped(X[ids], ids), Y[ids])
        opt.zero_grad()
        loss.backward()
        opt.step()
        freezer.step()
        save_checkpoint(out, step + 1, model, opt, freezer, cache, crash)
    torch.save({"model": model.state_dict(), "stats": dict(cache.stats), "active": cache.active,
                "boundary": cache.boundary}, out / "final.pt")
