"""Iterative Range Decreasing (IRD): search for a better sample-parameter pair than FISH's.

This is the project's interpretation of Dong et al. (arXiv 2403.08484), whose code and
pseudo-code are not public; only the abstract describes the idea (shrink the sample range and
the parameter range toward higher Fisher information, score sample-parameter pairs by
fine-tuning performance, keep the best). The README's "IRD selection" section says the same for
users::

    S <- pool of N samples ; P <- all candidate entries ; best <- None
    for t = 1, 2, ...:
        one Fisher pass over S, restricted to P:
            F_j = sum_{n in S} g_nj^2  (j in P)      s_n = sum_{j in P} g_nj^2  (n in S)
        M_t <- top-k of F inside P ; r_t <- score(M_t) ; keep M_t if r_t beats best
        P <- top max(k, shrink |P|) of P by F ; S <- top shrink |S| of S by s
        stop when |S| would drop below min_samples, after `rounds` rounds, or once |P| == k

That loop is ``search="halve"`` (the first interpretation, v1): one candidate per round, about
2N per-sample gradients in all. ``search="branch"`` scores more candidates per round, as the
paper's "each pair" suggests: after round 1 (FISH on the pool), each level splits the current
sample range S into the kept part (top ``shrink |S|`` by s_n, as above) and the rest, runs one
Fisher pass on each inside the shrunken parameter range, scores both candidates and descends
into the better part. Two candidates per level at the same sample sizes: about 3N per-sample
gradients in all (N for round 1, then |S| per level), twice the scoring. Halving only the
parameter range with the same samples would not change the candidate (the top-k of F inside
the top half of P by F is the top-k inside P), so there is no separate parameter-only step.

Round 1 is FISH on the pool in both searches. Controls: ``direction="reverse"`` keeps the lowest-Fisher halves
of both ranges (the paper's contrast baseline); ``sample_order="random"`` halves the sample
range at random (separates "fewer samples" from "better samples"). The best candidate is kept
in every variant, ties going to the earlier candidate. Fisher passes and the scorer are passed in,
so this file knows nothing of PEFT, models or data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Optional, get_args

import torch

from .fisher import FisherResult
from .selection import select, shrink_range, top_k_positions

logger = logging.getLogger(__name__)

IRDSearch = Literal["halve", "branch"]
IRD_SEARCHES = get_args(IRDSearch)

# (sample positions in the pool, parameter range or None for all, progress-bar label) -> Fisher
FisherPass = Callable[[list[int], Optional[dict[str, torch.Tensor]], str], FisherResult]
# candidate masks (name -> sorted flat indices) -> score, higher is better
Scorer = Callable[[dict[str, torch.Tensor]], float]


class IRDRound(NamedTuple):
    """One row of the trace: sizes of the ranges searched, the candidate's score, wall time, and
    the candidate's overlap with round 1's (FISH's) mask: |M_t & M_1| / |M_t | M_1| (Jaccard; 1.0
    for round 1, None in records written before it was kept). An overlap near 1 means the search
    had little to choose between."""

    round: int
    n_samples: int
    n_params_in_range: int
    score: Optional[float]
    seconds: float
    jaccard_with_first: Optional[float] = None


@dataclass(frozen=True)
class IRDSettings:
    """The search's settings. These defaults are the ``FishIRDConfig`` defaults (``ird_*`` fields),
    which ``FishIRDConfig.ird_settings()`` turns into this object in one place."""

    shrink: float = 0.5
    rounds: Optional[int] = None
    min_samples: int = 32
    direction: Literal["top", "reverse"] = "top"
    sample_order: Literal["fisher", "random"] = "fisher"
    budget: str = "global"
    seed: int = 0
    search: IRDSearch = "halve"


@dataclass
class IRDResult:
    masks: dict[str, torch.Tensor]
    best_round: int
    trace: list[IRDRound]
    per_sample_gradients: int
    fisher_seconds: float
    scoring_seconds: float
    first_round_scores: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


def schedule(num_samples: int, num_params: int, k: int, settings: IRDSettings) -> list[tuple[int, int]]:
    """(|S|, |P|) of every round that will run: a pure function of the sizes and settings."""
    sizes = [(num_samples, num_params)]
    while True:
        s, p = sizes[-1]
        if p <= k or (settings.rounds is not None and len(sizes) >= settings.rounds):
            return sizes
        s_next = int(s * settings.shrink)
        if s_next < max(1, settings.min_samples):
            return sizes
        sizes.append((s_next, max(k, int(p * settings.shrink))))


class _Search:
    """The step both searches share: a Fisher pass on a sample range inside a parameter range, its
    top-k candidate, the candidate's score, the trace row, and the best candidate so far."""

    def __init__(
        self,
        num_samples: int,
        k: int,
        fisher_pass: FisherPass,
        score: Scorer,
        settings: IRDSettings,
        input_axes: Optional[dict[str, Optional[int]]] = None,
    ) -> None:
        self.num_samples, self.k, self.fisher_pass, self.score, self.settings = (
            num_samples,
            k,
            fisher_pass,
            score,
            settings,
        )
        self.input_axes = input_axes
        self.passes = 0  # planned Fisher passes; 0 until the number of candidate entries is known
        self.trace: list[IRDRound] = []
        self.best: Optional[tuple[float, int, dict[str, torch.Tensor]]] = None
        self.first_scores: dict[str, torch.Tensor] = {}
        self.first_candidate: dict[str, torch.Tensor] = {}
        self.fisher_seconds = self.scoring_seconds = 0.0
        self.gradients = 0

    def step(self, samples: list[int], ranges: Optional[dict[str, torch.Tensor]], n_params: Optional[int]):
        """Evaluate one (sample range, parameter range) pair; returns its Fisher result and score."""
        start, t = time.perf_counter(), len(self.trace) + 1
        if n_params is not None and not self.passes:
            self.passes = planned_passes(self.num_samples, n_params, self.k, self.settings)
        result = self.fisher_pass(samples, ranges, _round_label(t, self.passes, len(samples), n_params))
        self.gradients += result.num_samples
        self.fisher_seconds += result.seconds
        if t == 1:
            self.first_scores = result.scores
            n_params = sum(s.numel() for s in result.scores.values())
            self.passes = planned_passes(self.num_samples, n_params, self.k, self.settings)
        candidate = select(result.scores, self.k, self.settings.budget, ranges, self.input_axes)
        if t == 1:
            self.first_candidate = candidate
        value = None
        if self.passes != 1:  # a single candidate needs no scoring
            scored_at = time.perf_counter()
            value = float(self.score(candidate))
            self.scoring_seconds += time.perf_counter() - scored_at
            if value != value:
                raise ValueError(f"The IRD evaluator returned NaN for candidate {t}; it must return a finite float.")
        overlap = round(mask_jaccard(candidate, self.first_candidate), 6)
        self.trace.append(IRDRound(t, len(samples), n_params, value, round(time.perf_counter() - start, 3), overlap))
        logger.info("IRD candidate %d: %d samples, %d entries in range, score %s", t, len(samples), n_params, value)
        if self.best is None or (value is not None and value > self.best[0]):
            self.best = (value if value is not None else float("-inf"), t, candidate)
        return result, value

    def result(self) -> IRDResult:
        best = self.best
        return IRDResult(
            best[2], best[1], self.trace, self.gradients, self.fisher_seconds, self.scoring_seconds, self.first_scores
        )


def mask_jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Jaccard overlap of two masks given as parameter name -> sorted flat indices (1.0 if both empty)."""
    inter = union = 0
    for name in a.keys() | b.keys():
        x, y = a.get(name), b.get(name)
        nx, ny = (0 if x is None else x.numel()), (0 if y is None else y.numel())
        common = int(torch.isin(x, y).sum()) if nx and ny else 0
        inter, union = inter + common, union + nx + ny - common
    return inter / union if union else 1.0


def planned_passes(num_samples: int, num_params: int, k: int, settings: IRDSettings) -> int:
    """Fisher passes (= candidates) the search will run: one per round for ``halve``, and for
    ``branch`` one for round 1 plus two per later level (one when the rest of a split is empty)."""
    plan = schedule(num_samples, num_params, k, settings)
    if settings.search == "halve":
        return len(plan)
    sizes = [s for s, _ in plan]
    return 1 + sum(1 + (before > after) for before, after in zip(sizes, sizes[1:]))


def iterative_range_decreasing(
    num_samples: int,
    k: int,
    fisher_pass: FisherPass,
    score: Scorer,
    settings: IRDSettings,
    num_params: Optional[int] = None,
    input_axes: Optional[dict[str, Optional[int]]] = None,
) -> IRDResult:
    """Run the IRD search (``settings.search``) over a pool of ``num_samples`` samples; see the
    module docstring. ``best_round`` in the result is the 1-based position of the kept candidate
    in the trace (one row per Fisher pass; for ``halve`` that is the round).

    ``num_params`` (the candidate entries, if the caller knows them) lets the progress labels say
    "i/n" from the first pass on; otherwise the plan is known after the first pass.
    ``input_axes`` (score name -> the weight's input-feature dimension) is what ``budget="column_capped"``
    caps along.
    """
    if settings.search not in IRD_SEARCHES:
        raise ValueError(f"IRD search={settings.search!r}: choose one of {IRD_SEARCHES}.")
    search = _Search(num_samples, k, fisher_pass, score, settings, input_axes)
    samples = list(range(num_samples))
    result, _ = search.step(samples, None, num_params)
    plan = schedule(num_samples, search.trace[0].n_params_in_range, k, settings)
    lowest = settings.direction == "reverse"
    generator = torch.Generator().manual_seed(settings.seed)
    ranges: Optional[dict[str, torch.Tensor]] = None
    for next_samples, next_params in plan[1:]:
        ranges = shrink_range(result.scores, ranges, next_params, lowest=lowest)
        kept = _shrink_samples(samples, result.sample_scores, next_samples, settings, lowest, generator)
        outcome = (*search.step(kept, ranges, next_params), kept)
        rest = sorted(set(samples) - set(kept))
        if settings.search == "branch" and rest:
            other = (*search.step(rest, ranges, next_params), rest)
            if other[1] > outcome[1]:  # ties stay with the kept (higher-Fisher) part
                outcome = other
        result, _, samples = outcome
    return search.result()


def _round_label(t: int, passes: int, n_samples: int, n_params: Optional[int]) -> str:
    """Progress label of pass t: ``IRD round 2/4 (512 samples, 5,678,901 entries)``."""
    of = f"/{passes}" if passes else ""
    entries = f", {n_params:,} entries" if n_params is not None else ""
    return f"IRD round {t}{of} ({n_samples} samples{entries})"


def _shrink_samples(
    samples: list[int],
    sample_scores: torch.Tensor,
    size: int,
    settings: IRDSettings,
    lowest: bool,
    generator: torch.Generator,
) -> list[int]:
    """Keep ``size`` samples: highest s_n (reverse: lowest; random control: a seeded random subset)."""
    if settings.sample_order == "random":
        keep = torch.randperm(len(samples), generator=generator)[:size]
    else:
        keep = top_k_positions(-sample_scores if lowest else sample_scores, size)
    return sorted(samples[int(i)] for i in keep)
