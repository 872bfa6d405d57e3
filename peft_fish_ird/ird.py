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

Round 1 is FISH on the pool. Controls: ``direction="reverse"`` keeps the lowest-Fisher halves
of both ranges (the paper's contrast baseline); ``sample_order="random"`` halves the sample
range at random (separates "fewer samples" from "better samples"). The best candidate is kept
in every variant, ties going to the earlier round. Fisher passes and the scorer are passed in,
so this file knows nothing of PEFT, models or data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Optional

import torch

from .fisher import FisherResult
from .selection import select, shrink_range, top_k_positions

logger = logging.getLogger(__name__)

# (sample positions in the pool, parameter range or None for all, progress-bar label) -> Fisher
FisherPass = Callable[[list[int], Optional[dict[str, torch.Tensor]], str], FisherResult]
# candidate masks (name -> sorted flat indices) -> score, higher is better
Scorer = Callable[[dict[str, torch.Tensor]], float]


class IRDRound(NamedTuple):
    """One row of the trace: sizes of the ranges searched, the candidate's score, wall time."""

    round: int
    n_samples: int
    n_params_in_range: int
    score: Optional[float]
    seconds: float


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


def iterative_range_decreasing(
    num_samples: int,
    k: int,
    fisher_pass: FisherPass,
    score: Scorer,
    settings: IRDSettings,
    num_params: Optional[int] = None,
) -> IRDResult:
    """Run the IRD search over a pool of ``num_samples`` samples; see the module docstring.

    ``num_params`` (the candidate entries, if the caller knows them) lets the progress labels say
    "round t of n" from the first round on; otherwise the plan is known after the first pass.
    """
    samples = list(range(num_samples))
    ranges: Optional[dict[str, torch.Tensor]] = None
    trace: list[IRDRound] = []
    best: Optional[tuple[float, int, dict[str, torch.Tensor]]] = None
    first_scores: dict[str, torch.Tensor] = {}
    plan = None if num_params is None else schedule(num_samples, num_params, k, settings)
    lowest = settings.direction == "reverse"
    generator = torch.Generator().manual_seed(settings.seed)
    fisher_seconds = scoring_seconds = 0.0
    gradients = 0
    t = 0
    while True:
        t += 1
        start = time.perf_counter()
        result = fisher_pass(samples, ranges, _round_label(t, plan, len(samples)))
        gradients += result.num_samples
        fisher_seconds += result.seconds
        if plan is None:
            plan = schedule(num_samples, sum(s.numel() for s in result.scores.values()), k, settings)
        candidate = select(result.scores, k, settings.budget, ranges)
        if t == 1:
            first_scores = result.scores
        value = None
        if len(plan) > 1:  # a single candidate needs no scoring
            scored_at = time.perf_counter()
            value = float(score(candidate))
            scoring_seconds += time.perf_counter() - scored_at
            if value != value:
                raise ValueError(f"The IRD evaluator returned NaN for round {t}; it must return a finite float.")
        n_params = plan[t - 1][1]
        trace.append(IRDRound(t, len(samples), n_params, value, round(time.perf_counter() - start, 3)))
        logger.info("IRD round %d: %d samples, %d entries in range, score %s", t, len(samples), n_params, value)
        if best is None or (value is not None and value > best[0]):
            best = (value if value is not None else float("-inf"), t, candidate)
        if t >= len(plan):
            break
        next_samples, next_params = plan[t]
        ranges = shrink_range(result.scores, ranges, next_params, lowest=lowest)
        samples = _shrink_samples(samples, result.sample_scores, next_samples, settings, lowest, generator)
    return IRDResult(best[2], best[1], trace, gradients, fisher_seconds, scoring_seconds, first_scores)


def _round_label(t: int, plan: Optional[list[tuple[int, int]]], n_samples: int) -> str:
    """Progress label of round t: ``IRD round 2/4 (512 samples, 5,678,901 entries)``."""
    if plan is None:
        return f"IRD round {t} ({n_samples} samples)"
    return f"IRD round {t}/{len(plan)} ({n_samples} samples, {plan[t - 1][1]:,} entries)"


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
