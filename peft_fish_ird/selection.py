"""Scores -> masks: the sparse budget and deterministic top-k (global, per module, or per module
with each input feature's share capped: ``column_capped``).

Ties (e.g. attention ``key.bias``, whose gradient is structurally zero) are broken by position:
among equal scores the entry that comes first (in the order of the score dict, then flattened
index) wins, so the same scores always give the same mask.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from typing import Literal, Optional, get_args

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


CountReducer = Callable[[torch.Tensor], torch.Tensor]


def select_global(
    scores: Mapping[str, torch.Tensor],
    k: int,
    *,
    all_reduce_counts: Optional[CountReducer] = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, torch.Tensor]:
    """One top-k over all entries of all parameters (FISH). Returns name -> sorted flat indices.

    Bounded memory: the scores are never concatenated. The k-th largest value ``T`` is found by a
    bisection on the order-preserving int64 image of the float64 values (``float64_order_key``),
    counting ``(s >= t).sum()`` one parameter at a time: at most 64 passes, fewer when a pass
    counts exactly k entries at or above its threshold (then those are the top-k). Every entry above
    ``T`` is kept; of the entries equal to ``T``, the earliest (dict order, then flat index) fill the
    rest, exactly as ``reference.select_global_concat``. Extra memory: one parameter's float64 copy
    (none for float64 scores) and boolean mask at a time.

    Sharded scores (each rank holds some of the parameters; the global order is rank order, then
    each rank's dict order): pass ``all_reduce_counts``, which takes a CPU int64 vector and returns
    its element-wise sum over ranks, with this process's ``rank`` and the ``world_size``. Every rank
    must call ``select_global`` with the same ``k``; it returns this rank's share of the global top-k.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size.")
    reduce = all_reduce_counts if all_reduce_counts is not None else (lambda counts: counts)
    flats = _Flat(scores)
    total, nans = (int(c) for c in reduce(_local_sizes(flats)))
    _check_budget(k, total)
    if k >= total:
        return {name: torch.arange(f.numel(), device=f.device) for name, f in flats.items()}
    if k <= 0:
        return {name: torch.zeros(0, dtype=torch.int64, device=f.device) for name, f in flats.items()}
    if nans:
        raise ValueError("Scores contain NaN; cannot rank them.")
    key, exact = kth_largest_key(lambda t: _count(flats, t, reduce), k)
    threshold = float64_from_order_key(key)
    if exact:  # exactly k entries are >= threshold: no ties to break
        return {name: (f.double() >= threshold).nonzero().squeeze(1) for name, f in flats.items()}
    above = _count(flats, threshold, reduce, strict=True)
    left = max(0, k - above - _ties_on_earlier_ranks(flats, threshold, reduce, rank, world_size))
    out = {}
    for name, f in flats.items():
        f = f.double()
        keep = f > threshold
        tied = (f == threshold).nonzero().squeeze(1)[:left]
        keep[tied] = True
        left -= tied.numel()
        out[name] = keep.nonzero().squeeze(1)
    return out


class _Flat(Mapping):
    """``name -> score.reshape(-1)``, read on access: a lazy ``scores`` (``Restricted``) stays lazy."""

    def __init__(self, scores: Mapping[str, torch.Tensor]) -> None:
        self.scores = scores

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.scores[name].reshape(-1)

    def __iter__(self):
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)


_LOW_BITS = 0x7FFF_FFFF_FFFF_FFFF


def float64_order_key(value: float) -> int:
    """The int64 whose signed order is the order of float64 ``value`` (its bit pattern, with the
    magnitude bits flipped for negative numbers). ``-0.0`` maps to -1, just below ``+0.0``'s 0."""
    bits = struct.unpack("<q", struct.pack("<d", value))[0]
    return bits ^ _LOW_BITS if bits < 0 else bits


def float64_from_order_key(key: int) -> float:
    """Inverse of ``float64_order_key``."""
    bits = key ^ _LOW_BITS if key < 0 else key
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def kth_largest_key(count_at_least: Callable[[float], int], k: int) -> tuple[int, bool]:
    """Order key of the k-th largest value, given ``count_at_least(t) = #{s >= t}`` (no NaN).

    Bisection for the largest key ``t`` in ``[key(-inf), key(+inf)]`` with ``count >= k``: at most
    64 calls. Returns ``(key, exact)``; ``exact`` means the count at ``key`` is exactly k (the search
    may stop early then, at a key that need not be a value's).
    """
    lo, hi = float64_order_key(float("-inf")), float64_order_key(float("inf"))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        count = count_at_least(float64_from_order_key(mid))
        if count == k:
            return mid, True
        if count > k:
            lo = mid
        else:
            hi = mid - 1
    return lo, False


def _ties_on_earlier_ranks(
    flats: Mapping[str, torch.Tensor], threshold: float, reduce: CountReducer, rank: int, world_size: int
) -> int:
    """Entries equal to ``threshold`` held by ranks before this one (they win the ties first)."""
    if world_size == 1:
        return 0
    slots = torch.zeros(world_size, dtype=torch.int64)
    slots[rank] = sum(int((f.double() == threshold).sum()) for f in flats.values())
    return int(reduce(slots)[:rank].sum())


def _local_sizes(flats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(entries, NaN entries) of this process's scores, as an int64 vector."""
    numel = sum(f.numel() for f in flats.values())
    nans = sum(int(torch.isnan(f).sum()) for f in flats.values() if f.is_floating_point())
    return torch.tensor([numel, nans], dtype=torch.int64)


def _count(flats: Mapping[str, torch.Tensor], threshold: float, reduce: CountReducer, strict: bool = False) -> int:
    """Global number of entries ``>= threshold`` (``strict``: ``>``), one parameter at a time."""
    local = 0
    for f in flats.values():
        f = f.double()
        local += int(torch.count_nonzero(f > threshold if strict else f >= threshold))
    return int(reduce(torch.tensor([local], dtype=torch.int64))[0])


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


def column_capped_top_k(values: torch.Tensor, quota: int, input_axis: int) -> torch.Tensor:
    """Sorted flat positions of the ``quota`` largest entries of a 2-D score matrix such that no input
    feature (a slice along ``input_axis``: a Linear weight's column, a Conv1D weight's row) holds more
    than ``ceil(quota / input features)``: the greedy top-k under that cap, which is the best-scoring
    such set. ``-inf`` marks entries outside the range; when the capped range holds fewer than
    ``quota`` entries, the best of the rest of the range make up the count.

    Why: FISH's top-k in a weight matrix concentrates on a few input features (all-MiniLM-L6-v2, 0.5%
    per module: the top 1% of input features hold 64% of each matrix's entries, one column of layer 5's
    query holds all 384 of its rows), which are the large, nearly constant activation dimensions. The
    cap keeps the Fisher ranking inside each feature but spreads the entries over all of them.
    Ties go to lower positions along the feature (stable sort), as in ``top_k_positions``.
    """
    if values.dim() != 2 or input_axis not in (0, 1):
        raise ValueError(f"column_capped_top_k needs a 2-D score matrix and input_axis 0 or 1, got {values.shape}.")
    features = values.shape[input_axis]
    cap = -(-quota // features)
    other = 1 - input_axis
    order = torch.sort(values, dim=other, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(values.shape[other], device=values.device).unsqueeze(input_axis).expand_as(order)
    ranks.scatter_(other, order, positions)
    flat = values.reshape(-1)
    allowed = flat > float("-inf")
    capped = (ranks.reshape(-1) < cap) & allowed
    floor = torch.tensor(float("-inf"), dtype=flat.dtype)
    if int(capped.sum()) >= quota:
        return top_k_positions(torch.where(capped, flat, floor), quota)
    first = capped.nonzero().squeeze(1)
    rest = top_k_positions(torch.where(allowed & ~capped, flat, floor), quota - first.numel())
    return torch.cat([first, rest]).sort().values


def select_column_capped(
    scores: Mapping[str, torch.Tensor],
    k: int,
    input_axes: Mapping[str, Optional[int]],
    ranges: Optional[Mapping[str, torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """``per_module`` quotas; inside each matrix with an input axis (``input_axes``, from the layer
    registry: Linear, Conv1D and their quantized forms) the top entries under the per-feature cap of
    ``column_capped_top_k``; every other parameter (biases, norms, embeddings) its plain top-k."""
    view = restrict(scores, ranges)
    sizes = {n: (int(ranges[n].sum()) if ranges is not None else s.numel()) for n, s in scores.items()}
    quota = per_module_quota(sizes, k)
    out = {}
    for name, score in scores.items():
        axis = input_axes.get(name)
        if axis is None or score.dim() != 2:
            out[name] = top_k_positions(view[name], quota[name])
        else:
            out[name] = column_capped_top_k(view[name].view(score.shape), quota[name], axis)
    return out


Budget = Literal["global", "per_module", "column_capped"]  # FishIRDConfig.budget
BUDGETS = get_args(Budget)


def select(
    scores: Mapping[str, torch.Tensor],
    k: int,
    budget: str = "global",
    ranges: Optional[Mapping[str, torch.Tensor]] = None,
    input_axes: Optional[Mapping[str, Optional[int]]] = None,
) -> dict[str, torch.Tensor]:
    """Top-k entries of ``scores`` (``budget`` one of ``BUDGETS``), only inside ``ranges``.

    ``ranges``: name -> bool mask of the entries allowed (IRD's parameter range); None: all.
    Per-module quotas are proportional to each parameter's share of the range.
    ``input_axes``: name -> the weight dimension indexed by the input feature (``column_capped`` only).
    """
    if budget == "column_capped":
        return select_column_capped(scores, k, input_axes or {}, ranges)
    if ranges is None:
        if budget == "global":
            return select_global(scores, k)
        if budget == "per_module":
            return select_per_module(scores, k)
        raise ValueError(f"budget={budget!r}: choose one of {BUDGETS}.")
    masked = restrict(scores, ranges)
    if budget == "global":
        _check_budget(k, sum(int(r.sum()) for r in ranges.values()))
        return select_global(masked, k)
    if budget == "per_module":
        quota = per_module_quota({n: int(ranges[n].sum()) for n in scores}, k)
        return {n: top_k_positions(masked[n], quota[n]) for n in scores}
    raise ValueError(f"budget={budget!r}: choose one of {BUDGETS}.")


class Restricted(Mapping):
    """Flat float64 scores with entries outside the range at -inf (``lowest``: negated, so a top-k
    picks the lowest-scored entries of the range), formed one parameter at a time when read.

    A view, not a copy: IRD's range restriction must not add a float64 copy of every score (8
    bytes per model parameter); ``select_global`` reads one parameter's view at a time.
    """

    def __init__(
        self, scores: Mapping[str, torch.Tensor], ranges: Optional[Mapping[str, torch.Tensor]], lowest: bool
    ) -> None:
        self.scores, self.ranges, self.lowest = scores, ranges, lowest

    def __getitem__(self, name: str) -> torch.Tensor:
        flat = self.scores[name].reshape(-1).double()
        flat = -flat if self.lowest else flat
        if self.ranges is None:
            return flat
        return torch.where(self.ranges[name].reshape(-1), flat, torch.tensor(float("-inf"), dtype=torch.float64))

    def __iter__(self):
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)


def restrict(
    scores: Mapping[str, torch.Tensor], ranges: Optional[Mapping[str, torch.Tensor]], lowest: bool = False
) -> Restricted:
    """The lazy range-restricted view of ``scores`` (``Restricted``)."""
    return Restricted(scores, ranges, lowest)


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
