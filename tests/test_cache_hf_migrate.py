"""Migrating cached rows through newly frozen Hugging Face layers: each sample's side inputs
(attention mask, position ids) are stored with its row, and at a deeper freeze the rows are
pushed through the newly frozen layers with them. Migrated rows equal rows computed from the
input at the new boundary; changed side inputs turn the cache off; checkpoints carry them."""

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from smartfrz_fast import SmartFreezer, StaticFreeze  # noqa: E402
from smartfrz_fast.cache import ActivationCache, Inputs  # noqa: E402
from smartfrz_fast.cache import core  # noqa: E402
from tests.test_cache_hf import N, PADDING, build, units_through_layer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:SmartFreezer. 1 trainable parameter")


def setup(kind, freeze=True, **cache_args):
    model = build(kind)  # dropout 0.2: the prefix must run in eval mode
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, 10 ** 9), example_inputs=PADDING["none"][0][:2])
    if freeze:  # embeddings and layer 0 (a resumed run takes its freeze from the checkpoint)
        freezer.freeze_to(units_through_layer(freezer, 0))
    cache = ActivationCache(freezer, num_samples=N, deterministic=True, **cache_args)
    model.train()
    return model, opt, freezer, cache


def fill(cache, ids, mask, extra=None, order=(5, 0, 11, 2, 7, 9, 1, 4, 10, 3, 8, 6)):
    """One pass over every sample, in batches of 4 in a shuffled order (rows stored per batch)."""
    wrapped = cache.wrap()
    order = torch.tensor(order)
    for i in range(0, N, 4):
        index = order[i:i + 4]
        kwargs = {} if extra is None else {k: v[index] for k, v in extra.items()}
        wrapped(ids[index], index, attention_mask=mask[index], **kwargs)


def cached_rows(cache):
    ids = torch.arange(N)
    slots = cache._store.lookup(ids)
    assert bool((slots >= 0).all()), cache.describe()
    return cache._store.read(slots, *cache._act)


def rows_from_inputs(cache, ids, mask, extra=None):
    """The prefix output at the cache's boundary, computed from the inputs (eval mode)."""
    with cache._eval_mode(0, cache.boundary), torch.no_grad():
        return cache.chain.run(Inputs((ids,), {"attention_mask": mask, **(extra or {})}), 0, cache.boundary)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("kind", ["bert-cls", "llama-lm", "gpt2-lm", "gpt2"])
def test_migrated_rows_equal_rows_computed_at_the_new_boundary(kind, padding, monkeypatch):
    monkeypatch.setattr(core, "MIGRATE_CHUNK", 5)  # chunks of mixed masks, a ragged last one
    ids, mask = PADDING[padding]
    model, opt, freezer, cache = setup(kind)
    fill(cache, ids, mask)
    assert cache.boundary == 2 and cache.rows_cached == N
    freezer.freeze_to(units_through_layer(freezer, 1))
    assert cache.boundary == 3 and cache.stats["migrated"] == N and cache.rows_cached == N, cache.describe()
    expected = rows_from_inputs(cache, ids, mask)
    torch.testing.assert_close(cached_rows(cache), expected, rtol=1e-6, atol=1e-6)
    # the stored masks mattered: the same rows pushed through without them differ
    with torch.no_grad():
        unmasked = rows_from_inputs(cache, ids, torch.ones_like(mask))
    assert (unmasked - expected).abs().max() > 1e-3
    # and the next pass hits every migrated row: nothing is recomputed
    misses = cache.stats["misses"]
    fill(cache, ids, mask)
    assert cache.stats["misses"] == misses and cache.active


def test_gpt2_rows_migrate_with_their_position_ids():
    ids, mask = PADDING["left"]
    extra = {"position_ids": (mask.cumsum(1) - 1).clamp(min=0)}  # per sample: positions skip the padding
    model, opt, freezer, cache = setup("gpt2-lm")
    fill(cache, ids, mask, extra)
    freezer.freeze_to(units_through_layer(freezer, 2))  # two layers at once
    assert cache.boundary == 4 and cache.stats["migrated"] == N
    torch.testing.assert_close(cached_rows(cache), rows_from_inputs(cache, ids, mask, extra), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("audit_rows", [4, 0])
def test_a_sample_back_with_another_mask_is_computed_again_with_it(audit_rows):
    # the mask is part of the sample's input: its row is recomputed and replaced, and the new
    # mask kept with it, so a deeper freeze pushes the row through the next layer with the
    # mask it came with (this turned the cache off before; without an audit, at the freeze)
    ids, mask = PADDING["right"]
    model, opt, freezer, cache = setup("bert-cls", audit_rows=audit_rows)
    fill(cache, ids, mask)
    other = mask.clone()
    other[3, -1] = 1 - other[3, -1]
    wrapped = cache.wrap()
    index = torch.tensor([3, 0])
    with pytest.warns(UserWarning, match="sample id 3 came with another input than its cached row"):
        wrapped(ids[index], index, attention_mask=other[index])
    assert cache.active and cache.stats["input_changed"] == 1

    def row_is_fresh():  # sample 3's row is the prefix's output for the mask it came with
        fresh = cache._compute_prefix(Inputs((ids[3:4],), {"attention_mask": other[3:4]}))[0]
        torch.testing.assert_close(cached_rows(cache)[3].to(fresh.dtype), fresh, rtol=1e-5, atol=1e-5)
    row_is_fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        freezer.freeze_to(units_through_layer(freezer, 1))
    assert cache.active and cache.stats["migrated"] > 0
    row_is_fresh()


def resumed(kind, state, **cache_args):
    model, opt, freezer, cache = setup(kind, freeze=False, **cache_args)
    model.load_state_dict(state["model"])
    freezer.load_state_dict(state["freezer"])
    opt.load_state_dict(state["optimizer"])
    cache.load_state_dict(state["cache"])
    return model, opt, freezer, cache


CASES = {  # name: (cache args, save rows, rows migrated after the resume)
    "memory-rows": (dict(storage="memory"), True, N),
    "memory-refill": (dict(storage="memory"), False, N),  # refilled after the resume, with their masks
    "mmap-rows": (dict(storage="mmap"), True, N),
    "mmap": (dict(storage="mmap"), False, N),  # rows in the file, their masks in the checkpoint
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_keeps_the_side_inputs_with_rows(case, tmp_path):
    args, rows, migrated = CASES[case]
    if args["storage"] == "mmap":
        args = dict(args, path=str(tmp_path / "rows.bin"))
    ids, mask = PADDING["left"]
    model, opt, freezer, cache = setup("llama-lm", **args)
    fill(cache, ids, mask)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "freezer": freezer.state_dict(),
             "cache": cache.state_dict(rows=rows)}
    state = torch.load(_save(state, tmp_path / "ckpt.pt"), weights_only=False)
    if rows or args["storage"] == "mmap":
        assert torch.equal(state["cache"]["side"]["values"]["attention_mask"][state["cache"]["side"]["ids"]
                           .argsort()], mask)
    cache.close()

    model, opt, freezer, cache = resumed("llama-lm", state, **args)
    fill(cache, ids, mask)  # the first forward restores the rows (or refills them)
    freezer.freeze_to(units_through_layer(freezer, 1))
    assert cache.boundary == 3 and cache.stats["migrated"] == migrated, cache.describe()
    fill(cache, ids, mask)
    torch.testing.assert_close(cached_rows(cache), rows_from_inputs(cache, ids, mask), rtol=1e-6, atol=1e-6)
    cache.close()


def _save(state, path):
    torch.save(state, path)
    return path


def test_a_reopened_mmap_file_without_side_inputs_drops_rows_at_the_next_freeze(tmp_path):
    # reuse=True reopens the rows of a file without a checkpoint: their masks are unknown, so a
    # deeper freeze drops them (never pushes them through with a guessed mask); they refill.
    ids, mask = PADDING["left"]
    path = str(tmp_path / "rows.bin")
    model, opt, freezer, cache = setup("llama-lm", storage="mmap", path=path)
    fill(cache, ids, mask)
    weights = model.state_dict()
    cache.close()
    model, opt, freezer, cache = setup("llama-lm", storage="mmap", path=path, reuse=True)
    model.load_state_dict(weights)
    fill(cache, ids, mask)
    assert cache.stats["misses"] == 0 and cache.rows_cached == N  # the file's rows were hit
    freezer.freeze_to(units_through_layer(freezer, 1))
    assert cache.boundary == 3 and cache.stats["migrated"] == 0 and cache.rows_cached == 0
    fill(cache, ids, mask)
    torch.testing.assert_close(cached_rows(cache), rows_from_inputs(cache, ids, mask), rtol=1e-6, atol=1e-6)
    cache.close()


def test_damaged_side_inputs_in_a_state_are_not_used_to_migrate(tmp_path):
    # A flipped mask entry in the checkpoint's side inputs would push that sample's row through
    # the next layers with the wrong mask: its checksum fails, the row is counted and dropped at
    # the deeper freeze (refilled from its real input), the others migrate.
    ids, mask = PADDING["left"]
    args = dict(storage="mmap", path=str(tmp_path / "rows.bin"))
    model, opt, freezer, cache = setup("llama-lm", **args)
    fill(cache, ids, mask)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "freezer": freezer.state_dict(),
             "cache": cache.state_dict()}
    cache.close()
    side = state["cache"]["side"]
    victim = int(torch.randint(N, ()))
    row = int((side["ids"] == victim).nonzero())
    side["values"]["attention_mask"][row, 0] ^= 1
    model, opt, freezer, cache = resumed("llama-lm", state, **args)
    misses = cache.stats["misses"]
    with pytest.warns(UserWarning, match=f"sample {victim} has damaged side inputs"):
        fill(cache, ids, mask)
    assert cache.stats["bad_rows"] == 1 and cache.stats["misses"] == misses, cache.describe()  # rows still hit
    freezer.freeze_to(units_through_layer(freezer, 1))
    assert cache.stats["migrated"] == N - 1 and cache.rows_cached == N - 1
    fill(cache, ids, mask)
    torch.testing.assert_close(cached_rows(cache), rows_from_inputs(cache, ids, mask), rtol=1e-6, atol=1e-6)
    cache.close()
