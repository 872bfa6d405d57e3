"""A plain HF Trainer trains only the selected entries and the head; base tensors stay bit-identical."""

import pytest
import torch
from conftest import fish_config, make_examples, pad_collate, prepared_tiny_bert, tiny_bert
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from peft_fish_ird import UnpreparedAdapterError
from peft_fish_ird.layer import FishIRDLayer


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_train_epochs=3,
        learning_rate=5e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _train_set():
    return Dataset.from_list(make_examples(48, seed=3))


def test_trainer_moves_only_selected_entries_and_head(tmp_path):
    model = prepared_tiny_bert()
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "fishird_" not in k}
    head_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "modules_to_save" in k}
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_train_set(), data_collator=pad_collate)
    trainer.train()
    after = model.get_base_model().state_dict()
    for key, value in base_before.items():
        if "modules_to_save" in key:
            continue
        assert torch.equal(after[key], value), f"base tensor {key} changed"
    assert any(not torch.equal(after[k], v) for k, v in head_before.items()), "the head must train"
    moved = 0
    for name, module in model.named_modules():
        if isinstance(module, FishIRDLayer):
            for p in module.base_param_names():
                base = getattr(module.get_base_layer(), p).reshape(-1)
                eff = module.effective_param(p, ["default"]).reshape(-1)
                changed = set((eff != base).nonzero().squeeze(1).tolist())
                assert changed <= set(module.indices(p)["default"].tolist()), name
                moved += len(changed)
    assert moved > 0.5 * model.selection.k


def test_optimizer_state_exists_only_for_values_and_head(tmp_path):
    model = prepared_tiny_bert()
    trainer = Trainer(
        model=model, args=_args(tmp_path, max_steps=2), train_dataset=_train_set(), data_collator=pad_collate
    )
    trainer.train()
    names = {id(p): n for n, p in model.named_parameters()}
    with_state = [names[id(p)] for p in trainer.optimizer.state]
    assert with_state
    assert all("fishird_" in n or "modules_to_save" in n for n in with_state)
    state_numel = sum(p.numel() for p in trainer.optimizer.state)
    assert state_numel == model.selection.k + model.selection.head_params


def test_training_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    examples = make_examples(32, seed=3)
    for e in examples:  # a learnable rule: label = first token is even
        e["labels"] = e["input_ids"][0] % 2
    model = prepared_tiny_bert(keep_ratio=0.2)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, num_train_epochs=8),
        train_dataset=Dataset.from_list(examples),
        data_collator=pad_collate,
    )
    history = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert history.training_loss > 0


def test_trainer_on_unprepared_model_raises_the_documented_error(tmp_path):
    from peft import get_peft_model

    model = get_peft_model(tiny_bert(), fish_config())
    trainer = Trainer(
        model=model, args=_args(tmp_path, max_steps=1), train_dataset=_train_set(), data_collator=pad_collate
    )
    with pytest.raises(UnpreparedAdapterError, match="prepare"):
        trainer.train()


def test_training_after_evaluation_under_inference_mode():
    model = prepared_tiny_bert()
    batch = pad_collate(make_examples(4, seed=2))
    with torch.inference_mode():
        model.eval()
        model(**{k: v for k, v in batch.items() if k != "labels"})
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "fishird_" in n and p.requires_grad]
    assert grads and all(g is not None for g in grads)
