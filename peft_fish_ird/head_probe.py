"""Head probing before the Fisher pass: train only the new task head first (LP-FT).

A sequence classifier's head (``classifier`` / ``score``, trained densely through PEFT's
``modules_to_save``) starts random. The Fisher pass back-propagates the loss through it, so a
random head decides which backbone entries look informative. Probing trains the head alone for a
few steps (the body frozen) before the Fisher pass, so the mask is chosen - and training starts -
with a head that already separates the classes: linear probing then fine-tuning, LP-FT (Kumar et
al., 2022, "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution").

Measured on all-MiniLM-L6-v2, three tasks, 0.2% and 0.5% (``benchmarks/results/quality_v3`` against
``quality_v2``, paired over 30 seeds): probing for 48 steps at 1e-2 raised FISH's test accuracy by
2.4 points and its validation accuracy by 1.2. ``FishIRDConfig.head_probe_steps`` sets it: the
default ``"auto"`` probes for :data:`AUTO_STEPS` steps when the adapter has a new head to probe
(:func:`resolve_steps`); an int sets the steps, 0 turns probing off. The quality benchmark applies
the same loop (:func:`train_only`) before every method.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed
from .data import collate_indices, is_indexable, move_to, normalise_labels

AUTO = "auto"
AUTO_STEPS = 48  # the measured setting (benchmarks/results/head_probe, quality_v3): 48 steps at 1e-2, batch 16
# task types whose head PEFT adds to ``modules_to_save`` because the model creates it new (random)
NEW_HEAD_TASK_TYPES = ("SEQ_CLS",)


def resolve_steps(
    steps: Any, task_type: Optional[str], has_head: bool, num_examples: Optional[int], batch_size: int
) -> tuple[int, str]:
    """How many probing steps ``prepare`` runs, and why (recorded in the selection record).

    An int is taken as given. ``"auto"`` probes for :data:`AUTO_STEPS` steps only where probing is
    what was measured to help: a sequence classifier (``task_type="SEQ_CLS"``: a new, random head),
    whose head the adapter trains (``modules_to_save``), with at least one batch of training
    examples. Anything else - a causal LM (its head is pretrained), no head copy, fewer examples
    than ``head_probe_batch_size`` - means no probing, and the reason says which.
    """
    if steps != AUTO:
        return int(steps), "set" if steps else "off (head_probe_steps=0)"
    if str(task_type) not in NEW_HEAD_TASK_TYPES:
        return 0, f"auto: off, task_type={task_type!r} has no new head to probe (only {list(NEW_HEAD_TASK_TYPES)})"
    if not has_head:
        return 0, "auto: off, the adapter trains no head (modules_to_save is empty)"
    if num_examples is not None and num_examples < batch_size:
        return 0, f"auto: off, {num_examples} training examples < head_probe_batch_size={batch_size}"
    return AUTO_STEPS, f"auto: {AUTO_STEPS} steps (a new SEQ_CLS head in modules_to_save)"


def settings_for(config: Any, steps: Optional[int] = None) -> "HeadProbeSettings":
    """A ``FishIRDConfig``'s probe settings; ``steps``: the resolved count (default: ``head_probe_steps``,
    with ``"auto"`` read as :data:`AUTO_STEPS`, so the other values are checked either way). Refuses a
    string other than ``"auto"``."""
    if steps is None:
        value = config.head_probe_steps
        if isinstance(value, str) and value != AUTO:
            raise ValueError(
                f"head_probe_steps={value!r} is invalid: pass 'auto' (the default), a number of steps such as 48, "
                "or 0 for no probing."
            )
        steps = AUTO_STEPS if value == AUTO else value
    return HeadProbeSettings(steps, config.head_probe_lr, config.head_probe_batch_size, config.seed)


def steps_for(config: Any, has_head: bool, data: Any) -> tuple[int, str]:
    """:func:`resolve_steps` for a ``FishIRDConfig`` and ``prepare``'s training data."""
    count = example_count(data)
    return resolve_steps(config.head_probe_steps, config.task_type, has_head, count, config.head_probe_batch_size)


def example_count(data: Any) -> Optional[int]:
    """Training examples in ``data`` for ``resolve_steps``; None for a DataLoader (its batches are its own)."""
    if isinstance(data, DataLoader) or not is_indexable(data):
        return None
    return len(data)


@dataclass(frozen=True)
class HeadProbeSettings:
    """How the head is probed: ``steps`` AdamW steps (constant ``lr``, no weight decay) on batches of
    ``batch_size`` training examples, reshuffled with ``seed`` each pass over the data. ``lr`` and
    ``batch_size`` are ``FishIRDConfig``'s ``head_probe_*`` defaults; ``steps`` is resolved first
    (:func:`resolve_steps`; ``steps=0``: off)."""

    steps: int = 0
    lr: float = 1e-2
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
                least = "a non-negative int (0: no probing)" if name == "steps" else "a positive int"
                raise ValueError(f"head_probe_{name}={value!r} is invalid: pass {least}, e.g. 48 steps of 16.")
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"head_probe_lr={lr!r} is invalid: pass a positive learning rate, e.g. 1e-2.")


def probe_order(num_examples: int, settings: HeadProbeSettings) -> list[list[int]]:
    """The example indices of every probing step: full batches of a seeded permutation, a fresh
    permutation (same generator) each pass over the data; a last partial batch is skipped."""
    if num_examples < settings.batch_size:
        raise ValueError(
            f"Head probing needs at least head_probe_batch_size={settings.batch_size} training examples, got "
            f"{num_examples}: pass more data or a smaller head_probe_batch_size."
        )
    generator = torch.Generator().manual_seed(settings.seed)
    steps: list[list[int]] = []
    while len(steps) < settings.steps:
        order = torch.randperm(num_examples, generator=generator).tolist()
        for start in range(0, num_examples - settings.batch_size + 1, settings.batch_size):
            steps.append(order[start : start + settings.batch_size])
            if len(steps) == settings.steps:
                break
    return steps


def train_only(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Iterator[dict[str, Any]],
    lr: float,
    *,
    progress: bool = False,
    total: Optional[int] = None,
) -> list[float]:
    """Train ``params`` alone (every other parameter of ``model`` frozen for the duration) with
    AdamW at a constant ``lr``, one step per batch, in training mode; returns the step losses.
    ``requires_grad`` flags and the training mode are restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    try:
        bar = tqdm(batches, total=total, desc="head probe", unit="step", leave=False, disable=not progress)
        for batch in bar:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return losses


def probe_heads(
    model: nn.Module,
    heads: Sequence[nn.Module],
    data: Any,
    data_collator: Optional[Callable[[list[dict[str, Any]]], dict[str, Any]]],
    settings: HeadProbeSettings,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Probe ``heads`` (the adapter's trainable head copies) on ``data``; returns what it did (for the
    selection record). Dropout draws come from ``settings.seed`` (the global RNG is forked, as the IRD
    scorer does), so a probe is reproducible. Every process runs the same steps; rank 0's heads are
    then copied to all."""
    if not heads:
        raise ValueError(
            "head_probe_steps > 0 trains the adapter's new head, but it has none: FishIRD trains a head densely "
            "only through `modules_to_save` (PEFT adds `classifier` / `score` for task_type='SEQ_CLS'). Set "
            "modules_to_save=[...] to the head's module name, or head_probe_steps=0."
        )
    start = time.perf_counter()
    device = next(model.parameters()).device
    if isinstance(data, DataLoader):
        batches: Iterator[dict[str, Any]] = (move_to(b, device) for b in _cycle_loader(data, settings.steps))
    elif is_indexable(data):
        batches = (
            move_to(
                collate_indices(data, idx, model=model, batch_size=len(idx), data_collator=data_collator)[0], device
            )
            for idx in probe_order(len(data), settings)
        )
    else:
        raise TypeError(
            f"Head probing got {type(data).__name__}: pass a datasets.Dataset, a list of tokenized examples with a "
            "data_collator, or a torch DataLoader."
        )
    params = [p for head in heads for p in head.parameters()]
    show = progress and distributed.is_main_process()
    with torch.random.fork_rng(devices=[]):  # dropout draws seeded, the caller's random state untouched
        torch.manual_seed(settings.seed)
        losses = train_only(model, params, batches, float(settings.lr), progress=show, total=settings.steps)
    for head in heads:
        distributed.sync_module_states(head)  # identical already on CPU; exact everywhere
    return {
        "steps": settings.steps,
        "lr": float(settings.lr),
        "batch_size": settings.batch_size,
        "first_loss": round(losses[0], 6),
        "last_loss": round(losses[-1], 6),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _cycle_loader(loader: DataLoader, steps: int) -> Iterator[dict[str, Any]]:
    """``steps`` batches of ``loader``, starting it again when it runs out (its own order and collation)."""
    done = 0
    while done < steps:
        produced = False
        for batch in loader:
            produced = True
            yield normalise_labels(batch)
            done += 1
            if done == steps:
                return
        if not produced:
            raise ValueError("The DataLoader passed to `prepare` yielded no batches for head probing.")
