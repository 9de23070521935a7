"""The activation cache on Hugging Face BERT, Llama-style decoders and GPT-2 (tiny configs, random
init): the chain reproduces the model with and without (left or right) padding masks, the cache
gives the same loss and gradients as recomputing through the frozen prefix in eval mode (dropout
> 0), and training loops match; layouts the chain does not fit turn the cache off with a reason.
Rows are migrated through newly frozen layers with each sample's stored side inputs: see
tests/test_cache_hf_migrate.py."""

import copy
import importlib
import inspect
import re
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from smartfrz_fast import SmartFreezer, StaticFreeze  # noqa: E402
from smartfrz_fast.cache import ActivationCache, Inputs, find_blocks  # noqa: E402

# BertForMaskedLM's decoder bias is an alias the example forward does not reach; not our concern
pytestmark = pytest.mark.filterwarnings("ignore:SmartFreezer. 1 trainable parameter")

N, L, V = 12, 7, 50
_g = torch.Generator().manual_seed(3)
IDS = torch.randint(1, V, (N, L), generator=_g)
LENGTHS = torch.randint(4, L + 1, (N,), generator=_g)
MASK = (torch.arange(L) < LENGTHS[:, None]).long()  # right padding, fixed per sample
IDS = IDS.masked_fill(MASK == 0, 0)  # pad token 0
LEFT_MASK = MASK.flip(1)  # the same lengths, padded on the left
LEFT_IDS = IDS.flip(1)
PADDING = {"none": (IDS, None), "right": (IDS, MASK), "left": (LEFT_IDS, LEFT_MASK)}
LABELS = torch.randint(0, 3, (N,), generator=_g)
PROBE = torch.randn(L, 16, generator=_g)
DROPOUT = 0.2


def build(kind, dropout=DROPOUT):
    torch.manual_seed(0)
    small = dict(vocab_size=V, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=32, tie_word_embeddings=False, pad_token_id=0,
                 initializer_range=0.2)  # larger than the default 0.02: outputs far from zero
    if kind.startswith("bert"):
        config = transformers.BertConfig(**small, hidden_dropout_prob=dropout,
                                         attention_probs_dropout_prob=dropout, num_labels=3)
        cls = {"bert": transformers.BertModel, "bert-cls": transformers.BertForSequenceClassification,
               "bert-mlm": transformers.BertForMaskedLM}[kind]
    elif kind.startswith("llama"):
        config = transformers.LlamaConfig(**small, num_key_value_heads=1, attention_dropout=dropout)
        cls = transformers.LlamaModel if kind == "llama" else transformers.LlamaForCausalLM
    elif kind == "mistral-lm":  # sliding-window attention, window shorter than the sequence
        config = transformers.MistralConfig(**small, num_key_value_heads=1, attention_dropout=dropout,
                                            sliding_window=3)
        cls = transformers.MistralForCausalLM
    elif kind == "qwen2-lm":  # layer 0 full attention, later layers sliding (per-layer masks)
        config = transformers.Qwen2Config(**small, num_key_value_heads=1, attention_dropout=dropout,
                                          use_sliding_window=True, sliding_window=3, max_window_layers=1)
        cls = transformers.Qwen2ForCausalLM
    elif kind.startswith("gpt2"):
        config = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=3, n_head=2, n_inner=32, n_positions=32,
                                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2, initializer_range=0.2, resid_pdrop=dropout,
                                         embd_pdrop=dropout, attn_pdrop=dropout)
        cls = transformers.GPT2Model if kind == "gpt2" else transformers.GPT2LMHeadModel
    elif kind in ("qwen3-lm", "phi3-lm"):  # the same layout under other names (chain checks only)
        family = {"qwen3-lm": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                  "phi3-lm": (transformers.Phi3Config, transformers.Phi3ForCausalLM)}[kind]
        config = family[0](**small, num_key_value_heads=1, attention_dropout=dropout, bos_token_id=1,
                           eos_token_id=2)
        cls = family[1]
    else:
        raise ValueError(kind)
    return cls(config)


def body_blocks(model):
    """The modules of the chain's blocks before the head, in order (for the reference runs)."""
    body = getattr(model, "bert", None) or getattr(model, "model", None) or getattr(model, "transformer", model)
    if hasattr(body, "encoder"):
        return [body.embeddings, *body.encoder.layer]
    if hasattr(body, "wte"):  # GPT-2: the embedding block is wte + wpe + dropout
        return [nn.ModuleList([body.wte, body.wpe, body.drop]), *body.h]
    return [body.embed_tokens, *body.layers]


def loss_of(kind, out, index):
    if kind == "bert-cls":
        return nn.functional.cross_entropy(out.logits, LABELS[index])
    if kind == "bert-mlm":
        target = IDS[index].masked_fill(MASK[index] == 0, -100)
        return nn.functional.cross_entropy(out.logits.reshape(-1, V), target.reshape(-1))
    if kind.endswith("-lm"):
        target = IDS[index][:, 1:].masked_fill(MASK[index][:, 1:] == 0, -100)
        return nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), target.reshape(-1))
    loss = (out.last_hidden_state * PROBE).sum(-1).pow(2).mean()  # not invariant under the final norm
    pooled = getattr(out, "pooler_output", None)
    return loss if pooled is None else loss + (pooled * PROBE[0]).sum(-1).pow(2).mean()


def main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


KINDS = ["bert", "bert-cls", "bert-mlm", "llama", "llama-lm", "mistral-lm", "qwen2-lm", "gpt2", "gpt2-lm"]
HOW = {"bert": "Hugging Face BERT", "llama": "Hugging Face decoder", "mistral": "Hugging Face decoder",
       "qwen2": "Hugging Face decoder", "qwen3": "Hugging Face decoder", "phi3": "Hugging Face decoder",
       "gpt2": "Hugging Face GPT-2"}


@pytest.mark.parametrize("kind", ["llama-lm", "gpt2-lm"])
def test_decoders_on_transformers_without_masking_utils_run_by_module_swap(kind, monkeypatch):
    # Before 4.53 (no masking_utils.create_causal_mask; checked on 4.46.3) each model built its
    # masks inside: the decoders' chains are not built there (the reason says so), and the module
    # swap, which runs the model's own forward, takes the model.
    from smartfrz_fast.cache import split

    _, outputs = split._mask_builders()
    monkeypatch.setattr(split, "_mask_builders", lambda: (None, outputs))
    assert "added in 4.53" in split._llama(build("llama-lm")) and "added in 4.53" in split._gpt2(build("gpt2-lm"))
    model = build(kind)
    ids = PADDING["none"][0][:3]
    chain, how = find_blocks(model, Inputs((ids,), {}))
    assert how == "module swap"


@pytest.mark.parametrize("padding", list(PADDING))
@pytest.mark.parametrize("kind", KINDS + ["qwen3-lm", "phi3-lm"])
def test_chain_reproduces_the_model_at_every_cut(kind, padding):
    model = build(kind).eval()
    ids, mask = PADDING[padding]
    ids = ids[:5]
    kwargs = {} if mask is None else {"attention_mask": mask[:5]}
    inputs = Inputs((ids,), kwargs)
    chain, how = find_blocks(model, inputs)
    assert chain is not None, how
    assert how == HOW[kind.split("-")[0]] and len(chain) == 5  # embeddings, 3 layers, head
    with torch.no_grad():
        expected = model(ids, **kwargs)
        assert torch.isfinite(main_output(expected)).all()
        for cut in range(1, len(chain)):
            run = Inputs((ids,), kwargs)
            h = chain.run(run, 0, cut)
            got = chain.run(run, cut, h=h)
            torch.testing.assert_close(main_output(got), main_output(expected), rtol=1e-5, atol=1e-6)
            if kind == "bert":
                torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-6)
        if mask is not None:  # the mask reaches the layers: without it the output differs
            unmasked, masked_out = main_output(model(ids)), main_output(expected)
            assert (unmasked - masked_out).abs().max() > 1e-2 * masked_out.abs().max()


@pytest.mark.parametrize("kind", ["bert-cls", "llama-lm", "qwen2-lm", "gpt2-lm"])
def test_chain_reproduces_the_model_with_eager_attention(kind):
    # eager attention takes the additive mask in another layout (BERT on transformers 4.x:
    # get_extended_attention_mask instead of the sdpa expansion)
    config = build(kind).config
    model = type(build(kind))._from_config(config, attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    ids, mask = PADDING["left"]
    chain, how = find_blocks(model, Inputs((ids,), {"attention_mask": mask}))
    assert how == HOW[kind.split("-")[0]], how
    with torch.no_grad():
        run = Inputs((ids,), {"attention_mask": mask})
        got = chain.run(run, 2, h=chain.run(run, 0, 2))
        torch.testing.assert_close(main_output(got), main_output(model(ids, attention_mask=mask)),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-lm"])
def test_gpt2_chain_takes_token_types_and_position_ids(kind):
    model = build(kind).eval()
    kwargs = {"attention_mask": LEFT_MASK[:5], "token_type_ids": IDS[5:10],
              "position_ids": (LEFT_MASK[:5].cumsum(1) - 1).clamp(min=0)}  # positions that skip the padding
    chain, how = find_blocks(model, Inputs((LEFT_IDS[:5],), kwargs))
    assert how == "Hugging Face GPT-2", how
    with torch.no_grad():
        expected = main_output(model(LEFT_IDS[:5], **kwargs))
        for cut in range(1, len(chain)):
            run = Inputs((), {"input_ids": LEFT_IDS[:5], **kwargs})
            got = main_output(chain.run(run, cut, h=chain.run(run, 0, cut)))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for key in ("token_type_ids", "position_ids"):  # each one changes the output
            other = {k: v for k, v in kwargs.items() if k != key}
            assert not torch.allclose(main_output(model(LEFT_IDS[:5], **other)), expected, atol=1e-4)


def test_sliding_window_mask_matters_and_is_used():
    # A window (3) shorter than the sequence (7): a chain built with the plain causal mask would
    # differ; the Mistral chain must reproduce the sliding-window model exactly.
    model = build("mistral-lm").eval()
    chain, _ = find_blocks(model, Inputs((IDS[:4],)))
    full = copy.deepcopy(model)
    full.config.sliding_window = None
    full.model.config.sliding_window = None
    with torch.no_grad():
        assert not torch.allclose(full(IDS[:4]).logits, model(IDS[:4]).logits, atol=1e-4)
        torch.testing.assert_close(chain.run(Inputs((IDS[:4],))).logits, model(IDS[:4]).logits)


LABEL_CASES = {  # labels as the heads take them: classes, multi-hot (BERT's multi-label loss), tokens
    "bert-cls": LABELS[:5], "bert-cls-multi": (LABELS[:5, None] == torch.arange(3)).float(),
    "bert-mlm": IDS[:5].masked_fill(torch.rand(5, L, generator=_g) < 0.5, -100)}


@pytest.mark.parametrize("loss_kwargs", [{}, {"num_items_in_batch": torch.tensor(17)}])
@pytest.mark.parametrize("kind", ["bert-cls", "bert-cls-multi", "bert-mlm", "llama-lm", "qwen2-lm", "gpt2-lm"])
def test_the_chain_computes_the_models_loss_from_labels(kind, loss_kwargs):
    """With labels (and the Trainer's num_items_in_batch, which the decoders' loss divides by and
    BERT ignores) the chain's head computes the loss as the model's forward does."""
    model = build(kind.replace("-multi", "")).eval()
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    if loss_kwargs and not takes_kwargs:
        pytest.skip(f"{type(model).__name__}.forward takes no loss kwargs here (nor does the Trainer pass any)")
    labels = LABEL_CASES.get(kind, IDS[:5].masked_fill(MASK[:5] == 0, -100))
    inputs = Inputs((IDS[:5],), {"attention_mask": MASK[:5], "labels": labels, **loss_kwargs})
    chain, how = find_blocks(model, inputs)  # also compares the losses
    assert chain is not None, how
    with torch.no_grad():
        expected = model(IDS[:5], attention_mask=MASK[:5], labels=labels, **loss_kwargs)
        got = chain.run(inputs)
    assert got.loss is not None
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-6, atol=0)


def test_mask_built_once_per_run(monkeypatch):
    model = build("bert-cls").eval()
    chain, _ = find_blocks(model, Inputs((IDS[:3],), {"attention_mask": MASK[:3]}))
    calls = []
    if hasattr(model.bert, "_create_attention_masks"):  # transformers 5.x: the model's helper
        owner, name = model.bert, "_create_attention_masks"
    else:  # 4.x: the sdpa mask expansion the model calls inline
        owner, name = importlib.import_module("transformers.modeling_attn_mask_utils"), \
            "_prepare_4d_attention_mask_for_sdpa"
    make = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: calls.append(1) or make(*a, **kw))
    with torch.no_grad():
        chain.run(Inputs((IDS[:3],), {"attention_mask": MASK[:3]}))
    assert len(calls) == 1  # shared by the three layers


def units_through_layer(freezer, k):
    """Number of leading units that covers the embeddings and layers 0..k."""
    return 1 + max(i for i, u in enumerate(freezer.units) if re.search(rf"(^|\.)(layers?|h)\.{k}\.", u.name))


def frozen_setup(kind):
    """A model with its embeddings and first layer frozen, its cache, and an untouched copy."""
    model = build(kind)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, 10 ** 9), example_inputs=IDS[:2])
    freezer.freeze_to(units_through_layer(freezer, 0))
    cache = ActivationCache(freezer, num_samples=N, deterministic=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for n, p in reference.named_parameters():
        p.requires_grad_(n not in frozen)
    return model, reference, cache


@pytest.mark.parametrize("kind", KINDS)
def test_cached_loss_and_gradients_equal_eval_prefix_recompute(kind):
    model, reference, cache = frozen_setup(kind)
    wrapped = cache.wrap()
    model.train()
    index = torch.tensor([3, 0, 7, 5])
    for attempt in ("fill", "hit"):
        torch.manual_seed(11)
        loss = loss_of(kind, wrapped(IDS[index], index, attention_mask=MASK[index]), index)
        loss.backward()
        reference.train()
        for block in body_blocks(reference)[:2]:  # the frozen prefix, held in eval
            block.eval()
        torch.manual_seed(11)
        expected = loss_of(kind, reference(IDS[index], attention_mask=MASK[index]), index)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
    assert cache.boundary == 2 and cache.stats["hits"] == 4 and cache.stats["misses"] == 4, cache.describe()
    # dropout really is on: the same step with the prefix in train mode gives another loss
    reference.train()
    torch.manual_seed(11)
    assert not torch.allclose(loss_of(kind, reference(IDS[index], attention_mask=MASK[index]), index), loss)


@pytest.mark.parametrize("kind", ["gpt2-lm", "llama-lm"])
def test_an_input_the_batch_shares_may_come_first(kind):
    """A batch dict whose first tensor is shared by the batch (position_ids of shape [1, L]): the
    batch size is the sample ids' count, and cached rows give the recomputed loss and gradients."""
    model, reference, cache = frozen_setup(kind)
    wrapped = cache.wrap()
    model.train()
    index = torch.tensor([3, 0, 7, 5])
    shared = {"position_ids": torch.arange(L)[None]}
    for attempt in ("fill", "hit"):
        torch.manual_seed(11)
        loss = loss_of(kind, wrapped({**shared, "input_ids": IDS[index]}, index), index)
        loss.backward()
        reference.train()
        for block in body_blocks(reference)[:2]:
            block.eval()
        torch.manual_seed(11)
        expected = loss_of(kind, reference(input_ids=IDS[index], **shared), index)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
    assert cache.boundary == 2 and cache.stats["hits"] == 4 and cache.stats["misses"] == 4, cache.describe()


@pytest.mark.parametrize("asked_by", ["call", "config"])
@pytest.mark.parametrize("kind", ["bert-cls", "llama-lm"])
def test_a_forward_asking_for_hidden_states_and_attentions_runs_the_whole_model(kind, asked_by):
    """Hidden states and attentions are collected inside the layers, frozen ones included, which
    cached rows skip: such a forward runs whole (as the plain model) and says why; the forwards
    that do not ask keep their cached rows (transformers 5 collects them by hooks on the layers,
    installed at the first such forward: not a user's hooks, no cut before them)."""
    model, _, cache = frozen_setup(kind)
    wrapped = cache.wrap()
    model.train()
    index = torch.tensor([3, 0, 7, 5])
    for _ in range(2):  # fills, then serves
        wrapped(IDS[index], index)
    assert cache.stats["hits"] == 4 and cache.boundary == 2
    asked = {"output_hidden_states": True}
    if asked_by == "call":  # (a config asking for attentions needs eager attention)
        asked["output_attentions"] = True
    else:
        for name, value in asked.items():
            setattr(model.config, name, value)
    with pytest.warns(UserWarning, match=f"asks for {' and '.join(asked)} "):
        torch.manual_seed(5)
        got = wrapped(IDS[index], index, **(asked if asked_by == "call" else {}))
    torch.manual_seed(5)
    expected = model(IDS[index], **asked)
    assert len(got.hidden_states) == len(expected.hidden_states) == 4
    for name in (key[len("output_"):] for key in asked):
        if getattr(expected, name) is None:  # attentions under sdpa on transformers 4.x
            assert getattr(got, name) is None
            continue
        for a, b in zip(getattr(got, name), getattr(expected, name), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert cache.stats["bypassed"] == 1
    for name in asked:
        setattr(model.config, name, False)
    wrapped(IDS[index], index)
    assert cache.stats["hits"] == 8 and cache.boundary == 2, cache.describe()
    assert "hook" not in cache.describe()


@pytest.mark.parametrize("kind", ["bert-cls", "gpt2-lm"])
def test_a_first_forward_asking_for_hidden_states_does_not_set_the_cache_up(kind):
    """Set up on it, the chain's check had compared outputs that only a cut before the first
    layer reproduces: the cut stayed shallow for the whole run."""
    model, _, cache = frozen_setup(kind)
    wrapped = cache.wrap()
    model.train()
    index = torch.tensor([3, 0, 7, 5])
    with pytest.warns(UserWarning, match="asks for output_hidden_states"):
        wrapped(IDS[index], index, output_hidden_states=True)  # runs whole, and is no set-up
    assert cache.chain is None and cache.stats["bypassed"] == 1
    # it said "waiting for the first forward pass" (an MoE whose every forward asks for its
    # router logits never sets the cache up)
    assert cache.describe().startswith("activation cache not set up: all 1 forwards so far ran the whole model "
                                       "(the latest: a forward asks for output_hidden_states")
    for _ in range(2):
        wrapped(IDS[index], index)
    assert cache.boundary == 2 and cache.chain.how == HOW[kind.split("-")[0]], cache.describe()
    assert cache.stats["hits"] == 4


@pytest.mark.parametrize("word_embeddings_train", [True, False])
def test_bert_given_inputs_embeds_names_the_word_embedding_it_never_reads(word_embeddings_train):
    """Given inputs_embeds (which the BERT chain does not take: the module swap serves it), BERT
    never reads its word embedding, which the freezer then manages in no unit: while it trains,
    the cache cannot cut after the embeddings and says which parameter to set
    requires_grad=False on; once it does not, cached rows give the model's loss."""
    model = build("bert-cls", dropout=0.0)  # the cached and the plain forward compare exactly
    model.bert.embeddings.word_embeddings.weight.requires_grad_(word_embeddings_train)
    embeds = torch.randn(N, L, 16, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unread word embedding, said at set-up
        freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, 10 ** 9),
                               example_inputs={"inputs_embeds": embeds[:2]})
    freezer.freeze_to(units_through_layer(freezer, 0))
    cache = ActivationCache(freezer, num_samples=N, deterministic=True)
    wrapped = cache.wrap()
    model.train()
    index = torch.tensor([3, 0, 7, 5])
    for _ in range(2):
        out = wrapped({"inputs_embeds": embeds[index], "labels": LABELS[index]}, index)
    if word_embeddings_train:  # at most the token-type embedding, before the block that holds it
        assert cache.boundary <= 1 and "cut after bert.embeddings.LayerNorm" not in cache.describe()
        assert "bert.embeddings.word_embeddings.weight keeps training" in cache.describe()
        assert "requires_grad=False on bert.embeddings.word_embeddings.weight" in cache.describe()
    else:
        # the BERT chain does not take inputs_embeds: the module swap runs the model's own forward
        assert cache.chain.how == "module swap" and cache.boundary > 0 and cache.stats["hits"] == 4, cache.describe()
        with torch.no_grad():
            expected = model(inputs_embeds=embeds[index], labels=LABELS[index])
        torch.testing.assert_close(out.loss, expected.loss, rtol=1e-6, atol=1e-7)


def train(kind, use_cache, epochs=4, deepen_after=1):
    model = build(kind, dropout=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, 10 ** 9), example_inputs=IDS[:2])
    blocks = body_blocks(model)

    def hold_frozen_blocks_in_eval(event, units):  # what the cache does for its prefix
        for block in blocks:
            if any(p.requires_grad for p in block.parameters()):
                break
            block.eval()

    cache = None
    forward = model
    if use_cache:
        cache = ActivationCache(freezer, num_samples=N, deterministic=True)
        forward = cache.wrap()
    else:
        freezer.add_freeze_listener(hold_frozen_blocks_in_eval)
    model.train()
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(5)
    for epoch in range(epochs):
        if epoch == 0:
            freezer.freeze_to(units_through_layer(freezer, 0))
        if epoch == deepen_after + 1:
            freezer.freeze_to(units_through_layer(freezer, 1))
        perm = torch.randperm(N, generator=g)
        for i in range(0, N, 4):
            index = perm[i:i + 4]
            args = (IDS[index], index) if use_cache else (IDS[index],)
            loss = loss_of(kind, forward(*args, attention_mask=MASK[index]), index)
            opt.zero_grad()
            loss.backward()
            opt.step()
            freezer.step()
    return model, cache


@pytest.mark.parametrize("kind", ["bert-cls", "bert-mlm", "llama-lm", "qwen2-lm", "gpt2-lm"])
def test_training_loop_with_cache_matches_eval_prefix_training(kind):
    plain, _ = train(kind, use_cache=False)
    cached, cache = train(kind, use_cache=True)
    assert cache.active and cache.boundary == 3, cache.describe()
    assert cache.stats["hits"] > 0
    # at the deeper freeze every row went through layer 1 with its sample's stored attention mask
    assert cache.stats["migrated"] == N and cache.rows_cached == N
    for (name, p), q in zip(plain.state_dict().items(), cached.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_a_layout_that_only_looks_like_bert_is_refused():
    class ScaledBertForSequenceClassification(transformers.BertForSequenceClassification):
        def forward(self, input_ids, attention_mask=None):  # not what the BERT chain computes
            return super().forward(input_ids, attention_mask=attention_mask).logits * 2

    model = ScaledBertForSequenceClassification(build("bert-cls").config)
    chain, how = find_blocks(model, Inputs((IDS[:2],)))
    assert how == "module swap"  # the BERT chain refused it; the model's own forward runs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the find itself does not warn; the cache does, once
        find_blocks(model, Inputs((IDS[:2],)))


def test_a_block_partly_frozen_is_named_with_the_unit_that_still_trains():
    """The note for a block of a recognised chain holding a trainable parameter gave the reasons
    a torch.fx or module-swap chain finds no cut (a loop over time steps, a sequence-first
    output), which do not apply; it names the unit to wait for (review50)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3))
    ids = torch.randint(0, 50, (16, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezer = SmartFreezer(model, opt, StaticFreeze(1, at_step=1), example_inputs={"input_ids": ids[:2]},
                           total_steps=20)
    cache = ActivationCache(freezer, num_samples=16, deterministic=True)
    cached = cache.wrap()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            sample_ids = torch.arange(8) + 8 * (step % 2)
            cached({"input_ids": ids[sample_ids]}, sample_ids).logits.sum().backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    note = cache.describe()
    assert "(unit 'bert.embeddings." in note and "cuts only between its blocks" in note, note
    assert "time steps" not in note, note


@pytest.mark.parametrize("use_cache", [False, True])
def test_a_decoder_classifier_on_the_module_swap_cuts_after_its_frozen_layers(use_cache):
    """LlamaForSequenceClassification runs on the module swap. transformers 5.25's hub-kernel
    apply_rotary_pos_emb is an nn.Module outside the model that every attention calls, taken for a
    branch: no cut past an attention held, and the cache skipped 3 of 33 ops (review85). With
    use_cache=True the output's key-value cache holds every layer's keys and values: describe()
    says to pass use_cache=False, not "a residual or skip connection"."""
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=32, pad_token_id=0, num_labels=3, use_cache=use_cache))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = SmartFreezer(model, opt, policy=StaticFreeze(1, 10 ** 9), example_inputs=IDS[:2])
    freezer.freeze_to(units_through_layer(freezer, 1))
    cache = ActivationCache(freezer, num_samples=N, deterministic=True)
    cached = cache.wrap()
    for _ in range(2):  # fills, then serves
        out = cached({"input_ids": IDS[:6], "attention_mask": MASK[:6]}, torch.arange(6))
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(input_ids=IDS[:6], attention_mask=MASK[:6]).logits)
    described = cache.describe()
    assert cache.stats["hits"] == 6, described
    if use_cache:
        assert "pass use_cache=False to training forwards" in described, described
    else:
        assert "cut after model.layers.1)" in described, described
