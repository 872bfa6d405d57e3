"""Scores -> masks: the sparse budget and deterministic top-k (global or per module).

Ties (e.g. attention ``key.bias``, whose gradient is structurally zero) are broken by position:
among equal scores the entry that comes first (in the order of the score dict, then flattened
index) wins, so the same scores always give the same mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch


def sparse_budget(total_params: int, head_params: int, keep_ratio: float, head_in_budget: bool) -> int:
    """k = int(keep_ratio * total_params) [- head_params when the head counts against the budget].

    This is the FISH reference's ``keep_num``. Raises when nothing would be left for the mask.
    """
    k = int(total_params * keep_ratio) - (head_params if head_in_budget else 0)
    if int(total_params * keep_ratio) < 1:
        raise ValueError(
            f"keep_ratio={keep_ratio} of {total_params} parameters is less than one entry: raise keep_ratio "
            f"to at least {1 / total_params:.2e}."
        )
    if k <= 0:
        raise ValueError(
            f"keep_ratio={keep_ratio} of {total_params} parameters gives {int(total_params * keep_ratio)} "
            f"trainable entries, but the densely trained head (modules_to_save) already takes {head_params} of "
            "them: no sparse entries are left. Raise keep_ratio or set head_in_budget=False."
        )
    return k


def top_k_positions(values: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted positions of the ``k`` largest entries of a 1-D tensor; ties go to lower positions."""
    n = values.numel()
    if k >= n:
        return torch.arange(n, device=values.device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=values.device)
    if bool(torch.isnan(values).any()):
        raise ValueError("Scores contain NaN; cannot rank them.")
    kth = torch.topk(values, k, sorted=False).values.min()
    above = (values > kth).nonzero().squeeze(1)
    ties = (values == kth).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def select_global(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """One top-k over all entries of all parameters (FISH). Returns name -> sorted flat indices."""
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


def per_module_quota(sizes: Mapping[str, int], k: int) -> dict[str, int]:
    """Split k proportionally to sizes; remainders go to the largest fractional parts (then order)."""
    total = sum(sizes.values())
    _check_budget(k, total)
    exact = {n: k * s / total for n, s in sizes.items()}
    quota = {n: min(math.floor(v), sizes[n]) for n, v in exact.items()}
    left = k - sum(quota.values())
    order = sorted(sizes, key=lambda n: (-(exact[n] - math.floor(exact[n])), list(sizes).index(n)))
    while left > 0:
        for n in order:
            if left and quota[n] < sizes[n]:
                quota[n] += 1
                left -= 1
    return quota


def select_per_module(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Each parameter gets a share of k proportional to its size, then its own top-k."""
    quota = per_module_quota({n: s.numel() for n, s in scores.items()}, k)
    return {n: top_k_positions(s.reshape(-1).double(), quota[n]) for n, s in scores.items()}


def select(
    scores: Mapping[str, torch.Tensor],
    k: int,
    budget: str = "global",
    ranges: Optional[Mapping[str, torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """Top-k entries of ``scores`` (``budget`` 'global' or 'per_module'), only inside ``ranges``.

    ``ranges``: name -> bool mask of the entries allowed (IRD's parameter range); None: all.
    Per-module quotas are proportional to each parameter's share of the range.
    """
    if ranges is None:
        if budget == "global":
            return select_global(scores, k)
        if budget == "per_module":
            return select_per_module(scores, k)
        raise ValueError(f"budget={budget!r}: choose 'global' or 'per_module'.")
    masked = restrict(scores, ranges)
    if budget == "global":
        _check_budget(k, sum(int(r.sum()) for r in ranges.values()))
        return select_global(masked, k)
    if budget == "per_module":
        quota = per_module_quota({n: int(ranges[n].sum()) for n in scores}, k)
        return {n: top_k_positions(masked[n], quota[n]) for n in scores}
    raise ValueError(f"budget={budget!r}: choose 'global' or 'per_module'.")


def restrict(
    scores: Mapping[str, torch.Tensor], ranges: Optional[Mapping[str, torch.Tensor]], lowest: bool = False
) -> dict[str, torch.Tensor]:
    """Flat scores with entries outside the range at -inf (``lowest``: scores negated, so a top-k
    picks the lowest-scored entries of the range)."""
    out = {}
    for name, score in scores.items():
        flat = score.reshape(-1).double()
        flat = -flat if lowest else flat
        if ranges is not None:
            flat = torch.where(ranges[name].reshape(-1), flat, torch.tensor(float("-inf")))
        out[name] = flat
    return out


def shrink_range(
    scores: Mapping[str, torch.Tensor],
    ranges: Optional[Mapping[str, torch.Tensor]],
    size: int,
    lowest: bool = False,
) -> dict[str, torch.Tensor]:
    """The ``size`` highest- (``lowest``: lowest-) scored entries of the current range, as bool masks."""
    chosen = select_global(restrict(scores, ranges, lowest), size)
    masks = {}
    for name, score in scores.items():
        mask = torch.zeros(score.numel(), dtype=torch.bool)
        mask[chosen[name]] = True
        masks[name] = mask
    return masks


def random_mask(sizes: Mapping[str, int], k: int, seed: int) -> dict[str, torch.Tensor]:
    """A uniformly random set of k entries over all parameters (the FISH paper's random baseline)."""
    total = sum(sizes.values())
    _check_budget(k, total)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=generator)[:k].sort().values
    out, start = {}, 0
    for name, size in sizes.items():
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + size]))
        out[name] = chosen[lo:hi] - start
        start += size
    return out


def _check_budget(k: int, candidates: int) -> None:
    if k > candidates:
        raise ValueError(
            f"The sparse budget k={k} exceeds the {candidates} candidate entries of the targeted modules: "
            "lower keep_ratio or target more modules."
        )
