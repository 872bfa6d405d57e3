"""The fallback for any other small leaf module with a ``weight`` and/or ``bias``: exact per-sample
gradients by ``torch.func`` (``vmap`` of ``grad``), so a new architecture's parametrised modules
(Gemma's ``(1 + w)`` RMSNorm, ``Conv2d``, ``GroupNorm``, ``PReLU``, your own ``y = x * w``) stay
mask candidates instead of being dropped.

Sample n's gradient of parameter p is ``d/dp <g_n, f(x_n; p)>``, with ``x_n`` the module's input
and ``g_n`` the gradient reaching its output: one call of the module's own forward with the parameters swapped
per sample (the forward itself, so the Fisher pass's hooks on the module do not fire again),
vectorised by ``vmap``. This is exact for any module that treats the samples of a
batch independently, which holds in the Fisher pass (eval mode: no batch statistics, no
dropout). It costs a per-sample copy of the module's parameters, so modules with more than
``GENERIC_MAX_ENTRIES`` parameter entries are left to a dedicated type (and named in the
warning about unsupported modules). The type has no fast forward: the layer's slow path
(``functional_call`` with the effective parameters) trains it.

Matched last, after every registered type and matcher: a module qualifies if it has no child
modules and its parameters are floating-point ``weight`` / ``bias`` tensors (the names the
adapter layer can hold).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import grad, vmap
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call uses

from .registry import FisherSink, LayerType, register_layer_matcher

GENERIC_MAX_ENTRIES = 1 << 20  # parameter entries of one module: B copies are formed per batch
GENERIC_NAME = "other leaf modules with a weight/bias (generic torch.func rule)"


def is_generic_candidate(module: nn.Module) -> bool:
    """A leaf module whose parameters are only floating ``weight`` / ``bias``, small enough to vmap."""
    params = dict(module.named_parameters(recurse=False))
    if not params or set(params) - {"weight", "bias"} or next(module.children(), None) is not None:
        return False
    if not all(p.dtype.is_floating_point for p in params.values()):
        return False
    return sum(p.numel() for p in params.values()) <= GENERIC_MAX_ENTRIES


def generic_fisher(module: nn.Module, x: torch.Tensor, g: torch.Tensor, sink: FisherSink) -> None:
    """Per-sample gradients of the module's weight/bias via ``vmap(grad(<g_n, f(x_n)>))``."""
    params = {name: p.detach() for name, p in module.named_parameters(recurse=False)}

    def inner(p: dict[str, torch.Tensor], x1: torch.Tensor, g1: torch.Tensor) -> torch.Tensor:
        # the module's forward itself, not module(...): its hooks (the Fisher pass's own) must not fire
        with _reparametrize_module(module, p):
            out = type(module).forward(module, x1.unsqueeze(0))
        return (out * g1.unsqueeze(0).to(out.dtype)).sum()

    try:
        grads = vmap(grad(inner), in_dims=(None, 0, 0))(params, x, g)
    except Exception as err:  # vmap cannot trace some forwards (data-dependent control flow, ...)
        raise TypeError(
            f"The generic Fisher rule (torch.func vmap) cannot run {type(module).__name__}'s forward: {err}. "
            "Exclude the module (`exclude_modules`) or register a layer type for it "
            "(`peft_fish_ird.register_layer_type`)."
        ) from err
    for name, per_sample in grads.items():
        sink.dense(name, per_sample.reshape(per_sample.shape[0], -1).float())


register_layer_matcher(
    is_generic_candidate,
    LayerType(name=GENERIC_NAME, module_type=nn.Module, fisher_rule=generic_fisher),
)
