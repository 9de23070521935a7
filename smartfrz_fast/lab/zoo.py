"""The network zoo the predictor learns from: five families, local data only.

Families (each small enough to train in seconds on a CPU core):

- ``mlp``: flattened 8x8 digits, ReLU MLP (depth, width vary).
- ``cnn``: plain VGG-like conv stacks on 16x16 digits (conv-BN-ReLU or conv-ReLU).
- ``resnet``: BasicBlock ResNets with BatchNorm on 16x16 digits.
- ``vit``: a small vision transformer (4x4 patches of 16x16 digits, pre-norm blocks).
- ``lm``: a small causal transformer language model over bytes of Python's own standard-library
  sources (the text ships with the interpreter; nothing is downloaded).

Digits come from ``smartfrz_fast.data`` (scikit-learn's bundled set, deterministic distortions).
A ``RunSpec`` names one training run: family, size, optimizer, seed, steps and whether it
fine-tunes from a checkpoint trained first on a different task.
"""

from __future__ import annotations

import copy
import math
import os
import sysconfig
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FAMILIES = ("mlp", "cnn", "resnet", "vit", "lm", "mixer", "sepcnn", "rnn", "textenc")
TEXT_FAMILIES = ("lm", "textenc")  # byte inputs; the others see digits


# ----------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self, depth: int, width: int, in_dim: int = 64, classes: int = 10):
        super().__init__()
        dims = [in_dim] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


class _PooledFeatures(nn.Module):
    """``features``, global average pooling, then the linear ``head`` (the CNN families)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class PlainCNN(_PooledFeatures):
    """VGG-like: stages of 3x3 convs, a max-pool between stages."""

    def __init__(self, depth: int, width: int, bn: bool = True, classes: int = 10):
        super().__init__()
        layers: List[nn.Module] = []
        c, w = 1, width
        per_stage = max(1, depth // 3)
        for i in range(depth):
            if i and i % per_stage == 0 and i // per_stage < 3:
                layers.append(nn.MaxPool2d(2))
                w = min(w * 2, width * 4)
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=not bn)]
            if bn:
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.ReLU())
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, width: int, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        blocks, c = [], width
        for stage in range(3):
            out = width * 2**stage
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(c, out, 2 if (b == 0 and stage > 0) else 1))
                c = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.stem_bn(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block (the engine merges each LayerNorm into the layer before it)."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PosEmbed(nn.Module):
    """Learned position embedding in its own module, so that it is a unit of its own."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight


class TinyViT(nn.Module):
    def __init__(self, depth: int, dim: int, heads: int = 4, patch: int = 4, image: int = 16, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, patch)
        self.pos = PosEmbed((image // patch) ** 2, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, causal=False) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pos(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(self.ln(self.blocks(x)).mean(1))


class TinyLM(nn.Module):
    """Byte-level causal transformer LM; ``forward`` returns logits ``[B, L, 256]``."""

    def __init__(self, depth: int, dim: int, heads: int = 4, context: int = 32):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, causal=True) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, x: Tensor) -> Tensor:
        pos = torch.arange(x.shape[1], device=x.device)
        return self.head(self.ln(self.blocks(self.embed(x) + self.pos(pos))))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.token1 = nn.Linear(tokens, 2 * tokens)
        self.token2 = nn.Linear(2 * tokens, tokens)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.token2(F.gelu(self.token1(self.ln1(x).transpose(1, 2)))).transpose(1, 2)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Mixer(nn.Module):
    """MLP-Mixer (Tolstikhin et al. 2021): 4x4 patches of 16x16 digits, token- then channel-mixing."""

    def __init__(self, depth: int, dim: int, patch: int = 4, image: int = 16, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock((image // patch) ** 2, dim) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.ln(self.blocks(x)).mean(1))


class SeparableCNN(_PooledFeatures):
    """MobileNet-like: a conv stem, then depthwise 3x3 + pointwise 1x1 pairs (each conv-BN-ReLU),
    stride 2 and twice the channels at the second and fourth pair."""

    def __init__(self, depth: int, width: int, classes: int = 10):
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
        for i in range(depth):
            stride, out = (2, 2 * c) if i in (1, 3) else (1, c)
            layers += [nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)


class RowGRU(nn.Module):
    """Recurrent: the 16 rows of a 16x16 digit read in order by stacked GRU layers (one module
    per layer, so that each is a unit), classified from the last hidden state."""

    def __init__(self, depth: int, width: int, rows: int = 16, classes: int = 10):
        super().__init__()
        self.layers = nn.ModuleList(nn.GRU(rows if i == 0 else width, width, batch_first=True) for i in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        seq = x.flatten(1, 2)  # [B, 1, rows, cols] -> [B, rows, cols]
        for layer in self.layers:
            seq, _ = layer(seq)
        return self.head(seq[:, -1])


class TextEncoder(nn.Module):
    """Bidirectional byte-level transformer encoder classifying a snippet (BERT-like shape)."""

    def __init__(self, depth: int, dim: int, heads: int = 4, context: int = 64, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = PosEmbed(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, causal=False) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ln(self.blocks(self.pos(self.embed(x)))).mean(1))


# ----------------------------------------------------------------------------- data
_TEXT_CACHE: Dict[Tuple[str, int], Tensor] = {}
# Standard-library packages whose sources make the LM corpora ("a" pretrains, "b" is the task).
TEXT_SOURCES = {"a": ("email", "json", "http", "xml"), "b": ("asyncio", "concurrent", "logging", "unittest")}
# Packages whose snippets the text classifier tells apart (one class each; "a" pretrains).
TEXT_CLASSES = {"a": ("email", "http", "xml", "idlelib"), "b": ("asyncio", "logging", "multiprocessing", "tkinter")}


def package_source(package: str) -> bytes:
    """The ``.py`` sources of one standard-library package (sorted file order, tests left out)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks = []
    for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(root, package))):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".py") and "test" not in dirpath.split(os.sep)[-1]:
                with open(os.path.join(dirpath, name), "rb") as f:
                    chunks.append(f.read())
    return b"".join(chunks)


def stdlib_text(part: str = "b", max_bytes: int = 600_000) -> Tensor:
    """Bytes of some of this Python's standard-library sources, as ``uint8 [N]`` (sorted file
    order, so the same interpreter gives the same corpus)."""
    key = (part, max_bytes)
    if key not in _TEXT_CACHE:
        blob = b"".join(package_source(p) for p in TEXT_SOURCES[part])[:max_bytes]
        if not blob:
            raise RuntimeError(f"no standard-library sources found under {sysconfig.get_paths()['stdlib']} "
                               "for the text corpora")
        _TEXT_CACHE[key] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
    return _TEXT_CACHE[key]


def package_snippets(part: str, n_train: int, n_test: int, context: int, seed: int) -> Tuple[Tensor, ...]:
    """Snippets of ``context`` bytes labelled by the standard-library package they come from
    (``TEXT_CLASSES[part]``, one class each, balanced): the text-classification task. The last
    10 % of each package's sources is the test split."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, split in ((n_train, 0), (n_test, 1)):
        xs, ys = [], []
        for label, package in enumerate(TEXT_CLASSES[part]):
            text = torch.frombuffer(bytearray(package_source(package)), dtype=torch.uint8).long()
            cut = len(text) - len(text) // 10
            lo, hi = (0, cut) if split == 0 else (cut, len(text))
            if hi - lo <= context:
                raise RuntimeError(f"standard-library package {package!r} is too small for the text task")
            starts = torch.randint(lo, hi - context, (n // len(TEXT_CLASSES[part]),), generator=g)
            xs.append(text[starts[:, None] + torch.arange(context)])
            ys.append(torch.full((len(starts),), label))
        out += [torch.cat(xs), torch.cat(ys)]
    return tuple(out)


@dataclass(frozen=True)
class RunSpec:
    family: str
    depth: int
    width: int
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, nesterov) or "adamw"
    seed: int = 0
    steps: int = 600
    batch: int = 64
    finetune: bool = False  # pretrain on a different task first, then record the fine-tuning
    variant: str = ""  # family-specific switch ("nobn" for a CNN without BatchNorm)
    schedule: str = "cosine"  # learning-rate schedule after warm-up: see SCHEDULES

    @property
    def name(self) -> str:
        ft = "-ft" if self.finetune else ""
        var = f"-{self.variant}" if self.variant else ""
        sched = f"-{self.schedule}" if self.schedule != "cosine" else ""
        return f"{self.family}{var}-d{self.depth}-w{self.width}-{self.optimizer}{sched}-s{self.seed}{ft}"

    def as_dict(self) -> Dict:
        return asdict(self)


def build_model(spec: RunSpec) -> nn.Module:
    if spec.family == "mlp":
        return MLP(spec.depth, spec.width)
    if spec.family == "cnn":
        return PlainCNN(spec.depth, spec.width, bn=spec.variant != "nobn")
    if spec.family == "resnet":
        return ResNet(spec.depth, spec.width)
    if spec.family == "vit":
        return TinyViT(spec.depth, spec.width)
    if spec.family == "lm":
        return TinyLM(spec.depth, spec.width)
    if spec.family == "mixer":
        return Mixer(spec.depth, spec.width)
    if spec.family == "sepcnn":
        return SeparableCNN(spec.depth, spec.width)
    if spec.family == "rnn":
        return RowGRU(spec.depth, spec.width)
    if spec.family == "textenc":
        return TextEncoder(spec.depth, spec.width)
    raise ValueError(f"unknown family {spec.family!r}; choose one of {FAMILIES}")


class Task:
    """Training batches, a fixed probe batch and a test metric for one run."""

    def __init__(self, spec: RunSpec, pretrain: bool = False):
        self.spec = spec
        g_seed = 1000 + spec.seed + (7 if pretrain else 0)
        if spec.family == "lm":
            text = stdlib_text("a" if pretrain else "b")
            n_test = len(text) // 10
            self.train_text, self.test_text = text[:-n_test].long(), text[-n_test:].long()
            self.context = 32
        elif spec.family == "textenc":
            # pretraining classifies snippets of other packages (TEXT_CLASSES["a"]); same shape
            self.x, self.y, self.xt, self.yt = package_snippets(
                "a" if pretrain else "b", 8192, 1024, context=64, seed=g_seed)
        else:
            from ..data import load_digits_dataset

            size = 8 if spec.family == "mlp" else 16
            # pretraining sees clean enlargements with another split seed; the task is distorted
            x, y, xt, yt = load_digits_dataset(
                num_samples=4096, seed=g_seed, image_size=size, strength=0.3 if pretrain else 1.0,
                num_test_samples=1024, return_tensors=True)
            if pretrain:  # a different task: labels mapped to parity x 5 groups (still 10 classes)
                y, yt = (y * 3) % 10, (yt * 3) % 10
            self.x, self.y, self.xt, self.yt = x, y, xt, yt
        self.generator = torch.Generator().manual_seed(g_seed)
        self.probe = self._probe()

    def _probe(self) -> Tensor:
        g = torch.Generator().manual_seed(12345)
        if self.spec.family == "lm":
            starts = torch.randint(0, len(self.test_text) - self.context - 1, (128,), generator=g)
            return torch.stack([self.test_text[s:s + self.context] for s in starts])
        return self.xt[torch.randperm(len(self.xt), generator=g)[:128]]

    def batch(self) -> Tuple[Tensor, Tensor]:
        b = self.spec.batch
        if self.spec.family == "lm":
            starts = torch.randint(0, len(self.train_text) - self.context - 1, (b,), generator=self.generator)
            idx = starts[:, None] + torch.arange(self.context + 1)
            seq = self.train_text[idx]
            return seq[:, :-1], seq[:, 1:]
        idx = torch.randint(0, len(self.x), (b,), generator=self.generator)
        return self.x[idx], self.y[idx]

    @staticmethod
    def loss(logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        """Test accuracy and mean test loss (eval mode, the whole test split)."""
        was = model.training
        model.eval()
        if self.spec.family == "lm":
            n = (len(self.test_text) - 1) // self.context
            seq = self.test_text[:n * self.context + 1]
            x, y = seq[:-1].view(n, self.context), seq[1:].view(n, self.context)
        else:
            x, y = self.xt, self.yt
        correct, loss = 0, 0.0
        for s in range(0, len(x), 512):
            logits = model(x[s:s + 512])
            correct += int((logits.argmax(-1) == y[s:s + 512]).sum())
            loss += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[s:s + 512].reshape(-1),
                                          reduction="sum"))
        model.train(was)
        return {"accuracy": correct / y.numel(), "loss": loss / y.numel()}

    def accuracy(self, model: nn.Module) -> float:
        return self.evaluate(model)["accuracy"]


OPTIMIZERS = ("sgd", "adamw", "adam", "rmsprop")


def base_lr(spec: RunSpec) -> float:
    if spec.optimizer in ("adamw", "adam"):
        return 3e-3 if spec.family in ("mlp", "cnn", "resnet", "sepcnn", "rnn") else 2e-3
    if spec.optimizer == "rmsprop":
        return 1e-3
    sgd = {"mlp": 0.05, "cnn": 0.05, "resnet": 0.05, "vit": 0.05, "lm": 0.1, "mixer": 0.05, "sepcnn": 0.05,
           "rnn": 0.05, "textenc": 0.05}
    return sgd[spec.family] * (0.5 if spec.finetune else 1.0)


def make_optimizer(spec: RunSpec, model: nn.Module) -> torch.optim.Optimizer:
    lr = base_lr(spec)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr * (0.3 if spec.finetune else 1.0), weight_decay=0.01)
    if spec.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr * (0.3 if spec.finetune else 1.0))
    if spec.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=lr * (0.3 if spec.finetune else 1.0), alpha=0.99)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}; choose one of {OPTIMIZERS}")


def cosine(total: int):
    """Warm-up over the first 3% of steps, then cosine to zero (every run, every policy)."""
    return lr_factor("cosine", total)


SCHEDULES = ("cosine", "linear", "step", "constant")


def lr_factor(schedule: str, total: int):
    """Warm-up over the first 3 % of steps, then ``schedule``: cosine to zero, linear to zero,
    step (x0.1 at 50 % and again at 75 %), or constant."""
    warm = max(1, total // 33)
    decay = {
        "cosine": lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)),
        "linear": lambda s: max(0.0, 1.0 - s / total),
        "step": lambda s: 0.1 ** ((s >= total // 2) + (s >= 3 * total // 4)),
        "constant": lambda s: 1.0,
    }.get(schedule)
    if decay is None:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    return lambda s: min(1.0, (s + 1) / warm) * decay(s)


class Session:
    """One zoo run being trained: model (fine-tuned specs start from their pretrained
    checkpoint), batches, optimizer and learning-rate schedule, built the same way for the
    recording, every freezing trial and every policy; ``checkpoint``/``restore`` branch it.

    ``pretrained=False`` skips the pretraining of a fine-tuned spec (for a session that is about
    to ``restore`` a checkpoint anyway)."""

    def __init__(self, spec: RunSpec, pretrained: bool = True, schedule: bool = True):
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.model = build_model(spec)
        if spec.finetune and pretrained:
            self.model.load_state_dict(pretrained_state(spec))
        self.task = Task(spec)
        self.optimizer = make_optimizer(spec, self.model)
        # a policy that sets per-unit learning rates itself (FreezeOut) runs without one
        self.scheduler = None
        if schedule:
            self.add_schedule()
        self.step = 0

    def add_schedule(self) -> None:
        """The spec's learning-rate schedule (warm-up, then decay) on the optimizer."""
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(self.spec.schedule, self.spec.steps))

    def train_step(self) -> Tensor:
        x, y = self.task.batch()
        loss = Task.loss(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        return loss.detach()

    def checkpoint(self) -> Dict[str, Any]:
        """Everything the rest of the run depends on, copied (before any freezing)."""
        return {"step": self.step,
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "batches": self.task.generator.get_state()}

    @classmethod
    def restore(cls, spec: RunSpec, state: Dict[str, Any]) -> "Session":
        """A session continuing from ``checkpoint()``: the same batches and updates follow."""
        run = cls(spec, pretrained=False, schedule=state["scheduler"] is not None)
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if run.scheduler is not None:
            run.scheduler.load_state_dict(state["scheduler"])
        run.task.generator.set_state(state["batches"])
        run.step = state["step"]
        return run

    def example_inputs(self) -> Tuple[Tensor]:
        """Inputs for the engine's unit discovery that draw no training batch."""
        return (self.task.probe[:8],)


def pretrained_state(spec: RunSpec) -> Dict[str, Tensor]:
    """Weights of ``spec``'s model trained (unrecorded) on the pretraining task, for fine-tuning."""
    torch.manual_seed(spec.seed + 99)
    model = build_model(spec)
    task = Task(spec, pretrain=True)
    opt = make_optimizer(RunSpec(**{**spec.as_dict(), "finetune": False}), model)
    steps = spec.steps // 2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps))
    for _ in range(steps):
        x, y = task.batch()
        Task.loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    if spec.family != "lm":  # the classifier head is re-initialised for the new task
        torch.manual_seed(spec.seed + 7)
        model.head.reset_parameters()
    return model.state_dict()


# Networks never recorded in the zoo (sizes/seeds not there), of the two hardest families:
# the evaluation of policies in use (evaluate.py), never training data.
EVAL_SPECS = (
    RunSpec("resnet", 1, 10, "sgd", 10, steps=480),
    RunSpec("vit", 2, 40, "sgd", 10, steps=480),
    RunSpec("resnet", 1, 16, "adamw", 11, steps=480),
    RunSpec("vit", 3, 32, "adamw", 11, steps=480),
)


def zoo_specs(quick: bool = False) -> List[RunSpec]:
    """The collection's runs. ``quick``: one tiny run per family (CI smoke test)."""
    if quick:
        return [RunSpec("mlp", 2, 32, steps=90, batch=32), RunSpec("cnn", 3, 8, steps=90, batch=32),
                RunSpec("vit", 1, 32, "adamw", steps=90, batch=32)]
    # Sized so that the whole collection takes ~15 min on 2 shared CPU cores (see docs).
    specs = [
        RunSpec("mlp", 3, 128, "sgd", 0, steps=720),
        RunSpec("cnn", 6, 16, "sgd", 0, steps=720),
        RunSpec("mlp", 4, 96, "adamw", 1, steps=480),
        RunSpec("mlp", 5, 64, "sgd", 2, steps=480),
        RunSpec("mlp", 3, 128, "sgd", 3, steps=480, finetune=True),
        RunSpec("cnn", 4, 12, "adamw", 1, steps=480),
        RunSpec("cnn", 5, 8, "sgd", 2, steps=480, variant="nobn"),
        RunSpec("cnn", 4, 12, "adamw", 3, steps=480, finetune=True),
        RunSpec("lm", 2, 64, "sgd", 0, steps=480, batch=32),
        RunSpec("lm", 3, 48, "adamw", 1, steps=480, batch=32),
        RunSpec("lm", 2, 48, "sgd", 3, steps=480, batch=32, finetune=True),
        RunSpec("resnet", 1, 12, "sgd", 0, steps=480),
        RunSpec("resnet", 1, 8, "adamw", 1, steps=480),
        RunSpec("resnet", 1, 8, "sgd", 3, steps=480, finetune=True),
        RunSpec("vit", 3, 48, "sgd", 0, steps=480),
        RunSpec("vit", 2, 32, "adamw", 1, steps=480),
        RunSpec("vit", 2, 32, "adamw", 3, steps=480, finetune=True),
        # Second round (more of every family, most for the two hardest to generalise to).
        RunSpec("vit", 1, 48, "sgd", 4, steps=480),
        RunSpec("vit", 4, 32, "sgd", 5, steps=480),
        RunSpec("resnet", 2, 8, "sgd", 4, steps=480),
        RunSpec("resnet", 1, 12, "adamw", 5, steps=480),
        RunSpec("vit", 3, 40, "adamw", 6, steps=480),
        RunSpec("resnet", 2, 12, "adamw", 6, steps=480, finetune=True),
        RunSpec("vit", 2, 48, "sgd", 7, steps=480, finetune=True),
        RunSpec("cnn", 3, 16, "sgd", 4, steps=480),
        RunSpec("lm", 4, 32, "adamw", 4, steps=480, batch=32),
        RunSpec("mlp", 2, 192, "adamw", 4, steps=480),
        RunSpec("cnn", 4, 12, "adamw", 5, steps=480, variant="nobn"),
        RunSpec("lm", 1, 96, "sgd", 5, steps=480, batch=32),
        # Third round (issue 16): four more families (an MLP-Mixer, a depthwise-separable CNN, a
        # recurrent model, a text encoder fine-tuned from an in-house pretrained checkpoint),
        # more fine-tuning, other optimizers and schedules, longer runs.
        RunSpec("mixer", 2, 48, "adamw", 0, steps=480),
        RunSpec("mixer", 3, 32, "sgd", 1, steps=480, schedule="linear"),
        RunSpec("mixer", 2, 48, "adamw", 2, steps=480, finetune=True),
        RunSpec("sepcnn", 4, 16, "sgd", 0, steps=480),
        RunSpec("sepcnn", 3, 12, "rmsprop", 1, steps=480, schedule="step"),
        RunSpec("sepcnn", 4, 16, "sgd", 2, steps=480, finetune=True),
        RunSpec("rnn", 2, 48, "adamw", 0, steps=480),
        RunSpec("rnn", 1, 64, "adam", 1, steps=480, schedule="linear"),
        RunSpec("rnn", 2, 48, "adamw", 2, steps=480, finetune=True),
        RunSpec("textenc", 2, 48, "adamw", 0, steps=480),
        RunSpec("textenc", 2, 48, "adamw", 1, steps=480, finetune=True),
        RunSpec("textenc", 3, 32, "sgd", 2, steps=480, finetune=True, schedule="linear"),
        RunSpec("textenc", 1, 64, "adam", 3, steps=480, finetune=True, schedule="constant"),
        RunSpec("vit", 2, 32, "adam", 8, steps=480, schedule="step"),
        RunSpec("vit", 2, 32, "adamw", 9, steps=960),
        RunSpec("cnn", 4, 12, "rmsprop", 6, steps=480, schedule="linear"),
        RunSpec("resnet", 1, 12, "sgd", 7, steps=480, finetune=True, schedule="step"),
        RunSpec("resnet", 1, 8, "sgd", 8, steps=960),
        RunSpec("lm", 2, 48, "adamw", 6, steps=480, batch=32, finetune=True, schedule="linear"),
        RunSpec("mlp", 3, 96, "rmsprop", 5, steps=480, finetune=True),
    ]
    return specs
