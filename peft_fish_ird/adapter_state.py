"""Read-only views of a model's FishIRD state: which layers hold an adapter, the head, the counts.

Shared by the tuner (``FishIRDModel``) and the functional path (``functional.prepare_model``) for
models built with PEFT's ``inject_adapter_in_model``, which keeps no tuner object.
"""

from __future__ import annotations

import re

import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .config import PREFIX
from .layer import FishIRDLayer
from .layer_types.bnb import packed_numel


def fishird_layers_of(model: nn.Module, adapter_name: str) -> dict[str, FishIRDLayer]:
    """Targeted modules holding ``adapter_name``, by name relative to ``model``."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, FishIRDLayer) and adapter_name in module.fishird_prepared
    }


def head_wrappers_of(model: nn.Module) -> list[ModulesToSaveWrapper]:
    """PEFT's wrappers of the densely trained head (``modules_to_save``)."""
    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


def count_parameters_of(model: nn.Module) -> tuple[int, int]:
    """(all parameters of the base model incl. head, parameters of the densely trained head)."""
    head = sum(p.numel() for wrapper in head_wrappers_of(model) for p in wrapper.original_module.parameters())
    total = 0
    for name, param in model.named_parameters():
        if PREFIX in name or ".modules_to_save." in f".{name}":
            continue
        total += packed_numel(param) or param.numel()  # a packed 4-bit weight counts its logical size
    return total, head


# ``<module>.fishird_<param>_values``, with ``.<adapter>`` while PEFT still selects a state dict's entries
_VALUES_KEY = re.compile(rf"^(?P<stem>.+\.{PREFIX}(?:weight|bias))_values(?P<adapter>\.[^.]+)?$")


def check_values_match_indices(state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse to save an adapter whose values are not whole: each ``fishird_<param>_values`` must
    hold one number per entry of its ``fishird_<param>_indices``.

    A sharded copy of the values (DeepSpeed ZeRO-3 keeps an empty local tensor per rank) would
    otherwise be written as an adapter that loads as "no training"."""
    for key, values in state_dict.items():
        match = _VALUES_KEY.match(key)
        if match is None:
            continue
        indices = state_dict.get(f"{match['stem']}_indices{match['adapter'] or ''}")
        if indices is not None and values.numel() != indices.numel():
            raise RuntimeError(
                f"Cannot save the adapter: {key} holds {values.numel()} values for {indices.numel()} entries, "
                "i.e. only this rank's shard (DeepSpeed ZeRO-3 partitions trainable parameters). Save the "
                "gathered weights instead: `trainer.save_model()` (with `stage3_gather_16bit_weights_on_model_save`"
                "), `model.save_pretrained(path, state_dict=accelerator.get_state_dict(model))`, or enter "
                "`deepspeed.zero.GatheredParameters(list(model.parameters()))` on every rank and call "
                "`save_pretrained` on rank 0 inside it."
            )
