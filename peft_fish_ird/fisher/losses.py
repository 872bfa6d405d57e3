"""Per-sample losses: each sample's OWN loss, as with a batch of one.

The Fisher pass back-propagates the SUM of these, so per-sample gradients do not depend on the
batch size. Convention for causal LMs (also SFT data whose prompt tokens carry ``-100``): a
sample's loss is the mean next-token cross-entropy over its own labelled tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's own loss, shape ``(B,)``, computed in float32.

    * classification, logits ``(B, C)`` and integer labels ``(B,)``: cross-entropy;
    * regression, logits ``(B, 1)`` and float labels ``(B,)``: squared error;
    * causal LM, logits ``(B, T, V)`` and labels ``(B, T)`` (``-100`` ignored): next-token
      cross-entropy averaged over the sample's own labelled tokens (HF's loss for a batch of one).
    """
    if labels is None:
        raise ValueError(
            "The Fisher batch has no 'labels': fisher='empirical' needs the true labels. Add a 'labels' "
            "(or 'label') column, or use fisher='expected' for classification."
        )
    if logits.dim() == 2 and labels.dim() == 1:
        if labels.is_floating_point():
            if logits.shape[-1] != 1:
                raise ValueError(f"Float labels need logits of shape (B, 1) (regression), got {tuple(logits.shape)}.")
            return (logits[:, 0].float() - labels.float()).square()
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if logits.dim() == 3 and labels.dim() == 2:
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        token = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            reduction="none",
            ignore_index=-100,
        ).view(shift_labels.shape)
        count = (shift_labels != -100).sum(1).clamp(min=1)
        return token.sum(1) / count
    raise ValueError(
        f"Cannot form per-sample losses from logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: "
        "supported are sequence classification/regression ((B, C) with (B,)) and causal LM ((B, T, V) with "
        "(B, T)). For another task, call `peft_fish_ird.compute_fisher(..., loss_fn=fn)` with "
        "`fn(logits, labels) -> (B,)` per-sample losses."
    )


def class_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log p(c|x)`` for the expected Fisher; only classification logits ``(B, C)`` qualify."""
    if logits.dim() != 2 or logits.shape[-1] < 2:
        raise ValueError(
            f"fisher='expected' is exact only for classification logits (B, C>=2), got {tuple(logits.shape)}. "
            "Use fisher='empirical' for causal LMs and regression."
        )
    return torch.log_softmax(logits.float(), dim=-1)


def output_logits(outputs: Any) -> torch.Tensor:
    """The logits of a HF ``ModelOutput``, a tuple or a plain tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None:
        logits = outputs[0]
    return logits
