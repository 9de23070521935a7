"""SmartFreezeCallback inside a real transformers.Trainer on the CPU (a tiny BERT built from a
config, no downloads): units freeze inside the trainer, the freeze state survives the Trainer's
own checkpoints, and a run resumed with resume_from_checkpoint ends bit-identical to an
uninterrupted one (shuffled data, dropout on, checkpoint in the middle of an epoch)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from smartfrz_fast import FreezeOut, LinearFreeze, StaticFreeze  # noqa: E402
from smartfrz_fast.integrations.huggingface import (  # noqa: E402
    CHECKPOINT_FILE,
    SmartFreezeCallback,
    check_training_args,
)

MAX_STEPS = 12  # 48 samples, batch 8: 6 steps per epoch, 2 epochs


def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3))


def dataset(n=48):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (n, 8), generator=g)
    labels = ids[:, 0] % 3  # learnable
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def training_args(out, **kwargs):
    defaults = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=MAX_STEPS, save_strategy="steps",
                    save_steps=4, learning_rate=5e-3, max_grad_norm=1.0, logging_strategy="no", report_to="none",
                    use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def make_policy(name):
    return StaticFreeze(5, at_step=3) if name == "static" else FreezeOut(t0=0.3, spacing="linear")


def run(out, policy, resume=None, **kwargs):
    model = tiny_bert()
    trainer = Trainer(model=model, args=training_args(out, **kwargs), train_dataset=dataset())
    callback = SmartFreezeCallback(make_policy(policy)).attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, callback


def inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def test_units_freeze_inside_the_trainer(tmp_path):
    model, trainer, callback = run(tmp_path, "static", save_strategy="no")
    freezer = callback.freezer
    assert freezer.num_frozen == 5 and freezer.timeline[0].step == 3
    assert freezer.step_count == trainer.state.global_step == MAX_STEPS
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen_names == {n for u in freezer.units[:5] for n in u.param_names}
    assert "bert.encoder.layer.0.attention.self.key.weight" in frozen_names
    assert "bert.encoder.layer.0.attention.self.value.weight" not in frozen_names
    opt = inner(trainer.optimizer)
    frozen = [p for u in freezer.units[:5] for p in u.parameters]
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in held or p in opt.state for p in frozen)
    assert all(p in opt.state for p in model.classifier.parameters())
    opt.state_dict()


@pytest.mark.parametrize("policy", ["static", "freezeout"])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, policy):
    with _no_warning():
        full_model, full_trainer, full_cb = run(tmp_path / "full", policy)
    assert full_cb.freezer.num_frozen > 0
    checkpoint = tmp_path / "full" / "checkpoint-4"  # mid-epoch (6 steps per epoch)
    assert (checkpoint / CHECKPOINT_FILE).is_file()
    saved = torch.load(checkpoint / CHECKPOINT_FILE, weights_only=True)
    assert saved["step"] == 4 and saved["num_frozen"] == full_cb.freezer.timeline[0].num_frozen

    with _no_warning():
        model, trainer, callback = run(tmp_path / "resumed", policy, resume=str(checkpoint))
    assert callback.freezer.timeline == full_cb.freezer.timeline
    assert callback.freezer.step_count == MAX_STEPS
    for name, value in full_model.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), f"{name} differs after resume"
    a, b = inner(full_trainer.optimizer).state_dict(), inner(trainer.optimizer).state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][key])), (index, key)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_resume_true_finds_the_last_checkpoint_and_restores_state(tmp_path):
    run(tmp_path, "static", max_steps=8)  # checkpoints 4 and 8
    model = tiny_bert()
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=dataset())
    callback = SmartFreezeCallback(StaticFreeze(5, at_step=3)).attach(trainer)
    seen = {}

    class Probe(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            opt = inner(optimizer)
            seen.update(step=callback.freezer.step_count, frozen=callback.freezer.num_frozen,
                        in_optimizer=sum(len(g["params"]) for g in opt.param_groups),
                        global_step=state.global_step)

    trainer.add_callback(Probe())
    trainer.train(resume_from_checkpoint=True)
    frozen_params = sum(len(u.parameters) for u in callback.freezer.units[:5])
    assert seen == {"step": 8, "frozen": 5, "global_step": 8,
                    "in_optimizer": len(list(model.parameters())) - frozen_params}
    assert callback.freezer.step_count == MAX_STEPS


def test_a_second_train_cannot_go_back_to_a_checkpoint(tmp_path):
    # frozen layers are never unfrozen: a trained freezer cannot return to an earlier checkpoint
    model, trainer, callback = run(tmp_path, "static")
    step = callback.freezer.step_count
    with pytest.raises(RuntimeError, match="trained in an earlier train.*build the model, Trainer and "
                                           "SmartFreezeCallback afresh"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert callback.freezer.step_count == step  # refused before anything ran


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    model, trainer, callback = run(tmp_path, "static", save_strategy="no", gradient_accumulation_steps=3,
                                   max_steps=4)
    assert trainer.state.global_step == 4 == callback.freezer.step_count
    assert callback.freezer.timeline[0].step == 3


def test_a_misspelt_freezer_setting_is_refused_at_construction():
    with pytest.raises(TypeError, match=r"'sample_evry' is not an argument of the callback nor a setting of "
                                         r"SmartFreezer \(did you mean 'sample_every'"):
        SmartFreezeCallback(StaticFreeze(1), sample_evry=2)
    with pytest.raises(TypeError, match=r"'total_step' .* \(did you mean 'total_steps'\?\)"):  # the callback's own
        SmartFreezeCallback(StaticFreeze(1), total_step=5)
    with pytest.raises(TypeError, match=r"takes no submodule=.*keep_trainable="):  # Lightning's, not this one's
        SmartFreezeCallback(StaticFreeze(1), submodule="bert")


def test_callback_without_attach_says_what_to_do(tmp_path):
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, save_strategy="no"), train_dataset=dataset(),
                      callbacks=[SmartFreezeCallback(StaticFreeze(1))])
    with pytest.raises(RuntimeError, match=r"attach\(trainer\)"):
        trainer.train()


def test_a_callback_both_passed_in_callbacks_and_attached_steps_once_per_step(tmp_path):
    """The error above used to say "not only passed in callbacks=[...]": a user who then also
    attached it had the callback registered twice, and the freezer stepped twice per optimizer
    step (a schedule at double speed, review60)."""
    callback = SmartFreezeCallback(StaticFreeze(1, at_step=5))
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, save_strategy="no", max_steps=6),
                      train_dataset=dataset(), callbacks=[callback])
    callback.attach(trainer)
    trainer.train()
    assert sum(c is callback for c in trainer.callback_handler.callbacks) == 1
    assert trainer.state.global_step == 6 == callback.freezer.step_count
    assert callback.freezer.timeline[0].step == 5


def test_a_second_train_past_the_first_runs_steps_names_the_callbacks_total_steps(tmp_path):
    """A second trainer.train() goes on with the same freezer, paced for the first run's steps:
    the engine's warning said to pass total_steps, which the user never passed (review80)."""
    import warnings

    callback = SmartFreezeCallback(LinearFreeze())
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, save_strategy="no", max_steps=6),
                      train_dataset=dataset())
    callback.attach(trainer)
    trainer.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    past = [str(w.message) for w in caught if "total_steps" in str(w.message)]
    assert len(past) == 1, past
    assert "built for that run's 6 optimizer steps; this one adds 6 to the 6 taken" in past[0]
    assert "SmartFreezeCallback(..., total_steps=" in past[0]
    assert callback.freezer.step_count == 12


def test_egeria_runs_in_the_callback(tmp_path):
    """The callback deep-copied its policy as a template for model_init's new models, and
    Egeria (a worker thread's lock, the model's copies) could not be copied (review82)."""
    from smartfrz_fast import Egeria

    model = tiny_bert()
    probe = {"input_ids": torch.stack([item["input_ids"] for item in dataset()[:4]])}
    policy = Egeria(model, probe, interval=2, warmup=2, window=2, patience=1, ref_refresh=8)
    trainer = Trainer(model=model, args=training_args(tmp_path, save_strategy="no", max_steps=8),
                      train_dataset=dataset())
    callback = SmartFreezeCallback(policy).attach(trainer)
    trainer.train()
    policy.close()
    assert callback.freezer.step_count == 8 and policy.overhead()["evaluations"] >= 3


class _PlainClassifier(torch.nn.Module):
    """A model of the user's own (no Hugging Face class) returning a dict with the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.l1, self.l2 = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, input_ids, labels=None):
        logits = self.head(torch.relu(self.l2(torch.relu(self.l1(self.emb(input_ids).mean(1))))))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_a_column_the_model_does_not_take_is_dropped_from_the_example_batch(tmp_path):
    """The Trainer drops dataset columns the model's forward does not take (an 'idx');
    the callback built its set-up batch from the raw items and the model refused it (review60)."""
    items = [{**item, "idx": i} for i, item in enumerate(dataset())]
    model = _PlainClassifier()
    trainer = Trainer(model=model, args=training_args(tmp_path, save_strategy="no", max_steps=4), train_dataset=items)
    callback = SmartFreezeCallback(StaticFreeze(2, at_step=2)).attach(trainer)
    trainer.train()
    assert callback.freezer.num_frozen == 2


def test_neftune_says_its_noise_stops_once_the_embeddings_freeze(tmp_path):
    """NEFTune's hook adds noise only in train mode; frozen embeddings run in eval mode (review60)."""
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, save_strategy="no", neftune_noise_alpha=5.0),
                      train_dataset=dataset())
    with pytest.warns(UserWarning, match="NEFTune.*stops once the embeddings freeze"):
        SmartFreezeCallback(StaticFreeze(1)).attach(trainer)


def test_a_resume_with_other_freezer_settings_names_the_callback_arguments(tmp_path):
    """The engine's advice, "construct it with the checkpoint's settings", names no argument a
    Trainer user passes (review60)."""
    model = tiny_bert()
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=dataset())
    SmartFreezeCallback(StaticFreeze(5, at_step=3), sample_every=1).attach(trainer)
    trainer.train()
    model = tiny_bert()
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=dataset())
    SmartFreezeCallback(StaticFreeze(5, at_step=3), sample_every=2).attach(trainer)
    with pytest.raises(ValueError, match=r"build it as SmartFreezeCallback\(policy, sample_every=1"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_a_resume_with_another_policy_names_the_callback(tmp_path):
    """The engine's "construct SmartFreezer with the same policy" named a class the Trainer user
    never builds (review79, review80)."""
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=dataset())
    SmartFreezeCallback(StaticFreeze(5, at_step=3)).attach(trainer)
    trainer.train()
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=dataset())
    SmartFreezeCallback(LinearFreeze()).attach(trainer)
    with pytest.raises(ValueError, match=r"policy StaticFreeze, this run uses LinearFreeze.*build it as "
                                         r"SmartFreezeCallback\(StaticFreeze\(\.\.\.\), \.\.\.\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_model_init_makes_each_train_a_new_run(tmp_path):
    """hyperparameter_search's pattern: model_init builds a new model for each train(); the second
    train() was refused with "give each freezer its own policy object", which the callback owns
    (review60)."""
    trainer = Trainer(model_init=tiny_bert, args=training_args(tmp_path, save_strategy="no", max_steps=4),
                      train_dataset=dataset())
    callback = SmartFreezeCallback(StaticFreeze(2, at_step=2)).attach(trainer)
    models = []
    for _ in range(2):
        trainer.train()
        assert callback.freezer.model is trainer.model and callback.freezer.num_frozen == 2
        assert callback.freezer.step_count == 4
        models.append(trainer.model)
    assert models[0] is not models[1]


class _Logits(torch.nn.Module):
    """A model of the user's whose forward takes no labels: a custom compute_loss pops them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.l1, self.head = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)

    def forward(self, input_ids):
        return self.head(torch.relu(self.l1(self.emb(input_ids).mean(1))))


class _PopsLabels(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        labels = inputs.pop("labels")
        logits = model(**inputs)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return (loss, logits) if return_outputs else loss


def test_the_example_batch_leaves_out_what_the_forward_does_not_take(tmp_path):
    """The set-up forward got the labels the Trainer keeps for a custom compute_loss (review61)."""
    trainer = _PopsLabels(model=_Logits(), args=training_args(tmp_path, save_strategy="no", max_steps=3,
                                                              label_names=["labels"]),
                          train_dataset=dataset())
    callback = SmartFreezeCallback(StaticFreeze(1, at_step=2)).attach(trainer)
    trainer.train()
    assert callback.freezer.num_frozen == 1


class _AugmentingDataset(torch.utils.data.Dataset):
    """Draws from torch's generator in __getitem__ (random augmentation)."""

    def __init__(self):
        self.items = dataset()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = dict(self.items[i])
        item["input_ids"] = (item["input_ids"] + torch.randint(0, 2, (8,))) % 50
        return item


class _OwnGeneratorDataset(_AugmentingDataset):
    """Augments with a generator of its own (reproducible augmentation)."""

    def __init__(self):
        super().__init__()
        self.rng = torch.Generator().manual_seed(5)

    def __getitem__(self, i):
        item = dict(self.items[i])
        item["input_ids"] = (item["input_ids"] + torch.randint(0, 2, (8,), generator=self.rng)) % 50
        return item


@pytest.mark.parametrize("data", [_AugmentingDataset, _OwnGeneratorDataset])
@pytest.mark.parametrize("cache", [False, True])
def test_the_example_batch_draws_nothing_from_the_users_generators(tmp_path, cache, data):
    """Reading two training samples for set-up moved torch's generator: every later batch was
    augmented otherwise than without the callback (review61); with the activation cache, reading
    the first item for its sample ids did too (review62)."""
    losses = []
    for with_callback in (False, True):
        model = tiny_bert()
        trainer = Trainer(model=model, args=training_args(tmp_path / str(with_callback), save_strategy="no",
                                                         max_steps=4, logging_steps=1, logging_strategy="steps"),
                          train_dataset=data())
        if with_callback:
            SmartFreezeCallback(StaticFreeze(1, at_step=100),
                                activation_cache={"deterministic": True} if cache else None).attach(trainer)
        trainer.train()
        losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_checkpoint_without_freezer_state_is_refused(tmp_path):
    Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=4), train_dataset=dataset()).train()
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=dataset())
    SmartFreezeCallback(StaticFreeze(1)).attach(trainer)
    with pytest.raises(FileNotFoundError, match=CHECKPOINT_FILE):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_user_scheduler_with_freezeout_trains(tmp_path):
    """FreezeOut scales each unit's lr inside the optimizer step only: a scheduler built on the
    user's groups before the freezer keeps working (it crashed at its first step before)."""
    model = tiny_bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    trainer = Trainer(model=model, args=training_args(tmp_path, save_strategy="no"), train_dataset=dataset(),
                      optimizers=(opt, sched))
    callback = SmartFreezeCallback(FreezeOut(t0=0.3, spacing="linear")).attach(trainer)
    trainer.train()
    assert callback.freezer.num_frozen > 0 and len(opt.param_groups) == 1
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / (1 + trainer.state.global_step))


def test_conflicting_training_args_are_refused(tmp_path):
    args = training_args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        check_training_args(args, tiny_bert())
    check_training_args(training_args(tmp_path, gradient_checkpointing=True), tiny_bert())


def enable_checkpointing(model, **kwargs):
    """The model-level switch, under whichever name the installed transformers has (5.x renamed it)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)



@pytest.mark.parametrize("hook, embeddings_frozen_by_user", [(True, False), (False, False), (True, True)])
def test_inputs_marked_for_grad_run_the_frozen_backward_and_say_so(hook, embeddings_frozen_by_user):
    # enable_input_require_grads (gradient_checkpointing_enable() calls it in transformers 5)
    # marks the embeddings' output as needing grad: the frozen layers after them ran their
    # backward, silently, while the report counted it as saved (review35: 52.5 ms a step
    # against 38-43 ms). With the embeddings frozen by the user (LoRA, PEFT's set-up) they are in
    # no unit, and nothing was said (review76: 40.7 % reported, 2.1 % measured)
    import warnings

    from smartfrz_fast import SmartFreezer

    model = tiny_bert()
    if hook:
        model.enable_input_require_grads()
    if embeddings_frozen_by_user:
        model.bert.embeddings.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    batch = {"input_ids": torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0)),
             "labels": torch.tensor([0, 1, 2, 0])}
    freezer = SmartFreezer(model, opt, StaticFreeze(5, at_step=1), example_inputs=batch)
    frozen_layer = model.bert.encoder.layer[0].attention.self.query  # units 0-4: the embeddings, query, key
    ran = []  # whether autograd records the frozen layer, so that the backward runs it
    frozen_layer.register_forward_hook(lambda module, args, out: ran.append(out.requires_grad))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            freezer.step()
    said = [w for w in caught if "enable_input_require_grads" in str(w.message)]
    assert freezer.num_frozen == 5 and not frozen_layer.weight.requires_grad
    assert len(said) == (1 if hook else 0) and (not said or "disable_input_require_grads()" in str(said[0].message))
    assert ran[-1] == hook  # the frozen layer's backward runs only with the hook



def test_the_trainer_takes_the_input_grad_hook_off_under_non_reentrant_checkpointing(tmp_path):
    # transformers 5's gradient_checkpointing_enable() sets enable_input_require_grads, which only
    # reentrant checkpointing needs (refused with a freezer): the callback takes it off again, so
    # the frozen layers' backward does not run (the hook set by hand here, as 4.x does not set it)
    import warnings

    model = tiny_bert()
    model.enable_input_require_grads()
    trainer = Trainer(model=model, args=training_args(tmp_path, save_strategy="no", max_steps=3,
                                                      gradient_checkpointing=True,
                                                      gradient_checkpointing_kwargs={"use_reentrant": False}),
                      train_dataset=dataset())
    callback = SmartFreezeCallback(StaticFreeze(5, at_step=1)).attach(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert callback.freezer.num_frozen == 5
    assert not any("enable_input_require_grads" in str(w.message) for w in caught)
    embeddings = model.get_input_embeddings()
    assert not any(getattr(h, "__name__", None) == "make_inputs_require_grads" for h in embeddings._forward_hooks.values())


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_the_model_really_uses_is_checked(tmp_path, reentrant):
    """Checkpointing switched on by the user on the model (not through TrainingArguments) is
    checked at train() too: reentrant is refused, non-reentrant trains."""
    model = tiny_bert()
    enable_checkpointing(model, use_reentrant=reentrant)
    trainer = Trainer(model=model, args=training_args(tmp_path, save_strategy="no", max_steps=2),
                      train_dataset=dataset())
    callback = SmartFreezeCallback(StaticFreeze(5, at_step=1)).attach(trainer)
    if reentrant:
        with pytest.raises(ValueError, match="checkpoints with use_reentrant=True"):
            trainer.train()
    else:
        trainer.train()
        assert callback.freezer.num_frozen == 5


def test_default_gradient_checkpointing_never_trains_nothing_silently(tmp_path):
    """gradient_checkpointing=True with no kwargs: transformers 4.x checkpoints reentrantly (layers
    after a frozen prefix would get no gradient), 5.x does not. What the user gets: either the run
    is refused with the fix, or the checkpointed layers keep training after the prefix froze."""
    model = tiny_bert()
    trainer = Trainer(model=model, args=training_args(tmp_path, save_strategy="no", gradient_checkpointing=True),
                      train_dataset=dataset())
    SmartFreezeCallback(StaticFreeze(5, at_step=1)).attach(trainer)
    layer = model.bert.encoder.layer[1].output.dense.weight
    after_freeze = {}

    class Snapshot(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            after_freeze.setdefault(state.global_step, layer.detach().clone())

    trainer.add_callback(Snapshot())
    # Which module checkpoints depends on the version (each layer; BertEncoder in 4.46).
    def checkpointing():
        return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]

    try:
        trainer.train()
    except ValueError as error:
        assert "use_reentrant" in str(error)
        fns = [m._gradient_checkpointing_func for m in checkpointing()]
        assert fns and all(fn.keywords.get("use_reentrant", True) for fn in fns)  # refused only where reentrant
    else:
        assert checkpointing()  # it did checkpoint
        assert not model.bert.embeddings.word_embeddings.weight.requires_grad
        assert not torch.equal(after_freeze[1], layer)  # trained after the embeddings froze


def test_total_steps_come_from_the_trainer_in_an_epoch_based_run(tmp_path):
    """No max_steps: the run's step count is the one the Trainer computes from the epochs (4.x sets
    trainer.state.max_steps only after building the optimizer, so it cannot come from there)."""
    model, trainer, callback = run(tmp_path, "freezeout", save_strategy="no", max_steps=-1, num_train_epochs=2)
    assert callback.freezer.total_steps == trainer.state.max_steps == MAX_STEPS == callback.freezer.step_count


def test_doc_example_runs(tmp_path):
    """The example in docs/integrations/huggingface.md runs as written."""
    from tests.test_docs_examples import block

    _, code, _ = block("docs/integrations/huggingface.md", "BertForSequenceClassification(BertConfig(")
    (tmp_path / "example.py").write_text(code, encoding="utf-8")
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed run matches: True" in result.stdout


def launch_ddp(out, *extra, cache=False):
    """Two Trainer processes under torch.distributed.run (gloo, CPU): tests/hf_ddp_worker.py.
    ``--standalone`` lets the launcher pick a free port itself (no race with other tests)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(__file__).with_name("hf_ddp_worker.py")), str(out), *extra, *(["--cache"] if cache else [])],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    suffix = "-resumed" if any(not e.startswith("--") for e in extra) else ""
    return [torch.load(out / f"rank{r}{suffix}.pt") for r in range(2)]


def test_ddp_two_processes_freeze_together_and_resume_bit_identical(tmp_path):
    """Real DDP inside the Trainer: the policy proposes a different prefix on each rank, both
    ranks apply rank 0's at the same steps and stay identical; resuming both ranks from the
    Trainer's mid-run checkpoint ends bit-identical to the uninterrupted run."""
    r0, r1 = launch_ddp(tmp_path)
    assert r0["world_size"] == 2 and r0["global_step"] == MAX_STEPS
    assert [p for _, p in r0["proposals"]] != [p for _, p in r1["proposals"]]
    assert r0["events"] == r1["events"] == r0["proposals"] == [(3, 1), (6, 2), (9, 3), (12, 4)]
    assert r0["frozen"] == r1["frozen"] and r0["frozen"]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    q0, q1 = launch_ddp(tmp_path, str(tmp_path / "checkpoint-6"))
    assert q0["events"] == q1["events"] == r0["events"]  # the first two restored from the checkpoint
    assert q0["proposals"] == [(9, 3), (12, 4)]  # only the steps after the checkpoint were decided
    for q in (q0, q1):
        assert all(torch.equal(q["state"][k], r0["state"][k]) for k in r0["state"])


def test_ddp_two_processes_with_the_activation_cache(tmp_path):
    """The cache inside the Trainer under DDP: each rank caches the samples it sees (the cached
    forward runs inside DDP's forward, so the suffix's gradients are all-reduced), the weights
    equal the run without the cache on both ranks, and both ranks resume from their own cache
    state in the Trainer's checkpoint to the same end."""
    plain = launch_ddp(tmp_path / "plain", "--static")  # the embeddings (block 1) freeze after step 1
    r0, r1 = launch_ddp(tmp_path / "cached", "--static", cache=True)
    for r in (r0, r1):
        assert r["cache"]["boundary"] == 1 and r["cache"]["hits"] > 0, r["cache"]
        assert r["events"] == plain[0]["events"]
        for k in plain[0]["state"]:
            torch.testing.assert_close(r["state"][k], plain[0]["state"][k], rtol=1e-5, atol=1e-6, msg=k)
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    checkpoint = tmp_path / "cached" / "checkpoint-6"
    assert {p.name for p in checkpoint.glob("smartfrz_cache.*.pt")} == {"smartfrz_cache.0.pt", "smartfrz_cache.1.pt"}
    q0, q1 = launch_ddp(tmp_path / "cached", str(checkpoint), "--static", cache=True)
    for q in (q0, q1):  # (memory rows are not in the checkpoint: they refill, all misses in epoch 2)
        assert q["cache"]["boundary"] == 1 and q["cache"]["stored"] > 0, q["cache"]
        assert all(torch.equal(q["state"][k], r0["state"][k]) for k in r0["state"])


def test_a_tokenizers_collator_batch_is_keyword_inputs(tmp_path):
    # the Trainer's default collator with a tokenizer (DataCollatorWithPadding) returns a
    # BatchEncoding, a mapping that is no dict: it went to the model as one positional input,
    # and the set-up forward failed inside BERT with an empty AttributeError
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(45)}
    vocab.update({"[PAD]": 45, "[UNK]": 46})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    ids = torch.randint(0, 45, (32, 8), generator=torch.Generator().manual_seed(1))
    train = [dict(tokenizer(" ".join(f"w{int(t)}" for t in ids[i])), labels=int(ids[i, 0]) % 3) for i in range(32)]
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=6, save_strategy="no"),
                      train_dataset=train, processing_class=tokenizer)
    assert not isinstance(trainer.data_collator(train[:2]), dict)
    callback = SmartFreezeCallback(StaticFreeze(3, at_step=2)).attach(trainer)
    trainer.train()
    assert callback.freezer.num_frozen == 3


class ConfigReadingTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = torch.nn.functional.cross_entropy(outputs.logits.view(-1, model.config.num_labels), labels)
        return (loss, outputs) if return_outputs else loss


def test_a_custom_compute_loss_reads_the_models_attributes_with_the_cache(tmp_path):
    # with the cache, compute_loss was given the callback's wrapper, which had no `config`
    trainer = ConfigReadingTrainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=8, save_strategy="no"),
                                   train_dataset=dataset())
    callback = SmartFreezeCallback(StaticFreeze(5, at_step=2), activation_cache={"deterministic": True}).attach(trainer)
    trainer.train()
    assert callback.freezer.num_frozen == 5 and callback.cache.stats["hits"] + callback.cache.stats["misses"] > 0


def test_a_kill_after_the_trainers_save_leaves_a_checkpoint_to_resume_from(tmp_path):
    """The Trainer's save ends by deleting older checkpoints (save_total_limit=1); the freezer's
    file was written after it, at on_save, so a kill in between left no checkpoint with it and
    the run could not resume (review43). It is written first now."""

    class Killed(Exception):
        pass

    class KillAtSave(transformers.TrainerCallback):  # runs before the freezer's on_save
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 8:
                raise Killed

    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, save_total_limit=1), train_dataset=dataset(),
                      callbacks=[KillAtSave()])
    SmartFreezeCallback(make_policy("static")).attach(trainer)
    with pytest.raises(Killed):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-8"]
    assert (tmp_path / "checkpoint-8" / CHECKPOINT_FILE).is_file()
    model, trainer, callback = run(tmp_path, "static", resume=True)
    assert callback.freezer.step_count == MAX_STEPS and callback.freezer.num_frozen == 5


@pytest.mark.parametrize("make_policy", [lambda: StaticFreeze(2, at_step=10), FreezeOut], ids=["static", "freezeout"])
def test_accelerate_state_hooks_resume_the_freezer_exactly(make_policy, tmp_path):
    """docs/integrations/huggingface.md's lines for accelerate's save_state / load_state, run as
    written: registered with register_for_checkpointing, the freezer loaded after the optimizer
    and the load failed once layers had frozen (review46)."""
    from accelerate import Accelerator

    from smartfrz_fast import SmartFreezer
    from tests.test_docs_examples import block

    _, lines, _ = block("docs/integrations/huggingface.md", "register_load_state_pre_hook")

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 3))
        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        freezer = SmartFreezer(model, optimizer, make_policy(), example_inputs=torch.randn(2, 8), total_steps=40)
        exec(lines, {"accelerator": accelerator, "freezer": freezer, "os": os, "torch": torch})
        return accelerator, model, optimizer, freezer

    def train(run, start, stop, save_at=None):
        accelerator, model, optimizer, freezer = run
        for step in range(start, stop):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
            accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
            freezer.step()
            if step == save_at:
                accelerator.save_state(str(tmp_path))
        return model, freezer

    whole, frozen = train(build(), 0, 40, save_at=24)
    resumed_run = build()
    resumed_run[0].load_state(str(tmp_path))
    resumed, refrozen = train(resumed_run, 25, 40)
    assert frozen.timeline and [(e.step, e.num_frozen) for e in refrozen.timeline] == \
        [(e.step, e.num_frozen) for e in frozen.timeline]
    for p, q in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
