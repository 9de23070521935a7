"""SpFDE freezing in sparse training: masks hold through freezing, DST updates and resume."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from smartfrz_fast import SmartFreezer, SparseMasks, StaticFreeze
from smartfrz_fast.policy.base import FreezePolicy

from models import SmallCNN, batch


class HistoryOnly(FreezePolicy):
    """Keeps a weight history, freezes the first `n` units at step `at`."""

    needs_history = True

    def __init__(self, n, at):
        super().__init__()
        self.n, self.at = n, at

    def decide(self, step, frozen):
        return self.n if step == self.at else None


def sampled_positions_are_unmasked(freezer, masks):
    h = freezer.history
    by_id = {id(p): masks.bool_mask(n) for n, p in masks.params.items()}
    checked = 0
    for u, unit in enumerate(freezer.units):
        for k in range(int(h.valid[u])):
            src = h.sources[int(h.source_ids[u, k])]
            if id(src) in by_id:
                # contiguous parameters: the storage offset is the flat index
                assert bool(by_id[id(src)].reshape(-1)[int(h.offsets[u, k])]), (unit.name, k)
                checked += 1
    return checked


def test_prune_masks_history_and_freeze():
    torch.manual_seed(0)
    model = SmallCNN()
    for m in (model.conv1, model.conv2, model.conv3):
        prune.l1_unstructured(m, "weight", amount=0.6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    freezer = SmartFreezer(model, opt, policy=HistoryOnly(2, at=4), example_inputs=batch(0)[0],
                           sample_size=64, window=4, decision_delay=0)
    masks = SparseMasks(model).attach(freezer)
    assert set(masks.params) == {"conv1.weight_orig", "conv2.weight_orig", "conv3.weight_orig"}
    assert sampled_positions_are_unmasked(freezer, masks) > 0
    # conv1 (72 weights, 60% pruned): fewer unmasked weights than K, all of them drawn
    assert int(freezer.history.valid[0]) == int(masks.bool_mask("conv1.weight_orig").sum()) + 8 + 16
    frozen_w = None
    for step in range(8):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
        assert masks.violations() == {}
        if step == 3:
            frozen_w = model.conv2.weight_orig.detach().clone()
    assert freezer.num_frozen == 2
    assert masks.frozen == {"conv1.weight_orig", "conv2.weight_orig"}
    assert torch.equal(model.conv2.weight_orig, frozen_w)
    assert torch.equal(model.conv2.weight, model.conv2.weight_orig)  # w == w_orig * mask


@pytest.mark.parametrize("change", ["recreated optimizer", "assign=True"])
def test_masks_follow_a_recreated_optimizer_and_replaced_parameters(change):
    # both changes the freezer adapts to: the masks must keep holding on what trains now
    torch.manual_seed(0)
    model = SmallCNN()  # masks given (not torch's prune): the masked weights get gradients
    given = {n: torch.rand(p.shape) > 0.5 for n, p in model.named_parameters() if p.dim() == 4}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    freezer = SmartFreezer(model, opt, policy=HistoryOnly(1, at=6), example_inputs=batch(0)[0],
                           sample_size=64, window=4, decision_delay=0)
    masks = SparseMasks(model, given).attach(freezer)
    for step in range(10):
        if step == 3 and change == "recreated optimizer":
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if step == 3 and change == "assign=True":
            model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
        for name, p in model.named_parameters():
            if name in masks.params:
                assert masks.params[name] is p
                assert not bool(((p.detach() != 0) & ~masks.bool_mask(name)).any()), (step, name)
    assert masks.violations() == {} and freezer.num_frozen == 1


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 4))


def random_masks(model, step, density=0.5):
    g = torch.Generator().manual_seed(100 + step)
    return {f"{i}.weight": torch.rand(model[i].weight.shape, generator=g) < density for i in (0, 2)}


def run_dst(steps, ckpt_at=None, resume=None):
    """Dict masks, prune-and-grow every 3 steps, first unit frozen at step 5."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    freezer = SmartFreezer(model, opt, policy=HistoryOnly(1, at=5), example_inputs=torch.randn(2, 10),
                           sample_size=32, window=3, decision_delay=0)
    masks = SparseMasks(model, random_masks(model, 0)).attach(freezer)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        masks.load_state_dict(resume["masks"])
        freezer.load_state_dict(resume["freezer"])
        opt.load_state_dict(resume["opt"])
        start = resume["step"]
    ckpt = None
    for step in range(start, steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 10, generator=g), torch.randint(0, 4, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
        if step % 3 == 2:
            with pytest.warns(UserWarning, match="frozen") if freezer.num_frozen else _nowarn():
                changed = masks.update(random_masks(model, step))
            assert "0.weight" not in changed or freezer.num_frozen == 0
        assert masks.violations() == {}
        assert sampled_positions_are_unmasked(freezer, masks) > 0
        if step + 1 == ckpt_at:
            ckpt = copy.deepcopy({"model": model.state_dict(), "masks": masks.state_dict(), "freezer": freezer.state_dict(),
                    "opt": opt.state_dict(), "step": step + 1})  # state_dicts alias live tensors
    return model, masks, freezer, ckpt


class _nowarn:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_dynamic_masks_freeze_with_their_layer_and_resume_exactly():
    model, masks, freezer, ckpt = run_dst(12, ckpt_at=7)
    assert freezer.num_frozen == 1 and masks.frozen == {"0.weight"}
    # unit 0's mask is the one it had when it froze (at step 5): the update at step 5 came after
    assert torch.equal(masks.bool_mask("0.weight"), random_masks(model, 2)["0.weight"])
    assert torch.equal(masks.bool_mask("2.weight"), random_masks(model, 11)["2.weight"])
    model2, masks2, freezer2, _ = run_dst(12, resume=ckpt)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert freezer2.num_frozen == 1 and masks2.frozen == masks.frozen
    assert torch.equal(freezer.history.history, freezer2.history.history)
    # the freezer's state loaded before the masks': the error named only shapes and channels_last
    model3 = mlp()
    freezer3 = SmartFreezer(model3, torch.optim.Adam(model3.parameters(), lr=1e-2), policy=HistoryOnly(1, at=5),
                            example_inputs=torch.randn(2, 10), sample_size=32, window=3, decision_delay=0)
    SparseMasks(model3, random_masks(model3, 0)).attach(freezer3)
    model3.load_state_dict(ckpt["model"])
    with pytest.raises(ValueError, match=r"in sparse training, its masks do: .*then masks.load_state_dict, then "
                                         r"freezer.load_state_dict"):
        freezer3.load_state_dict(ckpt["freezer"])


def test_restrict_keeps_columns_and_backfills_pruned_with_zero():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, policy=HistoryOnly(0, at=10**9), example_inputs=torch.randn(2, 10),
                           sample_size=16, window=3)
    h = freezer.history
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        h.snapshot()
    before = {(int(i), int(o)): h.history[0, :, k].clone() for k, (i, o) in
              enumerate(zip(h.source_ids[0], h.offsets[0])) if i >= 0}
    prev = torch.zeros_like(model[0].weight, dtype=torch.bool)
    prev[:10] = True
    new = torch.ones_like(prev)
    h.restrict_to_masks({id(model[0].weight): new}, {id(model[0].weight): prev})
    w = model[0].weight.detach().reshape(-1)
    for k in range(int(h.valid[0])):
        key = (int(h.source_ids[0, k]), int(h.offsets[0, k]))
        if key in before:
            assert torch.equal(h.history[0, :, k], before[key])
        elif key[0] == 0:
            expect = 0.0 if key[1] >= 10 * 10 else float(w[key[1]])
            assert torch.all(h.history[0, :, k] == expect)
    with pytest.raises(ValueError, match="same shape"):
        h.restrict_to_masks({id(model[0].weight): torch.ones(3, dtype=torch.bool)})


def test_bad_masks():
    model = mlp()
    with pytest.raises(ValueError, match="no torch.nn.utils.prune masks"):
        SparseMasks(model)
    with pytest.raises(ValueError, match="no parameter"):
        SparseMasks(model, {"9.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="the parameter is"):
        SparseMasks(model, {"0.weight": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="0/1"):
        SparseMasks(model, {"0.weight": torch.full((20, 10), 0.5)})


def test_static_policy_without_history():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(2, at_step=2), decision_delay=0)
    masks = SparseMasks(model, random_masks(model, 0)).attach(freezer)  # before the first forward
    for step in range(4):
        nn.functional.cross_entropy(model(torch.randn(8, 10)), torch.randint(0, 4, (8,))).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
        assert masks.violations() == {}
    assert masks.frozen == {"0.weight", "2.weight"}


def test_random_masks_exact_uniform_sparsity_dense_ends():
    from smartfrz_fast.sparse import random_masks as initial_masks

    model = SmallCNN(width=16)
    masks = initial_masks(model, 0.8, seed=3)
    assert set(masks) == {"conv2.weight", "conv3.weight"}  # conv1 (stem) and head stay dense
    for name, m in masks.items():
        assert m.dtype == torch.bool and m.shape == dict(model.named_parameters())[name].shape
        assert int(m.sum()) == round(0.2 * m.numel())
    again = initial_masks(model, 0.8, seed=3)
    assert all(torch.equal(masks[n], again[n]) for n in masks)
    assert not torch.equal(masks["conv2.weight"], initial_masks(model, 0.8, seed=4)["conv2.weight"])
    assert set(initial_masks(model, 0.5, dense_ends=False)) == {"conv1.weight", "conv2.weight", "conv3.weight", "head.weight"}
    with pytest.raises(ValueError, match="sparsity"):
        initial_masks(model, 1.0)


def test_attach_optimizer_keeps_masks_without_a_freezer():
    from smartfrz_fast.sparse import random_masks as initial_masks

    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    masks = SparseMasks(model, initial_masks(model, 0.7, seed=0)).attach_optimizer(opt)
    for step in range(4):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        assert masks.violations() == {}
    for name, p in masks.params.items():  # momentum of pruned weights zeroed too
        assert not bool(opt.state[p]["momentum_buffer"][~masks.bool_mask(name)].any())
    with pytest.raises(RuntimeError, match="already attached"):
        masks.attach_optimizer(opt)
    # a freezer over the same optimizer later: attach does not hook it twice
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, at_step=1), example_inputs=batch(0)[0])
    hooks = len(masks._hooks)
    masks.attach(freezer)
    assert len(masks._hooks) == hooks


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mid = nn.Embedding(30, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 30, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def _lm_steps(model, opt, freezer, steps):
    for step in range(steps):
        ids = torch.randint(0, 30, (8,), generator=torch.Generator().manual_seed(step))
        nn.functional.cross_entropy(model(ids), ids).backward()
        opt.step()
        opt.zero_grad()
        freezer.step()


def test_a_masked_shared_weight_that_keeps_training_keeps_its_mask():
    # the tied embedding's unit froze, but the weight trains on through the head: its mask
    # stopped being enforced and 300+ pruned entries came back
    model = _TiedLM()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    masks = SparseMasks(model, {"emb.weight": torch.rand(30, 16, generator=torch.Generator().manual_seed(1)) > 0.5})
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=2), example_inputs=torch.arange(8))
    masks.attach(freezer)
    _lm_steps(model, opt, freezer, 6)
    assert freezer.num_frozen == 1 and model.emb.weight.requires_grad  # shared_parameters="train"
    assert masks.violations() == {} and "emb.weight" not in masks.frozen


def test_centered_rmsprop_state_is_masked_too():
    # grad_avg was left at pruned positions: square_avg - grad_avg^2 < 0, and the weights went NaN
    model = mlp()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.9, centered=True)
    masks = SparseMasks(model, random_masks(model, 0))
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=100), example_inputs=torch.randn(4, 10))
    masks.attach(freezer)
    for step in range(4):
        model(torch.randn(6, 10, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters()) and masks.violations() == {}


def test_a_checkpoint_before_the_history_is_full_resumes_with_masks():
    # attach() backfilled every slot of newly drawn history columns, written or not, and the
    # resume's check took the unwritten slots' values for a corrupt checkpoint

    class Keeps(FreezePolicy):
        needs_history = True

        def decide(self, step, frozen):
            return None

    def build():
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        masks = SparseMasks(model, random_masks(model, 0))
        freezer = SmartFreezer(model, opt, Keeps(), example_inputs=torch.randn(4, 10), window=6, sample_size=16)
        masks.attach(freezer)
        return model, opt, masks, freezer

    model, opt, masks, freezer = build()
    for step in range(3):
        model(torch.randn(6, 10, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        freezer.step()
    saved = copy.deepcopy({"model": model.state_dict(), "masks": masks.state_dict(), "freezer": freezer.state_dict()})
    model2, _, masks2, freezer2 = build()
    model2.load_state_dict(saved["model"])
    masks2.load_state_dict(saved["masks"])
    freezer2.load_state_dict(saved["freezer"])
    assert torch.equal(freezer2.history.history, freezer.history.history)


def test_a_mask_under_a_tied_weights_other_name():
    # random_masks(dense_ends=False) names the tied head "head.weight": refused as no parameter
    model = _TiedLM()
    masks = SparseMasks(model, {"head.weight": torch.rand(30, 16, generator=torch.Generator().manual_seed(2)) > 0.5})
    assert list(masks.params) == ["emb.weight"] and masks.violations() == {}
    with pytest.raises(ValueError, match="one tied weight"):
        SparseMasks(model, {"head.weight": torch.ones(30, 16, dtype=torch.bool),
                            "emb.weight": torch.ones(30, 16, dtype=torch.bool)})
    # and update() takes the name the masks were given under ("no mask for 'head.weight'": review51)
    grown = torch.ones(30, 16, dtype=torch.bool)
    assert masks.update({"head.weight": grown}) == ["emb.weight"] and torch.equal(masks.bool_mask("emb.weight"), grown)


def test_a_layer_pruned_again_is_followed_and_resumes_exactly():
    """Iterative magnitude pruning: prune.l1_unstructured on a layer already pruned registers a
    new mask buffer. SparseMasks kept the old one: the newly pruned weight_orig entries kept moving
    under momentum, violations() said {}, the history sampled them, and a resume in the documented
    order put the old mask back into the model, regrowing 256 weights of a layer (review51)."""
    def batch_at(step):
        g = torch.Generator().manual_seed(step)
        return torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)

    def build(pruned_twice=False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        for _ in range(2 if pruned_twice else 1):  # a resumed script replays its pruning rounds
            prune.l1_unstructured(model[2], "weight", amount=0.5)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=3), example_inputs=batch_at(0)[0],
                               total_steps=16)
        return model, opt, freezer, SparseMasks(model).attach(freezer)

    def train(model, opt, freezer, masks, start, stop, saved=None):
        for step in range(start, stop):
            x, y = batch_at(step)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
            if step == 4:
                prune.l1_unstructured(model[2], "weight", amount=0.5)  # 50 % -> 75 %
                assert masks.masks["2.weight_orig"] is not model[2].weight_mask
            if step + 1 == 8 and saved is not None:
                saved.update(copy.deepcopy({"model": model.state_dict(), "masks": masks.state_dict(),
                                            "freezer": freezer.state_dict(), "opt": opt.state_dict()}))
        return model

    model, opt, freezer, masks = build()
    saved = {}
    train(model, opt, freezer, masks, 0, 16, saved)
    pruned = model[2].weight_mask == 0
    assert masks.masks["2.weight_orig"] is model[2].weight_mask and float(pruned.float().mean()) == 0.75
    assert masks.violations() == {} and not model[2].weight_orig[pruned].any()
    assert saved["masks"]["masks"]["2.weight_orig"].float().mean() == 0.25

    model2, opt2, freezer2, masks2 = build(pruned_twice=True)
    model2.load_state_dict(saved["model"])
    masks2.load_state_dict(saved["masks"])
    freezer2.load_state_dict(saved["freezer"])
    opt2.load_state_dict(saved["opt"])
    train(model2, opt2, freezer2, masks2, 8, 16)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layers_that_train_again_after_close_keep_their_masks():
    """A layer's mask froze with it for good: after freezer.close() (the way to train frozen
    layers again) its masked weights moved under AdamW's weight decay, and a checkpoint's
    frozen layers loaded into a run without a freezer were not masked either (review82)."""
    from smartfrz_fast.sparse import random_masks as initial_masks

    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(2, at_step=2), example_inputs=torch.randn(8, 10))
    masks = SparseMasks(model, initial_masks(model, 0.8, seed=0)).attach(freezer)

    def steps(n):
        for _ in range(n):
            nn.functional.cross_entropy(model(torch.randn(8, 10)), torch.randint(0, 4, (8,))).backward()
            opt.step()
            opt.zero_grad()
            if freezer.plan is not None and not freezer._closed:
                freezer.step()

    steps(4)
    assert masks.frozen and masks.violations() == {}
    state = masks.state_dict()
    freezer.close()
    model.requires_grad_(True)
    opt.add_param_group({"params": [p for p in model.parameters() if all(p is not q for g in opt.param_groups
                                                                          for q in g["params"])]})
    steps(4)
    assert masks.violations() == {}
    assert masks.state_dict()["frozen"] == []  # no layer is frozen now
    fresh = mlp()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01, weight_decay=0.1)
    resumed = SparseMasks(fresh, initial_masks(fresh, 0.8, seed=0)).attach_optimizer(fresh_opt)
    resumed.load_state_dict(state)  # frozen layers of the checkpoint, trained here
    for _ in range(4):
        nn.functional.cross_entropy(fresh(torch.randn(8, 10)), torch.randint(0, 4, (8,))).backward()
        fresh_opt.step()
        fresh_opt.zero_grad()
    assert resumed.violations() == {}
