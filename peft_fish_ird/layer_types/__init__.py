"""Supported module types: one file per type, each registering itself (see ``registry.py``).

Importing this package registers the built-in types; messages list them in this order.
"""

# isort: off
from . import linear, embedding, layer_norm, conv1d, rms_norm, bnb, generic  # noqa: F401  (register the built-in types, in order)

# isort: on
from .registry import (
    FisherRule,
    FisherSink,
    LayerType,
    ParamSpec,
    Quantized,
    describe_supported,
    in_out_features,
    is_supported,
    layer_type_for,
    register_layer_matcher,
    register_layer_type,
    supported_names,
)

__all__ = [
    "FisherRule",
    "FisherSink",
    "LayerType",
    "ParamSpec",
    "Quantized",
    "describe_supported",
    "in_out_features",
    "is_supported",
    "layer_type_for",
    "register_layer_matcher",
    "register_layer_type",
    "supported_names",
]
