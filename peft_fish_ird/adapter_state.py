"""Read-only views of a model's FishIRD state: which layers hold an adapter, the head, the counts.

Shared by the tuner (``FishIRDModel``) and the functional path (``functional.prepare_model``) for
models built with PEFT's ``inject_adapter_in_model``, which keeps no tuner object.
"""

from __future__ import annotations

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
