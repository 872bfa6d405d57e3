"""HF Trainer pipelines: prepare placement, callback, resume, accumulation/clipping/schedules/eval."""

from pathlib import Path

import pytest
import torch
from conftest import fish_config, make_examples, pad_collate, prepared_tiny_bert, script_diff, tiny_bert
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import peft_fish_ird
from peft_fish_ird import FishIRDCallback
from peft_fish_ird.layer import FishIRDLayer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TRAIN = Dataset.from_list(make_examples(64, seed=3))


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        save_strategy="no",
        max_steps=8,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "fishird_" in n or "modules_to_save" in n}


def test_fishird_trainer_script_differs_from_the_lora_script_by_two_lines():
    removed, added = script_diff(EXAMPLES / "trainer_lora.py", EXAMPLES / "trainer_fishird.py")
    assert len(removed) <= 2 and len(added) <= 2, (removed, added)
    assert any("FishIRDConfig" in ln for ln in added)


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                control.should_training_stop = True
            return control

    straight = prepared_tiny_bert()
    Trainer(model=straight, args=_args(tmp_path / "a"), train_dataset=TRAIN, data_collator=pad_collate).train()

    first = prepared_tiny_bert()
    args = _args(tmp_path / "b", save_strategy="steps", save_steps=4)
    Trainer(model=first, args=args, train_dataset=TRAIN, data_collator=pad_collate, callbacks=[StopAt()]).train()
    checkpoint = tmp_path / "b" / "checkpoint-4"
    assert checkpoint.exists()

    resumed = get_peft_model(tiny_bert(), fish_config())  # a fresh process would not have prepared yet
    Trainer(model=resumed, args=args, train_dataset=TRAIN, data_collator=pad_collate).train(
        resume_from_checkpoint=str(checkpoint)
    )
    a, b = _values(straight), _values(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a if a[k].numel())


def test_trainer_built_before_prepare_still_trains(tmp_path):
    model = get_peft_model(tiny_bert(), fish_config())
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=TRAIN, data_collator=pad_collate)
    model.prepare(make_examples(24), data_collator=pad_collate, progress=False)
    trainer.train()
    assert any(float(v.abs().sum()) > 0 for n, v in _values(model).items() if "fishird_" in n)


def test_callback_prepares_inside_the_trainer_pipeline(tmp_path):
    model = get_peft_model(tiny_bert(), fish_config())
    callback = FishIRDCallback(make_examples(24), data_collator=pad_collate, progress=False)
    trainer = Trainer(
        model=model, args=_args(tmp_path), train_dataset=TRAIN, data_collator=pad_collate, callbacks=[callback]
    )
    assert model.selection is not None
    trainer.train()
    assert any(float(v.abs().sum()) > 0 for n, v in _values(model).items() if "fishird_" in n)


def test_optimizer_built_before_prepare_is_refused(tmp_path):
    model = get_peft_model(tiny_bert(), fish_config())
    stale = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.prepare(make_examples(24), data_collator=pad_collate, progress=False)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=TRAIN,
        data_collator=pad_collate,
        optimizers=(stale, None),
        callbacks=[FishIRDCallback()],
    )
    with pytest.raises(RuntimeError, match="built before `prepare`"):
        trainer.train()


def test_accumulation_clipping_schedule_and_evaluation_work(tmp_path):
    model = prepared_tiny_bert()
    args = _args(
        tmp_path,
        gradient_accumulation_steps=2,
        max_grad_norm=0.1,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        eval_strategy="steps",
        eval_steps=4,
        per_device_eval_batch_size=8,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TRAIN,
        eval_dataset=Dataset.from_list(make_examples(16, seed=8)),
        data_collator=pad_collate,
    )
    trainer.train()
    logs = trainer.state.log_history
    assert any("eval_loss" in h for h in logs)
    grad_norms = [h["grad_norm"] for h in logs if "grad_norm" in h]
    assert grad_norms and all(g == g for g in grad_norms)
    lrs = [h["learning_rate"] for h in logs if "learning_rate" in h]
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs)  # warm-up then cosine decay


def test_get_peft_model_wrapper_prepares_and_rejects_other_configs():
    model = peft_fish_ird.get_peft_model(
        tiny_bert(),
        fish_config(),
        train_dataset=make_examples(24),
        data_collator=pad_collate,
        prepare_kwargs={"progress": False},
    )
    assert model.selection is not None
    assert any(isinstance(m, FishIRDLayer) and m.num_entries("default") for m in model.modules())
    with pytest.raises(TypeError, match="FishIRDConfig"):
        peft_fish_ird.get_peft_model(
            tiny_bert(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]), train_dataset=make_examples(4)
        )
