"""GPT-2's ``Conv1D``: ``y = x W + b`` with W stored (in x out), the transpose of ``nn.Linear``'s."""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from .linear import matmul_fast_forward
from .registry import FisherSink, batch_3d, register_layer_type


@register_layer_type(Conv1D, name="GPT-2 Conv1D", fast_forward=matmul_fast_forward(transposed=True), input_axis=0)
def conv1d_fisher(module: Conv1D, x: torch.Tensor, g: torch.Tensor, sink: FisherSink) -> None:
    """GPT-2 Conv1D, y = x W + b with W (in x out): per-sample dW = sum_t x_t g_t^T."""
    b = x.shape[0]
    x3, g3 = batch_3d(x, b, x.shape[-1]), batch_3d(g, b, g.shape[-1])
    sink.matrix("weight", x3, g3)
    if module.bias is not None:
        sink.dense("bias", g3.sum(1))
