"""The ``prepare`` pipeline: data plumbing around the Fisher engine, the selection and IRD.

``FishIRDModel.prepare`` validates, then builds a ``PrepareJob`` whose ``fish`` / ``random`` /
``ird`` method returns an ``Outcome`` (the masks plus what the record needs); the tuner fills the
layers with ``fill_masks`` and writes the record.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from . import distributed
from .config import IRD_SELECTIONS, FishIRDConfig
from .data import check_sequence_length, collate_indices, fisher_batches, move_to, require_indexable, seeded_permutation
from .evaluation import MaskedFineTuneScorer, isolated_candidate
from .fisher import compute_fisher
from .ird import IRDRound, IRDSettings, iterative_range_decreasing, schedule
from .layer import FishIRDLayer
from .selection import random_mask, select

logger = logging.getLogger(__name__)


def fill_masks(adapter: str, layers: dict[str, FishIRDLayer], masks: dict[str, torch.Tensor]) -> None:
    """Give every layer its entries (zero values) and mark the adapter prepared."""
    for key, indices in masks.items():
        module_name, param_name = key.rsplit(".", 1)
        layers[module_name].set_entries(adapter, param_name, indices)
    for layer in layers.values():
        layer.fishird_prepared[adapter] = True


@contextlib.contextmanager
def adapters_disabled(layers: Any) -> Iterator[None]:
    """Run the pretrained model: sparse deltas and trained head copies off (base layers' hooks fire)."""
    layers = list(layers)
    previous = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, flag in zip(layers, previous):
            layer._disable_adapters = flag


def check_some_information(scores: dict[str, torch.Tensor]) -> None:
    """All-zero Fisher scores carry no ranking (e.g. a loss that does not depend on the targets)."""
    if all(not bool(s.any()) for s in scores.values()):
        raise ValueError(
            "Every Fisher score is zero: the loss does not depend on the targeted parameters for these samples "
            "(e.g. a dead head, constant labels with a saturated loss, or targets outside the loss's path). A mask "
            "chosen from zeros would be arbitrary; check the model outputs and labels, or use selection='random'."
        )


def score_summary(scores: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Threshold and captured share of the Fisher mass (of the first round's Fisher) of a mask."""
    chosen = torch.cat([scores[k].reshape(-1)[idx] for k, idx in masks.items()])
    total = float(sum(s.double().sum() for s in scores.values()))
    return {
        "threshold": float(chosen.min()) if chosen.numel() else 0.0,
        "max": float(chosen.max()) if chosen.numel() else 0.0,
        "selected_fisher_share": float(chosen.double().sum()) / total if total > 0 else 0.0,
        "zero_score_entries_selected": int((chosen == 0).sum()),
    }


@dataclass
class Outcome:
    masks: dict[str, torch.Tensor]
    sample_indices: list[int]
    scores: dict[str, torch.Tensor]
    trace: list[IRDRound]
    best_round: int = 1
    per_sample_gradients: int = 0
    fisher_seconds: float = 0.0
    scoring_seconds: float = 0.0
    selection_samples: int = 0


class PrepareJob:
    """One ``prepare`` call: data plumbing around the Fisher engine, the selection and IRD."""

    def __init__(
        self,
        tuner: nn.Module,
        head_wrappers: list[nn.Module],
        adapter: str,
        config: FishIRDConfig,
        layers: dict[str, FishIRDLayer],
        data: Any,
        collator: Optional[Callable],
        batch_size: int,
        progress: bool,
    ) -> None:
        self.tuner, self.model, self.head_wrappers = tuner, tuner.model, head_wrappers
        self.adapter, self.config, self.layers = adapter, config, layers
        self.data, self.collator, self.batch_size, self.progress = data, collator, batch_size, progress
        self.targets = {name: layer.get_base_layer() for name, layer in layers.items()}
        self.device = next(self.model.parameters()).device

    def shapes(self) -> dict[str, torch.Size]:
        return {
            f"{name}.{p}": getattr(module, p).shape
            for name, module in self.targets.items()
            for p in self.layers[name].base_param_names()
        }

    def settings_summary(self, evaluator: Optional[Callable]) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {"selection": c.selection, "fisher_batch_size": self.batch_size}
        if c.selection in IRD_SELECTIONS:
            out.update(
                ird_shrink=c.ird_shrink,
                ird_rounds=c.ird_rounds,
                ird_min_samples=c.ird_min_samples,
                ird_selection_fraction=c.ird_selection_fraction,
                ird_eval_steps=c.ird_eval_steps,
                ird_eval_batch_size=c.ird_eval_batch_size,
                ird_eval_lr=c.ird_eval_lr,
                ird_eval_metric=c.ird_eval_metric,
                evaluator="user" if evaluator is not None else "built-in",
            )
        return out

    def _fisher(self, batches: list[dict[str, Any]], ranges: Optional[dict[str, torch.Tensor]], desc: str):
        check_sequence_length(self.model, batches)
        batches = [move_to(b, self.device) for b in batches]
        with adapters_disabled([*self.layers.values(), *self.head_wrappers]):
            return compute_fisher(
                self.model,
                batches,
                self.targets,
                self.config.fisher,
                sample_score_masks=ranges,
                progress=self.progress,
                desc=desc,
            )

    def fish(self, k: int) -> Outcome:
        drawn = fisher_batches(
            self.data,
            model=self.model,
            num_samples=self.config.num_samples,
            seed=self.config.seed,
            batch_size=self.batch_size,
            data_collator=self.collator,
        )
        result = self._fisher(drawn.batches, None, "FISH Fisher")
        check_some_information(result.scores)
        masks = select(result.scores, k, self.config.budget)
        trace = [
            IRDRound(
                1, result.num_samples, sum(s.numel() for s in result.scores.values()), None, round(result.seconds, 3)
            )
        ]
        return Outcome(masks, drawn.sample_indices, result.scores, trace, 1, result.num_samples, result.seconds)

    def random(self, k: int) -> Outcome:
        sizes = {key: int(torch.Size(shape).numel()) for key, shape in self.shapes().items()}
        masks = random_mask(sizes, k, self.config.seed)
        return Outcome(masks, [], {}, [IRDRound(1, 0, sum(sizes.values()), None, 0.0)])

    def ird(self, k: int, selection_dataset: Any, evaluator: Optional[Callable[[nn.Module], float]]) -> Outcome:
        c = self.config
        require_indexable(self.data, f"selection={c.selection!r}")
        n = len(self.data)
        settings = IRDSettings(
            shrink=c.ird_shrink,
            rounds=c.ird_rounds,
            min_samples=c.ird_min_samples,
            direction="reverse" if c.selection == "ird_reverse" else "top",
            sample_order="random" if c.selection == "ird_random" else "fisher",
            budget=c.budget,
            seed=c.seed,
        )
        candidates = sum(int(torch.Size(s).numel()) for s in self.shapes().values())
        plan = schedule(min(c.num_samples, n), candidates, k, settings)
        held_out_size = 0
        if len(plan) > 1 and evaluator is None and selection_dataset is None:
            held_out_size = max(1, round(c.ird_selection_fraction * n))
        order = seeded_permutation(n, c.seed)
        pool = order[: min(c.num_samples, n - held_out_size)]
        held_out = order[len(pool) : len(pool) + held_out_size]
        if not pool:
            raise ValueError(
                f"{n} examples leave none for the Fisher pool after holding out {held_out_size} for scoring: pass "
                "more data or a selection_dataset."
            )
        if len(pool) < c.num_samples:
            logger.warning(
                "IRD: Fisher pool holds %d examples (num_samples=%d; %d held out for scoring).",
                len(pool),
                c.num_samples,
                held_out_size,
            )

        def fisher_pass(positions, ranges, desc):
            batches = collate_indices(
                self.data,
                [pool[i] for i in positions],
                model=self.model,
                batch_size=self.batch_size,
                data_collator=self.collator,
            )
            return self._fisher(batches, ranges, desc)

        scorer = self._scorer(pool, held_out, selection_dataset, evaluator)
        result = iterative_range_decreasing(len(pool), k, fisher_pass, scorer, settings)
        selection_samples = len(held_out) if selection_dataset is None else len(selection_dataset)
        return Outcome(
            result.masks,
            pool,
            result.first_round_scores,
            result.trace,
            result.best_round,
            result.per_sample_gradients,
            result.fisher_seconds,
            result.scoring_seconds,
            selection_samples if evaluator is None else 0,
        )

    def _scorer(
        self, pool: list[int], held_out: list[int], selection_dataset: Any, evaluator: Optional[Callable]
    ) -> Callable[[dict[str, torch.Tensor]], float]:
        adapter, layers = self.adapter, self.layers
        heads = [w.modules_to_save[adapter] for w in self.head_wrappers if adapter in w.modules_to_save]
        state_modules = [*layers.values(), *heads]

        def trainable() -> list[nn.Parameter]:
            params = [layer.values(p)[adapter] for layer in layers.values() for p in layer.base_param_names()]
            params += [p for head in heads for p in head.parameters()]
            for p in params:
                p.requires_grad_(True)
            return params

        if evaluator is not None:
            inner = lambda: evaluator(self.tuner)  # noqa: E731
        else:
            inner = self._builtin_scorer(pool, held_out, selection_dataset, trainable)

        def score(masks: dict[str, torch.Tensor]) -> float:
            fill = lambda m: fill_masks(adapter, layers, m)  # noqa: E731
            with isolated_candidate(self.model, fill, masks, state_modules):
                return distributed.broadcast_float(float(inner()))  # every rank keeps the same round

        return score

    def _builtin_scorer(self, pool, held_out, selection_dataset, trainable) -> MaskedFineTuneScorer:
        c = self.config
        if selection_dataset is not None:
            require_indexable(selection_dataset, "selection_dataset")
            sel_source, sel_indices = selection_dataset, list(range(len(selection_dataset)))
        else:
            sel_source, sel_indices = self.data, held_out

        def collate(data: Any, idx: list[int]) -> list[dict[str, Any]]:
            batches = collate_indices(
                data, idx, model=self.model, batch_size=c.ird_eval_batch_size, data_collator=self.collator
            )
            return [move_to(b, self.device) for b in batches]

        needed = c.ird_eval_steps * c.ird_eval_batch_size
        order = seeded_permutation(len(pool), c.seed + 1)
        train_indices = [pool[order[i % len(order)]] for i in range(needed)]
        return MaskedFineTuneScorer(
            self.model,
            trainable,
            collate(self.data, train_indices),
            collate(sel_source, sel_indices),
            lr=c.ird_eval_lr,
            metric=c.ird_eval_metric,
            seed=c.seed,
        )
