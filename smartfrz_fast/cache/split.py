"""Cutting a model into a chain of blocks, so that a frozen prefix can be skipped.

A chain is a list of blocks with ``model(*args, **kwargs) == b[n-1](...b[1](b[0](inputs)))``.
The activation cache can only cut between blocks: the value crossing the cut is one tensor per
sample. Every block is called as ``fn(h, inputs)``: ``h`` is the previous block's output (the
model's inputs for block 0) and ``inputs`` the step's original inputs, which later blocks may
read (an attention mask) since the loader yields them every step anyway.

Chains come from, in this order: the user's list of blocks; a known structure (nn.Sequential,
torchvision ResNet/VGG/ViT, timm ResNet/ViT/ConvNeXt, Hugging Face GPT-2, BERT and Llama-style
decoders, recognised by class name and attributes, since none of these libraries needs to be
importable); a ``torch.fx`` trace cut where exactly one value is live. Whatever produced it, a
chain is accepted only after it reproduced the model's output on the example inputs (eval mode,
RNG and buffers restored).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..units import preserved_state


@dataclass
class Inputs:
    """One step's model inputs."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    # values derived from these inputs once and shared by the blocks of a run (attention masks,
    # rotary tables): see _per_step
    memo: Dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class Block:
    name: str
    fn: Callable[[Any, Inputs], Any]
    modules: List[nn.Module]
    needs_inputs: bool = False  # reads the step's inputs besides h (then rows cannot be migrated)

    def parameters(self) -> List[nn.Parameter]:
        seen, out = set(), []
        for module in self.modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def buffers(self) -> List[Tensor]:
        return [b for m in self.modules for b in m.buffers()]


@dataclass
class BlockChain:
    blocks: List[Block]
    how: str  # which recogniser produced it

    def run(self, inputs: Inputs, start: int = 0, stop: Optional[int] = None, h: Any = None) -> Any:
        """Blocks ``start..stop-1``; ``h`` is block ``start``'s input (ignored for block 0)."""
        stop = len(self.blocks) if stop is None else stop
        for block in self.blocks[start:stop]:
            h = block.fn(h, inputs)
        return h

    def __len__(self) -> int:
        return len(self.blocks)


def _module_block(name: str, module: nn.Module, first: bool) -> Block:
    if first:
        return Block(name, lambda h, inp: module(*inp.args, **inp.kwargs), [module])
    return Block(name, lambda h, inp: module(h), [module])


def _chain_of_modules(named: Sequence[Tuple[str, nn.Module]], how: str) -> BlockChain:
    return BlockChain([_module_block(n, m, i == 0) for i, (n, m) in enumerate(named)], how)


def _single_input(inp: Inputs) -> Tensor:
    if len(inp.args) != 1 or inp.kwargs:
        raise TypeError("this model's chain takes one positional input tensor")
    return inp.args[0]


def _has(model: nn.Module, *attrs: str) -> bool:
    return all(hasattr(model, a) for a in attrs)


# ------------------------------------------------------------------ known structures
def _sequential(model: nn.Module) -> Optional[BlockChain]:
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward and len(model):
        return _chain_of_modules(list(model.named_children()), "nn.Sequential")
    return None


def _resnet(model: nn.Module) -> Optional[BlockChain]:
    """torchvision ResNet (relu/avgpool/fc) and timm ResNet (act1/forward_head)."""
    if "ResNet" not in type(model).__name__ or not _has(model, "conv1", "bn1", "maxpool", "layer1", "layer4"):
        return None
    act = getattr(model, "act1", None) or getattr(model, "relu", None)
    if act is None:
        return None
    stem_modules = [model.conv1, model.bn1, act, model.maxpool]
    blocks = [Block("stem", lambda h, inp: model.maxpool(act(model.bn1(model.conv1(_single_input(inp))))),
                    stem_modules)]
    for layer_name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, layer_name)
        for name, child in layer.named_children():
            blocks.append(_module_block(f"{layer_name}.{name}", child, False))
    if _has(model, "forward_head", "global_pool", "fc"):  # timm
        blocks.append(Block("head", lambda h, inp: model.forward_head(h), [model.global_pool, model.fc]))
        how = "timm ResNet"
    else:
        blocks.append(Block("head", lambda h, inp: model.fc(torch.flatten(model.avgpool(h), 1)),
                            [model.avgpool, model.fc]))
        how = "torchvision ResNet"
    return BlockChain(blocks, how)


def _vgg(model: nn.Module) -> Optional[BlockChain]:
    if "VGG" not in type(model).__name__ or not _has(model, "features", "avgpool", "classifier"):
        return None
    blocks = [_module_block(f"features.{n}", m, i == 0) for i, (n, m) in enumerate(model.features.named_children())]
    blocks.append(Block("head", lambda h, inp: model.classifier(torch.flatten(model.avgpool(h), 1)),
                        [model.avgpool, model.classifier]))
    return BlockChain(blocks, "torchvision VGG")


def _vit(model: nn.Module) -> Optional[BlockChain]:
    if "VisionTransformer" not in type(model).__name__:
        return None
    if _has(model, "conv_proj", "encoder", "heads", "class_token", "_process_input"):  # torchvision
        enc = model.encoder

        def embed(h, inp):
            x = model._process_input(_single_input(inp))
            x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
            return enc.dropout(x + enc.pos_embedding)

        blocks = [Block("embed", embed, [model.conv_proj, enc.dropout, _ParamHolder(model.class_token, enc.pos_embedding)])]
        blocks += [_module_block(f"encoder.layers.{n}", m, False) for n, m in enc.layers.named_children()]
        blocks.append(Block("head", lambda h, inp: model.heads(enc.ln(h)[:, 0]), [enc.ln, model.heads]))
        return BlockChain(blocks, "torchvision ViT")
    if _has(model, "patch_embed", "_pos_embed", "blocks", "norm", "forward_head"):  # timm
        def embed(h, inp):
            x = model._pos_embed(model.patch_embed(_single_input(inp)))
            x = model.patch_drop(x) if hasattr(model, "patch_drop") else x
            return model.norm_pre(x) if hasattr(model, "norm_pre") else x

        extra = [p for n, p in model.named_parameters(recurse=False)]  # cls_token, pos_embed, ...
        embed_modules = [model.patch_embed, _ParamHolder(*extra)]
        embed_modules += [getattr(model, n) for n in ("patch_drop", "norm_pre", "pos_drop") if hasattr(model, n)]
        blocks = [Block("embed", embed, embed_modules)]
        blocks += [_module_block(f"blocks.{n}", m, False) for n, m in model.blocks.named_children()]
        head_modules = [model.norm] + [getattr(model, n) for n in ("fc_norm", "head_drop", "head") if hasattr(model, n)]
        blocks.append(Block("head", lambda h, inp: model.forward_head(model.norm(h)), head_modules))
        return BlockChain(blocks, "timm ViT")
    return None


def _convnext(model: nn.Module) -> Optional[BlockChain]:
    if "ConvNeXt" not in type(model).__name__ or not _has(model, "stem", "stages", "forward_head"):
        return None
    blocks = [_module_block("stem", model.stem, True)]
    for s, stage in model.stages.named_children():
        if not _has(stage, "downsample", "blocks"):
            return None
        blocks.append(_module_block(f"stages.{s}.downsample", stage.downsample, False))
        blocks += [_module_block(f"stages.{s}.blocks.{n}", m, False) for n, m in stage.blocks.named_children()]
    norm_pre = getattr(model, "norm_pre", nn.Identity())
    blocks.append(Block("head", lambda h, inp: model.forward_head(norm_pre(h)), [norm_pre, model.head]))
    return BlockChain(blocks, "timm ConvNeXt")


def _gpt2(model: nn.Module) -> Optional[BlockChain]:
    """Hugging Face GPT-2 (``GPT2LMHeadModel`` or ``GPT2Model``) called with input ids only."""
    if not type(model).__name__.startswith("GPT2"):
        return None
    body = getattr(model, "transformer", model)
    if not _has(body, "wte", "wpe", "drop", "h", "ln_f"):
        return None

    def embed(h, inp):
        ids = inp.args[0] if inp.args else inp.kwargs.get("input_ids")
        if ids is None or len(inp.args) + len(inp.kwargs) != 1:
            raise TypeError("the GPT-2 chain takes input_ids only (no attention_mask, labels, ...)")
        return body.drop(body.wte(ids) + body.wpe(torch.arange(ids.shape[1], device=ids.device)))

    def layer(module):
        def run(h, inp):
            out = module(h)
            return out[0] if isinstance(out, tuple) else out
        return run

    blocks = [Block("embed", embed, [body.wte, body.wpe, body.drop])]
    blocks += [Block(f"h.{i}", layer(m), [m]) for i, m in enumerate(body.h)]
    if hasattr(model, "lm_head"):
        from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

        blocks.append(Block("head", lambda h, inp: CausalLMOutputWithCrossAttentions(
            logits=model.lm_head(body.ln_f(h))), [body.ln_f, model.lm_head]))
    else:
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        blocks.append(Block("head", lambda h, inp: BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=body.ln_f(h)), [body.ln_f]))
    return BlockChain(blocks, "Hugging Face GPT-2")


# Hugging Face encoders and decoders (transformers 5.x layout). The model computes per-step
# values once (the attention mask in the layout the layers expect, the rotary tables) and hands
# them to every layer; the chain recomputes them from the step's inputs with the model's own
# functions, once per run (_per_step). Other transformers versions call their layers
# differently: the guess then fails verify_chain and the model falls through to fx / off.
def _positional_names(model: nn.Module) -> List[str]:
    return [n for n, p in inspect.signature(model.forward).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _hf_inputs(names: Sequence[str], inp: Inputs, allowed: Sequence[str], how: str) -> Dict[str, Any]:
    """The step's inputs by name (positional ones bound in the forward's parameter order
    ``names``). Anything but ``allowed`` (labels, inputs_embeds, past_key_values, ...) is refused."""
    if len(inp.args) > len(names):
        raise TypeError(f"too many positional inputs ({len(inp.args)}) for the {how} chain")
    given = dict(zip(names, inp.args))
    for key, value in inp.kwargs.items():
        if key in given:
            raise TypeError(f"input {key!r} given twice")
        given[key] = value
    extra = sorted(k for k, v in given.items() if v is not None and k not in allowed)
    if extra or given.get("input_ids") is None:
        raise TypeError(f"the {how} chain takes input_ids and optionally {', '.join(allowed[1:])}; "
                        f"got {extra or 'no input_ids'}")
    return given


def _per_step(inp: Inputs, key: Tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """``make()`` once per inputs object and key: every layer of a run shares one mask."""
    if key not in inp.memo:
        inp.memo[key] = make()
    return inp.memo[key]


def _layer_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _bert(model: nn.Module) -> Optional[BlockChain]:
    """BertModel, BertForSequenceClassification, BertForMaskedLM: embeddings -> encoder.layer[i]
    -> pooler / head, the padding mask expanded by the model's ``_create_attention_masks``."""
    name = type(model).__name__
    if "Bert" not in name:
        return None
    body = getattr(model, "bert", model)
    if not (_has(body, "embeddings", "encoder", "config", "_create_attention_masks")
            and hasattr(body.encoder, "layer")):
        return None
    if body.config.is_decoder or getattr(body.config, "add_cross_attention", False):
        return None  # causal masks and cross-attention: not this chain
    try:
        from transformers import modeling_outputs as mo
    except ImportError:
        return None

    how = "Hugging Face BERT"
    allowed = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    names = _positional_names(model)
    layers = list(body.encoder.layer)

    def embed(h, inp):
        x = _hf_inputs(names, inp, allowed, how)
        return body.embeddings(input_ids=x["input_ids"], token_type_ids=x.get("token_type_ids"),
                               position_ids=x.get("position_ids"))

    def mask(h, inp):
        def make():
            x = _hf_inputs(names, inp, allowed, how)
            return body._create_attention_masks(attention_mask=x.get("attention_mask"), encoder_attention_mask=None,
                                                embedding_output=h, encoder_hidden_states=None,
                                                past_key_values=None)[0]
        return _per_step(inp, (id(body), "mask", tuple(h.shape[:2]), h.dtype, h.device), make)

    def layer(module):
        return lambda h, inp: _layer_output(module(h, mask(h, inp)))

    blocks = [Block("embeddings", embed, [body.embeddings])]
    blocks += [Block(f"encoder.layer.{i}", layer(m), [m], needs_inputs=True) for i, m in enumerate(layers)]
    if model is body:
        pooler = [] if body.pooler is None else [body.pooler]
        blocks.append(Block("head", lambda h, inp: mo.BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=h, pooler_output=body.pooler(h) if pooler else None), pooler))
    elif (name.endswith("ForSequenceClassification") and _has(model, "dropout", "classifier")
          and body.pooler is not None):
        blocks.append(Block("head", lambda h, inp: mo.SequenceClassifierOutput(
            logits=model.classifier(model.dropout(body.pooler(h)))), [body.pooler, model.dropout, model.classifier]))
    elif name.endswith("ForMaskedLM") and hasattr(model, "cls"):
        blocks.append(Block("head", lambda h, inp: mo.MaskedLMOutput(logits=model.cls(h)), [model.cls]))
    else:
        return None
    return BlockChain(blocks, how)


def _llama(model: nn.Module) -> Optional[BlockChain]:
    """Llama-style decoders (LlamaModel / LlamaForCausalLM and the same layout: Mistral, Qwen2,
    Qwen3, Phi-3, ...): embed_tokens -> layers[i] -> norm -> lm_head, with the causal (or
    sliding-window) mask and the rotary position embeddings built once per step, as the model does."""
    body = getattr(model, "model", model)
    if not (_has(body, "embed_tokens", "layers", "norm", "rotary_emb", "config")
            and isinstance(body.layers, nn.ModuleList)):
        return None
    try:
        from transformers import masking_utils
        from transformers import modeling_outputs as mo
    except ImportError:
        return None
    config = body.config
    if not hasattr(masking_utils, "create_causal_mask"):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral / Phi-3: one mask for all layers, sliding if configured
        layer_types = ["sliding_attention" if getattr(config, "sliding_window", None) is not None
                       else "full_attention"] * config.num_hidden_layers
    mask_fns = {"full_attention": masking_utils.create_causal_mask,
                "sliding_attention": getattr(masking_utils, "create_sliding_window_causal_mask", None)}
    if any(mask_fns.get(t) is None for t in layer_types):
        return None  # an attention kind this chain does not build (chunked, ...)
    how = "Hugging Face decoder"
    allowed = ("input_ids", "attention_mask", "position_ids")
    names = _positional_names(model)
    layers = list(body.layers)[:config.num_hidden_layers]

    def context(h, inp, kind):
        """(mask, position_ids, position embeddings) for layers of attention ``kind``."""
        def positions():
            x = _hf_inputs(names, inp, allowed, how)
            ids = x.get("position_ids")
            ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0) if ids is None else ids
            return x, ids, body.rotary_emb(h, position_ids=ids)

        shape = (id(body), tuple(h.shape[:2]), h.dtype, h.device)
        x, ids, rotary = _per_step(inp, shape + ("positions",), positions)
        mask = _per_step(inp, shape + (kind,), lambda: mask_fns[kind](
            config=config, inputs_embeds=h, attention_mask=x.get("attention_mask"),
            past_key_values=None, position_ids=ids))
        return mask, ids, rotary

    def embed(h, inp):
        return body.embed_tokens(_hf_inputs(names, inp, allowed, how)["input_ids"])

    def layer(module, kind):
        def run(h, inp):
            mask, ids, rotary = context(h, inp, kind)
            return _layer_output(module(h, attention_mask=mask, position_ids=ids, position_embeddings=rotary))
        return run

    blocks = [Block("embed_tokens", embed, [body.embed_tokens, body.rotary_emb])]
    blocks += [Block(f"layers.{i}", layer(m, layer_types[i]), [m], needs_inputs=True) for i, m in enumerate(layers)]
    if model is body:
        blocks.append(Block("head", lambda h, inp: mo.BaseModelOutputWithPast(last_hidden_state=body.norm(h)),
                            [body.norm]))
    elif hasattr(model, "lm_head") and type(model).__name__.endswith("ForCausalLM"):
        blocks.append(Block("head", lambda h, inp: mo.CausalLMOutputWithPast(logits=model.lm_head(body.norm(h))),
                            [body.norm, model.lm_head]))
    else:
        return None
    return BlockChain(blocks, how)


class _ParamHolder(nn.Module):
    """Lets a block own loose parameters (class token, position embedding)."""

    def __init__(self, *params: nn.Parameter):
        super().__init__()
        self._held = list(params)

    def parameters(self, recurse: bool = True):  # noqa: D401 - mirrors nn.Module
        return iter(self._held)


KNOWN_STRUCTURES = (_sequential, _resnet, _vgg, _vit, _convnext, _gpt2, _bert, _llama)


# ------------------------------------------------------------------ torch.fx
def fx_chain(model: nn.Module) -> BlockChain:
    """Trace ``model`` and cut its graph wherever exactly one computed value is live.

    Placeholders (the inputs) and attributes are not cut values: every segment receives the
    original inputs and reads attributes itself. Segments that own no parameters are merged
    into the one before, so blocks line up with layers.
    """
    gm = torch.fx.symbolic_trace(model)
    nodes = list(gm.graph.nodes)
    compute = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    output = next(n for n in nodes if n.op == "output")
    pos = {n: i for i, n in enumerate(compute)}
    last_use = {}
    for n in compute:
        uses = [pos[u] for u in n.users if u in pos]
        last_use[n] = len(compute) if output in n.users else max(uses, default=pos[n])
    cuts = []  # k: cut after compute[k], carrying compute[k]
    live = 0
    ends_at: Dict[int, int] = {}
    for k, n in enumerate(compute):
        live += 1
        ends_at[last_use[n]] = ends_at.get(last_use[n], 0) + 1
        live -= ends_at.pop(k, 0)
        if live == 1 and last_use[n] > k and k + 1 < len(compute):
            cuts.append(k)
    placeholders = [n for n in nodes if n.op == "placeholder"]

    def touches_params(segment) -> bool:
        for n in segment:
            if n.op == "call_module" and any(True for _ in gm.get_submodule(n.target).parameters()):
                return True
            if any(a.op == "get_attr" for a in n.all_input_nodes):
                return True
        return False

    bounds = [-1] + cuts + [len(compute) - 1]
    segments = [compute[a + 1:b + 1] for a, b in zip(bounds[:-1], bounds[1:])]
    merged: List[list] = []
    for seg in segments:
        if merged and not touches_params(seg):
            merged[-1] = merged[-1] + seg
        else:
            merged.append(seg)
    if len(merged) > 1 and not touches_params(merged[0]):  # a parameter-free head start joins the next
        merged[1] = merged[0] + merged[1]
        merged.pop(0)

    blocks = []
    carried = None
    for i, seg in enumerate(merged):
        last = i == len(merged) - 1
        uses_inputs = i == 0 or any(a.op == "placeholder" for n in seg for a in n.all_input_nodes)
        sub = _fx_segment(gm, seg, carried, placeholders if uses_inputs else [], output if last else seg[-1])
        if i == 0:
            fn = (lambda s: (lambda h, inp: s(*inp.args, **inp.kwargs)))(sub)
        elif uses_inputs:
            fn = (lambda s: (lambda h, inp: s(h, *inp.args, **inp.kwargs)))(sub)
        else:
            fn = (lambda s: (lambda h, inp: s(h)))(sub)
        blocks.append(Block(f"fx[{seg[0].name}..{seg[-1].name}]", fn, [sub], needs_inputs=uses_inputs and i > 0))
        carried = seg[-1]
    return BlockChain(blocks, "torch.fx")


def _fx_segment(gm, segment, carried, placeholders, result):
    graph = torch.fx.Graph()
    env = {}
    if carried is not None:
        env[carried] = graph.placeholder("smartfrz_h")
    for p in placeholders:
        env[p] = graph.node_copy(p, lambda x: env[x])
    for n in segment:
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in env:
                env[a] = graph.node_copy(a, lambda x: env[x])
        env[n] = graph.node_copy(n, lambda x: env[x])
    if result.op == "output":
        graph.output(torch.fx.map_arg(result.args[0], lambda x: env[x]))
    else:
        graph.output(env[result])
    return torch.fx.GraphModule(gm, graph)


# ------------------------------------------------------------------ discovery and checks
def _outputs_match(a: Any, b: Any) -> bool:
    for key in ("logits", "last_hidden_state"):  # Hugging Face outputs: compare what was asked
        if hasattr(a, key) and hasattr(b, key):
            a, b = getattr(a, key), getattr(b, key)
            break
    la, lb = tree_flatten(a)[0], tree_flatten(b)[0]
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, Tensor) != isinstance(y, Tensor):
            return False
        if isinstance(x, Tensor):
            if x.shape != y.shape or not torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5):
                return False
    return True


def verify_chain(model: nn.Module, chain: BlockChain, inputs: Inputs) -> Optional[str]:
    """None if the chain reproduces ``model``'s output on ``inputs``; else why not."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with preserved_state(model), torch.no_grad():
            expected = model(*inputs.args, **inputs.kwargs)
            got = chain.run(inputs)
    except Exception as exc:  # a recogniser's guess that does not run is just not this model
        return f"running the {chain.how} blocks failed ({type(exc).__name__}: {exc})"
    finally:
        for m, training in modes.items():
            m.training = training
    if not _outputs_match(expected, got):
        return f"the {chain.how} blocks do not reproduce the model's output"
    return None


def find_blocks(model: nn.Module, inputs: Inputs, blocks: Optional[Sequence[nn.Module]] = None
                ) -> Tuple[Optional[BlockChain], str]:
    """The model's block chain and how it was found, or None and why there is none."""
    if blocks is not None:
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise TypeError("blocks= must be a non-empty list of nn.Modules, applied in order")
        chain = _chain_of_modules([(f"blocks[{i}]", b) for i, b in enumerate(blocks)], "user blocks")
        why = verify_chain(model, chain, inputs)
        if why is not None:
            raise ValueError(
                f"ActivationCache: {why}: the blocks you gave must satisfy "
                "model(x) == blocks[-1](...blocks[1](blocks[0](x))) (checked in eval mode)."
            )
        return chain, chain.how
    reasons = []
    for recognise in KNOWN_STRUCTURES:
        chain = recognise(model)
        if chain is None:
            continue
        why = verify_chain(model, chain, inputs)
        if why is None:
            return chain, chain.how
        reasons.append(why)
    try:
        chain = fx_chain(model)
    except Exception as exc:
        reasons.append(f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})")
    else:
        if len(chain) < 2:
            reasons.append(f"the traced forward of {type(model).__name__} has no point where a single value is live")
        else:
            why = verify_chain(model, chain, inputs)
            if why is None:
                return chain, chain.how
            reasons.append(why)
    return None, "; ".join(reasons) + ". Pass blocks=[...] (modules whose composition is the model)."
