"""Tables and loss-curve plots of ``results/fish_stability.json`` -> ``results/fish_stability.md`` + PNGs.

Command: python benchmarks/diagnostics/fish_stability.py report
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import numpy as np  # noqa: E402

SRC = C.RESULTS / "fish_stability.json"
MD = C.RESULTS / "fish_stability.md"
MASKS = C.RESULTS / "masks"


def mask_file(key: str) -> Path:
    return MASKS / f"{key.replace('|', '_')}.npz"


def overlap_block(runs: list[dict], label: str, title: str) -> tuple[list[str], float]:
    runs = [r for r in runs if mask_file(r["key"]).exists()]
    masks = [C.load_masks(mask_file(r["key"])) for r in runs]
    names = [f"{label}{r[label_field(label)]}" for r in runs]
    lines = [f"**{title}**", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    off = []
    for i, a in enumerate(masks):
        row = []
        for j, b in enumerate(masks):
            v = C.jaccard(a, b)
            row.append(f"{v:.3f}")
            if i < j:
                off.append(v)
        lines.append(f"| {names[i]} | " + " | ".join(row) + " |")
    mean = float(np.mean(off)) if off else float("nan")
    lines += ["", f"mean off-diagonal Jaccard: **{mean:.3f}**", ""]
    return lines, mean


def label_field(label: str) -> str:
    return {"fs": "fisher_seed", "hs": "head_seed", "os": "order_seed"}[label]


def pick(runs, **kw):
    return [r for r in runs if all(r.get(k) == v for k, v in kw.items())]


def pooler_rows(masks_runs: list[dict], data) -> list[str]:
    """Does the random head pick the pooler rows? Spearman(selected entries per pooler row, (w1 - w0)^2)."""
    lines = [
        "**Which pooler rows get the budget?** For a binary head the gradient reaching pooled unit i is "
        "(p1 - y1)(w1i - w0i), so the Fisher of pooler row i scales with (w1i - w0i)^2 of the *head init*.",
        "",
        "| mask (head init, Fisher seed) | pooler entries selected | share of pooler selected | "
        "Spearman(row count, (w1-w0)^2) | top-10% rows by (w1-w0)^2 hold |",
        "|---|---|---|---|---|",
    ]
    for r in masks_runs:
        if r["head"] != "random" or not mask_file(r["key"]).exists():
            continue
        masks = C.load_masks(mask_file(r["key"]))
        idx = masks.get("bert.pooler.dense.weight")
        if idx is None:
            continue
        base = C.load_base(data, r["head_seed"])
        w = base.classifier.weight.detach().numpy()
        d = (w[1] - w[0]) ** 2
        dim = base.bert.pooler.dense.weight.shape[1]
        counts = np.bincount(idx // dim, minlength=d.size)
        top = np.argsort(-d)[: d.size // 10]
        lines.append(
            f"| hs{r['head_seed']} fs{r['fisher_seed']} ns{r['num_samples']} | {idx.size:,} | "
            f"{idx.size / (d.size * dim):.1%} | {C.spearman(counts.tolist(), d.tolist()):.3f} | "
            f"{counts[top].sum() / max(1, counts.sum()):.1%} |"
        )
    return lines + [""]


def stats(v: list[float]) -> str:
    a = 100 * np.asarray(v)
    sd = a.std(ddof=1) if a.size > 1 else 0.0
    return f"{a.mean():.1f} ± {sd:.1f} [{a.min():.1f}, {a.max():.1f}]"


def by_condition(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs per condition; each decomp_* condition also gets the base run with all three seeds 0."""
    conds: dict[str, list[dict]] = {}
    for r in runs:
        conds.setdefault(r["condition"], []).append(r)
    zero = [r for r in conds.get("base", []) if r["head_seed"] == r["fisher_seed"] == r["order_seed"] == 0]
    for name in conds:
        if name.startswith("decomp_"):
            conds[name] = zero + conds[name]
    return conds


def train_tables(runs: list[dict]) -> list[str]:
    conds = by_condition(runs)
    lines = [
        "| condition | method | lr | steps | Fisher n | head | keep | seeds | val acc % mean ± std [min, max] | "
        "test acc % mean ± std [min, max] | test per seed | last-8-step train loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in conds.items():
        c = rs[0]["cond"]
        rs = sorted(rs, key=lambda r: (r["head_seed"], r["fisher_seed"], r["order_seed"]))
        per = ", ".join(f"{100 * r['test']['accuracy']:.1f}" for r in rs)
        last = np.mean([np.mean(r["losses"][-8:]) for r in rs])
        fisher_n = c["num_samples"] if c["method"] == "fish" else ""
        lines.append(
            f"| {name} | {c['method']} | {c['lr']:g} | {c['steps']} | {fisher_n} "
            f"| {c['head']} | {c['keep_ratio']:g} | {len(rs)} | {stats([r['val']['accuracy'] for r in rs])} | "
            f"{stats([r['test']['accuracy'] for r in rs])} | {per} | {last:.3f} |"
        )
    return lines + [""]


def loss_plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = by_condition(runs)
    names = list(conds)
    cols = 4
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharey=False)
    for ax, name in zip(axes.flat, names):
        for r in sorted(conds[name], key=lambda r: r["key"]):
            y = np.asarray(r["losses"])
            w = max(1, len(y) // 24)
            sm = np.convolve(y, np.ones(w) / w, mode="valid")
            lab = f"h{r['head_seed']} f{r['fisher_seed']} o{r['order_seed']}: {100 * r['test']['accuracy']:.0f}%"
            ax.plot(np.arange(sm.size) + w, sm, lw=1, label=lab)
        ax.set_title(name, fontsize=9)
        top = max(np.asarray(r["losses"]).max() for r in conds[name])
        ax.set_ylim(0.2, 0.85 if top < 0.9 else min(4.5, 1.05 * top))
        ax.axhline(np.log(2), color="grey", lw=0.5, ls=":")
        ax.legend(fontsize=6)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("training loss (moving average)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    d = json.loads(SRC.read_text())
    runs = d["runs"]
    mruns = [r for r in runs if r["kind"] == "mask"]
    truns = [r for r in runs if r["kind"] == "train"]
    out = [
        "# FISH seed stability: tables (generated)",
        "",
        f"Built by `python benchmarks/diagnostics/fish_stability.py report` from `fish_stability.json` "
        f"({len(runs)} runs). MiniLM, movie task, splits {d['meta']['splits']}, {d['meta']['max_length']} tokens. "
        "Jaccard = |A ∩ B| / |A ∪ B| over all selected entries.",
        "",
        "## 1. Mask overlap",
        "",
    ]
    summary = []
    for kr in sorted({r["keep_ratio"] for r in mruns}):
        for title, sel, lab in [
            ("Fisher seeds, head init 0, 128 samples", dict(head_seed=0, num_samples=128, head="random"), "fs"),
            ("Fisher seeds, head init 0, 512 samples", dict(head_seed=0, num_samples=512, head="random"), "fs"),
            ("head-init seeds, Fisher seed 0, 128 samples", dict(fisher_seed=0, num_samples=128, head="random"), "hs"),
            ("head-init seeds, whole train split (768 samples)", dict(num_samples=768, head="random"), "hs"),
            (
                "head-init seeds, linear-probe head, 128 samples",
                dict(fisher_seed=0, num_samples=128, head="probe"),
                "hs",
            ),
        ]:
            rs = pick(mruns, keep_ratio=kr, **sel)
            if len(rs) < 2:
                continue
            block, mean = overlap_block(rs, lab, f"keep {kr:g}: {title}")
            out += block
            summary.append(f"| {kr:g} | {title} | {len(rs)} | {mean:.3f} |")
        ref = pick(mruns, keep_ratio=kr, head_seed=0, fisher_seed=0, num_samples=768, head="random")
        if ref:
            full = C.load_masks(mask_file(ref[0]["key"]))
            for ns in (128, 512):
                rs = pick(mruns, keep_ratio=kr, head_seed=0, num_samples=ns, head="random")
                if rs:
                    v = [C.jaccard(full, C.load_masks(mask_file(r["key"]))) for r in rs]
                    summary.append(
                        f"| {kr:g} | {ns}-sample masks vs the 768-sample mask (head 0) | {len(rs)} | {np.mean(v):.3f} |"
                    )
    out = out[:6] + ["| keep | comparison | masks | mean Jaccard |", "|---|---|---|---|", *summary, ""] + out[6:]
    out += ["## 2. Where the budget goes (share of selected entries)", ""]
    groups = sorted({g for r in mruns for g in r["group_shares"]})
    layers = sorted({g for r in mruns for g in r["layer_shares"]})
    show = [r for r in mruns if r["num_samples"] == 128 and r["fisher_seed"] == 0]
    out += [
        "| mask | " + " | ".join(layers) + " | selected Fisher share | probe val acc |",
        "|---" * (len(layers) + 3) + "|",
    ]
    for r in show:
        out.append(
            f"| {r['head']} hs{r['head_seed']} kr{r['keep_ratio']:g} | "
            + " | ".join(f"{100 * r['layer_shares'].get(g, 0):.1f}" for g in layers)
            + f" | {r['selected_fisher_share']:.3f} | {r.get('probe_val_accuracy', '')} |"
        )
    out += ["", "| mask | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for r in show:
        out.append(
            f"| {r['head']} hs{r['head_seed']} | "
            + " | ".join(f"{100 * r['group_shares'].get(g, 0):.1f}" for g in groups)
            + " |"
        )
    out.append("")
    data = C.load_data("movie")
    out += pooler_rows(show + pick(mruns, num_samples=768), data)
    if truns:
        out += ["## 3. Per-seed accuracy by condition", "", *train_tables(truns)]
        out += [
            "Seeds: `base`, `lr*`, `probe*`, ... use head = Fisher = order seed s; `decomp_head` varies only the "
            "head init (Fisher draw and order at 0), `decomp_fisher` only the Fisher draw, `decomp_order` only the "
            "training order / dropout.",
            "",
        ]
        tr_masks = [r for r in truns if r["cond"]["method"] == "fish" and mask_file(r["key"]).exists()]
        by: dict[str, list[dict]] = {}
        for r in tr_masks:
            by.setdefault(r["condition"], []).append(r)
        lines = ["| condition | mean pairwise Jaccard of the trained masks | pooler share of budget |", "|---|---|---|"]
        for name, rs in by.items():
            ms = [C.load_masks(mask_file(r["key"])) for r in rs]
            js = [C.jaccard(ms[i], ms[j]) for i in range(len(ms)) for j in range(i + 1, len(ms))]
            pool = np.mean([r["group_shares"].get("pooler", 0.0) for r in rs])
            lines.append(f"| {name} | {np.mean(js) if js else float('nan'):.3f} | {100 * pool:.1f}% |")
        out += lines + [""]
        png = C.RESULTS / "fish_stability_losses.png"
        loss_plot(truns, png)
        out += [f"![training loss per seed]({png.name})", ""]
    MD.write_text("\n".join(out))
    print(f"wrote {MD}")


if __name__ == "__main__":
    main()
