"""Data sieving across DDP ranks: two real processes over gloo (tests/sieve_ddp_worker.py), plus
one-rank checks in this process."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smartfrz_fast import SievingSampler
from smartfrz_fast.sieve import DistributedSievingSampler

from conftest import free_port

HERE = Path(__file__).parent


def run_worker(mode, tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "sieve_ddp_worker.py"), mode, str(tmp_path), str(free_port())],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_two_ranks_shard_the_active_set_and_rotate_identically(tmp_path):
    r0, r1 = run_worker("sampler", tmp_path)
    assert r0["a_distributed_sampler"] and r1["a_distributed_sampler"]
    for r in (r0, r1):  # refused on every rank, naming the setting
        assert "ranks were given different settings" in r["refused"] and "seed=" in r["refused"]
    ref = r0["reference"]
    assert r0["rotations"] == r1["rotations"] == 7
    visited = set()
    for e, (a, b) in enumerate(zip(r0["epochs"], r1["epochs"])):
        active = set(a["active"])
        assert len(active) == 25 and a["len"] == b["len"] == 13
        # shards cover the active set; they overlap only in the one padding sample (2 x 13 = 25 + 1)
        assert set(a["shard"]) | set(b["shard"]) == active
        assert len(set(a["shard"]) & set(b["shard"])) == 1
        # every rank holds the same state after combining the losses ...
        assert a["active"] == b["active"] and a["pool"] == b["pool"]
        assert torch.equal(a["loss"], b["loss"])
        # ... and it is what one process fed every active sample's loss holds
        assert a["active"] == ref[e]["active"] and a["pool"] == ref[e]["pool"]
        assert torch.equal(a["loss"], ref[e]["loss"]), e
        visited |= active
    assert visited == set(range(41))  # the rotation visits the whole dataset
    # resumed from the state_dict after epoch 3: the same shards for the rest of the run
    for r in (r0, r1):
        assert r["tail"] == [ep["shard"] for ep in r["epochs"][3:]]


def test_ddp_with_freezing_and_sieving_ends_bit_identical(tmp_path):
    r0, r1 = run_worker("ddp", tmp_path)
    assert r0["steps_per_epoch"] == r1["steps_per_epoch"] == 3  # 24 active / 2 ranks / batch 4
    assert r0["events"] == r1["events"] and r0["events"]  # rank 0's AutoFreeze decisions, on both
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    s0, s1 = r0["sampler"], r1["sampler"]
    assert s0["rotations"] == 5 and s0["active"] == s1["active"] and s0["pool"] == s1["pool"]
    assert torch.equal(s0["loss"], s1["loss"])
    # the two ranks never train on the same sample in an epoch (24 active: no padding), and
    # over 6 epochs every one of the 48 samples was trained on
    per_epoch = [(set(r0["seen"][12 * e:12 * e + 12]), set(r1["seen"][12 * e:12 * e + 12])) for e in range(6)]
    assert all(len(a) == len(b) == 12 and not a & b for a, b in per_epoch)
    assert set(r0["seen"]) | set(r1["seen"]) == set(range(48))


# ---------------------------------------------------------------- one process (conftest's one-rank group)
def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedSievingSampler(10)


def test_one_rank_equals_the_single_process_sampler_and_guards_checkpoints(one_rank_group):
    loss = lambda i, e: float((i * 5 + e) % 7)  # noqa: E731
    a = DistributedSievingSampler(30, 0.5, 0.4, seed=2, momentum=0.3)
    b = SievingSampler(30, 0.5, 0.4, seed=2, momentum=0.3)
    for e in range(5):
        ids_a, ids_b = list(iter(a)), list(iter(b))
        assert ids_a == ids_b and len(a) == len(b) == 15
        a.record(torch.tensor(ids_a), torch.tensor([loss(i, e) for i in ids_a]))
        b.record(torch.tensor(ids_b), torch.tensor([loss(i, e) for i in ids_b]))
        if e == 3:  # records not yet combined: a checkpoint would lose them
            with pytest.raises(RuntimeError, match="sync"):
                a.state_dict()
    a.sync()
    assert a.active == b.active and torch.equal(a.loss, b.loss)
    assert a.state_dict()["active"] == b.state_dict()["active"]
    with pytest.raises(ValueError, match="reduction='none'"):
        a.record(torch.arange(3), torch.zeros(()))
