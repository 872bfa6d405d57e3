"""``nn.LayerNorm``: ``y = x_hat * w + b`` with ``x_hat`` the normalised input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import FisherSink, register_layer_type


@register_layer_type(nn.LayerNorm, name="LayerNorm")
def layer_norm_fisher(module: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor, sink: FisherSink) -> None:
    """Per-sample dw = sum_t g_t * x_hat_t, db = sum_t g_t (x_hat recomputed, one fused kernel)."""
    if module.weight is None and module.bias is None:
        return
    b = x.shape[0]
    width = 1
    for d in module.normalized_shape:
        width *= d
    x3 = x.reshape(b, -1, width).float()
    g3 = g.reshape(b, -1, width).float()
    x_hat = F.layer_norm(x3, (width,), eps=module.eps)
    if module.weight is not None:
        sink.dense("weight", (g3 * x_hat).sum(1))
    if module.bias is not None:
        sink.dense("bias", g3.sum(1))
