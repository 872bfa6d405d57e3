"""``add_weighted_adapter`` for FishIRD: a new adapter whose delta is the weighted sum of others'.

For every targeted parameter the new mask is the union of the adapters' masks, and its value at
an entry is ``sum_i w_i * delta_i`` (an adapter without that entry contributes 0), so the new
adapter's dense delta equals ``sum_i w_i * get_delta_weight(adapter_i)`` exactly. A densely
trained head (``modules_to_save``) is combined the same way, as deltas from the base head:
``W = W0 + sum_i w_i (W_i - W0)``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from ._version import __version__
from .adapter_state import count_parameters_of, fishird_layers_of, head_wrappers_of
from .record import SelectionRecord, mask_fingerprint


def add_weighted_adapter(tuner: Any, adapters: list[str], weights: list[float], adapter_name: str) -> SelectionRecord:
    """Add ``adapter_name``: the weighted sum of ``adapters``' sparse deltas (see the module docstring)."""
    _check_request(tuner, adapters, weights, adapter_name)
    config = copy.deepcopy(tuner.peft_config[adapters[0]])
    config.selection_record = None
    config.mask_init, config.init_weights = "fisher", True  # the mask and values come from the adapters
    tuner.peft_config[adapter_name] = config
    tuner.inject_adapter(tuner.model, adapter_name)
    masks: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for module_name, layer in fishird_layers_of(tuner.model, adapter_name).items():
        for param in layer.base_param_names():
            union = torch.unique(torch.cat([layer.indices(param)[a] for a in adapters]))  # sorted
            layer.set_entries(adapter_name, param, union)
            combined = torch.zeros(union.numel(), dtype=torch.float32, device=union.device)
            for name, weight in zip(adapters, weights):
                positions = torch.searchsorted(union, layer.indices(param)[name])
                combined.index_add_(0, positions, weight * layer.values(param)[name].detach().float())
            with torch.no_grad():
                layer.values(param)[adapter_name].copy_(combined)
            masks[f"{module_name}.{param}"] = union
            shapes[f"{module_name}.{param}"] = list(getattr(layer.get_base_layer(), param).shape)
        layer.fishird_prepared[adapter_name] = True
    _combine_heads(tuner.model, adapters, weights, adapter_name)
    record = _record(tuner.model, adapters, weights, adapter_name, masks, shapes)
    config.selection_record = record.to_dict()
    for param_name, param in tuner.model.named_parameters():
        if adapter_name in param_name:
            param.requires_grad_(False)  # as PEFT does for a combined adapter: set_adapter makes it trainable
    return record


def _check_request(tuner: Any, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    if adapter_name in tuner.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} already exists: choose a new name.")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"Pass one weight per adapter: got {len(adapters)} adapters and {len(weights)} weights.")
    unknown = [a for a in adapters if a not in tuner.peft_config]
    if unknown:
        raise ValueError(f"No adapters named {unknown}; have {sorted(tuner.peft_config)}.")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights!r}.")
    unprepared = [a for a in adapters if tuner.peft_config[a].selection_record is None]
    if unprepared:
        raise ValueError(f"Adapters {unprepared} have no mask yet: call `prepare` on them before combining them.")
    first = tuner.peft_config[adapters[0]]
    for name in adapters[1:]:
        other = tuner.peft_config[name]
        if set(other.target_modules or []) != set(first.target_modules or []) or set(
            other.modules_to_save or []
        ) != set(first.modules_to_save or []):
            raise ValueError(
                f"Adapters {adapters[0]!r} and {name!r} target different modules (target_modules / modules_to_save): "
                "a weighted FishIRD adapter combines adapters of the same targets. Build them with the same "
                "target_modules, or combine their dense deltas (`get_delta_weight`) yourself."
            )


def _combine_heads(model: Any, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    for wrapper in head_wrappers_of(model):
        if adapter_name not in wrapper.modules_to_save:
            continue
        base = dict(wrapper.original_module.named_parameters())
        with torch.no_grad():
            for name, param in wrapper.modules_to_save[adapter_name].named_parameters():
                param.copy_(base[name])
                for adapter, weight in zip(adapters, weights):
                    trained = dict(wrapper.modules_to_save[adapter].named_parameters())[name]
                    param.add_(trained - base[name], alpha=weight)


def _record(model, adapters, weights, adapter_name, masks, shapes) -> SelectionRecord:
    total, head = count_parameters_of(model)
    entries = {key: int(idx.numel()) for key, idx in masks.items()}
    return SelectionRecord(
        method="weighted",
        adapter_name=adapter_name,
        fisher="",
        budget="union",
        keep_ratio=(sum(entries.values()) + head) / total,
        head_in_budget=True,
        seed=0,
        num_samples_requested=0,
        num_samples_used=0,
        sample_indices=[],
        total_params=total,
        head_params=head,
        k=sum(entries.values()),
        entries_per_param=entries,
        shapes=shapes,
        score_summary={},
        fisher_seconds=0.0,
        seconds=0.0,
        versions={"peft_fish_ird": __version__, "torch": torch.__version__},
        settings={"selection": "weighted", "adapters": list(adapters), "weights": [float(w) for w in weights]},
        mask_sha256=mask_fingerprint(masks),
    )
