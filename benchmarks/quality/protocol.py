"""Report parts of the fair-comparison protocol (issue 12): the learning-rate grids, paired differences
with a bootstrap 95% confidence interval for every cell, and the acceptance lines.

Paired difference: for each seed both methods ran, accuracy(a) - accuracy(b) on the same test split
(same head initialisation, data order and Fisher samples). The interval is a percentile bootstrap of
the mean over those differences (``stats.bootstrap_ci``: numpy, seeded, 10,000 resamples); with five
seeds per cell it is a rough interval, pooled over tasks and budgets it is the acceptance test.
"""

from __future__ import annotations

import math
from typing import Optional

from benchmarks.quality.plan import GRID_PHASE
from benchmarks.quality.stats import Record, bootstrap_ci, keep_ratios, mean_std, paired_differences, ratio_label

# mask variants against FISH and LoRA too (rows appear only where both methods ran)
VARIANT_COMPARISONS = (
    ("fish_column_capped", "fish"),
    ("fish_column_capped", "lora"),
    ("ird_random", "fish"),  # IRD with the sample range halved at random (a control that beat FISH on movie)
    ("ird_random", "lora"),
    # FISH inside the transformer blocks only (per_module; no embeddings, no pooler: LoRA's ground)
    ("fish_blocks_per_module", "fish"),
    ("fish_blocks_per_module", "lora"),
    ("ird_random_blocks_per_module", "fish_blocks_per_module"),
    ("ird_random_blocks_per_module", "lora"),
    ("random", "fish"),  # the random-mask control: what FISH's Fisher ranking is worth at a tuned rate
    ("random", "lora"),
)
COMPARISONS = (("fish", "lora"), ("ird", "fish"), *VARIANT_COMPARISONS)
ACCEPTANCE_BUDGETS = (0.002, 0.005)
# (method, baseline, the mean must be at least, the interval's lower end must be above), in accuracy units
ACCEPTANCE = (("fish", "lora", 0.0, -0.005), ("ird", "fish", 0.01, 0.0))


def split_phases(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(main records, learning-rate grid records)."""
    grid = [r for r in records if r.get("phase") == GRID_PHASE]
    return [r for r in records if r.get("phase") != GRID_PHASE], grid


def fmt_ci(values: list[float]) -> str:
    """'+0.4 pp [-0.8, +1.6] (n=5)': mean and bootstrap 95% interval in percentage points."""
    mean, _, n = mean_std(values)
    low, high = bootstrap_ci(values)
    interval = "" if math.isnan(low) else f" [{100 * low:+.1f}, {100 * high:+.1f}]"
    return f"{100 * mean:+.1f} pp{interval} (n={n})"


def ci_table(records: list[Record]) -> list[str]:
    """Every budget of one task: FISH − LoRA and IRD − FISH with the bootstrap interval."""
    rows = []
    for ratio in keep_ratios(records):
        for method, baseline in COMPARISONS:
            diffs = list(paired_differences(records, method, ratio, baseline).values())
            if diffs:
                rows.append(f"| {ratio_label(ratio)} | {method} − {baseline} | {fmt_ci(diffs)} |")
    if not rows:
        return []
    head = ["| budget | comparison | mean, bootstrap 95% CI (pp) |", "|---|---|---|"]
    return ["Paired differences with a bootstrap 95% interval of the mean:", "", *head, *rows, ""]


def grid_table(grid: list[Record]) -> list[str]:
    """Validation accuracy of every rate of every grid (grid seed), the chosen rate in bold."""
    cells: dict[tuple[str, Optional[float]], list[Record]] = {}
    for record in grid:
        cells.setdefault((record["method"], record["keep_ratio"]), []).append(record)
    rows = []
    for (method, ratio), runs in cells.items():
        runs = sorted(runs, key=lambda r: r["learning_rate"])
        best = max(runs, key=lambda r: r["validation"]["accuracy"])  # the first maximum: the earlier rate
        scores = [f"{r['learning_rate']:g}: {100 * r['validation']['accuracy']:.1f}" for r in runs]
        scores = [f"**{text}**" if r is best else text for r, text in zip(runs, scores)]
        edge = " (at the grid's edge)" if best in (runs[0], runs[-1]) else ""
        rows.append(f"| {method} | {ratio_label(ratio)} | {', '.join(scores)}{edge} | seed {runs[0]['seed']} |")
    if not rows:
        return []
    head = ["| method | budget | rate: validation accuracy (%) | on |", "|---|---|---|---|"]
    return [
        "Learning-rate grid (chosen by validation accuracy on the grid seed, then used for every seed; "
        "the test split plays no part):",
        "",
        *head,
        *rows,
        "",
    ]


def acceptance_lines(records: list[Record]) -> list[str]:
    """PASS / FAIL of the protocol's criteria, pooled over every task and the budgets 0.2% and 0.5%."""
    lines = []
    for method, baseline, min_mean, min_low in (*ACCEPTANCE, *((m, b, None, None) for m, b in VARIANT_COMPARISONS)):
        keyed = [
            (ratio, list(paired_differences([r for r in records if r["task"] == t], method, ratio, baseline).values()))
            for t in dict.fromkeys(r["task"] for r in records)
            for ratio in ACCEPTANCE_BUDGETS
        ]
        budgets = ", ".join(f"{100 * ratio:g}%" for ratio in dict.fromkeys(ratio for ratio, c in keyed if c))
        cells = [c for _, c in keyed if c]
        diffs = [d for c in cells for d in c]
        if len(diffs) < 2:
            continue
        mean, _, _ = mean_std(diffs)
        low, _ = bootstrap_ci(diffs)
        if min_mean is None:  # a variant's pooled difference: reported, not a criterion
            lines.append(f"- {method} − {baseline}, pooled over {len(cells)} cells ({budgets}): {fmt_ci(diffs)}.")
            continue
        verdict = "PASS" if mean >= min_mean and low > min_low else "FAIL"
        lines.append(
            f"- **{verdict}** {method} − {baseline}, pooled over {len(cells)} task × budget cells ({budgets}): "
            f"{fmt_ci(diffs)}; "
            f"needs a mean ≥ {100 * min_mean:+.1f} pp and an interval above {100 * min_low:+.1f} pp."
        )
    return lines
