"""Running one cell of the quality benchmark: per-process caches, training, evaluation, its record."""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np
import peft
import torch
import transformers
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import peft_fish_ird
from benchmarks.quality.methods import LoraOption, build_fishird, build_full, build_lora, lora_options
from benchmarks.quality.models import load_model, load_tokenizer, model_location, probe_head
from benchmarks.quality.plan import SPARSE_METHODS, BenchmarkError, Cell, Experiment, head_of, task_type_of
from benchmarks.quality.tasks import (
    TaskData,
    answer_tokens,
    encode,
    encode_lm,
    glue_splits,
    num_labels_of,
    offline_splits,
)

logger = logging.getLogger("quality")


@dataclass
class Context:
    """Per-process caches: model locations, tokenizers, tokenized tasks, LoRA candidate counts and the
    last model built before training (the grid's rates of one cell share its selection)."""

    device: str
    locations: dict[str, str] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    data: dict[tuple[str, str], TaskData] = field(default_factory=dict)
    lora: dict[tuple[str, str], list[LoraOption]] = field(default_factory=dict)
    built: Optional[tuple[Any, Any, dict[str, Any]]] = None  # (cell group + seed, untrained model, info)

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
            if head_of(exp) == "lm":
                lm = exp.settings["lm"]
                enc = {
                    n: encode_lm(tok, rows, data["max_length"], lm["prompt"], lm["answers"])
                    for n, rows in parts.items()
                }
                collator, choices = DataCollatorForSeq2Seq(tok, padding=True), answer_tokens(tok, lm["answers"])
            else:
                enc = {name: encode(tok, rows, data["max_length"]) for name, rows in parts.items()}
                collator, choices = DataCollatorWithPadding(tok), None
            self.data[key] = TaskData(
                enc["train"],
                enc["selection"],
                enc["test"],
                collator,
                num_labels_of(task),
                enc.get("validation"),
                choices,
            )
        return self.data[key]

    def lora_options(self, exp: Experiment, base: Any, num_labels: int) -> list[LoraOption]:
        key = (exp.settings_id, str(num_labels))
        if key not in self.lora:
            self.lora[key] = lora_options(base, exp.settings["lora"]["target_sets"], task_type_of(exp))
        return self.lora[key]

    def build(self, cell: Cell, exp: Experiment, data: TaskData) -> tuple[Any, dict[str, Any]]:
        """The cell's model before training and what building it did (selection, trainable counts).

        The grid's rates of one cell run one after the other on the same seed: their model before
        training is the same (same head initialisation, same selection), so it is built once and
        copied; ``info["reused_build"]`` says so. Training seeds everything again (``Trainer``).
        """
        ident = (cell.group, cell.seed)
        if self.built is None or self.built[0] != ident:
            self.built = None  # free the previous copy before building the next
            location, tokenizer = self.location(exp), self.tokenizer(exp)
            base = load_model(location, data.num_labels, tokenizer, cell.seed, self.device, head_of(exp))
            probe = exp.settings["train"].get("head_probe")
            probed = {"head_probe": probe_head(base, data.train, data.collator, probe, cell.seed)} if probe else {}
            if cell.method in SPARSE_METHODS:
                model, info = build_fishird(base, cell, exp, data)
            elif cell.method == "lora":
                model, info = build_lora(base, cell, exp, self.lora_options(exp, base, data.num_labels))
            else:
                model, info = build_full(base)
            info = {**info, **probed}
            self.built = (ident, model, info)
            return copy.deepcopy(model), {**info, "reused_build": False}
        return copy.deepcopy(self.built[1]), {**self.built[2], "reused_build": True}


class ValidationCurve(TrainerCallback):
    """Validation accuracy every ``every`` optimizer steps and after the last: ``points = [[step, accuracy], ...]``.

    ``final`` keeps the metrics of the evaluation after the last step (the trained model's validation score).
    With ``at_start``, also the untrained model's (step 0: every method starts from the base model).

    With ``patience`` (early stopping on validation, the same rule for every method): training stops
    once ``patience`` validation points in a row fail to beat the best one, and ``restore_best`` puts
    back the trainable weights of the best point (a copy kept in memory), whose metrics become
    ``final``. So each method trains until its validation accuracy stops rising, and is judged at
    its best point on validation - never on test.
    """

    def __init__(
        self, data: TaskData, every: int, batch_size: int, at_start: bool = False, patience: Optional[int] = None
    ) -> None:
        self.data, self.every, self.batch_size, self.at_start = data, every, batch_size, at_start
        self.patience = patience
        self.points: list[list[float]] = []
        self.final: Optional[dict[str, float]] = None
        self.best: Optional[tuple[int, dict[str, float], dict[str, torch.Tensor]]] = None  # step, metrics, weights
        self.since_best = 0
        self.stopped_step: Optional[int] = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.at_start:
            metrics = evaluate(model, self.data.validation, self.data.collator, self.batch_size, self.data.choices)
            self.points.append([0, metrics["accuracy"]])
            self._consider(0, metrics, model)
            model.train()

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            metrics = evaluate(model, self.data.validation, self.data.collator, self.batch_size, self.data.choices)
            self.points.append([state.global_step, metrics["accuracy"]])
            self.final = metrics if state.global_step == state.max_steps else None
            self._consider(state.global_step, metrics, model)
            if self.patience is not None and self.since_best >= self.patience and state.global_step < state.max_steps:
                control.should_training_stop = True
                self.stopped_step = state.global_step
            model.train()

    def _consider(self, step: int, metrics: dict[str, float], model: Any) -> None:
        if self.patience is None:
            return
        if self.best is None or metrics["accuracy"] > self.best[1]["accuracy"]:
            weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            self.best, self.since_best = (step, dict(metrics), weights), 0
        else:
            self.since_best += 1

    def restore_best(self, model: Any) -> None:
        """Early stopping: put the best validation point's trainable weights back; its metrics become ``final``."""
        if self.best is None:
            return
        step, metrics, weights = self.best
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        self.final = {**metrics, "best_step": step, "stopped_step": self.stopped_step}
        self.best = (step, metrics, {})  # the copy is no longer needed


def train(
    model: Any, data: TaskData, lr: float, seed: int, settings: dict[str, Any]
) -> tuple[float, float, Optional[ValidationCurve]]:
    """HF Trainer on the train split; returns (seconds, mean training loss, validation curve).

    No checkpoints, no reporting. No curve without a validation split or ``train.eval_every``.
    With ``train.patience``, early stopping on validation (``ValidationCurve``): the model returned
    holds the best validation point's weights.
    """
    t = settings["train"]
    every = t.get("eval_every")
    at_start = bool(t.get("eval_at_start", False))
    patience = t.get("patience")
    curve = (
        ValidationCurve(data, every, settings["eval_batch_size"], at_start, patience)
        if every and data.validation
        else None
    )
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
        callbacks = [curve] if curve else None
        trainer = Trainer(
            model=model, args=args, train_dataset=data.train, data_collator=data.collator, callbacks=callbacks
        )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
    if curve is not None and patience is not None:
        curve.restore_best(model)
    return seconds, float(result.training_loss), curve


def binary_scores(pred: Any, labels: Any) -> dict[str, float]:
    """F1 of class 1 and Matthews correlation (CoLA's metric) from numpy arrays of 0/1."""
    tp = float(np.sum((pred == 1) & (labels == 1)))
    tn = float(np.sum((pred == 0) & (labels == 0)))
    fp = float(np.sum((pred == 1) & (labels == 0)))
    fn = float(np.sum((pred == 0) & (labels == 1)))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {"f1": f1, "mcc": (tp * tn - fp * fn) / denom if denom else 0.0}


def choice_logits(logits: torch.Tensor, labels: torch.Tensor, choices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's answer as a classifier's: the logits of the answer tokens at the position before
    each row's one labelled token (the prompt's end), and the class that token stands for."""
    position = (labels != -100).int().argmax(1)  # the answer token's position (one per row)
    rows = torch.arange(labels.shape[0])
    answer = labels[rows, position]
    gold = torch.stack([answer == c for c in choices], 1).int().argmax(1)
    return logits[rows, position - 1][:, choices], gold


def evaluate(
    model: Any, dataset: Any, collator: Any, batch_size: int, choices: Optional[list[int]] = None
) -> dict[str, float]:
    """Accuracy, mean cross-entropy (and F1 / MCC for two classes) on a split, with plain torch and numpy.

    With ``choices`` (a causal LM), the prediction is the answer token of higher probability at the
    prompt's end (``choice_logits``); the loss is the cross-entropy over those answers."""
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    logits, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            gold = batch.pop("labels")
            out = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            if choices is not None:
                out, gold = choice_logits(out, gold, choices)
            logits.append(out)
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


def run_cell(cell: Cell, exp: Experiment, ctx: Context, rate: float) -> dict[str, Any]:
    """Build, select, train at ``rate`` and evaluate one cell; returns its JSON record."""
    start, cpu_start = time.perf_counter(), time.process_time()
    data = ctx.task_data(exp, cell.task)
    model, info = ctx.build(cell, exp, data)
    train_seconds, train_loss, curve = train(model, data, rate, cell.seed, exp.settings)
    eval_start = time.perf_counter()
    batch = exp.settings["eval_batch_size"]
    metrics = evaluate(model, data.test, data.collator, batch, data.choices)
    eval_seconds = time.perf_counter() - eval_start
    validation = {}
    if data.validation is not None:
        final = (
            curve.final
            if curve and curve.final
            else evaluate(model, data.validation, data.collator, batch, data.choices)
        )
        validation = {"validation": {**final, "curve": curve.points if curve else []}}
    record = {
        "key": cell.key,
        "settings_id": cell.settings_id,
        "experiment": cell.experiment,
        "phase": cell.phase,
        "task": cell.task,
        "model": cell.model,
        "model_source": exp.model_spec,
        "method": cell.method,
        "keep_ratio": cell.keep_ratio,
        "seed": cell.seed,
        "metrics": metrics,
        **validation,
        "train_loss": train_loss,
        "learning_rate": rate,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "n_train": len(data.train),
        "n_selection": len(data.selection),
        "n_test": len(data.test),
        **({"n_validation": len(data.validation)} if data.validation is not None else {}),
        **info,
        "selection_seconds": round(info["selection_seconds"], 3),
        "run_seconds": round(time.perf_counter() - start, 3),
        "cpu_seconds": round(time.process_time() - cpu_start, 3),  # about threads x run_seconds when not contended
        "settings": exp.settings,
        "env": environment(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    del model
    gc.collect()
    return record
