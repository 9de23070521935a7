"""Real architectures built from their libraries' own configs, tiny, randomly initialised
(nothing is downloaded), for the tests that must hold on the models users train.

``build(name)`` returns a ``RealModel``: the module, ``batch(step)`` giving the forward's
positional and keyword inputs for that step (a fixed function of the step, so two runs see the
same data), and ``loss(output, step)``. Regularisers (dropout, attention dropout, stochastic
depth) are left at the library's defaults or raised, on purpose: frozen units must still be
deterministic.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from torch import nn

HF_MODELS = ("gpt2_tied", "llama_tied", "t5", "distilbert", "roberta", "bert")
VISION_MODELS = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "swin_t")
ALL_MODELS = HF_MODELS + VISION_MODELS
# More architectures, for the tests that must hold beyond the named ones (ALBERT: one layer
# called 12 times; Mamba: tied embeddings and no attention; ViT: patch embedding and a class
# token; convnext: layer scale and stochastic depth; densenet: concatenated features).
MORE_HF_MODELS = ("albert", "mamba_tied", "vit")
MORE_VISION_MODELS = ("convnext_tiny", "densenet121", "regnet_y_400mf")
MORE_MODELS = MORE_HF_MODELS + MORE_VISION_MODELS

VOCAB, SEQ, BATCH, CLASSES = 96, 12, 4, 5


@dataclass
class RealModel:
    name: str
    model: nn.Module
    batch: Callable[[int], Tuple[tuple, Dict[str, Any]]]
    loss: Callable[[Any, int], torch.Tensor]


def importable_torchvision():
    """torchvision, or None when it is not installed. The torchvision wheel that pairs with the
    CPU torch 2.13 has C++ ops built for CUDA, and its import fails at ``torchvision::nms`` (and
    with it ``import transformers``' models, which import torchvision when it is there);
    declaring the two schemas whose fakes its Python side registers makes every model usable
    (detection ops stay unusable). conftest.py calls this first, before anything imports it."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        importable_torchvision.library = library  # the schemas live as long as the library object
        import torchvision
    return torchvision


def _generator(step: int) -> torch.Generator:
    return torch.Generator().manual_seed(7919 * step + 13)


def _tokens(step: int) -> Dict[str, torch.Tensor]:
    g = _generator(step)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, SEQ - 3:] = 0  # one padded row: the mask must reach every block
    return {"input_ids": ids, "attention_mask": mask}


def _classes(step: int) -> torch.Tensor:
    return torch.randint(0, CLASSES, (BATCH,), generator=_generator(step + 10**6))


def _hf(name: str) -> RealModel:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    import transformers as tf

    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "gpt2_tied":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=SEQ, **small))
    elif name == "llama_tied":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                                   num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=SEQ, tie_word_embeddings=True,
                                                   attention_dropout=0.1, **small))
    elif name == "mamba_tied":
        model = tf.MambaForCausalLM(tf.MambaConfig(num_hidden_layers=4, hidden_size=32, state_size=8, expand=2,
                                                   conv_kernel=4, tie_word_embeddings=True, **small))
    elif name == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(
            image_size=16, patch_size=4, num_channels=3, num_hidden_layers=4, hidden_size=32, intermediate_size=64,
            num_attention_heads=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=CLASSES))

        def pixels(step):
            return (), {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=_generator(step)),
                        "labels": _classes(step)}

        return RealModel(name, model, pixels, lambda out, step: out.loss)
    elif name == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(num_layers=3, num_decoder_layers=3, d_model=32, d_ff=64,
                                                          d_kv=8, num_heads=4, decoder_start_token_id=0, **small))
    else:
        config_class, model_class = {
            "distilbert": (tf.DistilBertConfig, tf.DistilBertForSequenceClassification),
            "roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification),
            "bert": (tf.BertConfig, tf.BertForSequenceClassification),
            "albert": (tf.AlbertConfig, tf.AlbertForSequenceClassification),
        }[name]
        if name == "distilbert":
            config = config_class(n_layers=4, dim=32, hidden_dim=64, n_heads=2, max_position_embeddings=SEQ + 2,
                                  num_labels=CLASSES, **small)
        elif name == "albert":  # one layer, called 6 times (ALBERT shares it across depth)
            config = config_class(num_hidden_layers=6, embedding_size=16, hidden_size=32, intermediate_size=64,
                                  num_attention_heads=2, max_position_embeddings=SEQ + 2, num_labels=CLASSES,
                                  classifier_dropout_prob=0.1, **small)
        else:
            config = config_class(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                  max_position_embeddings=SEQ + 2, num_labels=CLASSES, **small)
        model = model_class(config)
        return RealModel(name, model, lambda step: ((), {**_tokens(step), "labels": _classes(step)}),
                         lambda out, step: out.loss)

    def batch(step):
        inputs = _tokens(step)
        # language models predict their input (T5's decoder copies it); padding is ignored
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        return (), {**inputs, "labels": labels}

    return RealModel(name, model, batch, lambda out, step: out.loss)


def _vision(name: str) -> RealModel:
    torchvision = importable_torchvision()
    if torchvision is None:
        pytest.skip("torchvision is not installed (CI installs torchvision==0.28.0 after the README's set-up)")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=CLASSES)
    size = 64 if name == "swin_t" else 32

    def batch(step):
        return (torch.randn(BATCH, 3, size, size, generator=_generator(step)),), {}

    return RealModel(name, model, batch, lambda out, step: nn.functional.cross_entropy(out, _classes(step)))


def build(name: str) -> RealModel:
    if name not in ALL_MODELS + MORE_MODELS:
        raise KeyError(f"unknown model {name!r}; one of {ALL_MODELS + MORE_MODELS}")
    return _hf(name) if name in HF_MODELS + MORE_HF_MODELS else _vision(name)
