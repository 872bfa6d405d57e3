"""Figures of the quality report (matplotlib, optional: without it the report is tables only)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from benchmarks.quality.stats import (
    COLOURS,
    IRD_VARIANTS,
    Record,
    accuracy,
    by_seed,
    keep_ratios,
    mean_std,
    methods_present,
    ratio_label,
    tasks_of,
)

logger = logging.getLogger("quality.report")
CURVE_METHODS = ("fish", "ird", "lora")


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def _save(fig: Any, path: Path) -> None:
    """Lay out, write and close a figure (every plot is saved the same way)."""
    import matplotlib.pyplot as plt  # optional dependency: imported only when plotting

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(records: list[Record], title: str, path: Path) -> None:
    """Accuracy vs keep ratio (log axis), mean ± std per method; full fine-tuning as a dashed line."""
    import matplotlib.pyplot as plt  # optional dependency: imported only when plotting

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in methods_present(records):
        if method == "full":
            mean, std, _ = mean_std([accuracy(r) for r in records if r["method"] == "full"])
            ax.axhline(100 * mean, color=COLOURS["full"], linestyle="--", label=f"full (±{100 * std:.1f})")
            continue
        points = [(r, mean_std(list(by_seed(records, method, r).values()))) for r in keep_ratios(records)]
        points = [(100 * r, 100 * m, 100 * s) for r, (m, s, n) in points if n]
        if points:
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method, color=COLOURS.get(method))
    ax.set_xscale("log")
    ax.set_xlabel("trainable share of all parameters (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_traces(records: list[Record], title: str, path: Path) -> bool:
    """IRD search traces: candidate score per round, one line per run, a star on the chosen round."""
    import matplotlib.pyplot as plt  # optional dependency: imported only when plotting
    from matplotlib.ticker import MaxNLocator

    runs = [r for r in records if r["method"] in IRD_VARIANTS and r.get("selection", {}).get("trace")]
    ratios = sorted({r["keep_ratio"] for r in runs})
    if not ratios:
        return False
    fig, axes = plt.subplots(1, len(ratios), figsize=(3.4 * len(ratios), 3.4), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        for run in (r for r in runs if r["keep_ratio"] == ratio):
            trace = run["selection"]["trace"]
            xs = [row["round"] for row in trace]
            ys = [row["score"] for row in trace]
            colour = COLOURS[run["method"]]
            ax.plot(xs, ys, marker=".", color=colour, alpha=0.7, label=run["method"])
            best = run["selection"]["best_round"]
            ax.plot([best], [ys[xs.index(best)]], marker="*", markersize=11, color=colour)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        ax.set_title(f"{ratio_label(ratio)}", fontsize=9)
        ax.set_xlabel("round (sample range halves)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("selection score (higher is better)")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return True


def plot_convergence(records: list[Record], title: str, path: Path) -> bool:
    """Validation accuracy vs optimizer steps of FISH, IRD and LoRA (mean ± std over seeds), one panel per budget."""
    import matplotlib.pyplot as plt  # optional dependency: imported only when plotting

    runs = [r for r in records if r["method"] in CURVE_METHODS and r.get("validation", {}).get("curve")]
    ratios = sorted({r["keep_ratio"] for r in runs})
    if not ratios:
        return False
    fig, axes = plt.subplots(1, len(ratios), figsize=(4.2 * len(ratios), 3.6), squeeze=False, sharey=True)
    for ax, ratio in zip(axes[0], ratios):
        for method in CURVE_METHODS:
            curves = [r["validation"]["curve"] for r in runs if r["method"] == method and r["keep_ratio"] == ratio]
            steps = sorted({step for curve in curves for step, _ in curve})
            if not steps:
                continue
            stats = [mean_std([acc for curve in curves for s, acc in curve if s == step]) for step in steps]
            means = [100 * m for m, _, _ in stats]
            stds = [100 * sd for _, sd, _ in stats]
            ax.plot(steps, means, marker=".", color=COLOURS[method], label=f"{method} (n={len(curves)})")
            low, high = [m - sd for m, sd in zip(means, stds)], [m + sd for m, sd in zip(means, stds)]
            ax.fill_between(steps, low, high, color=COLOURS[method], alpha=0.15)
        ax.set_title(ratio_label(ratio), fontsize=9)
        ax.set_xlabel("optimizer steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation accuracy (%)")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return True


def make_plots(model: str, records: list[Record], output_dir: Path, tag: str) -> dict[str, list[Path]]:
    """Per task, the accuracy, trace and convergence figures (empty when matplotlib is missing)."""
    try:
        import matplotlib  # optional dependency ([bench] / [dev] extras)

        matplotlib.use("Agg")
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib): tables only, no plots")
        return {}
    out: dict[str, list[Path]] = {}
    for task in tasks_of(records):
        mine = [r for r in records if r["task"] == task]
        base = output_dir / slug(f"quality_{model}{tag}_{task}")
        paths = []
        if keep_ratios(mine):
            plot_accuracy(mine, f"{model}, {task}: accuracy vs budget", base.with_name(base.name + "_accuracy.png"))
            paths.append(base.with_name(base.name + "_accuracy.png"))
        trace_path = base.with_name(base.name + "_ird_trace.png")
        if plot_traces(mine, f"{model}, {task}: IRD candidate scores per round", trace_path):
            paths.append(trace_path)
        curve_path = base.with_name(base.name + "_convergence.png")
        if plot_convergence(mine, f"{model}, {task}: validation accuracy during training", curve_path):
            paths.append(curve_path)
        out[task] = paths
    return out
