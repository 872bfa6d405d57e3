"""Tables of the quality benchmark, rebuilt from its JSON results (nothing is re-run).

``python -m benchmarks.quality`` calls :func:`write_report` after its runs and for ``--only-report``.
Writes ``quality.md`` (accuracy mean ± sample std over seeds per method and budget, paired per-seed
differences against FISH, the cells where IRD does not beat FISH, matched LoRA counts, timings)
and, when matplotlib is installed, the figures of ``plots.py``. Records are grouped by model and
settings fingerprint, so runs made with different settings are never averaged together.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

from benchmarks.common import atomic_write_text
from benchmarks.quality.plots import make_plots
from benchmarks.quality.protocol import acceptance_lines, ci_table, grid_table, split_phases
from benchmarks.quality.stats import (
    COMPARED_TO_FISH,
    IRD_VARIANTS,
    Record,
    accuracy,
    by_seed,
    group,
    keep_ratios,
    mean_std,
    methods_present,
    paired_differences,
    ratio_label,
    tasks_of,
)

logger = logging.getLogger("quality.report")


def pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


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
        mine = [r for r in records if r["method"] == method and "reused_run" not in r]  # a reused run is counted once
        if not mine:
            continue
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
            f"(the FISH mask on the same pool) in {first} of {len(runs)} runs.{jaccard_by_round(runs)}"
        )
    return lines


def jaccard_by_round(runs: list[Record]) -> str:
    """Mean overlap (Jaccard) of each round's candidate with round 1's, from the traces that carry it."""
    by_round: dict[int, list[float]] = {}
    for r in runs:
        for row in r["selection"]["trace"]:
            if row.get("jaccard_with_first") is not None:
                by_round.setdefault(int(row["round"]), []).append(float(row["jaccard_with_first"]))
    if not by_round:
        return ""
    parts = [f"round {t}: {statistics.fmean(v):.3f} (n={len(v)})" for t, v in sorted(by_round.items())]
    return " Mean Jaccard overlap with round 1's mask by round: " + ", ".join(parts) + "."


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


def probe_words(probe: dict | None) -> str:
    """'head probed first (48 steps at lr 0.01, batch 16), ' or nothing."""
    if not probe:
        return ""
    return f"head probed first ({probe['steps']} steps at lr {probe['lr']}, batch {probe.get('batch_size', 16)}), "


def settings_line(record: Record) -> str:
    s = record["settings"]
    d, t, f, i = s["data"], s["train"], s["fish"], s["ird"]
    splits = f"test/selection/train {record['n_test']}/{record['n_selection']}/{record['n_train']}"
    if "n_validation" in record:
        splits = (
            f"test/selection/validation/train {record['n_test']}/{record['n_selection']}/"
            f"{record['n_validation']}/{record['n_train']}"
        )
        curve = f", validation accuracy every {t['eval_every']} steps" if t.get("eval_every") else ""
        splits += f" (validation carved from the training data{curve})"
    return (
        f"splits {splits} "
        f"(split seed {d['split_seed']}), max {d['max_length']} tokens; {t['epochs']} epoch(s), "
        f"batch {t['batch_size']}, {probe_words(t.get('head_probe'))}"
        f"lr sparse {t['lr']['sparse']} / LoRA {t['lr']['lora']} / full {t['lr']['full']}; Fisher: {f['fisher']}, "
        f"{f['num_samples']} samples, {f['budget']} top-k, head in budget {f['head_in_budget']}; IRD: shrink "
        f"{i['ird_shrink']}, min samples {i['ird_min_samples']}, scorer {i['ird_eval_steps']} steps × batch "
        f"{i['ird_eval_batch_size']} at lr {i['ird_eval_lr']}, metric {i['ird_eval_metric']} on the selection split; "
        f"device {record['env'].get('cuda') or 'CPU'} ({record['env'].get('torch_threads')} threads), torch "
        f"{record['env'].get('torch')}."
    )


def copy_line(records: list[Record]) -> str:
    """Which records are runs of an earlier profile at the same rate (``reuse.py``), if any."""
    copies = [r for r in records if "copied_from" in r]
    if not copies:
        return ""
    profiles = sorted({r["copied_from"]["profile"] for r in copies})
    files = sorted({r["copied_from"]["file"] for r in copies})
    return (
        f"{len(copies)} of these {len(records)} records are runs of profile {', '.join(profiles)} at the same "
        f"learning rate under otherwise identical settings, copied from {', '.join(files)} (each keeps a "
        "`copied_from` note); the others were run under this profile."
    )


def section_markdown(model: str, settings_id: str, records: list[Record], plots: dict[str, list[Path]]) -> list[str]:
    copied = copy_line(records)
    records, grid = split_phases(records)
    lines = [f"## {model} (settings `{settings_id}`)", "", settings_line((records or grid)[0]), ""]
    lines += [copied, ""] if copied else []
    accept = acceptance_lines(records)
    if accept:
        lines += ["Acceptance (paired per-seed differences, bootstrap 95% interval of the mean):", "", *accept, ""]
    for task in tasks_of(records + grid):
        mine = [r for r in records if r["task"] == task]
        lines += [f"### {task}", "", "Test accuracy (%), mean ± sample std over seeds:", "", *accuracy_table(mine), ""]
        grid_runs = [r for r in grid if r["task"] == task]
        lines += grid_table(grid_runs) + ci_table(mine)
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
        lines += ["Seconds per run:", "", *timing_table(mine + grid_runs), ""]  # every run made, grid runs included
        for path in plots.get(task, []):
            lines += [f"![{path.stem}]({path.name})", ""]
    return lines


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
            f"Built by `python -m benchmarks.quality --only-report` from `quality.json` ({len(records)} records). "
            "Test accuracy on a "
            "split that neither the mask selection nor IRD's scorer saw. Differences are in percentage points (pp), "
            "paired by seed; 'wins' counts seeds where the method is strictly ahead of FISH. Every cell is listed, "
            "including those where IRD loses."
        ),
        "",
    ]
    written = []
    for (model, settings_id), mine in groups.items():
        tag = f"_{settings_id}" if models.count(model) > 1 else ""
        plots = make_plots(model, split_phases(mine)[0], output_dir, tag)
        written += [p for paths in plots.values() for p in paths]
        lines += section_markdown(model, settings_id, mine, plots)
        for line in acceptance_lines(split_phases(mine)[0]):
            logger.info("%s (%s): %s", model, settings_id, line.removeprefix("- ").replace("**", ""))
    if not records:
        lines.append("No runs yet.")
    md = output_dir / "quality.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    return [md, *written]
