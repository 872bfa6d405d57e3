"""Tables and plot of the speed benchmark, from its JSON alone (``--only-report`` needs no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import atomic_write_text
from benchmarks.speed import TRAIN_METHODS


def write_markdown(result: dict[str, Any], path: Path) -> None:
    f, t = result["fisher"], result["training"]
    lines = [
        "# Speed and memory",
        "",
        f"Command: `{result['command']}`  ",
        f"Environment: {result['environment']}",
        "",
        f"## Fisher ({f['samples']} samples, batch {f['batch']}, {f['tokens']} tokens, all parameters)",
        "",
        "× one plain pass: ratio of median times; in brackets the quartiles of the per-repeat ratios "
        f"({len(f['seconds_all']['plain_pass'])} repeats, methods in turn).",
        "",
        "| method | seconds (median) | × one plain fwd+bwd pass |",
        "|---|---|---|",
    ]
    for k, v in f["seconds_median"].items():
        q = f["ratio_to_plain_pass_paired_quartiles"][k]
        lines.append(f"| {k} | {v:.2f} | {f['ratio_to_plain_pass'][k]:.2f} [{q[0]:.2f}–{q[2]:.2f}] |")
    if "engine_max_rel_error_vs_loop" in f:
        lines += [
            "",
            f"Engine vs batch-size-1 loop: max relative error {f['engine_max_rel_error_vs_loop']:.1e}; "
            f"top-0.5% mask identical: {f['top_0.5pct_mask_identical_to_loop']}; "
            f"speed-up {f['engine_speedup_vs_loop']:.2f}x.",
        ]
    prep = result.get("prepare")
    if prep:
        lines += [
            "",
            "## `prepare` end to end (draw + collate, Fisher pass, selection, filling the layers)",
            "",
            "× one plain fwd+bwd pass over the same collated batches; in brackets the quartiles of the "
            "per-repeat ratios. Breakdown: medians of the Fisher engine's own time, one timed draw, and of "
            "each call's rest (its time minus its engine time and the draw).",
            "",
            "| samples | prepare s | plain pass s | × plain pass | draw + collate s | Fisher engine s | "
            "selection, fill, checks s |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in prep.values():
            med, q, b = row["seconds_median"], row["ratio_paired_quartiles"], row["breakdown_seconds"]
            lines.append(
                f"| {row['samples']} | {med['prepare']:.2f} | {med['plain_pass']:.2f} | "
                f"{row['ratio_to_plain_pass']:.2f} [{q[0]:.2f}–{q[2]:.2f}] | {b['draw_and_collate']:.2f} | "
                f"{b['fisher_engine']:.2f} | {b['selection_fill_and_checks']:.2f} |"
            )
    lines += [
        "",
        f"## Training step (batch {t['batch']}, {t['tokens']} tokens, AdamW; FishIRD keep_ratio "
        f"{t['keep_ratio']:.5f} = LoRA r=8 count {t['lora_trainable']:,})",
        "",
        "Step × LoRA: ratio of median step times, then the median and in brackets the quartiles of the "
        f"per-repeat ratios (each of the {len(t['step_seconds_all']['lora'])} repeats times every method once, "
        f"in turn, over {t.get('steps_per_timing', 1)} steps in a row). {_memory_note(t)}",
        "",
        "| method | trainable | step × LoRA | per-repeat median [quartiles] | peak memory × LoRA | peak memory MB "
        "| optimizer state MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in _train_methods(t):
        q = t["step_ratio_to_lora_paired_quartiles"][m]
        lines.append(
            f"| {m} | {t['trainable'][m]:,} | {t['step_ratio_to_lora'][m]:.2f} | "
            f"{q[1]:.2f} [{q[0]:.2f}–{q[2]:.2f}] | "
            f"{t['peak_memory_ratio_to_lora'][m]:.2f} | {t['peak_memory_bytes'][m] / 2**20:.0f} | "
            f"{t['optimizer_state_bytes'][m] / 2**20:.2f} |"
        )
    st = result.get("strategies")
    if st:
        tot = st["total_seconds"]
        lines += [
            "",
            f"## Values gradient: strategy per layer ({len(st['layers'])} Linear layers, "
            f"a and b of {st['rows_of_a_and_b']} rows)",
            "",
            *(
                [
                    f"The autotune (the default) picked a strategy within 5% of the fastest for "
                    f"{st['autotune_within_5pct']} of {len(st['layers'])} layers (the fastest itself for "
                    f"{st['autotune_agree']}). "
                ]
                if "autotuned" in tot
                else []
            ),
            f"The cost model (the fallback, `FISHIRD_AUTOTUNE=0`) picked the fastest strategy for {st['agree']} of "
            f"{len(st['layers'])} layers. Total time of all layers' values gradients:",
            "",
            "| strategy | ms | × the cost model's pick |",
            "|---|---|---|",
        ]
        keys = ("autotuned", "chosen", "fastest_per_layer", "density_rule", "sddmm", "dense", "rows", "cols")
        for key in (k for k in keys if k in tot):
            lines.append(f"| {key} | {tot[key] * 1e3:.2f} | {tot[key] / tot['chosen']:.2f} |")
    ird, ad = result["ird_and_size"]["ird"], result["ird_and_size"]["adapter"]
    lines += [
        "",
        "## IRD overhead and adapter size",
        "",
        f"IRD over {ird['num_samples']} samples, {ird['rounds']} rounds, {ird['per_sample_gradients']} per-sample "
        f"gradients: Fisher time {ird['ird_fisher_ratio_to_fish']:.2f}× one FISH Fisher pass; scoring (built-in "
        f"evaluator) {ird['ird_scoring_seconds']:.1f} s on top.",
        "",
        f"Adapter file: {ad['file_bytes']:,} bytes for k = {ad['k']:,} entries + {ad['head_params']} head "
        f"parameters = {ad['ratio_to_bound']:.3f}× k·(4+{ad.get('index_bytes', 8)}) + head·4 "
        f"({ad.get('index_bytes', 8)}-byte indices).",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def _quartile_bars(ratios: dict[str, float], quartiles: Any, names: Any) -> Any:
    """Error bars from the ratio down/up to the per-repeat quartiles (None when not measured)."""
    if not quartiles:
        return None
    return [
        [max(0.0, ratios[n] - quartiles[n][0]) for n in names],
        [max(0.0, quartiles[n][2] - ratios[n]) for n in names],
    ]


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib  # optional dependency ([bench] / [dev] extras): imported only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, t = result["fisher"], result["training"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = list(f["ratio_to_plain_pass"])
    axes[0].bar(
        names,
        [f["ratio_to_plain_pass"][n] for n in names],
        color="tab:blue",
        yerr=_quartile_bars(f["ratio_to_plain_pass"], f.get("ratio_to_plain_pass_paired_quartiles"), names),
        capsize=3,
    )
    axes[0].axhline(1.2, color="red", ls="--", lw=1, label="target 1.2×")
    axes[0].set_title("Fisher time × one plain fwd+bwd pass")
    axes[0].legend()
    quartiles = {"step_ratio_to_lora": t.get("step_ratio_to_lora_paired_quartiles")}
    for ax, key, title in (
        (axes[1], "step_ratio_to_lora", "training step time × LoRA"),
        (axes[2], "peak_memory_ratio_to_lora", "peak memory × LoRA"),
    ):
        methods = _train_methods(t)
        ax.bar(
            methods,
            [t[key][m] for m in methods],
            color="tab:green",
            yerr=_quartile_bars(t[key], quartiles.get(key), methods),
            capsize=3,
        )
        ax.axhline(1.0, color="red", ls="--", lw=1)
        ax.set_title(title)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _train_methods(training: dict) -> list[str]:
    """The training methods a result holds, in TRAIN_METHODS order (older results lack newer methods)."""
    return [m for m in TRAIN_METHODS if m in training["trainable"]]


def _memory_note(t: dict) -> str:
    runs = t.get("peak_memory_bytes_all")
    if runs is None:  # results written before the memory repeats
        return "Peak memory: one fresh process per method."
    n = len(next(iter(runs.values())))
    return (
        f"Peak memory: the median of {n} fresh processes per method, each the peak of three steps after "
        "a first one, counted from the RSS left once the C heap's free memory is returned (glibc "
        "`malloc_trim`, every method alike)."
    )
