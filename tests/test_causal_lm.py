"""Causal-LM training as LLM users do it, on the tiny Llama: SFT labels (prompt tokens -100) in
``prepare``, gradient checkpointing, bf16, and greedy ``generate`` before/after training and merging."""

import pytest
import torch
from conftest import adapter_masks, lm_collate, lm_examples, randomize_values, tiny_llama
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_fish_ird import FishIRDConfig, fisher_scores
from peft_fish_ird.layer import FishIRDLayer
from peft_fish_ird.reference import fisher_loop
from peft_fish_ird.selection import select

PROMPTS = torch.tensor([[5, 17, 3, 44, 9], [8, 30, 72, 15, 40]])


def _config(**overrides):
    kwargs = dict(task_type="CAUSAL_LM", keep_ratio=0.05, num_samples=16, fisher_batch_size=4)
    kwargs.update(overrides)
    return FishIRDConfig(**kwargs)


def _prepared(seed=0, **overrides):
    model = get_peft_model(tiny_llama(seed), _config(**overrides))
    model.prepare(lm_examples(24), data_collator=lm_collate, progress=False)
    return model


def _values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "fishird_" in n and p.numel()}


def _value_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "fishird_" in n and p.numel()}


def test_sft_mask_is_the_global_top_k_of_the_batch_size_one_fisher_over_completion_tokens():
    examples = lm_examples(24)
    assert all(e["labels"][:3] == [-100] * 3 for e in examples)
    model = get_peft_model(tiny_llama(), _config())
    record = model.prepare(examples, data_collator=lm_collate, progress=False)
    reference = tiny_llama()
    targets = {n: m for n, m in reference.named_modules() if f"{n}.weight" in record.shapes}
    assert "lm_head" in targets and "model.embed_tokens" in targets and "model.norm" in targets
    drawn = [examples[i] for i in record.sample_indices]
    slow = fisher_loop(reference, [lm_collate(drawn[i : i + 1]) for i in range(len(drawn))], targets)
    expected, got = select(slow.scores, record.k, "global"), adapter_masks(model)
    assert got.keys() == expected.keys()
    overlap = sum(len(set(got[k].tolist()) & set(expected[k].tolist())) for k in expected)
    assert overlap >= record.k - 2  # float ties at the threshold are the only allowed difference


def test_prompt_labels_change_the_fisher_so_the_minus_100_mask_matters():
    masked = lm_examples(16)
    unmasked = [dict(e, labels=list(e["input_ids"])) for e in masked]
    model = tiny_llama()
    kw = dict(data_collator=lm_collate, num_samples=16, progress=False)
    a, b = fisher_scores(model, masked, **kw), fisher_scores(model, unmasked, **kw)
    total_a = sum(float(v.double().sum()) for v in a.values())
    diff = sum(float((a[k] - b[k]).double().abs().sum()) for k in a)
    assert diff > 0.05 * total_a
    k = int(0.05 * sum(v.numel() for v in a.values()))
    mask_a, mask_b = select(a, k), select(b, k)
    assert any(not torch.equal(mask_a[n], mask_b[n]) for n in mask_a)


def test_a_loss_mask_column_without_labels_is_refused_instead_of_silently_dropped():
    examples = [
        {"input_ids": e["input_ids"], "completion_mask": [int(t != -100) for t in e["labels"]]} for e in lm_examples(8)
    ]
    model = get_peft_model(tiny_llama(), _config())
    with pytest.raises(ValueError, match="completion_mask.*no 'labels'"):
        model.prepare(examples, data_collator=lm_collate, progress=False)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), _value_grads(model)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gradient_checkpointing_gives_the_same_loss_and_value_gradients(use_reentrant):
    # no embedding entries: the checkpointed layers' inputs then do not require grad (reentrant's pitfall)
    model = _prepared(keep_ratio=0.2, exclude_modules=["embed_tokens"])
    randomize_values(model)
    model.train()
    batch = lm_collate(lm_examples(8, seed=5))
    loss, grads = _loss_and_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.base_model.model.model.gradient_checkpointing
    checkpointed_loss, checkpointed = _loss_and_grads(model, batch)
    assert torch.allclose(loss, checkpointed_loss, rtol=1e-6)
    assert grads.keys() == checkpointed.keys()
    layer_grads = [k for k in grads if ".layers." in k]
    assert layer_grads, "the case must have entries inside the checkpointed decoder layers"
    assert all(float(grads[k].abs().sum()) > 0 for k in layer_grads)
    for key in grads:
        assert torch.allclose(grads[key], checkpointed[key], rtol=1e-5, atol=1e-8), key


def _train(tmp_path, model, **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=3,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **kw,
    )
    data = Dataset.from_list(lm_examples(12, seed=7))
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=lm_collate)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_gradient_checkpointing_trains_like_without(tmp_path):
    plain, checkpointed = (_prepared(keep_ratio=0.2, exclude_modules=["embed_tokens"]) for _ in range(2))
    losses = _train(tmp_path / "a", plain)
    checkpointed_losses = _train(tmp_path / "b", checkpointed, gradient_checkpointing=True)
    assert len(losses) == 3 and losses == pytest.approx(checkpointed_losses, rel=1e-5)
    a, b = _values(plain), _values(checkpointed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(float(v.abs().sum()) > 0 for v in a.values())


def test_bf16_training_runs_and_updates_float32_values(tmp_path):
    model = _prepared(keep_ratio=0.2)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(**lm_collate(lm_examples(4, seed=5)))
    assert outputs.logits.dtype == torch.bfloat16
    outputs.loss.backward()
    grads = _value_grads(model)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert any(".layers." in k and float(g.abs().sum()) > 0 for k, g in grads.items())
    model.zero_grad()
    before = _values(model)
    losses = _train(tmp_path, model, bf16=True)  # CPU bf16 autocast
    assert all(loss == loss for loss in losses)
    after = _values(model)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)


def _generate(model):
    model.eval()
    with torch.no_grad():
        return model.generate(
            input_ids=PROMPTS,
            attention_mask=torch.ones_like(PROMPTS),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )


def test_greedy_generate_equals_the_base_before_training_and_the_merged_model_after():
    base_output = _generate(tiny_llama())
    model = _prepared()
    assert torch.equal(_generate(model), base_output)  # zero values: the base model
    randomize_values(model, scale=0.5)  # as if trained
    adapter_output = _generate(model)
    assert not torch.equal(adapter_output, base_output), "the case must change the generated tokens"
    merged = model.merge_and_unload()
    assert not any(isinstance(m, FishIRDLayer) for m in merged.modules())
    assert torch.equal(_generate(merged), adapter_output)
