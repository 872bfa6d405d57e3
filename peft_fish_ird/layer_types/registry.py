"""The one registry of the module types FishIRD can adapt.

Everything the package knows about a layer type lives in that type's file in this folder, behind
one ``@register_layer_type`` decorator (Opacus's ``grad_sample/`` layout):

* ``fisher_rule(module, input, grad_output, sink)``: the exact per-sample gradients of the
  module's parameters from its input and output gradient, handed to ``sink`` (below), which
  squares and sums them while they are in cache;
* ``fast_forward(layer, x, adapter)`` (optional): forward of ``base(x) + sparse term`` whose
  backward forms only the input gradient and the values' gradient. Without it, the layer runs the
  slow exact path: ``torch.func.functional_call`` of the base module's own forward with the
  effective parameters, differentiated by autograd;
* ``fast_path_applies(module)`` (optional): whether ``fast_forward`` covers this instance;
* ``fisher_input(x, batch_size)`` (optional): rewrites the module's input before the Fisher
  pass sees it, e.g. expanding a broadcast ``(1, T)`` input to the batch so samples stay apart;
* ``param_names``: the parameters that can hold entries (default ``("weight", "bias")``);
* ``name``: how messages call the type;
* ``input_axis`` (optional): the weight dimension indexed by the input feature (Linear: 1, its
  (out x in) weight's columns; Conv1D: 0), for ``budget="column_capped"``; None: not a matrix of that kind;
* ``quantized`` (optional): a ``Quantized`` description for a base whose weight is stored packed
  (bitsandbytes 4/8-bit): the logical shape of each parameter, and how to dequantize it. Such a
  layer keeps its deltas in float32 beside the packed base (forward = base(x) + sparse term),
  and its slow path adds the dense delta to the dequantized weight; merging into it is refused.

A type can be registered by its class or, for a library that should not be imported just to
register it, by its dotted class path (``"bitsandbytes.nn.modules.Linear4bit"``).

Merging is the same for every type and lives in ``layer.py``: the deltas are written into the
flattened base parameters at their indices (exact for any parameter), and unmerge restores them
from a backup.

Extension contract (for your own module type)::

    from peft_fish_ird.layer_types import register_layer_type

    @register_layer_type(MyScale, name="MyScale")
    def my_scale_fisher(module, x, g, sink):        # y = x * module.weight
        b = x.shape[0]
        sink.dense("weight", (g * x).reshape(b, -1, x.shape[-1]).sum(1).float())

Lookup walks the module's class hierarchy (MRO), so a subclass of a registered type is covered
unless it registers its own entry. This module never imports PEFT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import nn


class FisherSink(Protocol):
    """Where a Fisher rule puts a batch's per-sample gradients (``fisher.sink.Sink``).

    All gradients are float32; ``B`` is the batch size.
    """

    def dense(self, param_name: str, per_sample_grad: torch.Tensor) -> None:
        """``(B, numel)``: row b is sample b's flattened gradient."""

    def matrix(self, param_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Sample n's gradient is ``a[n]^T b[n]`` for ``a`` ``(B, T, rows)``, ``b`` ``(B, T, cols)``."""

    def rows(self, param_name: str, samples: torch.Tensor, rows: torch.Tensor, row_grads: torch.Tensor) -> None:
        """Row-sparse: sample ``samples[u]`` has gradient ``row_grads[u]`` in row ``rows[u]``."""


FisherRule = Callable[[nn.Module, torch.Tensor, torch.Tensor, FisherSink], None]
FastForward = Callable[[Any, torch.Tensor, str], torch.Tensor]


@dataclass(frozen=True)
class ParamSpec:
    """What the package needs to know of a parameter that can hold entries: its logical shape
    (a packed 4-bit weight's unpacked shape), the dtype its deltas and merges use, its device."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass(frozen=True)
class Quantized:
    """How a quantized base type exposes its packed parameters (see the module docstring)."""

    spec: Callable[[nn.Module, str], ParamSpec]  # (module, parameter name) -> logical spec
    dequantize: Callable[[nn.Module, str], torch.Tensor]  # (module, parameter name) -> float tensor
    library: str  # for messages, e.g. "bitsandbytes 4-bit"


@dataclass(frozen=True)
class LayerType:
    """What the package knows about one module type (see the module docstring)."""

    name: str
    module_type: type
    fisher_rule: FisherRule
    fast_forward: Optional[FastForward] = None
    fast_path_applies: Callable[[nn.Module], bool] = lambda module: True
    fisher_input: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None
    param_names: tuple[str, ...] = ("weight", "bias")
    quantized: Optional[Quantized] = None
    input_axis: Optional[int] = None

    def parameters_of(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's own parameters that can hold entries, by name (``bias=None`` left out).

        As stored: a quantized type's packed weight is its packed tensor (use ``specs_of`` for
        shapes and ``dense_param`` for values)."""
        out = {}
        for name in self.param_names:
            param = getattr(module, name, None)
            if isinstance(param, torch.Tensor):
                out[name] = param
        return out

    def specs_of(self, module: nn.Module) -> dict[str, ParamSpec]:
        """Logical shape, dtype and device of each parameter that can hold entries."""
        if self.quantized is not None:
            return {name: self.quantized.spec(module, name) for name in self.parameters_of(module)}
        return {name: ParamSpec(p.shape, p.dtype, p.device) for name, p in self.parameters_of(module).items()}

    def dense_param(self, module: nn.Module, name: str) -> torch.Tensor:
        """The parameter's values as a dense tensor of its logical shape (dequantized if packed)."""
        if self.quantized is not None:
            return self.quantized.dequantize(module, name)
        return getattr(module, name)


_REGISTRY: dict[type, LayerType] = {}
_BY_PATH: dict[str, LayerType] = {}  # "package.module.Class" -> entry, for types registered by path
# (predicate, entry) for types recognised by behaviour rather than by class
_MATCHERS: list[tuple[Callable[[nn.Module], bool], LayerType]] = []


def register_layer_type(
    module_type: type | str,
    *,
    name: Optional[str] = None,
    fast_forward: Optional[FastForward] = None,
    fast_path_applies: Optional[Callable[[nn.Module], bool]] = None,
    fisher_input: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
    param_names: tuple[str, ...] = ("weight", "bias"),
    quantized: Optional[Quantized] = None,
    input_axis: Optional[int] = None,
) -> Callable[[FisherRule], FisherRule]:
    """Decorator on a Fisher rule: register ``module_type`` (replacing an earlier entry for it).

    ``module_type``: an ``nn.Module`` subclass, or its dotted class path (matched without importing it).
    """
    by_path = isinstance(module_type, str)
    if not by_path and not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer_type needs an nn.Module subclass or its dotted path, got {module_type!r}.")

    def wrap(rule: FisherRule) -> FisherRule:
        entry = LayerType(
            name=name or (module_type.rsplit(".", 1)[-1] if by_path else module_type.__name__),
            module_type=nn.Module if by_path else module_type,
            fisher_rule=rule,
            fast_forward=fast_forward,
            fast_path_applies=fast_path_applies or (lambda module: True),
            fisher_input=fisher_input,
            param_names=tuple(param_names),
            quantized=quantized,
            input_axis=input_axis,
        )
        if by_path:
            _BY_PATH[module_type] = entry
        else:
            _REGISTRY[module_type] = entry
        return rule

    return wrap


def register_layer_matcher(matches: Callable[[nn.Module], bool], entry: LayerType) -> None:
    """Register ``entry`` for every module class whose instances ``matches`` accepts.

    For a family of look-alike classes with no common base (Llama's, Qwen's, Mistral's
    ``*RMSNorm``). ``matches`` runs for every module not found through the MRO registry, so it
    should reject cheaply and cache any expensive check (see ``rms_norm.py``).
    """
    _MATCHERS.append((matches, entry))


def layer_type_for(module: nn.Module) -> Optional[LayerType]:
    """The entry for ``module``'s class or its nearest registered base class, else the first
    matcher that accepts it; None if unsupported."""
    for cls in type(module).__mro__:
        entry = _REGISTRY.get(cls) or _BY_PATH.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry is not None:
            return entry
    return next((entry for matches, entry in _MATCHERS if matches(module)), None)


def is_supported(module: nn.Module) -> bool:
    """Whether FishIRD can adapt ``module`` (it has a registered layer type)."""
    return layer_type_for(module) is not None


def supported_names() -> list[str]:
    """Names of the registered types, in registration order (for messages)."""
    return [e.name for e in _REGISTRY.values()] + [e.name for e in _BY_PATH.values()] + [e.name for _, e in _MATCHERS]


def describe_supported() -> str:
    """``"Linear, Embedding, LayerNorm and GPT-2 Conv1D"``: the registry in words, for messages."""
    names = supported_names()
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def batch_3d(t: torch.Tensor, batch: int, width: int) -> torch.Tensor:
    """``(B, tokens, width)`` float32 view of a batch-first activation or gradient (any middle dims)."""
    return t.reshape(batch, -1, width).float()


def in_out_features(base: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """PEFT's ``in_features`` / ``out_features`` of a base layer (Embedding: vocabulary, dimension;
    GPT-2 Conv1D: its (in x out) weight's shape; a norm: its size twice)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None, None
    if weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    return int(weight.shape[-1]), int(weight.shape[-1])
