"""Freezing under DDP and FSDP2: two real processes over gloo (tests/ddp_worker.py), plus the
refusals, checked in this process on a one-rank gloo group."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from smartfrz_fast import SmartFreezer, StaticFreeze
from smartfrz_fast.distributed import FreezableDDP, unwrap

from conftest import free_port

HERE = Path(__file__).parent
STEPS_IN_WORKER = 14  # ddp_worker.STEPS


def run_worker(mode, tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "ddp_worker.py"), mode, str(tmp_path), str(free_port())],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    reference = torch.load(tmp_path / "reference.pt") if (tmp_path / "reference.pt").exists() else None
    return ranks, reference


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("mode", ["rewrap", "unused", "fsdp2", "cache_rewrap", "cache_unused"])
def test_two_ranks_freeze_together_and_stay_in_sync(mode, tmp_path):
    (r0, r1), ref = run_worker(mode, tmp_path)
    # The policy proposes different prefixes on each rank ...
    assert r0["proposals"] != r1["proposals"]
    assert [p for _, p in r0["proposals"]] != [p for _, p in r1["proposals"]]
    # ... yet both ranks froze the same units at the same steps: rank 0's.
    assert r0["events"] == r1["events"] == [(3, 1), (6, 2), (9, 3), (12, 4)]
    # Units are found on the inner module (no "module." prefix), same on every rank.
    assert r0["units"] == r1["units"] and r0["units"][0] == "0.0+0.1"
    # Weights identical across ranks after the freezes and more steps.
    assert max_diff(r0["state"], r1["state"]) == 0.0
    # ... and equal to one process training on both ranks' batches (same schedule); only
    # the order of float sums differs (all-reduce mean vs batch mean).
    assert ref["events"] == r0["events"]
    assert max_diff(r0["state"], ref["state"]) < 1e-5
    for r in (r0, r1):
        assert r["frozen_grads_none"]
        assert r["optimizer_params"] == 2 * 2 + 2  # two trainable blocks (Linear+LayerNorm) + head
        assert r["optimizer_state"] == r["optimizer_params"]  # frozen momentum buffers deleted
    if mode in ("rewrap", "cache_rewrap"):
        assert r0["rewraps"] == r1["rewraps"] == 4
    if mode.startswith("cache"):
        # The activation cache ran under DDP: the suffix's gradients were all-reduced (weights
        # equal across ranks and to the cache-free one-process run, above) while each rank hit
        # its own cached rows and pushed them through every deeper freeze.
        for r in (r0, r1):
            assert r["cache"]["boundary"] == 4 and r["cache"]["hits"] > 0 and r["cache"]["migrated"] > 0
            assert "Put {rank} in the path" in r["cache"]["shared_path_error"]
        assert r0["cache"]["files"] == (["cache.0.bin", "cache.1.bin"] if mode == "cache_rewrap" else [])
    # Rank 0's decision is broadcast only where the policy decides (every third step), not
    # every step.
    assert r0["broadcasts"] == r1["broadcasts"] == 4


def test_the_cache_under_plain_ddp_never_moves_rows_through_a_ranks_own_batch_statistics(tmp_path):
    # at a freeze, rank 1 pushed its rows through BatchNorm statistics of its own; DDP's next
    # forward put rank 0's in their place without a version bump: stale rows, 6.8e-3 in weights
    (tmp_path / "plain").mkdir()
    (tmp_path / "cached").mkdir()
    (_, plain), _ = run_worker("unused_bn", tmp_path / "plain")
    (r0, r1), _ = run_worker("cache_unused_bn", tmp_path / "cached")
    assert r1["events"] == plain["events"] == [(3, 1), (6, 2), (9, 3), (12, 4)]
    assert r0["cache"]["hits"] > 0 and r1["cache"]["hits"] > 0
    weights = [k for k in plain["state"] if "running" not in k and "num_batches" not in k]
    assert max_diff({k: r0["state"][k] for k in weights}, {k: r1["state"][k] for k in weights}) == 0.0
    assert max_diff(r1["state"], plain["state"]) < 1e-6  # rank 1 with the cache as without it


@pytest.mark.parametrize("scenario", ["hold_one_rank", "close_unfreeze", "close_unfreeze_cache", "resume_assign",
                                      "smartfrz_set_up_lengths", "extra_step_schedule", "extra_step_adaptive",
                                      "join_throw_rebuild"])
def test_what_the_users_code_does_under_ddp_keeps_the_ranks_in_step(scenario, tmp_path):
    # each drifted apart silently: a layer held on one rank clamped that rank's freeze alone; the
    # DDP inside FreezableDDP kept averaging only the parameters it was built over (none of the
    # layers close() let train again, none of the tensors load_state_dict(assign=True) put in)
    proc = subprocess.run([sys.executable, str(HERE / "ddp_user_worker.py"), scenario, str(tmp_path),
                           str(free_port())], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["params"], r1["params"])
    if scenario == "hold_one_rank":  # rank 1's hold (until step 6, a window of 4) holds both
        assert r0["timeline"] == r1["timeline"] == [(10, 2)]
    if scenario.startswith("close_unfreeze"):
        assert r0["frozen_layer_moved"]
    if scenario == "resume_assign":
        assert torch.equal(r0["params"], r0["uninterrupted"])
    if scenario == "smartfrz_set_up_lengths":  # the ranks' FLOP shares differ, what they go by does not
        assert r0["limits"][0] != r1["limits"][0] and r0["limits"][1] == r1["limits"][1]
        assert r0["timeline"] == r1["timeline"]
    if scenario.startswith("extra_step"):  # rank 1's extra call is not counted (review40)
        assert r0["timeline"] == r1["timeline"] == [(6, 2)] and r0["step_count"] == r1["step_count"] == 12
    if scenario == "join_throw_rebuild":  # gloo aborted after the rebuild inside the join (review40)
        assert "exhausted" in r0["error"] and "exhausted" in r1["error"] and r0["timeline"] == [(3, 2)]


def test_ranks_with_different_settings_are_refused(tmp_path):
    # FreezeOut/LinearFreeze with another total_steps per rank froze at other steps: DDP averaged
    # a frozen rank's zeros into the other's gradients, and FreezableDDP's rewrap hung
    (r0, r1), _ = run_worker("mismatch", tmp_path)
    for rank, r in enumerate((r0, r1)):
        assert f"the ranks were given different settings (rank {rank}: total_steps={14 + rank}" in r["error"]


def test_fsdp2_nonfinite_weights_in_one_shard_stop_every_rank(tmp_path):
    # each rank checked only its own shard: the ranks froze [3, 1] units and the next backward hung
    (r0, r1), _ = run_worker("fsdp2_nan", tmp_path)
    assert r0["frozen"] == r1["frozen"] == 1


def test_schedule_policy_needs_no_broadcast_and_matches_one_process(tmp_path):
    # LinearFreeze depends only on the step: every rank computes the same int, nothing is
    # broadcast, and the timeline is the single-process one (same steps, same prefixes).
    (r0, r1), ref = run_worker("schedule", tmp_path)
    assert r0["broadcasts"] == r1["broadcasts"] == 0
    assert r0["events"] == r1["events"] == ref["events"] and len(r0["events"]) >= 2
    assert max_diff(r0["state"], r1["state"]) == 0.0
    assert max_diff(r0["state"], ref["state"]) < 1e-5


@pytest.mark.slow
def test_fsdp2_autofreeze_on_sharded_gradients(tmp_path):
    # AutoFreeze reads per-unit gradient norms: under FSDP2 each rank norms its shards and the
    # engine sums them over the ranks; decisions still come from rank 0.
    (r0, r1), _ = run_worker("fsdp2_autofreeze", tmp_path)
    assert r0["events"] == r1["events"] and r0["events"]
    assert max_diff(r0["state"], r1["state"]) == 0.0
    # broadcast only at AutoFreeze's interval ends after the first (steps 6, 9, 12)
    assert 1 <= r0["broadcasts"] == r1["broadcasts"] <= 3


# ---------------------------------------------------------------- refusals (conftest's one-rank group)
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_static_graph_is_refused(one_rank_group):
    model = nn.parallel.DistributedDataParallel(mlp(), static_graph=True)
    with pytest.raises(ValueError, match="static_graph=True.*FreezableDDP"):
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                     example_inputs=torch.randn(2, 4))
    with pytest.raises(ValueError, match="static_graph"):
        FreezableDDP(mlp(), static_graph=True)


def test_ddp_without_find_unused_is_refused_with_advice(one_rank_group):
    model = nn.parallel.DistributedDataParallel(mlp())
    with pytest.raises(ValueError, match="find_unused_parameters=False.*FreezableDDP"):
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                     example_inputs=torch.randn(2, 4))


@pytest.mark.parametrize("setting", ["find_unused_parameters=False", "static_graph=True", "find_unused_parameters=True"])
def test_ddp_built_after_the_freezer_is_checked_at_its_first_forward(one_rank_group, setting):
    """A DDP built after the freezer, around the module the freezer was given, was not looked at:
    the first backward after the first freeze failed with torch's "Expected to have finished
    reduction in the prior iteration", naming neither (review83)."""
    inner = mlp()
    opt = torch.optim.SGD(inner.parameters(), lr=0.1)
    freezer = SmartFreezer(inner, opt, StaticFreeze(1, at_step=1), example_inputs=torch.randn(2, 4))
    key, value = setting.split("=")
    model = nn.parallel.DistributedDataParallel(nn.Sequential(inner), **{key: value == "True"})  # a parent too
    if setting != "find_unused_parameters=True":
        with pytest.raises(ValueError, match=rf"built after the freezer.*{re.escape(setting)}"):
            model(torch.randn(2, 4))
        return
    for _ in range(3):  # works as it is: trains through the freeze
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert freezer.num_frozen == 1


def test_a_part_of_the_model_wrapped_in_ddp_without_find_unused_is_refused_at_construction(one_rank_group):
    """DDP around a part of the model (model.body = DDP(body)) was not looked at: the first backward
    after a freeze failed in DDP's own reducer, steps later, never naming FreezableDDP."""
    def model(**ddp_kwargs):
        return nn.Sequential(nn.parallel.DistributedDataParallel(mlp(), **ddp_kwargs), nn.Linear(2, 2))

    with pytest.raises(ValueError, match=r"DistributedDataParallel around the model's '0' with "
                                         r"find_unused_parameters=False.*FreezableDDP"):
        m = model()
        SmartFreezer(m, torch.optim.SGD(m.parameters(), lr=0.1), StaticFreeze(1), example_inputs=torch.randn(2, 4))
    m = model(find_unused_parameters=True)  # what DDP needs to let a part of its module freeze
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    freezer = SmartFreezer(m, opt, StaticFreeze(1, at_step=1), example_inputs=torch.randn(2, 4))
    for _ in range(3):
        m(torch.randn(4, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert freezer.num_frozen == 1


def test_a_head_wrapped_in_ddp_that_never_freezes_is_not_refused(one_rank_group):
    """keep_trainable's head never freezes, so DDP around it alone (find_unused_parameters=False,
    DDP's default) is fine: it was refused as if it wrapped the body (review48)."""
    torch.manual_seed(0)
    model = nn.Sequential(mlp(), nn.parallel.DistributedDataParallel(nn.Linear(2, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=1), example_inputs=torch.randn(2, 4))
    for _ in range(3):
        model(torch.randn(4, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert freezer.num_frozen == 2 and freezer.units[-1].name == "1.module"


def test_fsdp1_is_refused_with_advice(one_rank_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    inner = mlp()
    model = nn.Sequential(FullyShardedDataParallel(inner, device_id=torch.device("cpu")))
    with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
        unwrap(model)
    with pytest.raises(ValueError, match="FSDP1"):
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                     example_inputs=torch.randn(2, 4))


def test_wrapped_model_on_one_rank_trains_like_plain(one_rank_group):
    # FreezableDDP over one rank: units found on the inner module, lazily at first forward;
    # the freeze re-wraps DDP, and training matches the unwrapped model exactly.
    results = []
    for wrap in (False, True):
        inner = mlp()
        model = FreezableDDP(inner) if wrap else inner
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=3))
        for step in range(6):
            g = torch.Generator().manual_seed(step)
            model(torch.randn(5, 4, generator=g)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
        assert [u.name for u in freezer.units] == ["0", "2", "4"]
        assert freezer.module is inner
        results.append({k: v.clone() for k, v in inner.state_dict().items()})
    assert model.rewraps == 1 and model.state_dict().keys() == {f"module.{k}" for k in results[0]}
    assert max_diff(*results) == 0.0


def test_parameters_replaced_inside_plain_ddp_warn_that_ddp_still_averages_the_old_ones(one_rank_group):
    # the freezer follows load_state_dict(assign=True); DDP does not: the ranks drifted silently
    inner = mlp()
    model = torch.nn.parallel.DistributedDataParallel(inner, find_unused_parameters=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=30), example_inputs=torch.randn(5, 4), total_steps=40)
    state = {k: v.clone() for k, v in inner.state_dict().items()}
    inner.load_state_dict(state, assign=True)
    with pytest.warns(UserWarning, match="DDP still averages the gradients of the tensors it was built over"):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        freezer.step()


def test_fsdp2_weight_history_on_one_rank_matches_an_unsharded_model(one_rank_group):
    # One rank owns every shard: the history must be the unsharded model's, bit for bit.
    from torch.distributed.fsdp import fully_shard

    from smartfrz_fast import FreezePolicy

    class Keeps(FreezePolicy):
        needs_history = True

        def decide(self, step, frozen):
            return None

    histories = []
    for shard in (False, True):
        model = mlp()
        if shard:
            fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = SmartFreezer(model, opt, Keeps(), example_inputs=torch.randn(2, 4), window=3, sample_size=8)
        torch.manual_seed(1)
        for _ in range(4):
            model(torch.randn(5, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
        histories.append(freezer.history.history)
    assert histories[0].abs().sum() > 0 and torch.equal(histories[0], histories[1])


@pytest.mark.slow
def test_fsdp2_weight_history_is_the_one_process_history(tmp_path):
    # Each rank gathers the sampled positions in its own shards (the head's [3, 12] weight is
    # split 2 + 1 rows: uneven) and one all-reduce completes the snapshot: both ranks hold the
    # same history, and it is the history one process training on both ranks' batches keeps.
    (r0, r1), ref = run_worker("fsdp2_history", tmp_path)
    assert r0["events"] == r1["events"] == ref["events"] == [(3, 1), (6, 2), (9, 3), (12, 4)]
    assert max_diff(r0["state"], r1["state"]) == 0.0
    assert len(r0["histories"]) == len(ref["histories"]) >= STEPS_IN_WORKER - 1
    for (step, h0, count0), (_, h1, count1), (ref_step, h_ref, count_ref) in zip(
            r0["histories"], r1["histories"], ref["histories"]):
        assert step == ref_step and count0 == count1 == count_ref
        assert torch.equal(h0, h1)
        assert (h0 - h_ref).abs().max() < 1e-5  # float sums in another order, as the weights
    assert r0["histories"][-1][1].abs().amin(dim=-1).gt(0).any()  # real weights, not zeros


@pytest.mark.slow
def test_fsdp2_smartfrz_decides_the_same_on_every_rank(tmp_path):
    (r0, r1), _ = run_worker("fsdp2_smartfrz", tmp_path)
    assert r0["events"] == r1["events"] and r0["events"]
    # identical histories, identical scores (NaN: a unit past the prefix's end, not scored)
    torch.testing.assert_close(r0["probabilities"], r1["probabilities"], rtol=0, atol=0, equal_nan=True)
    assert max_diff(r0["state"], r1["state"]) == 0.0


def test_activation_cache_refuses_what_it_cannot_run_under(one_rank_group, tmp_path, monkeypatch):
    # The cache runs under DDP (the two-process tests above); what it cannot run under is
    # refused with advice.
    from torch.distributed.fsdp import fully_shard

    from smartfrz_fast.cache import ActivationCache

    def freezer_on(model):
        return SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                            example_inputs=torch.randn(2, 4))

    # FSDP2: its root forward gathers the parameters, and the cache calls the blocks directly.
    sharded = mlp()
    fully_shard(sharded)
    with pytest.raises(NotImplementedError, match="does not support FSDP yet.*FreezableDDP"):
        ActivationCache(freezer_on(sharded), num_samples=8, deterministic=True)
    # A FreezableDDP the freezer does not know would never be rebuilt after a freeze.
    inner = mlp()
    plain = freezer_on(inner)
    cache = ActivationCache(plain, num_samples=8, deterministic=True)
    with pytest.raises(ValueError, match="not given to the SmartFreezer"):
        cache.wrap(FreezableDDP(inner))
    # DDP without find_unused_parameters would wait for the frozen prefix's gradients.
    with pytest.raises(ValueError, match="find_unused_parameters=False"):
        cache.wrap(nn.parallel.DistributedDataParallel(inner))
    # A torch whose DDP lacks the pieces of its forward the cache runs inside.
    from smartfrz_fast.cache import core

    unused_ddp = nn.parallel.DistributedDataParallel(inner, find_unused_parameters=True)
    monkeypatch.setattr(core, "_DDP_FORWARD_PARTS", core._DDP_FORWARD_PARTS + ("_renamed_in_a_later_torch",))
    with pytest.raises(NotImplementedError, match="has no _renamed_in_a_later_torch"):
        cache.wrap(unused_ddp)
    monkeypatch.undo()
    # One mmap file per rank: "{rank}" in the path names it.
    ranked = ActivationCache(plain, num_samples=8, deterministic=True, storage="mmap",
                             path=str(tmp_path / "rows.{rank}.bin"))
    assert ranked.path == str(tmp_path / "rows.0.bin")


def test_activation_cache_under_ddp_on_one_rank_equals_no_ddp(one_rank_group):
    # The cached forward inside DDP's forward: same losses and weights as without DDP.
    from smartfrz_fast.cache import ActivationCache

    results = []
    for wrap in (False, True):
        inner = mlp()
        model = FreezableDDP(inner) if wrap else inner
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=2), example_inputs=torch.randn(2, 4))
        cache = ActivationCache(freezer, num_samples=10, deterministic=True)
        cached = cache.wrap()
        xs = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
        losses = []
        for step in range(8):
            ids = torch.arange(5) + 5 * (step % 2)
            loss = cached(xs[ids], ids).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
            losses.append(loss.item())
        assert cache.active and cache.stats["hits"] > 0
        results.append((losses, {k: v.clone() for k, v in inner.state_dict().items()}))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


@pytest.mark.parametrize("setup", ["example_inputs", "first forward"])
def test_fsdp2_root_owning_parameters(one_rank_group, setup):
    # fully_shard per block, then the root, which owns layers itself (a transformer's embeddings
    # and head): the traced set-up forward left the root's parameters unsharded, the guard
    # recorded those, and freezer.state_dict() took the sharded ones for a changed model
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), *[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)],
                          nn.Linear(8, 3))
    for block in list(model)[1:3]:
        fully_shard(block)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lazy = setup == "first forward"
    freezer = SmartFreezer(model, opt, StaticFreeze(2, at_step=2), total_steps=4,
                           example_inputs=None if lazy else torch.randn(2, 4))
    if lazy:
        with pytest.raises(ValueError, match="Pass example_inputs"):
            model(torch.randn(5, 4))
        return
    for step in range(4):
        model(torch.randn(5, 4, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert freezer.num_frozen == 2 and not model[0].weight.requires_grad
    assert freezer.state_dict()["num_frozen"] == 2


def test_freezable_ddp_keeps_communication_hooks_across_rewraps(one_rank_group):
    # a comm hook (fp16 compression, PowerSGD) lived on the DDP object that the first freeze replaced
    import torch.distributed as dist

    calls = []

    def counting_allreduce(state, bucket):
        calls[-1] += 1
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])

    model = FreezableDDP(mlp())
    model.register_comm_hook(None, counting_allreduce)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=torch.randn(2, 4))
    for step in range(4):
        calls.append(0)
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert model.rewraps == 1 and all(n > 0 for n in calls), calls


def test_freezable_ddp_with_every_unit_frozen_keeps_no_sync_and_its_hooks(one_rank_group):
    # keep_trainable=0 froze every unit: no DDP is built then, and no_sync() failed with
    # "'Sequential' object has no attribute 'no_sync'"; a hook registered then was lost
    import torch.distributed as dist

    calls = []

    def counting_allreduce(state, bucket):
        calls.append(1)
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])

    model = FreezableDDP(mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, StaticFreeze(3), example_inputs=torch.randn(2, 4), keep_trainable=0)
    freezer.freeze_to(3)
    model(torch.randn(5, 4))
    assert model.ddp is model.module
    with model.no_sync():  # nothing to hold back
        model(torch.randn(5, 4))
    model.register_comm_hook(None, counting_allreduce)
    freezer.close()  # every layer trains again: a DDP is built, with the hook
    model.module.requires_grad_(True)
    model(torch.randn(5, 4)).square().mean().backward()
    assert isinstance(model.ddp, nn.parallel.DistributedDataParallel) and calls


def test_the_inner_module_of_a_freezable_ddp_is_refused(one_rank_group):
    inner = mlp()
    model = FreezableDDP(inner)
    with pytest.raises(ValueError, match="give SmartFreezer the FreezableDDP itself"):
        SmartFreezer(inner, torch.optim.SGD(model.parameters(), lr=0.1), StaticFreeze(1),
                     example_inputs=torch.randn(2, 4))


def test_what_cannot_freeze_is_refused_up_front(one_rank_group):
    # ZeRO kept state on frozen parameters and failed its state_dict(); Egeria under FSDP2
    # crashed mid-run copying sharded weights into its reference
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from smartfrz_fast import Egeria

    model = mlp()
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="ZeroRedundancyOptimizer.*use FSDP2"):
        SmartFreezer(model, zero, StaticFreeze(1), example_inputs=torch.randn(2, 4))
    model = mlp()
    policy = Egeria(model, torch.randn(4, 4))
    fully_shard(model)
    with pytest.raises(ValueError, match="Egeria does not run under FSDP2"):
        SmartFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), policy, example_inputs=torch.randn(2, 4))
    with pytest.raises(ValueError, match="Egeria does not run under FSDP2"):  # built after fully_shard
        Egeria(model, torch.randn(4, 4))  # (it advised building Egeria before wrapping, review83)


def test_fsdp2_units_and_attention_are_those_of_the_unsharded_model(one_rank_group):
    # nn.MultiheadAttention reads its out_proj's weight without calling out_proj: under FSDP2 the
    # unsharded weight it reads was never watched, so out_proj was left out of the units
    from torch.distributed.fsdp import fully_shard

    from smartfrz_fast.units import discover_units

    def encoder():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(50, 16), *[nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
                                                     for _ in range(2)], nn.Linear(16, 2))

    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    plain = discover_units(encoder(), (ids,))
    model = encoder()
    for layer in model[1:3]:
        fully_shard(layer)
    fully_shard(model)
    sharded = discover_units(model, (ids,))
    assert sharded.untraced_parameters == [] and plain.untraced_parameters == []
    assert [(u.name, u.attention) for u in sharded.units] == [(u.name, u.attention) for u in plain.units]
    assert "1.self_attn.out_proj+1.norm1" in [u.name for u in sharded.units]
    assert [u.name for u in sharded.units if u.attention][0] == "1.self_attn"
