"""Slow, obvious versions of the fast paths: the exactness oracles for tests and benchmarks.

``fisher_loop`` is the FISH reference's algorithm: one sample at a time, its padding stripped,
``torch.autograd.grad`` of its own loss w.r.t. every target parameter, squared and summed.
``select_global_concat`` is the global top-k over one concatenated score vector (one float64 per
candidate entry), the twin of the bounded-memory ``selection.select_global``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional

import torch
from torch import nn

from .fisher import (
    FisherResult,
    FisherType,
    LossFn,
    batch_size_of,
    class_log_probs,
    frozen_eval,
    output_logits,
    per_sample_losses,
)
from .selection import _check_budget, top_k_positions


def unpad_sample(batch: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Sample ``index`` of a collated batch as a batch of one, padded positions removed.

    Positions are those where ``attention_mask`` is 0; every tensor whose second dimension has the
    mask's length is cut the same way (input ids, token types, token-level labels).
    """
    mask = batch.get("attention_mask")
    keep = mask[index].bool() if mask is not None else None
    sample = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            sample[key] = value
            continue
        row = value[index]
        if keep is not None and row.dim() >= 1 and row.shape[0] == keep.shape[0]:
            row = row[keep]
        sample[key] = row.unsqueeze(0)
    return sample


@contextlib.contextmanager
def _only_grad_for(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Eval mode with gradients for ``params`` only; everything restored on exit."""
    with frozen_eval(model):
        for p in params:
            p.requires_grad_(True)
        yield


def fisher_loop(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    targets: Mapping[str, nn.Module],
    fisher: FisherType = "empirical",
    *,
    sample_score_masks: Optional[Mapping[str, torch.Tensor]] = None,
    loss_fn: Optional[LossFn] = None,
) -> FisherResult:
    """Batch-size-1 Fisher (same contract and result as ``fisher.compute_fisher``)."""
    loss_fn = loss_fn or per_sample_losses
    named: dict[str, torch.Tensor] = {}
    for name, module in targets.items():
        for p in ("weight", "bias"):  # the oracle scores any module's own weight and bias
            tensor = getattr(module, p, None)
            # a tensor shared by several targets (tied weights) once, under its first use's name:
            # autograd's gradient of it already sums the uses
            if isinstance(tensor, torch.Tensor) and all(t is not tensor for t in named.values()):
                named[f"{name}.{p}"] = tensor
    masks = {k: v.bool() for k, v in (sample_score_masks or {}).items()}
    scores = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in named.items()}
    sample_scores: list[float] = []
    start = time.perf_counter()
    keys = list(named)
    params = [named[k] for k in keys]
    with _only_grad_for(model, params), torch.enable_grad():
        for batch in batches:
            for i in range(batch_size_of(batch)):
                sample = unpad_sample(batch, i)
                labels = sample.pop("labels", None)
                logits = output_logits(model(**sample))
                if fisher == "empirical":
                    terms = [(1.0, loss_fn(logits, labels)[0])]
                else:
                    log_p = class_log_probs(logits)[0]
                    terms = [(float(log_p[c].detach().exp()), -log_p[c]) for c in range(log_p.shape[0])]
                s_n = 0.0
                for weight, loss in terms:
                    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                    for key, grad in zip(keys, grads):
                        if grad is None:
                            continue
                        sq = weight * grad.double().square()
                        scores[key] += sq
                        s_n += float(sq[masks[key]].sum() if key in masks else sq.sum())
                sample_scores.append(s_n)
    return FisherResult(
        {k: v.float() for k, v in scores.items()},
        torch.tensor(sample_scores, dtype=torch.float32),
        len(sample_scores),
        time.perf_counter() - start,
    )


def select_global_concat(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Global top-k over the concatenation of all scores (float64). Returns name -> sorted flat indices."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).double() for n in names])
    _check_budget(k, flat.numel())
    chosen = top_k_positions(flat, k)
    out, start = {}, 0
    for name in names:
        size = scores[name].numel()
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + size], device=chosen.device))
        out[name] = chosen[lo:hi] - start
        start += size
    return out
