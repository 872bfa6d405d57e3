"""Tables and plots of the quality benchmark, rebuilt from its JSON results (nothing is re-run).

Command:
    python benchmarks/report_quality.py --results benchmarks/results/quality.json --output-dir benchmarks/results

``benchmarks/quality.py`` calls :func:`write_report` after its runs and for ``--only-report``.
Writes ``quality.md`` (accuracy mean ± sample std over seeds per method and budget, paired per-seed
differences against FISH, the cells where IRD does not beat FISH, matched LoRA counts, timings)
and, when matplotlib is installed, per model and task ``quality_<model>_<task>_accuracy.png``
(accuracy vs keep ratio per method) and ``quality_<model>_<task>_ird_trace.png`` (IRD score per
round). Records are grouped by model and settings fingerprint, so runs made with different
settings are never averaged together.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

METHOD_ORDER = ("fish", "ird", "ird_reverse", "ird_random", "random", "lora", "full")
COMPARED_TO_FISH = ("ird", "ird_reverse", "ird_random", "random", "lora")
IRD_VARIANTS = ("ird", "ird_reverse", "ird_random")
COLOURS = {
    "fish": "C0",
    "ird": "C1",
    "ird_reverse": "C2",
    "ird_random": "C4",
    "random": "C7",
    "lora": "C3",
    "full": "k",
}

logger = logging.getLogger("quality.report")

Record = dict[str, Any]


# ---------------------------------------------------------------------------------------------- numbers
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
    present = {r["method"] for r in records}
    return [m for m in METHOD_ORDER if m in present]


def group(records: list[Record]) -> dict[tuple[str, str], list[Record]]:
    """Records by (model, settings fingerprint), in order of first appearance."""
    out: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        out.setdefault((record["model"], record["settings_id"]), []).append(record)
    return out


def tasks_of(records: list[Record]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in records))


# ---------------------------------------------------------------------------------------------- text
def pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


def ratio_label(ratio: Optional[float]) -> str:
    return "100% (full)" if ratio is None else f"{100 * ratio:g}%"


def fmt_stats(values: list[float]) -> str:
    mean, std, n = mean_std(values)
    if n == 0:
        return ""
    return f"{pct(mean)} (n=1)" if n == 1 else f"{pct(mean)} ± {pct(std)} (n={n})"


def fmt_diff(diffs: dict[int, float]) -> str:
    """'+0.4 ± 1.1 pp, 2/3 wins [+1.2, +0.8, -0.8]' in percentage points."""
    if not diffs:
        return ""
    mean, std, n = mean_std(list(diffs.values()))
    wins = sum(d > 0 for d in diffs.values())
    seeds = ", ".join(f"{100 * d:+.1f}" for d in diffs.values())
    return f"{100 * mean:+.1f} ± {100 * std:.1f} pp, {wins}/{n} wins [{seeds}]"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def accuracy_table(records: list[Record]) -> list[str]:
    ratios = keep_ratios(records)
    full = [accuracy(r) for r in records if r["method"] == "full"]
    header = ["method", *[ratio_label(r) for r in ratios]] + (["100% (full)"] if full else [])
    rows = []
    for method in methods_present(records):
        if method == "full":
            rows.append(["full", *[""] * len(ratios), fmt_stats(full)])
            continue
        row = [method, *[fmt_stats(list(by_seed(records, method, r).values())) for r in ratios]]
        rows.append(row + ([""] if full else []))
    return table(header, rows)


def paired_table(records: list[Record]) -> list[str]:
    rows = []
    for ratio in keep_ratios(records):
        for method in COMPARED_TO_FISH:
            diffs = paired_differences(records, method, ratio)
            if diffs:
                rows.append([ratio_label(ratio), f"{method} − fish", fmt_diff(diffs)])
    return table(["budget", "comparison", "mean ± std (pp), wins, per seed"], rows) if rows else []


def lora_table(records: list[Record]) -> list[str]:
    rows = []
    for ratio in keep_ratios(records):
        fish = next((r for r in records if r["method"] == "fish" and r["keep_ratio"] == ratio), None)
        lora = next((r for r in records if r["method"] == "lora" and r["keep_ratio"] == ratio), None)
        if lora is None:
            continue
        t = lora["trainable"]
        fish_count = "–"
        if fish:
            f = fish["trainable"]
            fish_count = f"{f['sparse_entries']:,} + {f['head']:,} head = {f['count']:,}"
        rows.append(
            [
                ratio_label(ratio),
                f"{t['budget']:,}",
                fish_count,
                f"r={t['lora_r']} on {t['lora_target_modules']}",
                f"{t['count']:,}",
                f"{100 * t['relative_difference']:+.1f}%",
            ]
        )
    header = [
        "budget",
        "int(keep_ratio × total)",
        "FISH trainable",
        "LoRA",
        "LoRA trainable (incl. head)",
        "LoRA vs budget",
    ]
    return table(header, rows) if rows else []


def timing_table(records: list[Record]) -> list[str]:
    rows = []
    for method in methods_present(records):
        mine = [r for r in records if r["method"] == method]
        cols = [statistics.fmean(r[k] for r in mine) for k in ("selection_seconds", "train_seconds", "run_seconds")]
        rows.append([method, str(len(mine)), *[f"{c:.1f}" for c in cols]])
    return table(["method", "runs", "selection s (mean)", "training s (mean)", "whole run s (mean)"], rows)


def ird_round_summary(records: list[Record]) -> list[str]:
    lines = []
    for variant in IRD_VARIANTS:
        runs = [r for r in records if r["method"] == variant]
        if not runs:
            continue
        first = sum(r["selection"]["best_round"] == 1 for r in runs)
        rounds = statistics.fmean(len(r["selection"]["trace"]) for r in runs)
        lines.append(
            f"- `{variant}`: {len(runs)} runs, {rounds:.1f} rounds on average; the best candidate was round 1 "
            f"(the FISH mask on the same pool) in {first} of {len(runs)} runs."
        )
    return lines


def ird_verdicts(records: list[Record]) -> tuple[list[str], int, int]:
    """Every (budget) where IRD's mean paired difference to FISH is not positive, plus wins / cells."""
    lines, wins, cells = [], 0, 0
    for ratio in keep_ratios(records):
        diffs = paired_differences(records, "ird", ratio)
        if not diffs:
            continue
        cells += 1
        mean, std, n = mean_std(list(diffs.values()))
        if mean > 0:
            wins += 1
            noise = " (within one std of zero)" if n > 1 and mean < std else ""
            lines.append(f"  - {ratio_label(ratio)}: IRD ahead by {100 * mean:+.1f} pp{noise}")
        else:
            lines.append(f"  - {ratio_label(ratio)}: **IRD does not beat FISH**: {fmt_diff(diffs)}")
    return lines, wins, cells


def settings_line(record: Record) -> str:
    s = record["settings"]
    d, t, f, i = s["data"], s["train"], s["fish"], s["ird"]
    return (
        f"splits test/selection/train {record['n_test']}/{record['n_selection']}/{record['n_train']} "
        f"(split seed {d['split_seed']}), max {d['max_length']} tokens; {t['epochs']} epoch(s), "
        f"batch {t['batch_size']}, "
        f"lr sparse {t['lr']['sparse']} / LoRA {t['lr']['lora']} / full {t['lr']['full']}; Fisher: {f['fisher']}, "
        f"{f['num_samples']} samples, {f['budget']} top-k, head in budget {f['head_in_budget']}; IRD: shrink "
        f"{i['ird_shrink']}, min samples {i['ird_min_samples']}, scorer {i['ird_eval_steps']} steps × batch "
        f"{i['ird_eval_batch_size']} at lr {i['ird_eval_lr']}, metric {i['ird_eval_metric']} on the selection split; "
        f"device {record['env'].get('cuda') or 'CPU'} ({record['env'].get('torch_threads')} threads), torch "
        f"{record['env'].get('torch')}."
    )


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def section_markdown(model: str, settings_id: str, records: list[Record], plots: dict[str, list[Path]]) -> list[str]:
    lines = [f"## {model} (settings `{settings_id}`)", "", settings_line(records[0]), ""]
    for task in tasks_of(records):
        mine = [r for r in records if r["task"] == task]
        lines += [f"### {task}", "", "Test accuracy (%), mean ± sample std over seeds:", "", *accuracy_table(mine), ""]
        paired = paired_table(mine)
        if paired:
            lines += [
                "Paired per-seed differences against FISH (same split, head init and data order):",
                "",
                *paired,
                "",
            ]
        verdicts, wins, cells = ird_verdicts(mine)
        if cells:
            lines += [f"IRD beats FISH on the mean in {wins} of {cells} budgets:", "", *verdicts, ""]
        summary = ird_round_summary(mine)
        if summary:
            lines += ["IRD rounds:", "", *summary, ""]
        lora = lora_table(mine)
        if lora:
            lines += [
                "Trainable-parameter matching (LoRA rank and targets chosen closest to FISH's count):",
                "",
                *lora,
                "",
            ]
        lines += ["Seconds per run:", "", *timing_table(mine), ""]
        for path in plots.get(task, []):
            lines += [f"![{path.stem}]({path.name})", ""]
    return lines


# ---------------------------------------------------------------------------------------------- plots
def plot_accuracy(records: list[Record], title: str, path: Path) -> None:
    """Accuracy vs keep ratio (log axis), mean ± std per method; full fine-tuning as a dashed line."""
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_traces(records: list[Record], title: str, path: Path) -> bool:
    """IRD search traces: candidate score per round, one line per run, a star on the chosen round."""
    import matplotlib.pyplot as plt
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def make_plots(model: str, records: list[Record], output_dir: Path, tag: str) -> dict[str, list[Path]]:
    """Per task, the accuracy and trace figures (empty when matplotlib is missing)."""
    try:
        import matplotlib

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
        out[task] = paths
    return out


# ---------------------------------------------------------------------------------------------- output
def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".report-", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_report(records: list[Record], output_dir: Path) -> list[Path]:
    """Write quality.md (and plots) for all records; returns the paths written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    groups = group(records)
    models = [model for model, _ in groups]
    lines = [
        "# Quality benchmark results",
        "",
        (
            f"Built by `benchmarks/report_quality.py` from `quality.json` ({len(records)} runs). Test accuracy on a "
            "split that neither the mask selection nor IRD's scorer saw. Differences are in percentage points (pp), "
            "paired by seed; 'wins' counts seeds where the method is strictly ahead of FISH. Every cell is listed, "
            "including those where IRD loses."
        ),
        "",
    ]
    written = []
    for (model, settings_id), mine in groups.items():
        tag = f"_{settings_id}" if models.count(model) > 1 else ""
        plots = make_plots(model, mine, output_dir, tag)
        written += [p for paths in plots.values() for p in paths]
        lines += section_markdown(model, settings_id, mine, plots)
    if not records:
        lines.append("No runs yet.")
    md = output_dir / "quality.md"
    write_atomic(md, "\n".join(lines) + "\n")
    return [md, *written]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent
    p.add_argument("--results", type=Path, default=here / "results" / "quality.json", help="the benchmark's JSON")
    p.add_argument(
        "--output-dir", type=Path, default=None, help="where quality.md and plots go (default: beside the JSON)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not args.results.exists():
        logger.error("error: %s does not exist; run benchmarks/quality.py first.", args.results)
        return 2
    records = json.loads(args.results.read_text())["records"]
    for path in write_report(records, args.output_dir or args.results.parent):
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
