"""RMSNorm (Llama, Qwen, Mistral, SmolLM, ``torch.nn.RMSNorm``): ``y = w * x_hat`` with
``x_hat = x / sqrt(mean(x^2) + eps)`` computed in float32 and cast back to the input's dtype.

Every Llama-family model defines its own ``*RMSNorm`` class with no common base, so these are
recognised by behaviour: a module with a single 1-D ``weight``, no children and an ``eps`` /
``variance_epsilon`` attribute whose output on a probe input equals the formula above. Variants
that compute something else (Gemma's ``(1 + w) * x_hat``) fail the probe and stay unsupported,
with the warning that names unsupported types.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .registry import FisherSink, LayerType, register_layer_matcher


def _eps(module: nn.Module, dtype: torch.dtype) -> Optional[float]:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", "missing"))
    if eps == "missing":
        return None
    return torch.finfo(dtype).eps if eps is None else float(eps)


def _normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x_hat`` as Llama computes it: float32 statistics, cast back to the input's dtype."""
    x32 = x.float()
    x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + _eps(module, x.dtype))
    return x_hat.to(x.dtype)


_PROBED: dict[tuple[type, torch.dtype], bool] = {}


def behaves_like_rms_norm(module: nn.Module) -> bool:
    """A single 1-D float ``weight``, no children, an epsilon, and (probed once per class and
    dtype) ``module(x) == weight * x_hat`` on a random input."""
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    if set(params) != {"weight"} or weight.dim() != 1 or any(True for _ in module.children()):
        return False
    if _eps(module, torch.float32) is None or not weight.is_floating_point() or weight.device.type == "meta":
        return False
    key = (type(module), weight.dtype)
    if key not in _PROBED:
        _PROBED[key] = _probe(module, weight)
    return _PROBED[key]


def _probe(module: nn.Module, weight: torch.Tensor) -> bool:
    probe = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device)
    try:
        with torch.no_grad():
            out = module(probe.to(weight.dtype))
    except Exception:  # a module with a different call signature is simply not an RMSNorm
        return False
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        return False
    expected = weight.float() * _normalised(module, probe)
    return bool(torch.allclose(out.float(), expected, rtol=1e-3, atol=1e-5))


def rms_norm_fisher(module: nn.Module, x: torch.Tensor, g: torch.Tensor, sink: FisherSink) -> None:
    """Per-sample dw = sum_t g_t * x_hat_t (x_hat recomputed as the forward computes it)."""
    b, width = x.shape[0], x.shape[-1]
    x_hat = _normalised(module, x).reshape(b, -1, width).float()
    sink.dense("weight", (g.reshape(b, -1, width).float() * x_hat).sum(1))


register_layer_matcher(
    behaves_like_rms_norm,
    LayerType(name="RMSNorm", module_type=nn.Module, fisher_rule=rms_norm_fisher, param_names=("weight",)),
)
