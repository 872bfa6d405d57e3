"""``nn.Linear``: ``y = x W^T + b``. Its fast forward also serves GPT-2's ``Conv1D`` (``conv1d.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..sparse_ops import MatrixPattern, sparse_delta_matmul
from .registry import FisherSink, batch_3d, register_layer_type


def matmul_fast_forward(transposed: bool) -> Callable[[Any, torch.Tensor, str], torch.Tensor]:
    """Fast forward of ``base(x) + x @ scatter(values)`` for a matrix weight stored (out x in)
    (``transposed=False``, Linear) or (in x out) (``True``, Conv1D), whose backward forms only the
    input gradient and the values' gradient (``sparse_ops``)."""

    def forward(layer: Any, x: torch.Tensor, adapter: str) -> torch.Tensor:
        base = layer.base_layer
        w_idx, w_values = layer.indices("weight")[adapter], layer.values("weight")[adapter]
        pattern = layer.cached_layout(adapter, w_idx, lambda: MatrixPattern.build(w_idx, *base.weight.shape))
        b_idx = b_values = None
        if base.bias is not None and layer.indices("bias")[adapter].numel():
            b_idx, b_values = layer.indices("bias")[adapter], layer.values("bias")[adapter]
        keep = layer.keep_effective_weight.get(adapter, False)
        return sparse_delta_matmul(x, base.weight, base.bias, pattern, w_values, b_idx, b_values, transposed, keep)

    return forward


@register_layer_type(nn.Linear, name="Linear", fast_forward=matmul_fast_forward(transposed=False), input_axis=1)
def linear_fisher(module: nn.Linear, x: torch.Tensor, g: torch.Tensor, sink: FisherSink) -> None:
    """y = x W^T + b: per-sample dW = sum_t g_t x_t^T (out x in), db = sum_t g_t."""
    b = x.shape[0]
    x3, g3 = batch_3d(x, b, x.shape[-1]), batch_3d(g, b, g.shape[-1])
    sink.matrix("weight", g3, x3)
    if module.bias is not None:
        sink.dense("bias", g3.sum(1))
