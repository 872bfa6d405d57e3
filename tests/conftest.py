"""Shared tiny cases: random-weight BERT and GPT-2 sequence classifiers, padded batches."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
)

import peft_fish_ird  # noqa: E402,F401  (registers the method)

VOCAB = 97
PAD = 0


def tiny_bert(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        pad_token_id=PAD,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0, num_labels: int = 2) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        num_labels=num_labels,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=1,
        attn_implementation="eager",
    )
    return GPT2ForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0, tied: bool = False, width: int = 16, heads: int = 2):
    """A random-weight Llama causal LM (RMSNorm, no biases), tied or untied embeddings; MLP 2x ``width``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


def lm_examples(n: int, seed: int = 0, prompt_len: int = 3) -> list[dict]:
    """Causal-LM examples with SFT-style labels: the first ``prompt_len`` tokens are -100."""
    out = []
    for e in make_examples(n, seed=seed, min_len=prompt_len + 2, max_len=12):
        labels = [-100] * prompt_len + e["input_ids"][prompt_len:]
        out.append({"input_ids": e["input_ids"], "attention_mask": e["attention_mask"], "labels": labels})
    return out


def lm_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pads ids with PAD and labels with -100 (padding never counts in the loss)."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {
        k: torch.full((len(examples), width), fill, dtype=torch.long)
        for k, fill in (("input_ids", PAD), ("attention_mask", 0), ("labels", -100))
    }
    for i, e in enumerate(examples):
        for key in batch:
            batch[key][i, : len(e[key])] = torch.tensor(e[key])
    return batch


def lm_batches(n: int, size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    examples = lm_examples(n, seed=seed)
    return [lm_collate(examples[i : i + size]) for i in range(0, n, size)]


def make_examples(n: int, seed: int = 0, min_len: int = 3, max_len: int = 12, num_labels: int = 2) -> list[dict]:
    """Tokenized examples of varying length (ids never equal PAD), with labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        out.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * length,
                "labels": int(torch.randint(0, num_labels, (1,), generator=g)),
            }
        )
    return out


def pad_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pads to the longest example (what DataCollatorWithPadding does)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["labels"] for e in examples])}


def batches_of(examples: list[dict], size: int) -> list[dict[str, torch.Tensor]]:
    return [pad_collate(examples[i : i + size]) for i in range(0, len(examples), size)]


@pytest.fixture
def examples() -> list[dict]:
    return make_examples(24)


def fish_config(**overrides):
    """A FishIRDConfig for the tiny models: 5% budget, few samples, plain FISH (no head probing, which
    ``head_probe_steps="auto"`` would run for these SEQ_CLS models; test_head_probe.py covers it)."""
    from peft_fish_ird import FishIRDConfig

    kwargs = dict(task_type="SEQ_CLS", keep_ratio=0.05, num_samples=16, fisher_batch_size=4, head_probe_steps=0)
    kwargs.update(overrides)
    return FishIRDConfig(**kwargs)


def prepared_tiny_bert(seed: int = 0, **config_overrides):
    """A tiny BERT wrapped by get_peft_model and prepared on 24 examples."""
    from peft import get_peft_model

    model = get_peft_model(tiny_bert(seed), fish_config(**config_overrides))
    model.prepare(make_examples(24), data_collator=pad_collate, progress=False)
    return model


def randomize_values(peft_model, scale: float = 0.1, seed: int = 1) -> None:
    """Give every values vector non-zero entries (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "fishird_" in name and p.numel():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def script_diff(lora_path, fish_path) -> tuple[list[str], list[str]]:
    """(removed, added) code lines between two example scripts, their docstrings left out."""
    import ast
    import difflib

    def code_lines(path):
        source = path.read_text()
        doc = ast.get_docstring(ast.parse(source), clean=False)
        return (source.split('"""', 2)[2] if doc else source).splitlines()

    diff = [
        ln
        for ln in difflib.unified_diff(code_lines(lora_path), code_lines(fish_path), lineterm="", n=0)
        if ln[:1] in "+-" and ln[:3] not in ("+++", "---")
    ]
    return [ln for ln in diff if ln.startswith("-")], [ln for ln in diff if ln.startswith("+")]


def adapter_masks(peft_model, adapter: str = "default") -> dict:
    """``"<module>.<param>"`` -> the adapter's entry indices, for every FishIRD layer."""
    from peft_fish_ird.layer import FishIRDLayer

    return {
        f"{name}.{p}": module.indices(p)[adapter].clone()
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, FishIRDLayer)
        for p in module.base_param_names()
    }


def adamw_steps(model, params, batch: dict, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps of ``model`` on one batch (its own loss), training ``params``."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
