"""Numbers of the quality report, computed from the JSON records only (no torch)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any, Optional

import numpy as np

METHOD_ORDER = (
    "fish",
    "fish_column_capped",
    "ird",
    "ird_column_capped",
    "ird_branch",
    "ird_reverse",
    "ird_random",
    "random",
    "lora",
    "full",
)
COMPARED_TO_FISH = tuple(m for m in METHOD_ORDER if m not in ("fish", "full"))  # paired against FISH
IRD_VARIANTS = ("ird", "ird_branch", "ird_reverse", "ird_random")
COLOURS = {
    "fish": "C0",
    "ird": "C1",
    "ird_reverse": "C2",
    "ird_random": "C4",
    "ird_branch": "C5",
    "random": "C7",
    "lora": "C3",
    "full": "k",
}

Record = dict[str, Any]


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for a single value) and count."""
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def accuracy(record: Record) -> float:
    return float(record["metrics"]["accuracy"])


def by_seed(records: Iterable[Record], method: str, ratio: Optional[float]) -> dict[int, float]:
    """seed -> accuracy of one method at one budget (``None``: full fine-tuning)."""
    return {r["seed"]: accuracy(r) for r in records if r["method"] == method and r["keep_ratio"] == ratio}


def paired_differences(records: list[Record], method: str, ratio: float, baseline: str = "fish") -> dict[int, float]:
    """seed -> accuracy(method) - accuracy(baseline), over the seeds both have (same data, head init, order)."""
    ours, theirs = by_seed(records, method, ratio), by_seed(records, baseline, ratio)
    return {seed: ours[seed] - theirs[seed] for seed in sorted(ours.keys() & theirs.keys())}


def keep_ratios(records: list[Record]) -> list[float]:
    return sorted({r["keep_ratio"] for r in records if r["keep_ratio"] is not None})


def methods_present(records: list[Record]) -> list[str]:
    """The methods of ``records``: the known ones in ``METHOD_ORDER``, then any others (mask variants) by name."""
    present = {r["method"] for r in records}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def group(records: list[Record]) -> dict[tuple[str, str], list[Record]]:
    """Records by (model, settings fingerprint), in order of first appearance."""
    out: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        out.setdefault((record["model"], record["settings_id"]), []).append(record)
    return out


def tasks_of(records: list[Record]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in records))


def ratio_label(ratio: Optional[float]) -> str:
    return "100% (full)" if ratio is None else f"{100 * ratio:g}%"


def choose_rate(grid: list[Record], rates: list[float]) -> Optional[dict[str, Any]]:
    """The grid's rate with the highest validation accuracy (ties: the earlier rate of the grid).

    Returns ``{"chosen", "grid": [[rate, validation accuracy], ...], "seed", "at_edge"}``, or None while a
    rate of ``rates`` has no record yet. The test split plays no part in the choice.
    """
    scores = {r["learning_rate"]: r["validation"]["accuracy"] for r in grid}
    if any(rate not in scores for rate in rates):
        return None
    best = max(rates, key=lambda rate: (scores[rate], -rates.index(rate)))
    seeds = sorted({r["seed"] for r in grid})
    return {
        "chosen": best,
        "grid": [[rate, scores[rate]] for rate in rates],
        "seed": seeds[0],
        "at_edge": best in (rates[0], rates[-1]),
    }


def bootstrap_ci(
    values: list[float], resamples: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (numpy, seeded; resampling with replacement)."""
    if len(values) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    data = np.asarray(values, dtype=float)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
