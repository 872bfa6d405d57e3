"""The ``prepare`` pipeline: data plumbing around the Fisher engine, the selection and IRD.

``FishIRDModel.prepare`` checks the adapter, then ``PrepareJob(...).run()`` draws the data, runs
the selection named by ``config.selection`` (through the ``SELECTIONS`` table) and returns an
``Outcome``: the masks and the ``SelectionRecord`` describing them. The tuner fills the layers
with ``fill_masks`` and stores the record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from . import distributed
from ._version import __version__
from .config import IRD_SELECTIONS, FishIRDConfig
from .data import check_sequence_length, collate_indices, fisher_batches, move_to, require_indexable, seeded_permutation
from .evaluation import MaskedFineTuneScorer, isolated_candidate
from .fisher import compute_fisher
from .head_probe import AUTO as HEAD_PROBE_AUTO
from .head_probe import probe_heads, steps_for
from .ird import IRDRound, iterative_range_decreasing, planned_passes, schedule
from .layer import FishIRDLayer
from .record import SelectionRecord, mask_fingerprint
from .selection import random_mask, select, sparse_budget

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
class Selected:
    """What one selection (``fish`` / ``random`` / ``ird``) found, before it becomes a record."""

    masks: dict[str, torch.Tensor]
    sample_indices: list[int]
    scores: dict[str, torch.Tensor]
    trace: list[IRDRound]
    best_round: int = 1
    per_sample_gradients: int = 0
    fisher_seconds: float = 0.0
    scoring_seconds: float = 0.0
    selection_samples: int = 0


@dataclass
class Outcome:
    """The result of ``PrepareJob.run``: the masks to fill and the record describing them."""

    masks: dict[str, torch.Tensor]
    record: SelectionRecord


class PrepareJob:
    """One ``prepare`` call: data plumbing around the Fisher engine, the selection and IRD."""

    def __init__(
        self,
        tuner: Any,
        adapter: str,
        data: Any,
        collator: Optional[Callable] = None,
        *,
        selection_dataset: Any = None,
        evaluator: Optional[Callable[[nn.Module], float]] = None,
        batch_size: Optional[int] = None,
        progress: bool = True,
    ) -> None:
        self.tuner, self.model, self.adapter = tuner, tuner.model, adapter
        self.config: FishIRDConfig = tuner.peft_config[adapter]
        self.layers: dict[str, FishIRDLayer] = tuner.fishird_layers(adapter)
        self.head_wrappers = tuner.head_wrappers()
        self.data, self.collator, self.progress = data, collator, progress
        self.selection_dataset, self.evaluator = selection_dataset, evaluator
        self.batch_size = batch_size or self.config.fisher_batch_size
        self.targets = {name: layer.get_base_layer() for name, layer in self.layers.items()}
        self.device = next(self.model.parameters()).device
        self.head_probe: dict[str, Any] = {}  # what probing did; non-empty: the Fisher sees the probed head
        self.head_probe_choice = ""  # how the step count was chosen (head_probe.resolve_steps)
        if (selection_dataset is not None or evaluator is not None) and self.config.selection not in IRD_SELECTIONS:
            raise ValueError(
                f"selection_dataset / evaluator are used by IRD only, but selection={self.config.selection!r}; set "
                "selection='ird' (or a control) in the FishIRDConfig, or drop these arguments."
            )

    def run(self) -> Outcome:
        """Bring the processes together, select the mask with ``config.selection``, describe it."""
        start = time.perf_counter()
        distributed.check_not_sharded(self.model)
        if distributed.ensure_process_group():
            logger.info(
                "FishIRD initialised torch.distributed (%d processes) for the Fisher pass.", distributed.world_size()
            )
        distributed.sync_module_states(self.model)
        heads = [w.modules_to_save[self.adapter] for w in self.head_wrappers if self.adapter in w.modules_to_save]
        steps, self.head_probe_choice = steps_for(self.config, bool(heads), self.data)
        if steps:
            self.head_probe = self.probe_head(heads, steps)
        elif self.config.head_probe_steps == HEAD_PROBE_AUTO:
            logger.info("FishIRD head probe %s.", self.head_probe_choice.replace("auto: ", "(auto) "))
        total, head = self.tuner.count_parameters()
        k = sparse_budget(total, head, self.config.keep_ratio, self.config.head_in_budget)
        selected = SELECTIONS[self.config.selection](self, k)
        record = self.record(selected, total, head, k, time.perf_counter() - start)
        return Outcome(selected.masks, record)

    def probe_head(self, heads: list[nn.Module], steps: int) -> dict[str, Any]:
        """Train the adapter's head copies (``modules_to_save``) alone (the sparse layers off: the body is
        the pretrained model) for ``steps`` steps on the training data, before any Fisher pass."""
        settings = self.config.head_probe_settings(steps)
        with adapters_disabled(self.layers.values()):
            done = probe_heads(self.model, heads, self.data, self.collator, settings, progress=self.progress)
        done["chosen"] = self.head_probe_choice
        done_text = "%(steps)d steps at lr %(lr)g, loss %(first_loss).4f -> %(last_loss).4f (%(seconds).1f s)"
        logger.info("FishIRD head probe: " + done_text + ".", done)
        return done

    def input_axes(self) -> dict[str, Optional[int]]:
        """``"<module>.weight"`` -> its input-feature dimension (the layer registry's ``input_axis``)."""
        return {f"{name}.weight": layer.layer_type.input_axis for name, layer in self.layers.items()}

    def shapes(self) -> dict[str, torch.Size]:
        return {
            f"{name}.{p}": self.layers[name].param_spec(p).shape
            for name, module in self.targets.items()
            for p in self.layers[name].base_param_names()
        }

    def settings_summary(self) -> dict[str, Any]:
        """The settings that shaped the mask (saved in the record), read off the config once."""
        c = self.config
        out: dict[str, Any] = {"selection": c.selection, "fisher_batch_size": self.batch_size}
        if self.head_probe:
            out["head_probe"] = self.head_probe
        elif c.head_probe_steps == HEAD_PROBE_AUTO:  # say why "auto" did not probe
            out["head_probe"] = {"steps": 0, "chosen": self.head_probe_choice}
        if c.selection in IRD_SELECTIONS:
            out["ird"] = dataclasses.asdict(c.ird_settings())
            out["evaluator"] = "user" if self.evaluator is not None else "built-in"
            if self.evaluator is None:
                out["scorer"] = dataclasses.asdict(c.scorer_settings())
        return out

    def record(self, selected: Selected, total: int, head: int, k: int, seconds: float) -> SelectionRecord:
        c = self.config
        return SelectionRecord(
            method=c.selection,
            adapter_name=self.adapter,
            fisher=c.fisher,
            budget=c.budget,
            keep_ratio=c.keep_ratio,
            head_in_budget=c.head_in_budget,
            seed=c.seed,
            num_samples_requested=c.num_samples,
            num_samples_used=len(selected.sample_indices),
            sample_indices=selected.sample_indices,
            total_params=total,
            head_params=head,
            k=k,
            entries_per_param={key: int(idx.numel()) for key, idx in selected.masks.items()},
            shapes={key: list(shape) for key, shape in self.shapes().items()},
            score_summary=score_summary(selected.scores, selected.masks) if selected.scores else {},
            fisher_seconds=round(selected.fisher_seconds, 3),
            seconds=round(seconds, 3),
            versions={"peft_fish_ird": __version__, "torch": torch.__version__},
            trace=selected.trace,
            best_round=selected.best_round,
            per_sample_gradients=selected.per_sample_gradients,
            scoring_seconds=round(selected.scoring_seconds, 3),
            selection_samples=selected.selection_samples,
            settings=self.settings_summary(),
            mask_sha256=mask_fingerprint(selected.masks),
        )

    def _fisher(
        self,
        batches: list[dict[str, Any]],
        ranges: Optional[dict[str, torch.Tensor]],
        desc: str,
        sample_scores: bool = True,
    ):
        """A Fisher pass over ``batches`` (per-sample scores restricted to ``ranges``; ``sample_scores``
        False: per-parameter scores only, for selections that never rank samples)."""
        check_sequence_length(self.model, batches)
        batches = [move_to(b, self.device) for b in batches]
        # the pretrained model; a probed head stays on (the point of probing: score through a trained head)
        heads_off = [] if self.head_probe else self.head_wrappers
        with adapters_disabled([*self.layers.values(), *heads_off]):
            return compute_fisher(
                self.model,
                batches,
                self.targets,
                self.config.fisher,
                sample_score_masks=ranges,
                progress=self.progress,
                desc=desc,
                sample_scores=sample_scores,
            )

    def fish(self, k: int) -> Selected:
        drawn = fisher_batches(
            self.data,
            model=self.model,
            num_samples=self.config.num_samples,
            seed=self.config.seed,
            batch_size=self.batch_size,
            data_collator=self.collator,
        )
        result = self._fisher(drawn.batches, None, "FISH Fisher", sample_scores=False)  # FISH ranks no samples
        check_some_information(result.scores)
        masks = select(result.scores, k, self.config.budget, input_axes=self.input_axes())
        n_params = sum(s.numel() for s in result.scores.values())
        trace = [IRDRound(1, result.num_samples, n_params, None, round(result.seconds, 3), 1.0)]
        return Selected(masks, drawn.sample_indices, result.scores, trace, 1, result.num_samples, result.seconds)

    def random(self, k: int) -> Selected:
        sizes = {key: int(torch.Size(shape).numel()) for key, shape in self.shapes().items()}
        masks = random_mask(sizes, k, self.config.seed)
        return Selected(masks, [], {}, [IRDRound(1, 0, sum(sizes.values()), None, 0.0)])

    def ird(self, k: int) -> Selected:
        c = self.config
        require_indexable(self.data, f"selection={c.selection!r}")
        settings = c.ird_settings()
        candidates = sum(int(torch.Size(s).numel()) for s in self.shapes().values())
        pool, held_out = self._ird_split(k, settings, candidates)

        def fisher_pass(positions, ranges, desc):
            batches = collate_indices(
                self.data,
                [pool[i] for i in positions],
                model=self.model,
                batch_size=self.batch_size,
                data_collator=self.collator,
            )
            return self._fisher(batches, ranges, desc)

        rounds = planned_passes(len(pool), candidates, k, settings)
        scorer = self._scorer(pool, held_out, rounds)
        result = iterative_range_decreasing(
            len(pool), k, fisher_pass, scorer, settings, num_params=candidates, input_axes=self.input_axes()
        )
        if self.evaluator is not None:
            selection_samples = 0
        else:
            selection_samples = len(held_out) if self.selection_dataset is None else len(self.selection_dataset)
        return Selected(
            result.masks,
            pool,
            result.first_round_scores,
            result.trace,
            result.best_round,
            result.per_sample_gradients,
            result.fisher_seconds,
            result.scoring_seconds,
            selection_samples,
        )

    def _ird_split(self, k: int, settings: Any, candidates: int) -> tuple[list[int], list[int]]:
        """The Fisher pool and the held-out selection split (both positions in ``data``)."""
        c, n = self.config, len(self.data)
        plan = schedule(min(c.num_samples, n), candidates, k, settings)
        held_out_size = 0
        if len(plan) > 1 and self.evaluator is None and self.selection_dataset is None:
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
        return pool, held_out

    def _scorer(self, pool: list[int], held_out: list[int], rounds: int) -> Callable[[dict[str, torch.Tensor]], float]:
        adapter, layers = self.adapter, self.layers
        heads = [w.modules_to_save[adapter] for w in self.head_wrappers if adapter in w.modules_to_save]
        state_modules = [*layers.values(), *heads]

        def trainable() -> list[nn.Parameter]:
            params = [layer.values(p)[adapter] for layer in layers.values() for p in layer.base_param_names()]
            params += [p for head in heads for p in head.parameters()]
            for p in params:
                p.requires_grad_(True)
            return params

        if self.evaluator is not None:
            evaluator = self.evaluator
            inner = lambda: evaluator(self.tuner)  # noqa: E731
        else:
            inner = self._builtin_scorer(pool, held_out, trainable)

        scored = [0]

        def score(masks: dict[str, torch.Tensor]) -> float:
            scored[0] += 1
            if isinstance(inner, MaskedFineTuneScorer):
                inner.desc = f"IRD scoring {scored[0]}/{rounds}"
            fill = lambda m: fill_masks(adapter, layers, m)  # noqa: E731
            with isolated_candidate(self.model, fill, masks, state_modules):
                return distributed.broadcast_float(float(inner()))  # every rank keeps the same round

        return score

    def _builtin_scorer(self, pool, held_out, trainable) -> MaskedFineTuneScorer:
        c = self.config.scorer_settings()
        if self.selection_dataset is not None:
            require_indexable(self.selection_dataset, "selection_dataset")
            sel_source, sel_indices = self.selection_dataset, list(range(len(self.selection_dataset)))
        else:
            sel_source, sel_indices = self.data, held_out

        def collate(data: Any, idx: list[int]) -> list[dict[str, Any]]:
            batches = collate_indices(data, idx, model=self.model, batch_size=c.batch_size, data_collator=self.collator)
            return [move_to(b, self.device) for b in batches]

        order = seeded_permutation(len(pool), self.config.seed + 1)
        train_indices = [pool[order[i % len(order)]] for i in range(c.steps * c.batch_size)]
        return MaskedFineTuneScorer(
            self.model,
            trainable,
            collate(self.data, train_indices),
            collate(sel_source, sel_indices),
            lr=c.lr,
            metric=c.metric,
            seed=self.config.seed,
            progress=self.progress,
        )


# config.selection -> the PrepareJob method that makes the mask
SELECTIONS: dict[str, Callable[[PrepareJob, int], Selected]] = {
    "fish": PrepareJob.fish,
    "random": PrepareJob.random,
    **dict.fromkeys(IRD_SELECTIONS, PrepareJob.ird),
}
