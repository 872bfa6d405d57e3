"""bitsandbytes 4-bit (``Linear4bit``: nf4 / fp4) and 8-bit (``Linear8bitLt``) bases, QLoRA-style.

The packed weight stays as it is. The sparse delta lives in float32 beside it, and the forward
is ``base(x) + x @ scatter(values)^T``: bitsandbytes' own kernel for the base, the sparse term from
``sparse_ops.sparse_delta_only``. The Fisher rule is the Linear one, since a Linear's per-sample
gradient ``g x^T`` needs only the layer's input and output gradient, never its weight. Shapes
come from the logical (unpacked) weight, and the slow reference path adds the dense delta to
the dequantized weight. Merging into a packed weight is refused (it would have to re-quantize,
rounding the sparse update away): ``peft_fish_ird.dequantize_bnb`` swaps the bases for float
Linears first.

Registered by class path, so importing this package never imports bitsandbytes.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..sparse_ops import MatrixPattern, sparse_delta_only
from .linear import linear_fisher
from .registry import ParamSpec, Quantized, register_layer_type

LINEAR_4BIT = "bitsandbytes.nn.modules.Linear4bit"
LINEAR_8BIT = "bitsandbytes.nn.modules.Linear8bitLt"
PACKED_PARAMS = ("Params4bit", "Int8Params")  # bitsandbytes' parameter classes


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype the module computes in (its bias's, or bitsandbytes' compute dtype, else float32)."""
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.dtype.is_floating_point:
        return bias.dtype
    dtype = getattr(module, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _spec(module: nn.Module, name: str) -> ParamSpec:
    param = getattr(module, name)
    if name == "weight":
        state = getattr(param, "quant_state", None)
        shape = state.shape if state is not None else param.shape
        return ParamSpec(torch.Size(shape), compute_dtype(module), param.device)
    return ParamSpec(param.shape, param.dtype, param.device)


def _dequantize(module: nn.Module, name: str) -> torch.Tensor:
    """Dense float copy of a parameter (the weight dequantized with PEFT's bitsandbytes helper)."""
    param = getattr(module, name)
    if name != "weight" or type(param).__name__ not in PACKED_PARAMS:
        return param
    from peft.utils.integrations import dequantize_bnb_weight

    _unpack_cpu_inference_layout(param)
    return dequantize_bnb_weight(param, state=getattr(module, "state", None)).to(compute_dtype(module))


def _unpack_cpu_inference_layout(param: Any) -> None:
    """Undo bitsandbytes' CPU inference repacking of a 4-bit weight, as its own ``state_dict`` does.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` under ``no_grad`` in eval mode repacks the
    weight in place for its inference kernel; dequantizing that layout would give wrong values.
    The next inference forward repacks it again."""
    state = getattr(param, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    import bitsandbytes.functional as bnb_functional

    param.data, param.quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(param.data, state)


def _forward(layer: Any, x: torch.Tensor, adapter: str) -> torch.Tensor:
    base = layer.base_layer
    w_idx, w_values = layer.indices("weight")[adapter], layer.values("weight")[adapter]
    rows, cols = _spec(base, "weight").shape
    pattern = layer.cached_layout(adapter, w_idx, lambda: MatrixPattern.build(w_idx, rows, cols))
    b_idx: Optional[torch.Tensor] = None
    b_values: Optional[torch.Tensor] = None
    if base.bias is not None and layer.indices("bias")[adapter].numel():
        b_idx, b_values = layer.indices("bias")[adapter], layer.values("bias")[adapter]
    out = base(x)
    return out + sparse_delta_only(x, pattern, w_values, b_idx, b_values).to(out.dtype)


for _path, _library in ((LINEAR_4BIT, "bitsandbytes 4-bit"), (LINEAR_8BIT, "bitsandbytes 8-bit")):
    register_layer_type(
        _path,
        name=f"{_path.rsplit('.', 1)[-1]} ({_library})",
        fast_forward=_forward,
        quantized=Quantized(spec=_spec, dequantize=_dequantize, library=_library),
        input_axis=1,  # the logical (out x in) weight of nn.Linear
    )(linear_fisher)


def packed_numel(param: torch.Tensor) -> Optional[int]:
    """The logical number of weights a packed bitsandbytes 4-bit parameter holds, else None."""
    state = getattr(param, "quant_state", None)
    if type(param).__name__ != "Params4bit" or state is None:
        return None
    return int(torch.Size(state.shape).numel())
