"""What every section of the speed benchmark shares: the model, synthetic batches, interleaved timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import torch
import transformers
from transformers import AutoModelForSequenceClassification

from benchmarks.quality.models import model_location
from peft_fish_ird.layer import is_supported_layer


def model_path() -> str:
    return model_location({"source": "minilm"})


def load_model(device: str, eager: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"attn_implementation": "eager"} if eager else {}
    return AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2, **kwargs).to(device)


def make_batches(
    n: int, batch: int, tokens: int, device: str, seed: int = 0, pad: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Random token batches, with random right padding (lengths tokens/2..tokens) when ``pad``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n // batch):
        ids = torch.randint(1000, 29000, (batch, tokens), generator=g)
        lengths = torch.randint(tokens // 2, tokens + 1, (batch,), generator=g) if pad else torch.full((batch,), tokens)
        mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
        out.append(
            {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=g)}
        )
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def as_examples(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    rows = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            keep = b["attention_mask"][i].bool()
            rows.append(
                {
                    "input_ids": b["input_ids"][i][keep].tolist(),
                    "attention_mask": [1] * int(keep.sum()),
                    "labels": int(b["labels"][i]),
                }
            )
    return rows


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["labels"] for e in examples])}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, list[float]]:
    """Time every function once per repeat, in turn, so machine drift hits all of them alike.

    Repeat i starts the turn at function i (mod their number): no method always runs right after
    the same other one (a method that frees a lot of memory slows the next one's allocations)."""
    for fn in fns.values():
        fn()  # warm-up
    names = list(fns)
    times = {name: [] for name in names}
    for i in range(repeats):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            times[name].append(timed(fns[name], device))
    return times


def paired_quartiles(times: dict[str, list[float]], reference: str) -> dict[str, list[float]]:
    """Quartiles of each method's per-repeat ratio to ``reference`` (times from ``interleaved``).

    Each repeat runs every method once in turn, so a method's time over the reference's in the same
    repeat cancels the machine's drift between repeats; the quartiles show the spread left."""
    out = {}
    for name, values in times.items():
        ratios = [a / b for a, b in zip(values, times[reference])]
        out[name] = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return out


def targets_of(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if is_supported_layer(m) and not n.startswith("classifier")}


def environment(device: str) -> dict[str, Any]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def quiet_transformers() -> None:
    transformers.logging.set_verbosity_error()
