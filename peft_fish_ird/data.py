"""Turn what users have (a ``datasets.Dataset``, a list of tokenized examples, or a DataLoader)
into the collated batches of the Fisher pass, drawing ``num_samples`` examples with a seed."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)
LABEL_KEYS = ("labels", "label", "label_ids")
MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "inputs_embeds", "position_ids")
LOSS_MASK_KEYS = ("completion_mask", "assistant_masks")  # SFT loss masks (TRL) that are not model inputs


@dataclass
class FisherBatches:
    """Collated batches and, per sample in feed order, its index in the user's data."""

    batches: list[dict[str, Any]]
    sample_indices: list[int]


def accepted_input_names(model: nn.Module) -> Optional[set[str]]:
    """Argument names of the underlying model's ``forward`` (None if it takes ``**kwargs`` only)."""
    base = model
    while hasattr(base, "get_base_model") and base.get_base_model() is not base:
        base = base.get_base_model()
    params = inspect.signature(base.forward).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names or None


def _keep_model_columns(example: Mapping[str, Any], accepted: Optional[set[str]]) -> dict[str, Any]:
    masks = [k for k in LOSS_MASK_KEYS if k in example]
    if masks and not any(k in example for k in LABEL_KEYS):
        raise ValueError(
            f"The examples carry {masks} but no 'labels': prepare keeps only the model's inputs and the labels, so "
            "this loss mask would be lost and the prompt tokens would count in the Fisher information. Fold it into "
            "the labels first: labels = input_ids with -100 where the mask is 0 (the dataset TRL's SFTTrainer "
            "prepares already has such labels: `peft_fish_ird.prepare_from_trainer(trainer)` uses it)."
        )
    if accepted is None:
        return dict(example)
    kept = {k: v for k, v in example.items() if k in accepted or k in LABEL_KEYS}
    if not any(k not in LABEL_KEYS for k in kept):
        raise ValueError(
            f"The examples have keys {sorted(example)}, none of which the model takes as input. Tokenize the text "
            f"first (e.g. `dataset.map(lambda b: tokenizer(b['text']), batched=True)`); the model accepts "
            f"{sorted(n for n in accepted if n in MODEL_INPUT_NAMES)}."
        )
    return kept


def normalise_labels(batch: Mapping[str, Any]) -> dict[str, Any]:
    batch = dict(batch)
    for key in ("label", "label_ids"):
        if key in batch and "labels" not in batch:
            batch["labels"] = batch.pop(key)
    return batch


def draw_indices(num_available: int, num_samples: int, seed: int) -> list[int]:
    """``num_samples`` distinct indices drawn uniformly with ``seed`` (all, in random order, if fewer)."""
    if num_available == 0:
        raise ValueError("The data passed to `prepare` is empty; pass the training examples.")
    if num_samples > num_available:
        logger.warning(
            "num_samples=%d but only %d examples were passed: the Fisher uses all %d.",
            num_samples,
            num_available,
            num_available,
        )
    return seeded_permutation(num_available, seed)[:num_samples]


def seeded_permutation(n: int, seed: int) -> list[int]:
    """The permutation of ``range(n)`` that every draw with ``seed`` starts from."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator).tolist()


def fisher_batches(
    data: Any,
    *,
    model: nn.Module,
    num_samples: int,
    seed: int,
    batch_size: int,
    data_collator: Optional[Callable[[list[dict[str, Any]]], dict[str, Any]]] = None,
) -> FisherBatches:
    """Collated batches of ``num_samples`` examples drawn from ``data`` with ``seed``.

    * ``datasets.Dataset`` or a sequence of dicts: a seeded random draw, collated with
      ``data_collator`` (default: ``transformers.default_data_collator``, which needs equal lengths;
      pass ``DataCollatorWithPadding(tokenizer)`` for variable-length text). Columns the model does not
      accept (e.g. raw ``text``) are dropped, as HF Trainer does.
    * ``DataLoader``: its batches in its own order until ``num_samples`` are reached (shuffle and
      collation are the loader's); the last batch is cut to size.
    """
    if isinstance(data, DataLoader):
        return _from_loader(data, num_samples)
    if not is_indexable(data):
        raise TypeError(
            f"`prepare` got {type(data).__name__}: pass a datasets.Dataset, a list of tokenized examples "
            "(dicts) with a data_collator, or a torch DataLoader."
        )
    indices = draw_indices(len(data), num_samples, seed)
    return FisherBatches(
        collate_indices(data, indices, model=model, batch_size=batch_size, data_collator=data_collator), indices
    )


def is_indexable(data: Any) -> bool:
    """A collection of examples with ``len`` and integer indexing (a Dataset or a list), not a
    DataLoader (no random access) and not a string."""
    if isinstance(data, (DataLoader, str, bytes)):
        return False
    return hasattr(data, "__getitem__") and hasattr(data, "__len__")


def require_indexable(data: Any, why: str) -> None:
    """Raise unless ``data`` supports ``len`` and integer indexing (a Dataset or a list)."""
    if not is_indexable(data):
        raise TypeError(
            f"{why} needs indexable data (a datasets.Dataset or a list of tokenized examples), got "
            f"{type(data).__name__}. Pass the dataset itself with `data_collator=` instead of a DataLoader."
        )


def collate_indices(
    data: Any,
    indices: Sequence[int],
    *,
    model: nn.Module,
    batch_size: int,
    data_collator: Optional[Callable[[list[dict[str, Any]]], dict[str, Any]]] = None,
) -> list[dict[str, Any]]:
    """Collate ``data[i]`` for ``i`` in ``indices`` (in that order) into batches of ``batch_size``."""
    if data_collator is None:
        from transformers import default_data_collator

        data_collator = default_data_collator
    accepted = accepted_input_names(model)
    batches = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        examples = [_keep_model_columns(_example(data, int(i)), accepted) for i in chunk]
        try:
            batch = data_collator(examples)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"The data_collator failed on the Fisher examples ({err}). For variable-length tokenized text pass "
                "`data_collator=DataCollatorWithPadding(tokenizer)`."
            ) from err
        batches.append(normalise_labels(batch))
    return batches


def _example(data: Any, index: int) -> Mapping[str, Any]:
    example = data[index]
    if not isinstance(example, Mapping):
        raise TypeError(f"Example {index} is a {type(example).__name__}, not a dict of model inputs.")
    return example


def _from_loader(loader: DataLoader, num_samples: int) -> FisherBatches:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler) and sampler.generator is None:
        logger.warning(
            "prepare() got a shuffling DataLoader without a seeded generator: the Fisher samples (and the mask) will "
            "differ between runs. Pass the dataset itself (drawn with config.seed), or "
            "DataLoader(..., generator=torch.Generator().manual_seed(seed))."
        )
    batches, seen = [], 0
    for batch in loader:
        batch = normalise_labels(batch)
        size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
        take = min(size, num_samples - seen)
        if take < size:
            batch = {k: (v[:take] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        batches.append(batch)
        seen += take
        if seen >= num_samples:
            break
    if seen == 0:
        raise ValueError("The DataLoader passed to `prepare` yielded no batches.")
    if seen < num_samples:
        logger.warning(
            "num_samples=%d but the DataLoader yielded %d examples: the Fisher uses %d.", num_samples, seen, seen
        )
    return FisherBatches(batches, list(range(seen)))


def move_to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def check_sequence_length(model: nn.Module, batches: Sequence[Mapping[str, Any]]) -> None:
    """Refuse batches longer than the model's position table (an opaque IndexError otherwise)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    for batch in batches:
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2 and ids.shape[1] > limit:
            raise ValueError(
                f"A Fisher batch has sequences of {ids.shape[1]} tokens, but the model handles at most {limit} "
                f"(config.max_position_embeddings). Tokenize with truncation=True, max_length={limit}."
            )
