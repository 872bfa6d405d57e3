"""Running the quality benchmark: per-process caches, training, evaluation, one record per cell."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import platform
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np
import peft
import torch
import transformers
from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainingArguments

import peft_fish_ird
from benchmarks.quality.methods import LoraOption, build_fishird, build_full, build_lora, lora_options
from benchmarks.quality.models import load_model, load_tokenizer, model_location
from benchmarks.quality.plan import FISHIRD_METHODS, BenchmarkError, Cell, Experiment
from benchmarks.quality.store import ResultStore
from benchmarks.quality.tasks import TaskData, encode, glue_splits, num_labels_of, offline_splits

logger = logging.getLogger("quality")


@dataclass
class Context:
    """Per-process caches: model locations, tokenizers, tokenized tasks, LoRA candidate counts."""

    device: str
    locations: dict[str, str] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    data: dict[tuple[str, str], TaskData] = field(default_factory=dict)
    lora: dict[tuple[str, str], list[LoraOption]] = field(default_factory=dict)

    def location(self, exp: Experiment) -> str:
        key = json.dumps(exp.model_spec, sort_keys=True)
        if key not in self.locations:
            self.locations[key] = model_location(exp.model_spec)
        return self.locations[key]

    def tokenizer(self, exp: Experiment) -> Any:
        location = self.location(exp)
        if location not in self.tokenizers:
            try:
                self.tokenizers[location] = load_tokenizer(location)
            except OSError as err:
                raise BenchmarkError(
                    f"Cannot load the tokenizer of {location!r} ({str(err)[:300]}). A hub name needs internet "
                    "access to the Hugging Face hub; offline, pass a local folder or use the models minilm / smollm2."
                ) from None
        return self.tokenizers[location]

    def task_data(self, exp: Experiment, task: str) -> TaskData:

        key = (exp.settings_id, task)
        if key not in self.data:
            data = exp.settings["data"]
            parts = glue_splits(task, data) if task.startswith("glue/") else offline_splits(task, data)
            tok = self.tokenizer(exp)
            enc = {name: encode(tok, rows, data["max_length"]) for name, rows in parts.items()}
            self.data[key] = TaskData(
                enc["train"], enc["selection"], enc["test"], DataCollatorWithPadding(tok), num_labels_of(task)
            )
        return self.data[key]

    def lora_options(self, exp: Experiment, base: Any, num_labels: int) -> list[LoraOption]:
        key = (exp.settings_id, str(num_labels))
        if key not in self.lora:
            self.lora[key] = lora_options(base, exp.settings["lora"]["target_sets"])
        return self.lora[key]


def train(model: Any, data: TaskData, lr: float, seed: int, settings: dict[str, Any]) -> tuple[float, float]:
    """HF Trainer on the train split; returns (seconds, mean training loss). No checkpoints, no reporting."""
    t = settings["train"]
    with tempfile.TemporaryDirectory(prefix="quality_trainer_") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=t["batch_size"],
            num_train_epochs=t["epochs"],
            learning_rate=lr,
            warmup_steps=float(t["warmup_ratio"]),
            weight_decay=t["weight_decay"],
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            seed=seed,
            use_cpu=t["use_cpu"],
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=data.collator)
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        result = trainer.train()
        return time.perf_counter() - start, float(result.training_loss)


def binary_scores(pred: Any, labels: Any) -> dict[str, float]:
    """F1 of class 1 and Matthews correlation (CoLA's metric) from numpy arrays of 0/1."""
    tp = float(np.sum((pred == 1) & (labels == 1)))
    tn = float(np.sum((pred == 0) & (labels == 0)))
    fp = float(np.sum((pred == 1) & (labels == 0)))
    fn = float(np.sum((pred == 0) & (labels == 1)))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {"f1": f1, "mcc": (tp * tn - fp * fn) / denom if denom else 0.0}


def evaluate(model: Any, dataset: Any, collator: Any, batch_size: int) -> dict[str, float]:
    """Accuracy, mean cross-entropy (and F1 / MCC for two classes) on a split, with plain torch and numpy."""
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    logits, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            gold = batch.pop("labels")
            logits.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
            labels.append(gold)
    all_logits, gold = torch.cat(logits), torch.cat(labels)
    pred = all_logits.argmax(-1)
    metrics = {
        "accuracy": float((pred == gold).float().mean()),
        "loss": float(torch.nn.functional.cross_entropy(all_logits, gold)),
        "n": int(gold.numel()),
    }
    if all_logits.shape[-1] == 2:
        metrics.update(binary_scores(np.asarray(pred), np.asarray(gold)))
    return metrics


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_fish_ird": peft_fish_ird.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_cell(cell: Cell, exp: Experiment, ctx: Context) -> dict[str, Any]:
    """Build, select, train and evaluate one cell; returns its JSON record."""
    start, cpu_start = time.perf_counter(), time.process_time()
    data = ctx.task_data(exp, cell.task)
    location, tokenizer = ctx.location(exp), ctx.tokenizer(exp)
    base = load_model(location, data.num_labels, tokenizer, cell.seed, ctx.device)
    lr = exp.settings["train"]["lr"]
    if cell.method in FISHIRD_METHODS:
        model, info = build_fishird(base, cell, exp, data)
        rate = lr["sparse"]
    elif cell.method == "lora":
        model, info = build_lora(base, cell, exp, ctx.lora_options(exp, base, data.num_labels))
        rate = lr["lora"]
    else:
        model, info = build_full(base)
        rate = lr["full"]
    train_seconds, train_loss = train(model, data, rate, cell.seed, exp.settings)
    eval_start = time.perf_counter()
    metrics = evaluate(model, data.test, data.collator, exp.settings["eval_batch_size"])
    record = {
        "key": cell.key,
        "settings_id": cell.settings_id,
        "experiment": cell.experiment,
        "task": cell.task,
        "model": cell.model,
        "model_source": exp.model_spec,
        "method": cell.method,
        "keep_ratio": cell.keep_ratio,
        "seed": cell.seed,
        "metrics": metrics,
        "train_loss": train_loss,
        "learning_rate": rate,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(time.perf_counter() - eval_start, 3),
        "n_train": len(data.train),
        "n_selection": len(data.selection),
        "n_test": len(data.test),
        **info,
        "selection_seconds": round(info["selection_seconds"], 3),
        "run_seconds": round(time.perf_counter() - start, 3),
        "cpu_seconds": round(time.process_time() - cpu_start, 3),  # about threads x run_seconds when not contended
        "settings": exp.settings,
        "env": environment(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    del model, base
    gc.collect()
    return record


class Progress:
    """Logs each run with an ETA from the mean time of finished runs of the same model and method."""

    def __init__(self, todo: list[Cell]) -> None:
        self.todo, self.done, self.seconds = todo, 0, {}

    def eta(self) -> float:
        every = [s for times in self.seconds.values() for s in times]
        if not every:
            return float("nan")
        mean = sum(every) / len(every)
        rest = self.todo[self.done :]
        by_kind = {k: sum(v) / len(v) for k, v in self.seconds.items()}
        return sum(by_kind.get((c.model, c.method), mean) for c in rest)

    def finish(self, cell: Cell, seconds: float, accuracy: Optional[float]) -> None:
        self.done += 1
        self.seconds.setdefault((cell.model, cell.method), []).append(seconds)
        result = "FAILED" if accuracy is None else f"accuracy {accuracy:.4f}"
        eta = self.eta()
        eta_text = "" if math.isnan(eta) else f", about {eta / 60:.1f} min left"
        logger.info("[%d/%d] %s: %s in %.0fs%s", self.done, len(self.todo), cell.label(), result, seconds, eta_text)


def run_all(cells: list[tuple[Cell, Experiment]], store: ResultStore) -> list[str]:
    """Run every cell not in the store yet; returns the labels of cells that failed (logged, not stored)."""
    done = store.done()
    todo = [(c, e) for c, e in cells if c.key not in done]
    logger.info(
        "%d runs planned, %d already in %s, %d to run", len(cells), len(cells) - len(todo), store.path, len(todo)
    )
    if not todo:
        return []
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, once per run
    use_cpu = all(exp.settings["train"]["use_cpu"] for _, exp in todo)
    ctx = Context(device="cuda" if torch.cuda.is_available() and not use_cpu else "cpu")
    progress, failed = Progress([c for c, _ in todo]), []
    for cell, exp in todo:
        start = time.perf_counter()
        try:
            record = run_cell(cell, exp, ctx)
        except BenchmarkError:
            raise
        except Exception:  # noqa: BLE001 - one failed run must not lose the others; it is retried on rerun
            logger.error("run %s failed:\n%s", cell.label(), traceback.format_exc())
            failed.append(cell.label())
            progress.finish(cell, time.perf_counter() - start, None)
            continue
        store.append(record)
        progress.finish(cell, time.perf_counter() - start, record["metrics"]["accuracy"])
    return failed
