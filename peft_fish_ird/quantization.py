"""Quantized base models: which quantizations FishIRD adapts, and a float copy for merging.

Supported: bitsandbytes 4-bit (nf4 / fp4) and 8-bit bases (``layer_types/bnb.py``: the packed
weight stays, the sparse delta lives in float32 beside it), and GGUF checkpoints, which
transformers de-quantizes to float on load. Any other quantization (GPTQ, AWQ, HQQ, torchao,
...) is refused when the adapter is injected, before anything runs: its layers would otherwise
be skipped or read as packed integers.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .layer_types import layer_type_for
from .layer_types.bnb import LINEAR_4BIT, LINEAR_8BIT, compute_dtype

SUPPORTED_QUANTIZATION = ("bitsandbytes", "gguf")
BNB_LAYERS = (LINEAR_4BIT, LINEAR_8BIT)


def quantization_method(model: nn.Module) -> Optional[str]:
    """The ``quant_method`` of a transformers model's quantization config (``"bitsandbytes"``, ...), else None."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method)).lower()


def check_quantization(model: nn.Module) -> None:
    """Refuse a base quantized with a method FishIRD cannot adapt, naming what is supported."""
    method = quantization_method(model)
    if method is not None and method not in SUPPORTED_QUANTIZATION:
        raise ValueError(
            f"The base model is quantized with {method!r}, which FishIRD does not support: its layers hold packed "
            "weights FishIRD cannot score or add a delta to. Supported are bitsandbytes 4-bit / 8-bit "
            "(`BitsAndBytesConfig(load_in_4bit=True)` or `load_in_8bit=True`) and GGUF files; otherwise load the "
            "model in float (bfloat16 / float32)."
        )


def is_bnb_layer(module: nn.Module) -> bool:
    return any(f"{cls.__module__}.{cls.__qualname__}" in BNB_LAYERS for cls in type(module).__mro__)


def dequantize_bnb(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes layer of ``model`` (adapted or not) by a float ``nn.Linear`` holding
    its dequantized weight, in place; returns ``model``.

    For merging: ``merge_and_unload`` refuses a quantized base (re-quantizing the merged weight
    would round the sparse update away). After this call the adapter's forward is unchanged up to
    float rounding (the dequantized weight is what the quantized kernel multiplies by) and
    ``merge_and_unload()`` works. The float copy needs the memory of a float model.
    """
    swaps = [(name, module) for name, module in model.named_modules() if is_bnb_layer(module)]
    for name, module in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _float_linear(module))
    for module in model.modules():  # adapted layers look their base's type up again
        if hasattr(module, "fishird_prepared") and hasattr(module, "layer_type"):
            module.layer_type = layer_type_for(module.get_base_layer())
            getattr(module, "_layout_cache", {}).clear()
    owners = _transformers_models(model)
    for owner in owners:
        _forget_quantization(owner)
    for config in {id(o.config): o.config for o in owners}.values():  # a config is shared by nested models
        del config.quantization_config
    return model


def _float_linear(module: nn.Module) -> nn.Linear:
    entry = layer_type_for(module)
    weight = entry.dense_param(module, "weight").detach()
    dtype = compute_dtype(module)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(weight.to(dtype))
        if module.bias is not None:
            out.bias.copy_(module.bias.detach().to(dtype))
    out.requires_grad_(False)
    return out


def _transformers_models(model: nn.Module) -> list[Any]:
    return [m for m in model.modules() if getattr(getattr(m, "config", None), "quantization_config", None) is not None]


def _forget_quantization(owner: Any) -> None:
    """What transformers' own ``dequantize`` resets: the quantizer and the config's quantization entry."""
    if hasattr(owner, "hf_quantizer"):
        owner.hf_quantizer = None
    if hasattr(owner, "is_quantized"):
        try:
            owner.is_quantized = False
        except AttributeError:  # a read-only property in some versions
            pass
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if flag in vars(owner):
            setattr(owner, flag, False)
