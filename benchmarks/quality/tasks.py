"""Tasks of the quality benchmark: seeded disjoint test / selection / train splits, tokenized."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from datasets import Dataset, load_dataset

from benchmarks.quality.plan import GLUE_TASKS, OFFLINE_TASKS, BenchmarkError
from peft_fish_ird.offline_data import load_hutto, load_rotten_tomatoes, split


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    text_pair: Optional[str] = None


@dataclass
class TaskData:
    """Tokenized splits of one task for one tokenizer."""

    train: Any
    selection: Any
    test: Any
    collator: Any
    num_labels: int
    validation: Any = None  # carved from the training data; None when the settings ask for none
    choices: Optional[list[int]] = None  # head "lm": the answer token of each class (scored at the prompt's end)


def resolve_sizes(
    n: int, test: Optional[int], selection: int, train: Optional[int], task: str, validation: int = 0
) -> dict[str, int]:
    """Split sizes in split order (test, selection, [validation,] train); ``None`` means all that remains.

    The validation split (learning-rate choice, convergence curves) is carved from the training data,
    so the test and selection splits are the same with or without it.
    """
    test = n - selection - validation - (train or 0) if test is None else test
    train = n - test - selection - validation if train is None else train
    if min(test, selection, train) <= 0 or validation < 0 or test + selection + validation + train > n:
        raise BenchmarkError(
            f"Task {task!r} has {n} examples; cannot split test={test}, selection={selection}, "
            f"validation={validation}, train={train}."
        )
    middle = {"validation": validation} if validation else {}
    return {"test": test, "selection": selection, **middle, "train": train}


def offline_rows(task: str) -> list[Example]:
    rows = load_rotten_tomatoes(unique=True) if task == "rotten_tomatoes" else load_hutto(task)
    return [Example(r.text, r.label) for r in rows]


def offline_splits(task: str, data: dict[str, Any]) -> dict[str, list[Example]]:
    """Seeded disjoint test / selection / (validation) / train splits of an offline task."""
    rows = offline_rows(task)
    sizes = resolve_sizes(len(rows), data["test"], data["selection"], data["train"], task, data.get("validation", 0))
    return split(rows, sizes, seed=data["split_seed"])


def glue_splits(task: str, data: dict[str, Any]) -> dict[str, list[Example]]:
    """GLUE via ``datasets``: selection, validation and train from GLUE train; test = GLUE validation.

    (GLUE's test labels are hidden.)
    """
    name = task.split("/", 1)[1]
    first, second, _, eval_split = GLUE_TASKS[name]
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise BenchmarkError(
            f"Task {task!r} loads GLUE from the Hugging Face hub, but HF_HUB_OFFLINE is set: unset it on a machine "
            f"with internet access, or use the offline tasks {list(OFFLINE_TASKS)}."
        )
    try:
        glue = load_dataset("nyu-mll/glue", name)
    except Exception as err:  # noqa: BLE001 - any failure here means the hub is not reachable
        raise BenchmarkError(
            f"Task {task!r} needs `datasets.load_dataset('nyu-mll/glue', {name!r})`, which failed "
            f"({type(err).__name__}: {str(err)[:300]}). It needs internet access to the Hugging Face hub; "
            f"offline, use the tasks {list(OFFLINE_TASKS)}."
        ) from None

    def rows(part: Any) -> list[Example]:
        return [Example(r[first], int(r["label"]), r[second] if second else None) for r in part]

    pool, test = rows(glue["train"]), rows(glue[eval_split])
    if data["test"] is not None:
        test = split(test, {"test": min(data["test"], len(test))}, seed=data["split_seed"])["test"]
    validation = data.get("validation", 0)
    train_size = len(pool) - data["selection"] - validation if data["train"] is None else data["train"]
    sizes = {"selection": data["selection"], **({"validation": validation} if validation else {}), "train": train_size}
    parts = split(pool, sizes, seed=data["split_seed"])
    return {"test": test, **parts}


def num_labels_of(task: str) -> int:
    return GLUE_TASKS[task.split("/", 1)[1]][2] if task.startswith("glue/") else 2


def answer_tokens(tokenizer: Any, answers: list[str]) -> list[int]:
    """The first token of each answer word; they must differ (the choice is made on that token)."""
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in answers]
    if len(set(ids)) != len(ids):
        raise BenchmarkError(f"The answers {answers} start with the same token; choose words that do not.")
    return ids


def encode_lm(tokenizer: Any, rows: list[Example], max_length: int, prompt: str, answers: list[str]) -> Any:
    """Causal-LM examples: ``prompt.format(text=...)`` then the class's answer token, labels -100 on the
    prompt (SFT style: only the answer counts, in the Fisher pass as in training).

    The text is cut to ``max_length`` tokens before it enters the template, so the template's end
    (e.g. ``"\nSentiment:"``) is never cut off."""
    choices = answer_tokens(tokenizer, answers)
    ids, masks, labels = [], [], []
    for r in rows:
        text_ids = tokenizer(r.text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        prompt_ids = tokenizer(prompt.format(text=tokenizer.decode(text_ids)), add_special_tokens=False)["input_ids"]
        ids.append(prompt_ids + [choices[r.label]])
        masks.append([1] * (len(prompt_ids) + 1))
        labels.append([-100] * len(prompt_ids) + [choices[r.label]])
    return Dataset.from_dict({"input_ids": ids, "attention_mask": masks, "labels": labels})


def encode(tokenizer: Any, rows: list[Example], max_length: int) -> Any:
    """A ``datasets.Dataset`` of token ids, attention masks and labels (padding left to the collator)."""
    texts = [r.text for r in rows]
    pairs = [r.text_pair for r in rows] if rows and rows[0].text_pair is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    return Dataset.from_dict({**enc, "labels": [r.label for r in rows]})
