"""FishIRDModel: PEFT tuner that wraps the targeted modules and selects their sparse entries.

``get_peft_model(model, FishIRDConfig(...))`` builds it with empty masks; ``prepare`` computes the
Fisher information at the pretrained weights, selects the top-k entries, fills the layers and
records what it did. ``PeftModel`` forwards unknown attributes to the tuner, so users call
``peft_model.prepare(...)`` and read ``peft_model.selection``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .adapter_state import check_values_match_indices, count_parameters_of, fishird_layers_of, head_wrappers_of
from .config import PREFIX, FishIRDConfig
from .distributed import check_not_partitioned_at_injection, is_dtensor
from .functional import prepare_adapter
from .layer import FishIRDLayer, FishIRDModule, UnpreparedAdapterError, is_supported_layer, unprepared_message
from .layer_types import describe_supported, layer_type_for
from .mask_init import init_data_free_mask
from .quantization import check_quantization
from .record import (
    SelectionRecord,
    check_record_shapes,
    indices_key_target,
    mask_fingerprint_of_checkpoint,
    reconcile_records,
)
from .weighted import add_weighted_adapter

logger = logging.getLogger(__name__)
RECORD_KEY = "fishird_selection_record"  # uint8 JSON of the SelectionRecord in adapter_model.safetensors


def compact_indices(indices: torch.Tensor) -> torch.Tensor:
    """Entry indices as saved: int32 when every index fits (a parameter of < 2**31 entries), else int64.

    At 8 bytes each, indices would be two thirds of an adapter file; loading widens them back to int64."""
    if indices.numel() == 0 or int(indices.max()) < 2**31:
        return indices.to(torch.int32)
    return indices


class FishIRDModel(BaseTuner):
    """Sparse fine-tuning of Fisher-selected entries (FISH Mask; IRD selection).

    Example::

        >>> import peft_fish_ird
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base, peft_fish_ird.FishIRDConfig(task_type="SEQ_CLS"))
        >>> model.prepare(train_dataset, data_collator=collator)
    """

    prefix: str = PREFIX
    tuner_layer_cls = FishIRDLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: FishIRDConfig, model_config: dict) -> FishIRDConfig:
        return peft_config  # target_modules=None is resolved from the model in _prepare_model

    def _prepare_model(self, peft_config: FishIRDConfig, model: nn.Module) -> None:
        check_not_partitioned_at_injection(model)
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(
                model, peft_config.modules_to_save or [], peft_config.exclude_modules
            )
            if not peft_config.target_modules:
                raise ValueError(
                    f"FishIRD found no supported module ({describe_supported()}) outside `modules_to_save`; pass "
                    "`target_modules` explicitly."
                )
        else:
            check_targets_match(model, peft_config)
        if peft_config.selection_record is not None:
            check_record_shapes(model, peft_config.selection_record)
        self._shared_tensors = shared_tensor_users(model)

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
            target.keep_effective_weight[adapter_name] = peft_config.keep_effective_weight
            return
        if not is_supported_layer(target):
            raise TypeError(
                f"target_modules matched {current_key!r} ({type(target).__name__}), which FishIRD cannot adapt: "
                f"supported are {describe_supported()}. Narrow `target_modules`."
            )
        tied = self._tied_owners(peft_config, target, current_key)
        new_module = FishIRDModule(target, adapter_name, inference_mode=peft_config.inference_mode, tied=tied)
        new_module.keep_effective_weight[adapter_name] = peft_config.keep_effective_weight
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _tied_owners(self, peft_config: FishIRDConfig, target: nn.Module, key: str) -> dict[str, FishIRDLayer]:
        """For each parameter of ``target`` that another module also holds (tied weights): the layer
        already holding its entries, if that module was adapted first. The first use adapted owns
        the one mask and delta; later uses apply it (``FishIRDLayer.values`` reads the owner's).

        A shared tensor whose other use is not targeted is refused: the delta would apply at one
        use, and a merge (which writes the shared tensor) would change the other."""
        shared = getattr(self, "_shared_tensors", None)  # found once per injection, in _prepare_model
        if shared is None:
            shared = shared_tensor_users(self.model)
        owners: dict[str, FishIRDLayer] = {}
        for param_name, tensor in layer_type_for(target).parameters_of(target).items():
            for other in shared.get(id(tensor), []):
                if other == key:
                    continue
                module = self.model.get_submodule(other)
                if isinstance(module, FishIRDLayer):
                    owner = module.tied_owner(param_name) or module
                    if getattr(owner.get_base_layer(), param_name, None) is not tensor:
                        raise ValueError(
                            f"FishIRD cannot tie {key!r}'s {param_name} to {other!r}: the shared tensor has another "
                            "name there. Leave one of the two out of `target_modules`."
                        )
                    owners[param_name] = owner
                    continue
                will_adapt = self._check_target_module_exists(peft_config, other)
                if not will_adapt or isinstance(will_adapt, _ExcludedModule) or not is_supported_layer(module):
                    raise ValueError(
                        f"FishIRD cannot target {key!r} alone: its {param_name} is shared with {other!r} (tied "
                        "weights), which is not targeted, so a sparse delta would apply at one use and a merge would "
                        f"change both. Target both (add {other!r} to `target_modules`; the default targets do) or "
                        "neither."
                    )
        return owners

    def _check_merge_allowed(self) -> None:
        """PEFT warns on merging adapters of tied modules; FishIRD's are exact: a tied tensor has one
        delta, written once, and stays tied (a use left untargeted is refused at injection)."""

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """PEFT's injection, then the data-free initial mask if the config asks for one (``mask_init``).

        ``low_cpu_mem_usage`` (PEFT loading a checkpoint next): the adapter stays on the meta device
        and the checkpoint's mask is loaded into it. A base quantized in a way FishIRD cannot adapt
        is refused first (``quantization.check_quantization``)."""
        check_quantization(model)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        if not low_cpu_mem_usage:
            init_data_free_mask(self, adapter_name)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Values are float32 (as PEFT's ``autocast_adapter_dtype=True`` would make them); with False
        they take the base weights' dtype, as PEFT's other methods' adapters do."""
        if not autocast_adapter_dtype:
            for layer in self.fishird_layers(adapter_name).values():
                layer.use_base_dtype(adapter_name)
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        layers_ready = all(
            m.is_prepared(adapter_name)
            for m in model.modules()
            if isinstance(m, FishIRDLayer) and adapter_name in m.fishird_prepared
        )
        if getattr(config, "selection_record", None) is None or not layers_ready:
            raise UnpreparedAdapterError(unprepared_message(adapter_name))
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for key, tensor in to_return.items():
            if is_dtensor(tensor):  # values FSDP2 shards (fully_shard after prepare): every rank gathers them
                tensor = to_return[key] = tensor.full_tensor()
        check_values_match_indices(to_return)
        for key, tensor in to_return.items():
            if indices_key_target(key) is not None:
                to_return[key] = compact_indices(tensor)
        # The record also travels in the weights file: HF Trainer's resume loads only the weights
        # into an existing adapter, keeping its (possibly unprepared) config.
        to_return[RECORD_KEY] = torch.frombuffer(
            bytearray(json.dumps(config.selection_record).encode()), dtype=torch.uint8
        )
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = dict(state_dict)
        record = state_dict.pop(RECORD_KEY, None)
        if record is not None:
            reconcile_records(
                config, json.loads(bytes(record.tolist()).decode()), mask_fingerprint_of_checkpoint(state_dict)
            )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    # ------------------------------------------------------------------ state
    def fishird_layers(self, adapter_name: str) -> dict[str, FishIRDLayer]:
        """Targeted modules holding ``adapter_name``, by name relative to the base model."""
        return fishird_layers_of(self.model, adapter_name)

    def count_parameters(self) -> tuple[int, int]:
        """(all parameters of the base model incl. head, parameters of the densely trained head)."""
        return count_parameters_of(self.model)

    def head_wrappers(self) -> list[ModulesToSaveWrapper]:
        """PEFT's wrappers of the densely trained head (``modules_to_save``)."""
        return head_wrappers_of(self.model)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> SelectionRecord:
        """Add ``adapter_name`` whose delta is ``sum_i weights[i] * delta(adapters[i])``: the union of
        the masks, values summed with the weights (heads combined as deltas from the base head).
        The new adapter is frozen, as in PEFT; ``set_adapter(adapter_name)`` activates it."""
        return add_weighted_adapter(self, adapters, weights, adapter_name)

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
        selection_dataset: Any = None,
        evaluator: Optional[Callable[[nn.Module], float]] = None,
        adapter_name: Optional[str] = None,
        batch_size: Optional[int] = None,
        progress: bool = True,
        overwrite: bool = False,
    ) -> SelectionRecord:
        """Choose the adapter's sparse mask (``config.selection``) and fill its layers.

        * ``"fish"``: draws ``num_samples`` examples with ``seed``, computes the exact diagonal
          Fisher of every targeted parameter at the pretrained weights and keeps the top-k entries
          (``keep_ratio`` of all parameters, minus the head if ``head_in_budget``).
        * ``"ird"`` / ``"ird_reverse"`` / ``"ird_random"``: the IRD search (``ird.py``); each
          round's candidate is scored by ``evaluator`` or by the built-in short masked fine-tune
          on a held-out selection split, and the best is kept.
        * ``"random"``: a uniformly random mask of the same size.

        Call it after ``get_peft_model`` and before building the optimizer or Trainer: it creates
        the trainable values tensors.

        Args:
            train_dataset: ``datasets.Dataset`` or list of tokenized examples (IRD needs these);
                a ``DataLoader`` also works for ``"fish"`` and ``"random"``.
            data_collator: collates examples (e.g. ``DataCollatorWithPadding(tokenizer)``).
            selection_dataset: IRD: examples the built-in evaluator scores candidates on (default:
                ``ird_selection_fraction`` of ``train_dataset``, held out). Never your test set.
            evaluator: IRD: ``evaluator(model) -> float``, higher is better; ``model`` is this tuner
                (callable like the base model) holding the candidate mask with zero values. It may
                train; the model is restored after each call.
            adapter_name: adapter to prepare (default: the active one).
            batch_size: Fisher batch size (default: ``config.fisher_batch_size``).
            progress: show progress bars.
            overwrite: allow replacing a mask whose values were already trained.
        """
        return prepare_adapter(
            self,
            self._single_adapter(adapter_name),
            train_dataset,
            data_collator,
            selection_dataset=selection_dataset,
            evaluator=evaluator,
            batch_size=batch_size,
            progress=progress,
            overwrite=overwrite,
        )


def default_target_modules(
    model: nn.Module, modules_to_save: list[str], exclude_modules: Optional[str | list[str] | set[str]] = None
) -> list[str]:
    """Every supported module outside the head and ``exclude_modules`` - what the FISH reference ranks.

    A tensor shared by several modules (tied embeddings and output head) is a candidate once: its
    uses are all targeted and share one mask (``FishIRDLayer`` ties them). If one of its uses
    cannot be adapted (an unsupported type, inside the head, or excluded, e.g. TRL's
    ``exclude_modules=["lm_head"]``), the others are left out too, with a warning naming them.
    """
    names: list[str] = []
    skip_under: list[str] = []
    unsupported: dict[str, int] = {}
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
            if not _excluded(name, exclude_modules):
                names.append(name)
        elif any(True for _ in base.parameters(recurse=False)):
            unsupported[type(base).__name__] = unsupported.get(type(base).__name__, 0) + 1
    if unsupported:
        logger.warning(
            "FishIRD has no layer type for %s, so their parameters are not mask candidates (supported: %s; "
            "the generic rule takes leaf modules whose only parameters are weight/bias, up to 2**20 entries; "
            "register a type with `peft_fish_ird.register_layer_type`).",
            ", ".join(f"{n} ({c} modules)" for n, c in sorted(unsupported.items())),
            describe_supported(),
        )
    chosen = set(names)
    left_out = {
        name
        for users in shared_tensor_users(model).values()
        if not all(u in chosen for u in users)
        for name in users
        if name in chosen
    }
    if left_out:
        logger.warning(
            "FishIRD leaves out %s: they share a tensor (tied weights) with a module it cannot adapt here or that "
            "is excluded, and a delta at one use only would change the other at merge.",
            sorted(left_out),
        )
    return [n for n in names if n not in left_out]


def shared_tensor_users(model: nn.Module) -> dict[int, list[str]]:
    """``id(tensor)`` -> names of the modules holding it as their own parameter, for tensors held by
    two or more modules (tied weights). PEFT's wrappers are looked through to their base layers,
    which are named as the wrapper (the name ``target_modules`` matches)."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            continue
        owner = name
        parent, _, leaf = name.rpartition(".")
        if leaf == "base_layer" and isinstance(model.get_submodule(parent) if parent else model, BaseTunerLayer):
            owner = parent
        for tensor in module.parameters(recurse=False):
            if owner not in users.setdefault(id(tensor), []):
                users[id(tensor)].append(owner)
    return {key: names for key, names in users.items() if len(names) > 1}


def check_targets_match(model: nn.Module, config: FishIRDConfig) -> None:
    """Explicit ``target_modules`` must match at least one module; the error lists what exists."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if any(check_target_module_exists(config, name) for name, _ in model.named_modules() if name):
        return
    supported = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and is_supported_layer(m)})
    raise ValueError(
        f"target_modules={config.target_modules!r} matches no module of this model. Supported modules here end in: "
        f"{supported}. Use such names (suffixes match), a regex, or leave target_modules=None for all of them."
    )


def _excluded(name: str, exclude_modules: Optional[str | list[str] | set[str]]) -> bool:
    """PEFT's ``exclude_modules`` semantics: a regex matched in full, or names matched as suffixes."""
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, name) is not None
    return _matches(name, list(exclude_modules))


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)
