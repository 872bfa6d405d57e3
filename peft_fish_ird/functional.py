"""``prepare`` as a function: the one implementation behind ``FishIRDModel.prepare`` and
``prepare_model``, the functional path for models built with PEFT's ``inject_adapter_in_model``.

The sequence: check the adapter -> run a ``PrepareJob`` (data, Fisher, selection/IRD, record) ->
fill the layers -> store the record in the config -> print a one-line summary.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, Optional

from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .adapter_state import count_parameters_of, fishird_layers_of, head_wrappers_of
from .config import FishIRDConfig
from .layer import FishIRDLayer
from .mask_init import values_trained
from .prepare import PrepareJob, fill_masks
from .record import SelectionRecord

logger = logging.getLogger(__name__)


def prepare_adapter(
    tuner: Any,
    adapter: str,
    train_dataset: Any,
    data_collator: Optional[Callable] = None,
    *,
    selection_dataset: Any = None,
    evaluator: Optional[Callable[[nn.Module], float]] = None,
    batch_size: Optional[int] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> SelectionRecord:
    """Choose ``adapter``'s mask and fill its layers; see ``FishIRDModel.prepare`` for the arguments.

    ``tuner`` is a ``FishIRDModel`` or an ``InjectedModel``: anything with ``model``,
    ``peft_config``, ``fishird_layers``, ``head_wrappers`` and ``count_parameters``.
    """
    layers = tuner.fishird_layers(adapter)
    check_can_prepare(tuner, adapter, layers, overwrite)
    job = PrepareJob(
        tuner,
        adapter,
        train_dataset,
        data_collator,
        selection_dataset=selection_dataset,
        evaluator=evaluator,
        batch_size=batch_size,
        progress=progress,
    )
    outcome = job.run()
    fill_masks(adapter, layers, outcome.masks)
    if distributed.uses_fsdp2(tuner.model):  # new values FSDP2 does not manage: keep the ranks' copies equal
        distributed.average_gradients_across_ranks(
            [layer.values(p)[adapter] for layer in layers.values() for p in layer.base_param_names()]
        )
    tuner.peft_config[adapter].selection_record = outcome.record.to_dict()
    report(outcome.record, progress)
    return outcome.record


def check_can_prepare(tuner: Any, adapter: str, layers: dict[str, FishIRDLayer], overwrite: bool) -> None:
    """Refuse what ``prepare`` cannot do safely: no targets, merged layers, trained values."""
    if not layers:
        raise ValueError(f"Adapter {adapter!r} targets no module; check `target_modules`.")
    if tuner.peft_config[adapter].selection_record is not None:
        logger.warning(
            "prepare() replaces adapter %r's existing mask: its values tensors are new objects, so an optimizer "
            "built before this call is stale - build it (or the Trainer's) again.",
            adapter,
        )
    values = [layer.values(p)[adapter] for layer in layers.values() for p in layer.base_param_names()]
    if any(distributed.is_dtensor(v) for v in values):
        raise RuntimeError(
            "fully_shard was applied after get_peft_model, so FSDP2 manages FishIRD's (still empty) values and "
            "prepare cannot replace them. Either prepare first and then fully_shard, or fully_shard the base "
            "model before get_peft_model."
        )
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("Cannot prepare while adapters are merged: call `unmerge_adapter()` first.")
    if values_trained(tuner, adapter, layers) and not overwrite:
        raise RuntimeError(
            f"Adapter {adapter!r} already has trained values; `prepare` would discard them. Pass "
            "overwrite=True to select a new mask anyway, or add a new adapter with `add_adapter`."
        )


def summary_line(record: SelectionRecord) -> str:
    """``prepare``'s one-line summary: entries, their share, time, head probing, and IRD's chosen round."""
    line = (
        f"FishIRD prepare ({record.method}): {record.trainable_entries:,} sparse entries + {record.head_params:,} "
        f"head = {100.0 * (record.trainable_entries + record.head_params) / record.total_params:.3f}% of "
        f"{record.total_params:,} parameters; Fisher {record.fisher_seconds:.1f} s, total {record.seconds:.1f} s"
    )
    probe = (record.settings or {}).get("head_probe") or {}
    if probe.get("steps"):
        losses = f"{probe['first_loss']:.3f} -> {probe['last_loss']:.3f}"
        line += f"; head probed first ({probe['steps']} steps, loss {losses})"
    if len(record.trace) > 1:
        best = record.trace[record.best_round - 1]
        line += (
            f"; best round {record.best_round} of {len(record.trace)} ({best.n_samples} samples, score "
            f"{best.score:.4g}), scoring {record.scoring_seconds:.1f} s"
        )
    return line


def report(record: SelectionRecord, progress: bool) -> None:
    """Show the summary: on stderr by default (rank 0, with the progress bars), else to the log."""
    line = summary_line(record)
    logger.info(line)
    if progress and distributed.is_main_process():
        tqdm.write(line, file=sys.stderr)


class InjectedModel:
    """The tuner's view for a model built with ``inject_adapter_in_model`` (which keeps no tuner)."""

    def __init__(self, model: nn.Module, config: FishIRDConfig, adapter_name: str) -> None:
        self.model = model
        self.peft_config = {adapter_name: config}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def fishird_layers(self, adapter_name: str) -> dict[str, FishIRDLayer]:
        return fishird_layers_of(self.model, adapter_name)

    def head_wrappers(self) -> list[Any]:
        return head_wrappers_of(self.model)

    def count_parameters(self) -> tuple[int, int]:
        return count_parameters_of(self.model)


def prepare_model(
    model: nn.Module,
    config: FishIRDConfig,
    train_dataset: Any,
    data_collator: Optional[Callable] = None,
    *,
    adapter_name: str = "default",
    **kwargs: Any,
) -> SelectionRecord:
    """Prepare a model built with ``peft.inject_adapter_in_model(config, model)``: the same as
    ``peft_model.prepare(...)`` (keyword arguments as there). The record is stored in ``config``.

    Example::

        model = inject_adapter_in_model(config, model)
        peft_fish_ird.prepare_model(model, config, train_dataset, data_collator=collator)
    """
    if not isinstance(config, FishIRDConfig):
        raise TypeError(f"prepare_model needs the FishIRDConfig the model was injected with, got {type(config)}.")
    if not fishird_layers_of(model, adapter_name):
        raise ValueError(
            f"The model holds no FishIRD adapter named {adapter_name!r}: build it with "
            "`peft.inject_adapter_in_model(config, model, adapter_name=...)` first, and pass the same name."
        )
    return prepare_adapter(
        InjectedModel(model, config, adapter_name), adapter_name, train_dataset, data_collator, **kwargs
    )
