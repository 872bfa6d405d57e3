"""TRL's SFTTrainer: the LoRA -> FishIRD switch of examples/sft_*.py is two lines, and the FishIRD script
trains only its masked entries (tiny Llama, 3 steps)."""

import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import adapter_masks, script_diff

pytest.importorskip("trl")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_fishird_sft_script_differs_from_the_lora_sft_script_by_two_lines():
    removed, added = script_diff(EXAMPLES / "sft_lora.py", EXAMPLES / "sft_fishird.py")
    assert len(removed) <= 2 and len(added) <= 2, (removed, added)
    assert any("FishIRDConfig" in ln for ln in added)


def test_fishird_sft_script_trains_only_the_masked_entries(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    out = tmp_path / "sft"
    monkeypatch.setattr(sys, "argv", ["sft_fishird.py", "--tiny", "--max-steps", "3", "--output-dir", str(out)])
    script = runpy.run_path(str(EXAMPLES / "sft_fishird.py"), run_name="__main__")
    trainer, model = script["trainer"], script["model"]
    assert trainer.state.global_step == 3
    assert (out / "adapter_model.safetensors").exists()
    masks = adapter_masks(model)
    assert "lm_head.weight" not in masks  # TRL's fused head reads lm_head.weight directly: excluded
    merged = model.merge_and_unload()
    from sft_common import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(tiny=True)  # the same seeded random weights
    moved = 0
    for name, param in base.named_parameters():
        changed = torch.nonzero((merged.get_parameter(name) != param).reshape(-1)).reshape(-1)
        allowed = set(masks.get(name, torch.empty(0, dtype=torch.long)).tolist())
        assert set(changed.tolist()) <= allowed, name
        moved += changed.numel()
    assert moved > 0


def _sft_trainer(tmp_path, model, tokenizer, rows, peft_config, **sft_args):
    """TRL's SFTTrainer on raw prompt/completion pairs: it tokenizes them itself (labels -100 on the prompt)."""
    from datasets import Dataset
    from sft_common import prompt_of
    from trl import SFTConfig, SFTTrainer

    pairs = Dataset.from_dict(
        {
            "prompt": [prompt_of(r.text) for r in rows],
            "completion": [" positive" if r.label else " negative" for r in rows],
        }
    )
    settings = dict(
        per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, bf16=False, gradient_checkpointing=False
    )
    settings.update(sft_args)
    args = SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, **settings
    )
    return SFTTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer, peft_config=peft_config)


def _config():
    from peft_fish_ird import FishIRDConfig

    return FishIRDConfig(task_type="CAUSAL_LM", keep_ratio=0.01, num_samples=16, exclude_modules=["lm_head"])


def test_prepare_from_trainer_uses_sft_trainers_own_tokenization_with_prompt_labels_masked(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from peft import get_peft_model
    from sft_common import load_model_and_tokenizer, sft_dataset, sft_rows

    from peft_fish_ird import prepare_from_trainer

    model, tokenizer = load_model_and_tokenizer(tiny=True)
    # TRL's defaults: bf16 (CPU autocast here) and gradient checkpointing
    trainer = _sft_trainer(
        tmp_path, model, tokenizer, sft_rows(64)["train"], _config(), bf16=True, gradient_checkpointing=True
    )
    own = sft_dataset(tokenizer, n=64)  # the same pairs, tokenized by examples/sft_common.py
    assert trainer.train_dataset[0]["input_ids"] == own[0]["input_ids"]
    assert trainer.train_dataset[0]["labels"] == own[0]["labels"]  # -100 on the prompt
    record = prepare_from_trainer(trainer, progress=False)

    reference = get_peft_model(load_model_and_tokenizer(tiny=True)[0], _config())
    reference.prepare(own, data_collator=trainer.data_collator, progress=False)
    assert record.sample_indices == reference.selection.sample_indices
    got, expected = adapter_masks(trainer.model), adapter_masks(reference)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    values = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "fishird_" in n and p.numel()}
    trainer.train()
    assert trainer.model.get_base_model().model.gradient_checkpointing
    assert any(not torch.equal(p, values[n]) for n, p in trainer.model.named_parameters() if n in values)


def test_prepare_from_trainer_refuses_packed_data(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from sft_common import load_model_and_tokenizer, sft_rows

    from peft_fish_ird import prepare_from_trainer

    model, tokenizer = load_model_and_tokenizer(tiny=True)
    trainer = _sft_trainer(tmp_path, model, tokenizer, sft_rows(16)["train"], _config(), packing=True)
    with pytest.raises(ValueError, match="packs examples"):
        prepare_from_trainer(trainer)
