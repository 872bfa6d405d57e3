"""FishIRDModel: PEFT tuner that wraps the targeted modules and selects their sparse entries.

``get_peft_model(model, FishIRDConfig(...))`` builds it with empty masks; ``prepare`` computes the
Fisher information at the pretrained weights, selects the top-k entries, fills the layers and
records what it did. ``PeftModel`` forwards unknown attributes to the tuner, so users call
``peft_model.prepare(...)`` and read ``peft_model.selection``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from . import __version__
from .config import FishIRDConfig
from .data import fisher_batches, move_to
from .fisher import FisherResult, compute_fisher
from .layer import FishIRDLayer, FishIRDModule, UnpreparedAdapterError, is_supported_layer, unprepared_message
from .record import SelectionRecord
from .selection import select, sparse_budget

logger = logging.getLogger(__name__)


class FishIRDModel(BaseTuner):
    """Sparse fine-tuning of Fisher-selected entries (FISH Mask; IRD selection).

    Example::

        >>> import peft_fish_ird
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, peft_fish_ird.FishIRDConfig(task_type="SEQ_CLS"))
        >>> model.prepare(train_dataset, data_collator=collator)
    """

    prefix: str = "fishird_"
    tuner_layer_cls = FishIRDLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: FishIRDConfig, model_config: dict) -> FishIRDConfig:
        return peft_config  # target_modules=None is resolved from the model in _prepare_model

    def _prepare_model(self, peft_config: FishIRDConfig, model: nn.Module) -> None:
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(model, peft_config.modules_to_save or [])
            if not peft_config.target_modules:
                raise ValueError(
                    "FishIRD found no supported module (Linear, Embedding, LayerNorm, Conv1D) outside "
                    "`modules_to_save`; pass `target_modules` explicitly."
                )
        if peft_config.selection_record is not None:
            check_record_shapes(model, peft_config.selection_record)

    def _create_and_replace(
        self,
        peft_config: FishIRDConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, FishIRDLayer):
            target.update_layer(adapter_name, inference_mode=peft_config.inference_mode)
            return
        if not is_supported_layer(target):
            raise TypeError(
                f"target_modules matched {current_key!r} ({type(target).__name__}), which FishIRD cannot adapt: "
                "supported are Linear, Embedding, LayerNorm and GPT-2 Conv1D. Narrow `target_modules`."
            )
        new_module = FishIRDModule(target, adapter_name, inference_mode=peft_config.inference_mode)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        if getattr(config, "selection_record", None) is None:
            raise UnpreparedAdapterError(unprepared_message(adapter_name))
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)

    # ------------------------------------------------------------------ state
    def fishird_layers(self, adapter_name: str) -> dict[str, FishIRDLayer]:
        """Targeted modules holding ``adapter_name``, by name relative to the base model."""
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, FishIRDLayer) and adapter_name in module.fishird_prepared
        }

    def count_parameters(self) -> tuple[int, int]:
        """(all parameters of the base model incl. head, parameters of the densely trained head)."""
        head = 0
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                head += sum(p.numel() for p in module.original_module.parameters())
        total = 0
        for name, param in self.model.named_parameters():
            if self.prefix in name or ".modules_to_save." in f".{name}":
                continue
            total += param.numel()
        return total, head

    @property
    def selection(self) -> Optional[SelectionRecord]:
        """The active adapter's selection record (None before ``prepare``)."""
        adapter = self._single_adapter(None)
        record = self.peft_config[adapter].selection_record
        return None if record is None else SelectionRecord.from_dict(record)

    def _single_adapter(self, adapter_name: Optional[str]) -> str:
        if adapter_name is not None:
            if adapter_name not in self.peft_config:
                raise ValueError(f"No adapter named {adapter_name!r}; have {sorted(self.peft_config)}.")
            return adapter_name
        active = self.active_adapters
        if len(active) != 1:
            raise ValueError(f"Several adapters are active ({active}); pass adapter_name=... to choose one.")
        return active[0]

    # ------------------------------------------------------------------ prepare
    def prepare(
        self,
        train_dataset: Any,
        data_collator: Optional[Callable[[list[dict[str, Any]]], dict[str, Any]]] = None,
        *,
        adapter_name: Optional[str] = None,
        batch_size: Optional[int] = None,
        progress: bool = True,
        overwrite: bool = False,
    ) -> SelectionRecord:
        """Compute the Fisher information and fill the adapter's sparse mask (FISH Mask).

        Draws ``num_samples`` examples from ``train_dataset`` with ``seed``, computes the exact
        diagonal Fisher of every targeted parameter at the pretrained weights (adapters disabled),
        keeps the top-k entries (``keep_ratio`` of all parameters, minus the head if
        ``head_in_budget``) and records the selection in the adapter config.

        Call it after ``get_peft_model`` and before building the optimizer or Trainer: it creates
        the trainable values tensors.

        Args:
            train_dataset: ``datasets.Dataset``, list of tokenized examples, or a ``DataLoader``.
            data_collator: collates examples (e.g. ``DataCollatorWithPadding(tokenizer)``).
            adapter_name: adapter to prepare (default: the active one).
            batch_size: Fisher batch size (default: ``config.fisher_batch_size``).
            progress: show a progress bar.
            overwrite: allow replacing a mask whose values were already trained.
        """
        start = time.perf_counter()
        adapter = self._single_adapter(adapter_name)
        config: FishIRDConfig = self.peft_config[adapter]
        layers = self.fishird_layers(adapter)
        self._check_can_prepare(adapter, layers, overwrite)
        data = fisher_batches(
            train_dataset,
            model=self.model,
            num_samples=config.num_samples,
            seed=config.seed,
            batch_size=batch_size or config.fisher_batch_size,
            data_collator=data_collator,
        )
        device = next(self.model.parameters()).device
        batches = [move_to(b, device) for b in data.batches]
        targets = {name: layer.get_base_layer() for name, layer in layers.items()}
        with adapters_disabled([*layers.values(), *self._head_wrappers()]):
            result = compute_fisher(
                self.model, batches, targets, config.fisher, progress=progress, total=len(batches), desc="FISH Fisher"
            )
        total, head = self.count_parameters()
        k = sparse_budget(total, head, config.keep_ratio, config.head_in_budget)
        masks = select(result.scores, k, config.budget)
        self._fill(adapter, layers, masks)
        record = SelectionRecord(
            method="fish",
            adapter_name=adapter,
            fisher=config.fisher,
            budget=config.budget,
            keep_ratio=config.keep_ratio,
            head_in_budget=config.head_in_budget,
            seed=config.seed,
            num_samples_requested=config.num_samples,
            num_samples_used=result.num_samples,
            sample_indices=data.sample_indices,
            total_params=total,
            head_params=head,
            k=k,
            entries_per_param={key: int(idx.numel()) for key, idx in masks.items()},
            shapes={key: list(score.shape) for key, score in result.scores.items()},
            score_summary=score_summary(result, masks),
            fisher_seconds=round(result.seconds, 3),
            seconds=round(time.perf_counter() - start, 3),
            versions={"peft_fish_ird": __version__, "torch": torch.__version__},
        )
        config.selection_record = record.to_dict()
        logger.info(
            "FishIRD prepare: %d sparse entries (%.3f%% of %d params; head %d) from %d samples in %.1fs",
            k, 100.0 * k / total, total, head, result.num_samples, record.seconds,
        )
        return record

    def _check_can_prepare(self, adapter: str, layers: dict[str, FishIRDLayer], overwrite: bool) -> None:
        if not layers:
            raise ValueError(f"Adapter {adapter!r} targets no module; check `target_modules`.")
        if any(layer.merged for layer in layers.values()):
            raise RuntimeError("Cannot prepare while adapters are merged: call `unmerge_adapter()` first.")
        trained = any(
            bool(layer.values(p)[adapter].detach().any()) for layer in layers.values() for p in layer.base_param_names()
        )
        if trained and not overwrite:
            raise RuntimeError(
                f"Adapter {adapter!r} already has trained values; `prepare` would discard them. Pass "
                "overwrite=True to select a new mask anyway, or add a new adapter with `add_adapter`."
            )

    def _head_wrappers(self) -> list[ModulesToSaveWrapper]:
        return [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]

    @staticmethod
    def _fill(adapter: str, layers: dict[str, FishIRDLayer], masks: dict[str, torch.Tensor]) -> None:
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


def default_target_modules(model: nn.Module, modules_to_save: list[str]) -> list[str]:
    """Every supported module outside the head - what the FISH reference ranks.

    Modules whose parameters are shared with another candidate (tied embeddings) are left out: the
    per-sample gradient of a shared weight sums over its uses before squaring, which the per-layer
    rules do not compute.
    """
    names: list[str] = []
    skip_under: list[str] = []
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip_under):
            continue
        if isinstance(module, ModulesToSaveWrapper) or _matches(name, modules_to_save):
            skip_under.append(name)
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(module, BaseTunerLayer):
            skip_under.append(name)
        if is_supported_layer(base):
            names.append(name)
            for p in base.parameters(recurse=False):
                owners.setdefault(id(p), []).append(name)
    tied = {n for group in owners.values() if len(group) > 1 for n in group}
    if tied:
        logger.warning("FishIRD leaves out modules with tied weights: %s", sorted(tied))
    return [n for n in names if n not in tied]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def check_record_shapes(model: nn.Module, record: dict[str, Any]) -> None:
    """Fail early, with the parameter named, when a saved mask does not fit this base model."""
    for key, shape in record.get("shapes", {}).items():
        module_name, param_name = key.rsplit(".", 1)
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(
                f"The FishIRD adapter was made for a model with a module {module_name!r}, which this base model "
                "lacks: load the adapter onto the base model it was trained with."
            ) from None
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        param = getattr(module, param_name, None)
        if param is None or list(param.shape) != list(shape):
            raise ValueError(
                f"The FishIRD adapter expects {key} of shape {list(shape)}, but this base model has "
                f"{None if param is None else list(param.shape)}: load it onto the base model it was trained with."
            )


def score_summary(result: FisherResult, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Threshold and captured share of the Fisher mass of a mask."""
    chosen = torch.cat([result.scores[k].reshape(-1)[idx] for k, idx in masks.items()])
    total = float(sum(s.double().sum() for s in result.scores.values()))
    return {
        "threshold": float(chosen.min()) if chosen.numel() else 0.0,
        "max": float(chosen.max()) if chosen.numel() else 0.0,
        "selected_fisher_share": float(chosen.double().sum()) / total if total > 0 else 0.0,
        "zero_score_entries_selected": int((chosen == 0).sum()),
    }
