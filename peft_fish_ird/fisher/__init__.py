"""The Fisher engine (see ``engine.py`` for the maths): exact batched sums of squared per-sample
gradients. The per-layer-type rules live with their types in ``peft_fish_ird.layer_types``."""

from typing import Optional

from torch import nn

from ..layer_types import FisherRule, layer_type_for
from .engine import FisherResult, FisherType, NonFiniteFisherError, batch_size_of, check_targets, compute_fisher
from .hooks import FisherHooks, frozen_eval
from .losses import LossFn, class_log_probs, output_logits, per_sample_losses
from .sink import MATRIX_CHUNK_ELEMENTS, PER_SAMPLE_GEMM_MIN_ELEMENTS, Sink


def rule_for(module: nn.Module) -> Optional[FisherRule]:
    """The Fisher rule of ``module``'s registered type (class hierarchy searched), or None."""
    entry = layer_type_for(module)
    return None if entry is None else entry.fisher_rule


__all__ = [
    "MATRIX_CHUNK_ELEMENTS",
    "PER_SAMPLE_GEMM_MIN_ELEMENTS",
    "FisherHooks",
    "FisherResult",
    "FisherType",
    "LossFn",
    "NonFiniteFisherError",
    "Sink",
    "batch_size_of",
    "check_targets",
    "class_log_probs",
    "compute_fisher",
    "frozen_eval",
    "output_logits",
    "per_sample_losses",
    "rule_for",
]
