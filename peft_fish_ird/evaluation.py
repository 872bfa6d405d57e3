"""Scoring IRD candidates: the built-in short masked fine-tune, and isolation of every candidate.

Each candidate mask is scored from the same starting point: zero deltas, the head as ``prepare``
found it (fresh, or trained alone first with ``head_probe_steps``), the same training batches in
the same order, the same dropout draws (the global RNG is forked, so the caller's random state is
untouched). Whatever a scorer does to the model is undone before the next candidate: values, head
copies, training mode, flags.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .fisher import output_logits, per_sample_losses


@contextlib.contextmanager
def isolated_candidate(
    model: nn.Module,
    fill: Callable[[dict[str, torch.Tensor]], None],
    masks: dict[str, torch.Tensor],
    state_modules: Sequence[nn.Module],
) -> Iterator[None]:
    """Install ``masks`` (zero values) for the duration of the block, then restore everything.

    ``state_modules``: modules whose parameters a scorer may train (the adapter's layers and
    head copies); their full state (tensors, Parameter objects, requires_grad) is restored.
    """
    saved = [_snapshot(m) for m in state_modules]
    modes = {m: m.training for m in model.modules()}
    try:
        fill(masks)
        yield
    finally:
        for module, snap in zip(state_modules, saved):
            _restore(module, snap)
        for m, mode in modes.items():
            m.training = mode


def _snapshot(module: nn.Module) -> dict[str, Any]:
    params = {name: (p, p.detach().clone(), p.requires_grad) for name, p in module.named_parameters(recurse=True)}
    buffers = {name: b.clone() for name, b in module.named_buffers(recurse=True)}
    # a tuner layer's per-adapter containers (values, indices, prepared flags): the names PEFT's
    # layer contract declares; their entries are swapped back whole, Parameter objects included
    names = getattr(module, "adapter_layer_names", ()) + getattr(module, "other_param_names", ())
    containers = {attr: dict(getattr(module, attr).items()) for attr in names}
    return {"params": params, "buffers": buffers, "containers": containers}


def _restore(module: nn.Module, snap: dict[str, Any]) -> None:
    for attr, items in snap["containers"].items():
        container = getattr(module, attr)
        for key in list(container.keys()):
            del container[key]
        for key, value in items.items():
            container[key] = value
    with torch.no_grad():
        for name, (param, value, flag) in snap["params"].items():
            param.copy_(value)
            param.requires_grad_(flag)
        live = dict(module.named_buffers(recurse=True))
        for name, value in snap["buffers"].items():
            if name in live and live[name].shape == value.shape:
                live[name].copy_(value)


@dataclass(frozen=True)
class ScorerSettings:
    """Settings of the built-in IRD evaluator. These defaults are the ``FishIRDConfig`` defaults
    (``ird_selection_fraction`` and ``ird_eval_*``), turned into this object by
    ``FishIRDConfig.scorer_settings()``."""

    selection_fraction: float = 0.1
    steps: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    metric: Literal["loss", "accuracy"] = "loss"


class MaskedFineTuneScorer:
    """Built-in IRD evaluator: ``steps`` AdamW steps on training batches with the candidate mask,
    then ``metric`` on the selection batches (``"loss"``: minus the mean per-sample loss;
    ``"accuracy"``: share of argmax hits). Higher is better."""

    def __init__(
        self,
        model: nn.Module,
        trainable: Callable[[], list[nn.Parameter]],
        train_batches: list[dict[str, Any]],
        selection_batches: list[dict[str, Any]],
        *,
        lr: float,
        metric: Literal["loss", "accuracy"],
        seed: int,
        progress: bool = False,
        desc: str = "IRD scoring",
    ) -> None:
        self.model = model
        self.trainable = trainable
        self.train_batches = train_batches
        self.selection_batches = selection_batches
        self.lr = lr
        self.metric = metric
        self.seed = seed
        self.progress, self.desc = progress, desc

    def __call__(self) -> float:
        params = self.trainable()
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model.train()
            show = self.progress and distributed.is_main_process()
            for batch in tqdm(self.train_batches, desc=self.desc, unit="step", leave=False, disable=not show):
                loss = self.model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return evaluate(self.model, self.selection_batches, self.metric)


def evaluate(model: nn.Module, batches: list[dict[str, Any]], metric: Literal["loss", "accuracy"]) -> float:
    """``-mean per-sample loss`` or accuracy of ``model`` on ``batches`` (eval mode, no grad)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            labels = batch["labels"]
            logits = output_logits(model(**{k: v for k, v in batch.items() if k != "labels"}))
            if metric == "loss":
                total -= float(per_sample_losses(logits, labels).sum())
            else:
                if logits.dim() != 2:
                    raise ValueError("ird_eval_metric='accuracy' needs classification logits (B, C); use 'loss'.")
                total += float((logits.argmax(-1) == labels).sum())
            count += int(labels.shape[0])
    if count == 0:
        raise ValueError("The IRD selection split is empty; pass more data or a selection_dataset.")
    return total / count
