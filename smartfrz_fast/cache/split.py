"""Cutting a model into a chain of blocks, so that a frozen prefix can be skipped.

A chain is a list of blocks with ``model(*args, **kwargs) == b[n-1](...b[1](b[0](inputs)))``.
The activation cache can only cut between blocks: the value crossing the cut is one tensor per
sample. Every block is called as ``fn(h, inputs)``: ``h`` is the previous block's output (the
model's inputs for block 0) and ``inputs`` the step's original inputs, which later blocks may
read (an attention mask) since the loader yields them every step anyway. A block that reads
only named per-sample inputs (``side_inputs``, bound by ``BlockChain.bind``) can also be run
later on a stored row with that sample's stored side inputs (migration at a deeper freeze).

Chains come from, in this order: the user's list of blocks; a known structure (nn.Sequential,
torchvision ResNet/VGG/ViT, timm ResNet/ViT/ConvNeXt, Hugging Face GPT-2, BERT and Llama-style
decoders, recognised by class name and attributes, since none of these libraries needs to be
importable); a ``torch.fx`` trace cut where exactly one value is live. Whatever produced it, a
chain is accepted only after it reproduced the model's output on the example inputs (eval mode,
RNG and buffers restored).
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils._python_dispatch import TorchDispatchMode

from ..units import (ParameterWrites, PythonAttributes, compiled_modules_run_eagerly, host_draws_at,
                     marks_output_for_grad, preserved_modes, preserved_rngs, preserved_state, uninitialized)
from .swap import SWAP, _DropoutOff, buffers_now, draws_at, not_reproducible, tensor_trees_match


@dataclass
class Inputs:
    """One step's model inputs."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    # values derived from these inputs once and shared by the blocks of a run (attention masks,
    # rotary tables): see _per_step
    memo: Dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    # the number of samples, once known (the forward's sample ids): see cache.core._batch_size
    batch: Optional[int] = field(default=None, compare=False)


@dataclass
class Block:
    name: str
    fn: Callable[[Any, Inputs], Any]
    modules: List[nn.Module]
    # reads the step's inputs besides h in a way the cache cannot replay (then rows cannot be migrated)
    needs_inputs: bool = False
    # names of the per-sample inputs it reads besides h (an attention mask, position ids): the cache
    # keeps them per sample id, so that stored rows can be pushed through this block later
    side_inputs: Tuple[str, ...] = ()
    # the modules whose calls a cached row stands in for, where ``modules`` holds only the
    # block's parameters (the module swap's blocks); None: ``modules`` and their descendants
    runs: Optional[List[nn.Module]] = None
    # modules whose calls start in the block but end after it (the module swap's blocks): cut
    # there, their forward runs on a stand-in's output, so their hooks would see a wrong input
    enters: List[nn.Module] = field(default_factory=list)

    def parameters(self) -> List[nn.Parameter]:
        seen, out = set(), []
        for module in self.modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def buffers(self) -> List[Tensor]:
        if self.runs is not None:  # the module swap's blocks hold loose parameters: the buffers are the called modules'
            return list({id(b): b for m in self.runs for b in m.buffers(recurse=False)}.values())
        return [b for m in self.modules for b in m.buffers()]


@dataclass
class BlockChain:
    blocks: List[Block]
    how: str  # which recogniser produced it
    # the step's inputs by name (positional ones bound to the forward's parameter names); needed
    # when blocks read side_inputs. A block run on Inputs((), {name: value}) sees those values.
    bind: Optional[Callable[["Inputs"], Dict[str, Any]]] = None
    passed_over: Optional[str] = None  # why a structure recognised in the model (a known chain) was not used

    @property
    def side_inputs(self) -> Tuple[str, ...]:
        """Names read besides h by the blocks after the first, in chain order."""
        return tuple(dict.fromkeys(n for b in self.blocks[1:] for n in b.side_inputs))

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


def _children(container: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, child) in the order an ``nn.Sequential`` or a loop over an ``nn.ModuleList`` calls
    them: a child registered under two names counts twice (``named_children()`` lists it once,
    and a dropout reused along an nn.Sequential dropped out of the chain; the chain's check runs
    in eval mode, where dropout is the identity, so nothing noticed)."""
    return [(name, child) for name, child in container._modules.items() if child is not None]


def _chain_of_modules(named: Sequence[Tuple[str, nn.Module]], how: str) -> BlockChain:
    return BlockChain([_module_block(n, m, i == 0) for i, (n, m) in enumerate(named)], how)


def _single_input(inp: Inputs) -> Tensor:
    if len(inp.args) != 1 or inp.kwargs:
        raise TypeError("this model's chain takes one positional input tensor")
    return inp.args[0]


def _has(model: nn.Module, *attrs: str) -> bool:
    return all(hasattr(model, a) for a in attrs)


# the flags timm's models (grad_checkpointing) and Hugging Face's (gradient_checkpointing) switch
# activation checkpointing with
_CHECKPOINTING_FLAGS = ("grad_checkpointing", "gradient_checkpointing")


def checkpointing_switches(model: nn.Module) -> List[Tuple[nn.Module, str, Any]]:
    """(module, flag, value now) of every activation-checkpointing switch the model's modules have."""
    return [(m, name, getattr(m, name)) for m in model.modules() for name in _CHECKPOINTING_FLAGS
            if isinstance(getattr(m, name, None), bool)]


def _checkpointing(model: nn.Module) -> bool:
    """A known chain calls the blocks itself, never the model's checkpointing (timm's
    ``checkpoint_seq``): where it is on, the module swap runs the model's own forward."""
    return any(on for _, _, on in checkpointing_switches(model))


# ------------------------------------------------------------------ known structures
def _sequential(model: nn.Module) -> Optional[BlockChain]:
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward and len(model):
        return _chain_of_modules(_children(model), "nn.Sequential")
    return None


def _resnet(model: nn.Module) -> Optional[BlockChain]:
    """torchvision ResNet (relu/avgpool/fc) and timm ResNet (act1/forward_head)."""
    if "ResNet" not in type(model).__name__ or not _has(model, "conv1", "bn1", "maxpool", "layer1", "layer4") \
            or _checkpointing(model):
        return None
    act = getattr(model, "act1", None) or getattr(model, "relu", None)
    if act is None:
        return None
    stem_modules = [model.conv1, model.bn1, act, model.maxpool]
    blocks = [Block("stem", lambda h, inp: model.maxpool(act(model.bn1(model.conv1(_single_input(inp))))),
                    stem_modules)]
    for layer_name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, layer_name)
        for name, child in _children(layer):
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
    blocks = [_module_block(f"features.{n}", m, i == 0) for i, (n, m) in enumerate(_children(model.features))]
    blocks.append(Block("head", lambda h, inp: model.classifier(torch.flatten(model.avgpool(h), 1)),
                        [model.avgpool, model.classifier]))
    return BlockChain(blocks, "torchvision VGG")


def _vit(model: nn.Module) -> Optional[BlockChain]:
    if "VisionTransformer" not in type(model).__name__ or _checkpointing(model):
        return None
    if _has(model, "conv_proj", "encoder", "heads", "class_token", "_process_input"):  # torchvision
        enc = model.encoder

        def embed(h, inp):
            x = model._process_input(_single_input(inp))
            x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
            return enc.dropout(x + enc.pos_embedding)

        blocks = [Block("embed", embed, [model.conv_proj, enc.dropout, _ParamHolder(model.class_token, enc.pos_embedding)])]
        blocks += [_module_block(f"encoder.layers.{n}", m, False) for n, m in _children(enc.layers)]
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
        blocks += [_module_block(f"blocks.{n}", m, False) for n, m in _children(model.blocks)]
        head_modules = [model.norm] + [getattr(model, n) for n in ("fc_norm", "head_drop", "head") if hasattr(model, n)]
        blocks.append(Block("head", lambda h, inp: model.forward_head(model.norm(h)), head_modules))
        return BlockChain(blocks, "timm ViT")
    return None


def _convnext(model: nn.Module) -> Optional[BlockChain]:
    if "ConvNeXt" not in type(model).__name__ or not _has(model, "stem", "stages", "forward_head") \
            or _checkpointing(model):
        return None
    blocks = [_module_block("stem", model.stem, True)]
    for s, stage in _children(model.stages):
        if not _has(stage, "downsample", "blocks"):
            return None
        blocks.append(_module_block(f"stages.{s}.downsample", stage.downsample, False))
        blocks += [_module_block(f"stages.{s}.blocks.{n}", m, False) for n, m in _children(stage.blocks)]
    norm_pre = getattr(model, "norm_pre", nn.Identity())
    blocks.append(Block("head", lambda h, inp: model.forward_head(norm_pre(h)), [norm_pre, model.head]))
    return BlockChain(blocks, "timm ConvNeXt")


# Hugging Face encoders and decoders (transformers 5.x, and 4.57). The model computes per-step
# values once (the attention mask in the layout the layers expect, the rotary tables) and hands
# them to every layer; the chain recomputes them from the step's inputs with the model's own
# functions, once per run (_per_step). Where versions differ, the chain detects which function
# or argument the installed one has; a layout it does not know fails verify_chain and the model
# falls through to fx / off.
def _positional_names(model: nn.Module) -> List[str]:
    return [n for n, p in inspect.signature(model.forward).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _hf_inputs(names: Sequence[str], inp: Inputs, allowed: Sequence[str], how: str,
               need_ids: bool = True) -> Dict[str, Any]:
    """The step's inputs by name (positional ones bound in the forward's parameter order
    ``names``). Anything but ``allowed`` (labels, inputs_embeds, past_key_values, ...) is refused.
    Only the embedding needs ``input_ids``: later layers also run on stored side inputs alone."""
    if len(inp.args) > len(names):
        raise TypeError(f"too many positional inputs ({len(inp.args)}) for the {how} chain")
    given = dict(zip(names, inp.args))
    for key, value in inp.kwargs.items():
        if key in given:
            raise TypeError(f"input {key!r} given twice")
        given[key] = value
    extra = sorted(k for k, v in given.items() if v is not None and k not in allowed)
    if extra or (need_ids and given.get("input_ids") is None):
        raise TypeError(f"the {how} chain takes input_ids and optionally {', '.join(allowed[1:])}; "
                        f"got {extra or 'no input_ids'}" + (" (leave other keys, a sample id, out of the batch "
                                                             "the model is called with)" if extra else ""))
    return given


def _mask_builders() -> Tuple[Any, Any]:
    """(transformers' ``masking_utils``, ``modeling_outputs``): both None without transformers
    (not a Hugging Face model), masking_utils None before 4.53 (masks were built inside each model)."""
    try:
        from transformers import modeling_outputs
    except ImportError:
        return None, None
    try:
        from transformers import masking_utils
    except ImportError:
        return None, modeling_outputs
    return (masking_utils if hasattr(masking_utils, "create_causal_mask") else None), modeling_outputs


def _too_old(how: str, lacks: str = "has no masking_utils.create_causal_mask (added in 4.53)") -> str:
    """Why a recognised decoder gets no chain on this transformers (a reason, not a chain)."""
    import transformers

    return (f"the {how} layout is recognised, but transformers {transformers.__version__} {lacks}, "
            "and the cache builds the layers' attention masks as masking_utils does: upgrade "
            "transformers (tested: Llama-style decoders on 4.53, 4.57 and 5.23, GPT-2 on 4.57 and 5.23)")


def _causal_mask_fn(make: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' ``create_causal_mask`` (or a sibling) as ``f(config, h, attention_mask,
    position_ids)`` for a full forward without a KV cache. 5.x takes ``inputs_embeds``; 4.x
    takes ``input_embeds`` and needs ``cache_position`` (0..L-1 without a cache)."""
    params = inspect.signature(make).parameters
    embeds = "inputs_embeds" if "inputs_embeds" in params else "input_embeds"

    def call(config, h, attention_mask, position_ids):
        kwargs = {embeds: h, **_no_kv_cache(params)}
        if "cache_position" in params:
            kwargs["cache_position"] = torch.arange(h.shape[1], device=h.device)
        return make(config=config, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    return call


def _no_kv_cache(params: Any) -> Dict[str, None]:
    """The keyword that tells a mask builder with these parameters there is no KV cache:
    ``past_key_values`` up to transformers 5.23, ``cache`` from 5.24."""
    return {"cache": None} if "cache" in params else {"past_key_values": None}


def _per_step(inp: Inputs, key: Tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """``make()`` once per inputs object and key: every layer of a run shares one mask."""
    if key not in inp.memo:
        inp.memo[key] = make()
    return inp.memo[key]


def _layer_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


# A model with a head computes its loss when given labels; so does its chain's head block, the way
# the model's forward does (checked on the first batch: verify_chain compares the losses too).
# num_items_in_batch is what transformers' Trainer passes for a model whose forward takes loss kwargs.
LOSS_INPUTS = ("labels", "num_items_in_batch")


def _causal_lm_loss(model: nn.Module, logits: Tensor, given: Dict[str, Any]) -> Optional[Tensor]:
    """As LlamaForCausalLM / GPT2LMHeadModel: the model's ``loss_function`` (shifted cross-entropy)."""
    if given.get("labels") is None:
        return None
    extra = {} if given.get("num_items_in_batch") is None else {"num_items_in_batch": given["num_items_in_batch"]}
    return model.loss_function(logits=logits, labels=given["labels"], vocab_size=model.config.vocab_size, **extra)


def _bert_classification_loss(model: nn.Module, logits: Tensor, given: Dict[str, Any]) -> Optional[Tensor]:
    """As BertForSequenceClassification.forward (which also fixes ``config.problem_type``)."""
    labels, config, n = given.get("labels"), model.config, model.num_labels
    if labels is None:
        return None
    if config.problem_type is None:
        config.problem_type = ("regression" if n == 1 else "single_label_classification"
                               if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
    if config.problem_type == "regression":
        return nn.functional.mse_loss(logits.squeeze(), labels.squeeze()) if n == 1 else \
            nn.functional.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, n), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def _masked_lm_loss(model: nn.Module, logits: Tensor, given: Dict[str, Any]) -> Optional[Tensor]:
    """As BertForMaskedLM.forward: mean cross-entropy over the labelled tokens (-100: ignored)."""
    if given.get("labels") is None:
        return None
    return nn.functional.cross_entropy(logits.view(-1, model.config.vocab_size), given["labels"].view(-1))


def _bert(model: nn.Module) -> Optional[BlockChain]:
    """BertModel, BertForSequenceClassification, BertForMaskedLM: embeddings -> encoder.layer[i]
    -> pooler / head, the padding mask expanded by the model's ``_create_attention_masks``."""
    name = type(model).__name__
    if "Bert" not in name:
        return None
    body = getattr(model, "bert", model)
    if not (_has(body, "embeddings", "encoder", "config") and hasattr(body.encoder, "layer")
            and (_has(body, "_create_attention_masks") or _has(body, "get_extended_attention_mask"))):
        return None
    if body.config.is_decoder or getattr(body.config, "add_cross_attention", False):
        return None  # causal masks and cross-attention: not this chain
    try:
        from transformers import modeling_outputs as mo
    except ImportError:
        return None

    how = "Hugging Face BERT"
    allowed = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    if model is not body:
        allowed += LOSS_INPUTS
    names = _positional_names(model)
    layers = list(body.encoder.layer)
    if hasattr(body, "_create_attention_masks"):
        mask_params = inspect.signature(body._create_attention_masks).parameters
        no_cache = _no_kv_cache(mask_params)
        takes_positions = "position_ids" in mask_params  # transformers >= 5.25

    def embed(h, inp):
        x = _hf_inputs(names, inp, allowed, how)
        return body.embeddings(input_ids=x["input_ids"], token_type_ids=x.get("token_type_ids"),
                               position_ids=x.get("position_ids"))

    def bind(inp):
        return _hf_inputs(names, inp, allowed, how, need_ids=False)

    def expand(h, bound):
        attention_mask = bound.get("attention_mask")
        if hasattr(body, "_create_attention_masks"):  # 5.x: the model's own helper
            positions = {"position_ids": bound.get("position_ids")} if takes_positions else {}
            return body._create_attention_masks(attention_mask=attention_mask, encoder_attention_mask=None,
                                                embedding_output=h, encoder_hidden_states=None, **no_cache,
                                                **positions)[0]
        # 4.x: BertModel.forward expands the mask inline, for sdpa (absolute positions) like this
        if attention_mask is None:
            attention_mask = torch.ones(h.shape[:2], device=h.device)
        if (getattr(body, "attn_implementation", None) == "sdpa" and attention_mask.dim() == 2
                and getattr(body, "position_embedding_type", "absolute") == "absolute"):
            from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask_for_sdpa

            return _prepare_4d_attention_mask_for_sdpa(attention_mask, h.dtype, tgt_len=h.shape[1])
        return body.get_extended_attention_mask(attention_mask, h.shape[:2])

    def mask(h, inp):
        return _per_step(inp, (id(body), "mask", tuple(h.shape[:2]), h.dtype, h.device),
                         lambda: expand(h, bind(inp)))

    def layer(module):
        return lambda h, inp: _layer_output(module(h, mask(h, inp)))

    blocks = [Block("embeddings", embed, [body.embeddings])]
    blocks += [Block(f"encoder.layer.{i}", layer(m), [m], side_inputs=("attention_mask",))
               for i, m in enumerate(layers)]
    if model is body:
        pooler = [] if body.pooler is None else [body.pooler]
        blocks.append(Block("head", lambda h, inp: mo.BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=h, pooler_output=body.pooler(h) if pooler else None), pooler))
    elif (name.endswith("ForSequenceClassification") and _has(model, "dropout", "classifier", "num_labels")
          and body.pooler is not None):
        def classify(h, inp):
            logits = model.classifier(model.dropout(body.pooler(h)))
            return mo.SequenceClassifierOutput(loss=_bert_classification_loss(model, logits, bind(inp)), logits=logits)
        blocks.append(Block("head", classify, [body.pooler, model.dropout, model.classifier]))
    elif name.endswith("ForMaskedLM") and hasattr(model, "cls"):
        def predict_tokens(h, inp):
            logits = model.cls(h)
            return mo.MaskedLMOutput(loss=_masked_lm_loss(model, logits, bind(inp)), logits=logits)
        blocks.append(Block("head", predict_tokens, [model.cls]))
    else:
        return None
    return BlockChain(blocks, how, bind)


def _llama(model: nn.Module) -> Union[BlockChain, str, None]:
    """Llama-style decoders (LlamaModel / LlamaForCausalLM and the same layout: Mistral, Qwen2,
    Qwen3, Phi-3, ...): embed_tokens -> layers[i] -> norm -> lm_head, with the causal (or
    sliding-window) mask and the rotary position embeddings built once per step, as the model does."""
    body = getattr(model, "model", model)
    if not (_has(body, "embed_tokens", "layers", "norm", "rotary_emb", "config")
            and isinstance(body.layers, nn.ModuleList)):
        return None
    masking_utils, mo = _mask_builders()
    if mo is None:
        return None
    if masking_utils is None:
        return _too_old("Hugging Face decoder")
    config = body.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # Mistral / Phi-3: one mask for all layers, sliding if configured
        layer_types = ["sliding_attention" if getattr(config, "sliding_window", None) is not None
                       else "full_attention"] * config.num_hidden_layers
    mask_fns = {"full_attention": masking_utils.create_causal_mask,
                "sliding_attention": getattr(masking_utils, "create_sliding_window_causal_mask", None)}
    if any(mask_fns.get(t) is None for t in layer_types):
        return None  # an attention kind this chain does not build (chunked, ...)
    mask_fns = {kind: _causal_mask_fn(make) for kind, make in mask_fns.items() if make is not None}
    how = "Hugging Face decoder"
    allowed = ("input_ids", "attention_mask", "position_ids")
    if model is not body:
        allowed += LOSS_INPUTS
    names = _positional_names(model)
    layers = list(body.layers)[:config.num_hidden_layers]

    def bind(inp):
        return _hf_inputs(names, inp, allowed, how, need_ids=False)

    def context(h, inp, kind):
        """(mask, position_ids, position embeddings) for layers of attention ``kind``."""
        def positions():
            x = bind(inp)
            ids = x.get("position_ids")
            ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0) if ids is None else ids
            return x, ids, body.rotary_emb(h, position_ids=ids)

        shape = (id(body), tuple(h.shape[:2]), h.dtype, h.device)
        x, ids, rotary = _per_step(inp, shape + ("positions",), positions)
        mask = _per_step(inp, shape + (kind,), lambda: mask_fns[kind](config, h, x.get("attention_mask"), ids))
        return mask, ids, rotary

    def embed(h, inp):
        return body.embed_tokens(_hf_inputs(names, inp, allowed, how)["input_ids"])

    def layer(module, kind):
        def run(h, inp):
            mask, ids, rotary = context(h, inp, kind)
            return _layer_output(module(h, attention_mask=mask, position_ids=ids, position_embeddings=rotary))
        return run

    blocks = [Block("embed_tokens", embed, [body.embed_tokens, body.rotary_emb])]
    blocks += [Block(f"layers.{i}", layer(m, layer_types[i]), [m], side_inputs=("attention_mask", "position_ids"))
               for i, m in enumerate(layers)]
    if model is body:
        blocks.append(Block("head", lambda h, inp: mo.BaseModelOutputWithPast(last_hidden_state=body.norm(h)),
                            [body.norm]))
    elif _has(model, "lm_head", "loss_function") and type(model).__name__.endswith("ForCausalLM"):
        def predict_next(h, inp):
            logits = model.lm_head(body.norm(h))
            return mo.CausalLMOutputWithPast(loss=_causal_lm_loss(model, logits, bind(inp)), logits=logits)
        blocks.append(Block("head", predict_next, [body.norm, model.lm_head]))
    else:
        return None
    return BlockChain(blocks, how, bind)


def _gpt2(model: nn.Module) -> Union[BlockChain, str, None]:
    """Hugging Face GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``): wte + wpe (+ token types) ->
    h[i] -> ln_f -> lm_head, with the causal mask (padding included) built once per step by
    transformers' ``create_causal_mask``, as GPT2Model.forward does."""
    name = type(model).__name__
    if name not in ("GPT2Model", "GPT2LMHeadModel"):
        return None
    body = getattr(model, "transformer", model)
    if not (_has(body, "wte", "wpe", "drop", "h", "ln_f", "config") and isinstance(body.h, nn.ModuleList)):
        return None
    if getattr(body.config, "add_cross_attention", False):
        return None  # cross-attention: not this chain
    masking_utils, mo = _mask_builders()
    if mo is None:
        return None
    if masking_utils is None:
        return _too_old("Hugging Face GPT-2")
    if hasattr(body, "_update_causal_mask"):  # 4.53: masking_utils exists, GPT-2 does not use it yet
        return _too_old("Hugging Face GPT-2", "builds GPT-2's masks its own way (until 4.54)")
    how = "Hugging Face GPT-2"
    allowed = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    if model is not body:
        allowed += LOSS_INPUTS
    names = _positional_names(model)
    causal_mask = _causal_mask_fn(masking_utils.create_causal_mask)

    def bind(inp):
        return _hf_inputs(names, inp, allowed, how, need_ids=False)

    def positions(x, length, device):  # the model's default: 0..L-1 whatever the padding
        ids = x.get("position_ids")
        return torch.arange(length, device=device).unsqueeze(0) if ids is None else ids

    def embed(h, inp):
        x = _hf_inputs(names, inp, allowed, how)
        ids = x["input_ids"]
        out = body.wte(ids) + body.wpe(positions(x, ids.shape[1], ids.device))
        if x.get("token_type_ids") is not None:  # GPT-2 embeds token types with wte
            out = out + body.wte(x["token_type_ids"])
        return body.drop(out)

    def context(h, inp):
        """(causal mask, position ids) shared by the layers of a run."""
        def make():
            x = bind(inp)
            ids = positions(x, h.shape[1], h.device)
            mask = x.get("attention_mask")
            if mask is not None and mask.ndim < 4:
                mask = mask.view(h.shape[0], -1)
            return causal_mask(body.config, h, mask, ids), ids
        return _per_step(inp, (id(body), "gpt2", tuple(h.shape[:2]), h.dtype, h.device), make)

    def layer(module):
        def run(h, inp):
            mask, ids = context(h, inp)
            return _layer_output(module(h, attention_mask=mask, position_ids=ids))
        return run

    blocks = [Block("embed", embed, [body.wte, body.wpe, body.drop])]
    blocks += [Block(f"h.{i}", layer(m), [m], side_inputs=("attention_mask", "position_ids"))
               for i, m in enumerate(body.h)]
    if model is body:
        blocks.append(Block("head", lambda h, inp: mo.BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=body.ln_f(h)), [body.ln_f]))
    elif hasattr(model, "loss_function"):
        def predict_next(h, inp):
            logits = model.lm_head(body.ln_f(h))
            return mo.CausalLMOutputWithCrossAttentions(loss=_causal_lm_loss(model, logits, bind(inp)), logits=logits)
        blocks.append(Block("head", predict_next, [body.ln_f, model.lm_head]))
    else:
        return None
    return BlockChain(blocks, how, bind)


class _ParamHolder(nn.Module):
    """Lets a block own loose parameters (class token, position embedding)."""

    def __init__(self, *params: nn.Parameter):
        super().__init__()
        self._held = list(params)

    def parameters(self, recurse: bool = True):  # noqa: D401 - mirrors nn.Module
        return iter(self._held)


KNOWN_STRUCTURES = (_sequential, _resnet, _vgg, _vit, _convnext, _gpt2, _bert, _llama)


# ------------------------------------------------------------------ torch.fx
class UnfaithfulTrace(ValueError):
    """A trace of the model would not run what its forward runs (a mode read in Python, a hook)."""


class _ModeFreeTracer(torch.fx.Tracer):
    """Keeps parameter-free leaf modules (StochasticDepth, DropPath, activations) as calls: traced
    through, a ``self.training`` they read would be recorded as the trace's constant
    (``stochastic_depth(x, p, 'row', True)``), and the cached prefix would run them in train mode.

    Refuses, as it meets them, two things of a forward that a graph does not record, and that the
    traced chain would then leave out of every trainable block too (review98): ops on what the
    weights computed run under no_grad or inference mode (a stop-gradient written ``with
    torch.no_grad():``, an ``@torch.no_grad()`` helper: gradients flowed through them; a mask or a
    normalisation of the inputs alone is none, review101), and an attribute set on a traced
    tensor (a max-norm constraint written ``self.weight.data = torch.renorm(...)``, as braindecode's
    ``LinearWithConstraint``: the constraint stopped holding). The trace runs with grad enabled."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._weighted: set = set()  # the nodes computed from the model's parameters

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname and next(m.children(), None) is None and next(m.parameters(recurse=False), None) is None:
            return True
        return super().is_leaf_module(m, qualname)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _AttributeGuardedProxy(node, self)

    def create_node(self, kind, target, args, kwargs, *rest, **named) -> torch.fx.Node:
        node = super().create_node(kind, target, args, kwargs, *rest, **named)
        if (kind == "get_attr" and _is_parameter(self.root, target)) or (
                kind == "call_module" and next(self.root.get_submodule(target).parameters(), None) is not None) \
                or any(n in self._weighted for n in node.all_input_nodes):
            self._weighted.add(node)
            if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
                raise UnfaithfulTrace(f"a forward of the model runs ops on its weights' results under torch.no_grad() "
                                      f"or inference mode (at {target!r}), which a trace does not record: the traced "
                                      "chain would let gradients through them")
        return node


class _EagerDrawsRefused(TorchDispatchMode):
    """A random op that runs on real tensors while tracing (``torch.rand([])`` of transformers'
    LayerDrop, a ``torch.rand(1) < p`` branch of torchvision's v2 transforms: no proxy among its
    arguments) is drawn once and baked into the graph as a constant, for the trainable blocks too:
    the chain then never drew it (every later draw of the run shifted, review97) or served one
    draw for ever. Such a trace is refused."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            raise UnfaithfulTrace(f"a forward of the model draws at random with torch ({func.overloadpacket.__name__} "
                                  "on arguments that do not depend on the input), which a trace would fix to one draw")
        return func(*args, **(kwargs or {}))


def _is_parameter(root: nn.Module, target: str) -> bool:
    """Whether ``target`` names a parameter of ``root`` (not a buffer: an input normalised by a
    dataset's mean and std under no_grad passes no gradient to anything trained, review102)."""
    owner, _, name = target.rpartition(".")
    try:
        return name in root.get_submodule(owner)._parameters
    except AttributeError:
        return False


class _AttributeGuardedProxy(torch.fx.Proxy):
    """A traced tensor on which the forward's Python sets an attribute refuses the trace."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("tracer", "node"):  # its own fields
            return object.__setattr__(self, name, value)
        raise UnfaithfulTrace(f"a forward of the model sets {name!r} on a traced tensor ({self.node.target}) in "
                              "Python (as `self.weight.data = ...`), which a trace does not record")


def _mode_free_trace(model: nn.Module) -> torch.fx.Graph:
    """The traced graph of ``model``, refused when it depends on train/eval mode.

    A module that reads ``self.training`` in Python (``F.dropout(x, p, self.training)`` in a
    user's block) is traced through, and the flag at trace time becomes a constant of the graph:
    traced in eval, the chain would run the trainable blocks without their dropout ever after.
    Tracing in both modes and comparing finds every such read."""
    graphs = []
    attributes = PythonAttributes([(name or type(model).__name__, m) for name, m in model.named_modules()])
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    versions = {name: t._version for name, t in state.items()}
    buffer_names = {name for name, _ in model.named_buffers()}
    saved = {name: b.detach().clone() for name, b in model.named_buffers() if not uninitialized(b)}

    def put_back() -> None:
        """Set-up leaves the model as it found it: a trace that stopped half-way (a proxy the
        forward kept on self for a lazily built memo made every later forward fail) too."""
        with torch.no_grad():
            for name, original in state.items():
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                table = module._buffers if name in buffer_names else module._parameters
                table[leaf] = original
                if name in saved and original._version != versions[name]:
                    original.copy_(saved[name])
        if attributes.changed():
            attributes.restore()

    writes = ParameterWrites(model)  # `p.data.clamp_()` at the top of a forward runs once, on the real tensor
    try:
        with preserved_modes(model.modules()), preserved_rngs(model), torch.enable_grad(), _EagerDrawsRefused(), \
                writes:
            for training in (True, False):
                model.train(training)
                graphs.append(_ModeFreeTracer().trace(model))
            model.train(True)
            with host_draws_at(0.0):  # and once more with Python's and numpy's draws at the other end
                drawn = _ModeFreeTracer().trace(model)
            with host_draws_at(1.0):
                drawn_high = _ModeFreeTracer().trace(model)
    except BaseException:
        writes.put_back()
        put_back()
        raise
    # Python that changes the model's own tensors (``self.count += 1``, weight clipping through
    # ``.data``, which moves no version counter) runs once on the real tensor while tracing and is
    # not in the graph: the chain would never run it (review98: a WGAN critic's clipping)
    now = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    touched = {id(p) for p in writes.touched()}
    changed = [name for name, t in state.items()
               if now.get(name) is not t or t._version != versions[name] or id(t) in touched]
    writes.put_back()
    if changed:
        put_back()
        raise UnfaithfulTrace(
            f"the forward of {type(model).__name__} changes its own tensors in Python ({', '.join(changed[:3])}), "
            "which a trace runs once and does not repeat")
    moved = attributes.changed()
    if moved:  # `self.calls += 1`, a schedule kept on self: the same, for Python values
        attributes.restore()
        raise UnfaithfulTrace(
            f"the forward of {type(model).__name__} changes Python attributes of its modules ({', '.join(moved[:3])}), "
            "which a trace runs once and does not repeat")
    if str(graphs[0]) != str(graphs[1]):
        raise UnfaithfulTrace(
            f"the traced forward of {type(model).__name__} reads train/eval mode outside a parameter-free "
            "module (a `self.training` in Python), which a trace would fix to one mode")
    if str(drawn) != str(graphs[0]) or str(drawn_high) != str(graphs[0]):
        raise UnfaithfulTrace(
            f"the traced forward of {type(model).__name__} draws with Python's or numpy's random generator "
            "(LayerDrop written with random.random()), which a trace would fix to one draw")
    return graphs[0]


def modules_outside(model: nn.Module, chain: BlockChain) -> List[Tuple[str, nn.Module]]:
    """(name, module) of the modules of ``model`` that ``chain`` does not call: the model itself
    and the containers around its blocks (a traced chain calls only leaf modules)."""
    called = {id(m) for block in chain.blocks for top in block.modules for m in top.modules()}
    return [(name or type(model).__name__, m) for name, m in model.named_modules() if id(m) not in called]


# pre-hooks that only recompute a layer's weight from its own parameters and buffers (a pruned
# weight is weight_orig * weight_mask): a cached row stands in for them as for the layer
_WEIGHT_HOOKS = (SpectralNorm, WeightNorm, BasePruningMethod)


def _captures_outputs(hook: Any) -> bool:
    """transformers' (5.x) hooks that collect ``output_hidden_states`` / ``output_attentions``:
    they do nothing unless a forward asks for those outputs, and the cache runs such a forward
    whole (``captured_outputs``), so they need no cut before them."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


# the Hugging Face forward arguments that ask for outputs collected inside the layers
CAPTURED_OUTPUTS = ("output_hidden_states", "output_attentions", "output_router_logits")
# settings (a Hugging Face config's) that choose what a forward returns, not what its layers
# compute from a sample (a forward asking for captured outputs makes no rows): a change of one
# leaves the cached rows as they are
OUTPUT_SWITCHES = frozenset((*CAPTURED_OUTPUTS, "return_dict"))


def captured_outputs(model: nn.Module, kwargs: Dict[str, Any]) -> List[str]:
    """The outputs collected inside the layers that a forward of a Hugging Face model with
    ``kwargs`` asks for (in the call, or as its config's default): cached rows skip the frozen
    layers, which would then be missing from them (or shift them), so such a forward runs the
    whole model. A model of another library may name an argument so and mean something else."""
    config = getattr(model, "config", None)
    if not any(c.__module__.startswith("transformers.") for c in type(config).__mro__):
        return []
    asked = []
    for name in CAPTURED_OUTPUTS:
        value = kwargs[name] if name in kwargs else getattr(config, name, None)
        if value is not None and not isinstance(value, Tensor) and bool(value):
            asked.append(name)
    return asked


def _user_hooks(m: nn.Module, forward_only: bool = False) -> bool:
    """True if ``m`` carries a hook a user placed: forward hooks and pre-hooks, and module
    backward hooks unless ``forward_only``. Not the user's: the engine's frozen-prefix hooks
    (``frozen.engine_hook``), torch's old-style ``spectral_norm``/``weight_norm`` and
    ``torch.nn.utils.prune``, whose pre-hooks only recompute the layer's weight from its own
    parameters and buffers, Hugging Face's ``enable_input_require_grads`` hook (the rows served in
    its module's place require grad instead: ``rows_need_grad``), transformers'
    output-collecting hooks (``_captures_outputs``) and a lazy layer's own materialising pre-hook
    (an ``nn.LazyBatchNorm1d`` the forward never calls keeps it)."""
    hooks = (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    if not forward_only:
        hooks += (*m._backward_hooks.values(), *m._backward_pre_hooks.values())
    return any(not (getattr(h, "engine_hook", False) or isinstance(h, _WEIGHT_HOOKS) or marks_output_for_grad(h)
                    or _captures_outputs(h) or getattr(h, "__func__", None) is LazyModuleMixin._infer_parameters)
               for h in hooks)


def skipped_hooks(model: nn.Module, chain: BlockChain,
                  outside: Optional[List[Tuple[str, nn.Module]]] = None) -> List[str]:
    """Modules of ``model`` that carry hooks a user placed (forward, or module backward hooks)
    and that ``chain`` would not call (``modules_outside``, or ``outside`` when the caller kept
    it). Their hooks would silently not run, so such a chain is not used. The module swap runs
    the model's own forward and skips none."""
    if chain.how == SWAP:
        return []
    return [name for name, m in (modules_outside(model, chain) if outside is None else outside) if _user_hooks(m)]


def block_modules(block: Block) -> List[nn.Module]:
    """The modules a cached row of ``block`` stands in for, each once."""
    modules = block.runs if block.runs is not None else [m for top in block.modules for m in top.modules()]
    return list(dict.fromkeys(modules))  # modules hash by identity


def rows_need_grad(blocks: Sequence[Block]) -> bool:
    """A module of ``blocks`` carries Hugging Face's hook that marks its output as requiring
    grad: rows served in their place must require grad too (reentrant checkpointing of the
    trainable layers after them needs an input that does)."""
    return any(marks_output_for_grad(h) for block in blocks for m in block_modules(block)
               for h in m._forward_hooks.values())


def hooked_modules(block: Block) -> List[nn.Module]:
    """Modules run by ``block`` that carry a user's forward hook or pre-hook. A cached row
    stands in for the block, so such a hook would not run on it (or would see a stand-in's
    output): the cache does not cut past them. Backward hooks do not count: a frozen block's
    calls pass no gradient (a forward whose input needs one is not served from the cache)."""
    modules = dict.fromkeys((*block_modules(block), *block.enters))
    return [m for m in modules if _user_hooks(m, forward_only=True)]


def _unpacked_only(node: torch.fx.Node) -> bool:
    """A value read only by item access with constant keys (``chunk``, ``split``, an LSTM's
    ``(out, state)``, a dict of outputs): a container, whose rows the cache cannot keep (a cut
    there turned the cache off: torchvision's ShuffleNetV2 after ``x.chunk(2, dim=1)``)."""
    return bool(node.users) and all(
        u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], (int, str))
        for u in node.users)


def fx_chain(model: nn.Module) -> BlockChain:
    """Trace ``model`` and cut its graph wherever exactly one computed value is live.

    Placeholders (the inputs) and attributes are not cut values: every segment receives the
    original inputs and reads attributes itself. Segments that own no parameters are merged
    into the one before, so blocks line up with layers. A trace that depends on train/eval
    mode raises ``UnfaithfulTrace``.
    """
    gm = torch.fx.GraphModule(model, _mode_free_trace(model), type(model).__name__)
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_function" and node.target is operator.getitem and not node.users:
            gm.graph.erase_node(node)  # `out, _ = rnn(x)`: the unused item, live at the cut after `out`, left no cut
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
        if live == 1 and last_use[n] > k and k + 1 < len(compute) and not _unpacked_only(n):
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
    if getattr(a, "loss", None) is not None or getattr(b, "loss", None) is not None:  # Hugging Face, labels given
        if not _outputs_match(getattr(a, "loss", None), getattr(b, "loss", None)):
            return False
    for key in ("logits", "last_hidden_state"):  # Hugging Face outputs: compare what was asked
        if hasattr(a, key) and hasattr(b, key):
            a, b = getattr(a, key), getattr(b, key)
            break
    return tensor_trees_match(a, b)


def verify_chain(model: nn.Module, chain: BlockChain, inputs: Inputs) -> Optional[str]:
    """None if the chain reproduces ``model``'s output on ``inputs``; else why not."""
    try:
        with preserved_modes(model.modules()), preserved_state(model), torch.no_grad():
            model.eval()
            expected = model(*inputs.args, **inputs.kwargs)
            got = chain.run(inputs)
            again = None
            if not _outputs_match(expected, got):
                before = buffers_now(model)
                again = model(*inputs.args, **inputs.kwargs)
                if not _outputs_match(expected, again):
                    return not_reproducible(model, before)
    except Exception as exc:  # a recogniser's guess that does not run is just not this model
        return f"running the {chain.how} chain failed ({type(exc).__name__}: {exc})"
    if again is not None:
        return f"the {chain.how} blocks do not reproduce the model's output"
    return _differs_in_training(model, chain, inputs)


def _differs_in_training(model: nn.Module, chain: BlockChain, inputs: Inputs) -> Optional[str]:
    """Why the chain does not reproduce the model in training mode, or None. The check above
    runs in eval mode, where code of the model's own forward that runs only in training (an
    ``if self.training:`` clamp, mask or noise in a subclass of a known structure, whose blocks
    the chain runs without its forward) is off; cached, it would be left out of every training
    step. Compared in train mode, dropout off and every random draw at its lowest and then its
    highest value (a draw the chain does not make shows as a difference at one of them)."""
    try:
        with preserved_modes(model.modules()), preserved_state(model), torch.no_grad(), \
                compiled_modules_run_eagerly(model):
            model.train()
            for extreme in (0, 1):
                outputs = []
                for run in (lambda: model(*inputs.args, **inputs.kwargs), lambda: chain.run(inputs)):
                    # each from the same buffers: a training forward writes some that its output
                    # reads (spectral norm's power iteration)
                    with _DropoutOff(), draws_at(extreme), preserved_state(model):
                        outputs.append(run())
                if not _outputs_match(*outputs):
                    return (f"the {chain.how} blocks do not reproduce the model's output in training mode (its "
                            "forward computes otherwise in training: an `if self.training:` branch, noise or a "
                            "mask of its own, which the blocks would leave out)")
    except Exception as exc:
        return f"running the {chain.how} chain in training mode failed ({type(exc).__name__}: {exc})"
    return None


def _check_chain(model: nn.Module, chain: BlockChain, inputs: Inputs) -> Optional[str]:
    """None if the chain may stand in for the model: it reproduces its output and runs every
    forward hook the model carries; else why not."""
    hooked = skipped_hooks(model, chain)
    if hooked:
        return (f"the {chain.how} blocks would not run the forward hooks on "
                f"{', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''}")
    return verify_chain(model, chain, inputs)


def widest_uncut(chain, units: Sequence[Sequence[Tensor]]) -> int:
    """The most consecutive frozen-prefix lengths, in ``units`` (each unit's parameters, in
    order), the chain cannot cut at: a boundary cuts at the leading units whose parameters all
    lie before it."""
    lengths, before, k = {0, len(units)}, set(), 0
    for block in chain.blocks[:-1]:
        before.update(id(p) for p in block.parameters())
        while k < len(units) and all(id(p) in before for p in units[k]):  # only grows: before does
            k += 1
        lengths.add(k)
    ordered = sorted(lengths)
    return max(b - a for a, b in zip(ordered, ordered[1:])) - 1


def _finer(model: nn.Module, chain, inputs: Inputs, units: Optional[Sequence[Sequence[Tensor]]]):
    """``chain``, or the module swap's where ``chain`` leaves a long run of frozen depths uncut
    and the swap cuts more finely: torch.fx keeps torch.nn's containers (TransformerEncoder) as
    one call, and values live across blocks (XCiT's H, W) leave it no cut inside the body."""
    uncut = None if units is None else widest_uncut(chain, units)
    if uncut is None or uncut <= max(3, len(units) // 4):
        return chain
    from .swap import swap_chain

    swapped, _ = swap_chain(model, inputs)
    return swapped if swapped is not None and widest_uncut(swapped, units) < uncut else chain


def find_blocks(model: nn.Module, inputs: Inputs, blocks: Optional[Sequence[nn.Module]] = None,
                units: Optional[Sequence[Sequence[Tensor]]] = None,
                no_fx: Optional[str] = None) -> Tuple[Optional[BlockChain], str]:
    """The model's block chain and how it was found, or None and why there is none. ``units``
    (the freezer's units' parameters, in order): a traced chain that cuts at few of their
    depths gives way to the module swap's where that cuts at more. ``no_fx``: why a torch.fx
    trace may not serve this model (it is not tried)."""
    if blocks is not None:
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
            raise TypeError("blocks= must be a non-empty list of nn.Modules, applied in order")
        chain = _chain_of_modules([(f"blocks[{i}]", b) for i, b in enumerate(blocks)], "user blocks")
        why = verify_chain(model, chain, inputs)
        if why is not None:
            raise ValueError(
                f"ActivationCache: {why}: the blocks you gave must satisfy "
                "model(x) == blocks[-1](...blocks[1](blocks[0](x))) (checked in eval and in train mode)."
            )
        return chain, chain.how
    reasons = []
    known = None  # why a structure recognised here does not serve: the chain found instead says so
    for recognise in KNOWN_STRUCTURES:
        chain = recognise(model)
        if isinstance(chain, str):  # recognised, but no chain here: why
            reasons.append(chain)
            continue
        if chain is None:
            continue
        why = _check_chain(model, chain, inputs)
        if why is None:
            return chain, chain.how
        reasons.append(why)
        known = known or why
    if no_fx is None and _checkpointing(model):
        no_fx = ("activation checkpointing is on in the model (timm's grad_checkpointing, Hugging Face's "
                 "gradient_checkpointing), which a torch.fx chain or a known structure's would leave out: "
                 "the module swap runs the model's own forward, checkpointing included")
    try:
        if no_fx is not None:
            raise UnfaithfulTrace(no_fx)
        chain = fx_chain(model)
    except UnfaithfulTrace as exc:
        reasons.append(str(exc))
    except Exception as exc:
        reasons.append(f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})")
    else:
        if len(chain) < 2:
            reasons.append(f"the traced forward of {type(model).__name__} has no point where a single value is live")
        else:
            why = _check_chain(model, chain, inputs)
            if why is None:
                chain = _finer(model, chain, inputs, units)
                chain.passed_over = known
                return chain, chain.how
            reasons.append(why)
    from .swap import swap_chain

    swapped, why = swap_chain(model, inputs)
    if swapped is not None:
        swapped.passed_over = known
        return swapped, swapped.how
    reasons.append(why)
    return None, "; ".join(reasons) + ". Pass blocks=[...] (modules whose composition is the model)."
