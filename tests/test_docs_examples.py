"""The user documentation's Python examples run as written (on the CPU, with small sizes).

Pages: README.md, docs/*.md, docs/integrations/*.md, bench/README.md. Every ```python block of
them is accounted for in exactly one way (``test_every_block_is_accounted_for`` fails on a new
block that is not). Entries are keyed by (page, a snippet found in that block and no other), so
blocks added or moved around them keep their entries, and a rewritten block is noticed:

- run here (``EXAMPLES``): in a fresh namespace, after a *prelude* that defines what the page
  leaves to the reader (``MyNet``, ``loader``, ``optimizer``, ...; small sizes), and followed by
  a *check* that asserts what the example is for. ``between`` inserts code before a line of the
  block (the fresh objects a resume example builds between saving and loading);
  ``page_prelude`` runs the definitions of an earlier block of the page first (a block that
  says "Net from the example above");
- run by another test (``COVERED``: the test's file and function; they run the block as
  written, in a subprocess);
- not run: marked in the page by an HTML comment on the line just before the block,
  ``<!-- not run: why (what runs instead) -->``, e.g. a block that needs a GPU or several
  processes.

Blocks run in this process (a subprocess per block costs seconds of imports each); a block that
needs ``torch.distributed`` gets the one-rank gloo group fixture, and dynamo is reset after the
compile example. The working directory is a temporary folder.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
         *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "integrations").glob("*.md")),
         "bench/README.md"]
BLOCK = re.compile(r"(?:<!--\s*not run:\s*(?P<why>.*?)\s*-->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: str):
    """[(code, reason it is not run or None)] of the page's ```python blocks, in order."""
    text = (ROOT / page).read_text(encoding="utf-8")
    return [(m["code"], m["why"]) for m in BLOCK.finditer(text)]


@dataclass
class Example:
    prelude: str = ""
    check: str = ""
    between: Optional[Tuple[str, str]] = None  # (a line of the block, code inserted before it)
    distributed: bool = False
    # (a snippet of an earlier block of the page, a line of it): that block up to the line runs
    # first, for a block that says "Net from the example above"
    page_prelude: Optional[Tuple[str, str]] = None
    needs: Tuple[str, ...] = ()  # optional packages (skipped without them)


SMALL_CNN = """
import torch
from torch import nn
from models import SmallCNN, batch, train_steps
torch.manual_seed(0)
"""

DIGITS = """
g = torch.Generator().manual_seed(0)
train_set = torch.utils.data.TensorDataset(torch.randn(64, 1, 8, 8, generator=g),
                                           torch.randint(0, 10, (64,), generator=g))
"""

CACHE_RUN = SMALL_CNN + DIGITS + """
from torch.utils.data import DataLoader
from smartfrz_fast import SmartFreezer, FreezeOut
from smartfrz_fast.cache import ActivationCache, IndexedDataset

def build():
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    freezer = SmartFreezer(model, optimizer, policy=FreezeOut(t0=0.3), example_inputs=train_set[:2][0],
                           total_steps=12)
    return model, optimizer, freezer, ActivationCache(freezer, num_samples=64, deterministic=True)

def epoch():
    for x, y, ids in DataLoader(IndexedDataset(train_set), batch_size=16):
        nn.functional.cross_entropy(model_c(x, ids), y).backward()
        optimizer.step(); optimizer.zero_grad(); freezer.step()
"""

SIEVE = SMALL_CNN + DIGITS + """
import torch.nn.functional as F
from torch.utils.data import DataLoader
from smartfrz_fast import DistributedSievingSampler, LinearFreeze, SievingSampler, SmartFreezer
dataset, b, epochs = train_set, 8, 3
model = SmallCNN()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
freezer = SmartFreezer(model, optimizer, policy=LinearFreeze(), example_inputs=dataset[:2][0], total_steps=18)
"""

SIEVE_CHECK = """
assert sampler.rotations == epochs - 1 and sorted(sampler.active + sampler.pool) == list(range(64))
assert freezer.step_count == epochs * len(loader) and freezer.num_frozen > 0
"""

EXAMPLES = {
    ("README.md", "policy=SmartFRZ() unless you pass another"): Example(
        prelude="""
import torch
from torch import nn
class MyNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
g = torch.Generator().manual_seed(0)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
    torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)), batch_size=16)
epochs = 3
""",
        # SmartFRZ: 12 steps never fill its window of 30 snapshots, so nothing freezes here
        check="assert freezer.step_count == 12 and freezer.num_frozen == 0 and freezer.policy.name == 'smartfrz'",
    ),
    ("docs/activation_cache.md", "storage=\"memory\")      # dtype"): Example(
        prelude=SMALL_CNN + DIGITS + """
model = SmallCNN()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
x0, n, loss_fn = train_set[:2][0], 4, nn.functional.cross_entropy
train_set = torch.utils.data.ConcatDataset([train_set] * 16)  # 1024 samples: four batches of 256
""",
        check="""
assert cache.active and cache.rows_cached > 0 and freezer.num_frozen > 0
assert cache.describe().startswith("activation cache on")
""",
    ),
    ("docs/activation_cache.md", 'cache.load_state_dict(ckpt["cache"])'): Example(
        prelude=CACHE_RUN + """
import os
model, optimizer, freezer, cache = build()
model_c = cache.wrap()
epoch()
path = os.path.abspath("ckpt.pt")
saved = (freezer.num_frozen, cache.boundary)
""",
        between=("ckpt = torch.load(path)",
                 "model, optimizer, freezer, cache = build()  # the resumed run's fresh objects\n"),
        check="""
model_c = cache.wrap()
epoch()
assert freezer.step_count == 8 and saved[0] > 0 and freezer.num_frozen >= saved[0]
assert cache.active and cache.boundary >= saved[1] > 0
""",
    ),
    ("docs/egeria_spfde.md", "policy = Egeria(model, probe_inputs"): Example(
        prelude=SMALL_CNN + """
from smartfrz_fast import Egeria, SmartFreezer
model = SmallCNN()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
probe_inputs, n = batch(999, size=32)[0], 12
""",
        check="""
train_steps(model, optimizer, freezer, n)
assert policy.overhead()["evaluations"] > 0 and policy.overhead()["worker_s"] > 0
""",
    ),
    ("docs/egeria_spfde.md", "masks = SparseMasks(model)"): Example(
        prelude=SMALL_CNN + """
from torch.nn.utils import prune
from smartfrz_fast import SmartFreezer, SparseMasks, StaticFreeze
from smartfrz_fast.sparse import random_masks
model = SmallCNN()
for layer in (model.conv2, model.conv3):
    prune.random_unstructured(layer, "weight", amount=0.5)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
freezer = SmartFreezer(model, optimizer, policy=StaticFreeze(1, at_step=2), example_inputs=batch(0)[0])
new_masks = random_masks(model, 0.5, seed=1)  # conv2 and conv3 (the ends stay dense)
""",
        check="""
train_steps(model, optimizer, freezer, 4)
assert masks.violations() == {} and freezer.num_frozen == 1
assert torch.equal(model.conv2.weight != 0, new_masks["conv2.weight"])  # the update took
""",
    ),
    ("docs/egeria_spfde.md", "sampler = SievingSampler(len(dataset)"): Example(prelude=SIEVE, check=SIEVE_CHECK),
    ("docs/egeria_spfde.md", "sampler = DistributedSievingSampler(len(dataset)"): Example(
        prelude=SIEVE + """
import os, torch.distributed as dist
from smartfrz_fast.cache import IndexedDataset
rank, path = dist.get_rank(), os.path.abspath("sampler.pt")
""",
        check=SIEVE_CHECK + 'assert torch.load(path)["sampler"]["rotations"] == epochs - 1\n',
        distributed=True,
    ),
    ("docs/integrations/torch_compile.md", "compiled = compile_blocks(model.layers, freezer"): Example(
        prelude="""
import torch
from torch import nn
from smartfrz_fast import SmartFreezer, FreezeOut

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

torch.manual_seed(0)
model = Net()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
x0, n = torch.randn(8, 16), 8
""",
        check="""
for step in range(n):
    model(torch.randn(8, 16)).square().mean().backward()
    optimizer.step(); optimizer.zero_grad(); freezer.step()
assert freezer.num_frozen == 3 and list(model.state_dict()) == list(Net().state_dict())  # names unchanged
""",
    ),
    ("docs/integrations/torch_compile.md", 'scaler = FreezeAwareGradScaler("cuda")'): Example(
        # On the CPU torch disables a "cuda" scaler (with a warning): the skipping still runs.
        prelude="""
import warnings
import torch
from torch import nn
device = "cuda" if torch.cuda.is_available() else "cpu"
warnings.filterwarnings("ignore", message=".*CUDA is not available")
frozen, trained = nn.Linear(4, 4).to(device), nn.Linear(4, 4).to(device)
frozen.requires_grad_(False)  # all of this optimizer's parameters frozen: no gradients
optimizers = [torch.optim.SGD(frozen.parameters(), lr=0.1), torch.optim.SGD(trained.parameters(), lr=0.1)]
before = trained.weight.detach().clone()
from smartfrz_fast.compile import FreezeAwareGradScaler as _Scaler
# the backward of a scaled loss; the block's own scaler starts at the same default scale
_Scaler("cuda").scale(trained(frozen(torch.randn(8, 4, device=device))).square().mean()).backward()
""",
        check="assert not torch.equal(trained.weight, before) and frozen.weight.grad is None",
    ),
    ("docs/activation_cache.md", "model = FreezableDDP(net)"): Example(  # one rank here
        prelude="""
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from smartfrz_fast import SmartFreezer, FreezeOut
from smartfrz_fast.cache import ActivationCache, IndexedDataset
from smartfrz_fast.distributed import FreezableDDP
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
g = torch.Generator().manual_seed(0)
train_set = torch.utils.data.TensorDataset(torch.randn(128, 8, generator=g), torch.randint(0, 2, (128,), generator=g))
x0, n = train_set[:2][0], 4
""",
        check="""
for epoch in range(3):  # FreezeOut freezes at steps 3-4: the third epoch meets cached rows
    loader.sampler.set_epoch(epoch)
    for x, y, ids in loader:
        nn.functional.cross_entropy(model_c(x, ids), y).backward()
        optimizer.step(); optimizer.zero_grad(); freezer.step()
assert freezer.num_frozen == 2 and cache.active and cache.stats["hits"] > 0
""",
        distributed=True,
    ),
    ("docs/integrations/huggingface.md", "activation_cache={\"deterministic\": True}).attach(trainer)"): Example(
        check="""
assert callback.freezer.num_frozen > 0 and callback.cache.active
assert callback.cache.stats["hits"] > 0 and callback.cache.stats["migrated"] > 0
""",
        needs=("transformers", "accelerate"),
    ),
    ("docs/integrations/lightning.md", "class CachedNet(Net)"): Example(
        page_prelude=("class Net(L.LightningModule)", "# 1. Uninterrupted run"),
        check="""
assert callback.freezer.num_frozen > 0 and callback.cache.active
assert callback.cache.stats["hits"] > 0 and callback.cache.boundary > 0
""",
        needs=("lightning",),
    ),
}

# Run as written (in a subprocess) by another test.
COVERED = {
    ("docs/profiling.md", "prof = profile_model(model, x"):
        ("tests/test_profile.py", "test_docs_example_runs"),
    ("docs/integrations/lightning.md", "class Net(L.LightningModule)"):
        ("tests/test_integration_lightning.py", "test_doc_example_runs"),
    ("docs/integrations/huggingface.md", "BertForSequenceClassification(BertConfig("):
        ("tests/test_integration_hf.py", "test_doc_example_runs"),
}

def block(page: str, snippet: str):
    """The one python block of ``page`` that contains ``snippet``: (its index, code, why not run)."""
    found = [(i, code, why) for i, (code, why) in enumerate(blocks(page)) if snippet in code]
    assert len(found) == 1, f"{page}: {len(found)} python blocks contain {snippet!r}, expected one"
    return found[0]


def test_every_block_is_accounted_for():
    claimed = {}
    for page, snippet in [*EXAMPLES, *COVERED]:
        i, _, why = block(page, snippet)
        assert why is None, f"{page}, python block {i}: marked not run in the page and listed here"
        assert (page, i) not in claimed, f"{page}, python block {i}: listed twice"
        claimed[page, i] = snippet
    for page in PAGES:
        for i, (code, why) in enumerate(blocks(page)):
            assert (page, i) in claimed or why is not None, (
                f"{page}, python block {i} is neither run (EXAMPLES, COVERED) nor marked "
                f"'<!-- not run: why -->':\n{code[:300]}")


@pytest.mark.parametrize("key", list(COVERED), ids=lambda k: k[0])
def test_covered_blocks_have_their_test(key):
    path, name = COVERED[key]
    text = (ROOT / path).read_text(encoding="utf-8")
    assert re.search(rf"^def {name}\(", text, re.M), f"{path} lost {name}, which runs {key[0]}'s example"
    assert key[0].split("/")[-1] in text, f"{path}::{name} no longer reads {key[0]}"
    assert block(*key)[0] == 0, f"{path}::{name} runs the first python block of {key[0]}; it moved"


@pytest.mark.parametrize("key", list(EXAMPLES), ids=lambda k: f"{k[0]}:{k[1][:30]}")
def test_doc_example_runs(key, tmp_path, monkeypatch, request):
    example = EXAMPLES[key]
    i, code, why = block(*key)
    assert why is None, f"{key[0]}, python block {i} is marked not run: {why}"
    if example.between is not None:
        line, insert = example.between
        assert code.count(line + "\n") == 1, f"{key[0]}, python block {i} lost the line {line!r}"
        code = code.replace(line + "\n", insert + line + "\n")
    for module in example.needs:
        pytest.importorskip(module)
    prelude = example.prelude
    if example.page_prelude is not None:
        snippet, stop = example.page_prelude
        earlier = block(key[0], snippet)[1]
        assert stop in earlier, f"{key[0]}: the block with {snippet!r} lost the line {stop!r}"
        prelude = earlier[:earlier.index(stop)] + prelude
    if example.distributed:
        request.getfixturevalue("one_rank_group")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_example__"}
    try:
        for part, source in (("prelude", prelude), ("block", code), ("check", example.check)):
            exec(compile(source, f"{key[0]} python block {i} ({part})", "exec"), namespace)
    finally:
        torch._dynamo.reset()  # the compile example's compiled code must not reach other tests
