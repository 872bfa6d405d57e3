"""``nn.Embedding``: a lookup ``y = W[ids]``; kept row-sparse in the Fisher pass and in training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..sparse_ops import EmbeddingRows, sparse_delta_embedding
from .registry import FisherSink, register_layer_type


def _embedding_fast_forward(layer: Any, ids: torch.Tensor, adapter: str) -> torch.Tensor:
    """``W0[ids] + D[pos(ids)]`` with D holding only the rows that have entries."""
    base = layer.base_layer
    w_idx, w_values = layer.indices("weight")[adapter], layer.values("weight")[adapter]
    rows = layer.cached_layout(
        adapter, w_idx, lambda: EmbeddingRows.build(w_idx, base.num_embeddings, base.embedding_dim, base.padding_idx)
    )
    return sparse_delta_embedding(ids, base, rows, w_values)


def _plain_lookup(module: nn.Embedding) -> bool:
    return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse


def _per_sample_ids(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """HF models pass position ids as a broadcast ``(1, T)`` tensor, so the lookup's output gradient
    would arrive summed over the batch. Expanding the ids keeps samples apart; same output."""
    if ids.dim() >= 1 and ids.shape[0] == 1 and batch_size > 1:
        return ids.expand(batch_size, *ids.shape[1:])
    return ids


@register_layer_type(
    nn.Embedding,
    name="Embedding",
    fast_forward=_embedding_fast_forward,
    fast_path_applies=_plain_lookup,
    fisher_input=_per_sample_ids,
    param_names=("weight",),
)
def embedding_fisher(module: nn.Embedding, ids: torch.Tensor, g: torch.Tensor, sink: FisherSink) -> None:
    """Per-sample gradient of a lookup: a sample's rows summed per distinct id (repeats add first),
    the padding row excluded. Kept sparse: never a ``B x vocab x dim`` tensor."""
    if module.scale_grad_by_freq or module.max_norm is not None:
        raise NotImplementedError(
            "Fisher rule for nn.Embedding with scale_grad_by_freq or max_norm is not implemented: exclude this "
            "embedding from `target_modules`."
        )
    b = ids.shape[0]
    width = module.embedding_dim
    ids2 = ids.reshape(b, -1)
    g2 = g.reshape(b, -1, width).float()
    sample = torch.arange(b, device=ids.device).unsqueeze(1).expand_as(ids2)
    keep = torch.ones_like(ids2, dtype=torch.bool) if module.padding_idx is None else ids2 != module.padding_idx
    keys = (sample * module.num_embeddings + ids2)[keep]
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    sums = torch.zeros(unique_keys.numel(), width, dtype=torch.float32, device=g.device)
    sums.index_add_(0, inverse, g2[keep])
    sink.rows("weight", unique_keys // module.num_embeddings, unique_keys % module.num_embeddings, sums)
