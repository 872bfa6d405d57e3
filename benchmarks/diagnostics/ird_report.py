"""Tables of ``results/ird_diagnostics.json`` -> ``results/ird_diagnostics.md``.

Command: python benchmarks/diagnostics/ird_diagnostics.py report
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import numpy as np  # noqa: E402

SRC = C.RESULTS / "ird_diagnostics.json"
MD = C.RESULTS / "ird_diagnostics.md"


def centred(groups: list[list[float]]) -> list[float]:
    return [v - float(np.mean(g)) for g in groups for v in g]


def same_candidates(builtin: dict, recorder: dict, kept: int) -> str:
    """Jaccard of the built-in run's final mask and the recorder's candidate of the same round (1.0 expected)."""
    a = C.RESULTS / "masks" / f"ird_{builtin['key'].replace('|', '_')}.npz"
    b = C.RESULTS / "masks" / f"ird_{recorder['key'].replace('|', '_')}_round{kept}.npz"
    if not (a.exists() and b.exists()):
        return "n/a"
    return f"J = {C.jaccard(C.load_masks(a), C.load_masks(b)):.4f}"


def overlap_only(rs: list[dict], shrink: float) -> list[str]:
    """Candidate overlap with round 1 (the FISH mask), from mask-only recorder runs (no training)."""
    out = [
        f"## Candidate overlap (mask-only runs, shrink {shrink}, seeds {sorted(r['seed'] for r in rs)})",
        "",
        "| seed | round | samples | params in range | J(round 1 = FISH) | J(previous) | pooler share |",
        "|---|---|---|---|---|---|---|",
    ]
    per_round: dict[int, list[float]] = {}
    for r in sorted(rs, key=lambda r: r["seed"]):
        for row, tr in zip(r["rounds"], r["trace_n"]):
            jp = "" if row["jaccard_prev"] is None else f"{row['jaccard_prev']:.3f}"
            out.append(
                f"| {r['seed']} | {row['round']} | {tr[1]} | {tr[2]:,} | {row['jaccard_round1']:.3f} | {jp} | "
                f"{100 * row['group_shares'].get('pooler', 0):.1f}% |"
            )
            per_round.setdefault(row["round"], []).append(row["jaccard_round1"])
    out += [
        "",
        "Mean Jaccard with round 1 by round: "
        + ", ".join(f"round {t}: {np.mean(v):.3f} (n={len(v)})" for t, v in sorted(per_round.items())),
        "",
    ]
    return out


def main() -> None:
    d = json.loads(SRC.read_text())
    runs = {r["key"]: r for r in d["runs"]}
    out = [
        "# IRD diagnostics: tables (generated)",
        "",
        f"Built by `python benchmarks/diagnostics/ird_diagnostics.py report` from `ird_diagnostics.json`. "
        f"MiniLM, movie, keep {d['meta']['keep_ratio']}, Fisher pool {d['meta']['num_samples']}, IRD settings "
        f"{d['meta']['ird']}. Built-in score = minus the selection-split loss after the 16-step scorer fine-tune. "
        "Each candidate was then trained fully with the recipe named in the table and evaluated on the validation "
        "split (400) and the test split (400).",
        "",
    ]
    recs = [r for r in d["runs"] if r["kind"] == "recorder"]
    by_recipe: dict[tuple, list[dict]] = {}
    for r in recs:
        by_recipe.setdefault((r["recipe"], r["shrink"]), []).append(r)
    for (recipe, shrink), rs in by_recipe.items():
        if recipe == "none":
            out += overlap_only(rs, shrink)
            continue
        out += [f"## recipe `{recipe}` ({d['meta']['recipes'][recipe]}), shrink {shrink}", ""]
        out += [
            "| seed | round | samples | params in range | built-in score | J(round 1 = FISH) | J(previous) | "
            "pooler share | val acc % | test acc % |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        score_g, test_g, val_g = [], [], []
        notes = []
        for r in sorted(rs, key=lambda r: r["seed"]):
            b = runs.get(f"builtin|shrink{shrink}|s{r['seed']}")
            scores = [row[3] for row in b["trace"]] if b else [None] * len(r["rounds"])
            trace = b["trace"] if b else r["trace_n"]
            for row, sc, tr in zip(r["rounds"], scores, trace):
                jp = "" if row["jaccard_prev"] is None else f"{row['jaccard_prev']:.3f}"
                out.append(
                    f"| {r['seed']} | {row['round']} | {tr[1]} | {tr[2]:,} | {sc:.4f} | {row['jaccard_round1']:.3f} | "
                    f"{jp} | {100 * row['group_shares'].get('pooler', 0):.1f}% | {100 * row['val']['accuracy']:.1f} | "
                    f"{100 * row['test']['accuracy']:.1f} |"
                )
            test = [row["test"]["accuracy"] for row in r["rounds"]]
            val = [row["val"]["accuracy"] for row in r["rounds"]]
            if b:
                score_g.append(scores)
                test_g.append(test)
                val_g.append(val)
                kept = b["best_round"]
                best_test = int(np.argmax(test)) + 1
                same = same_candidates(b, r, kept)
                notes.append(
                    f"seed {r['seed']}: built-in keeps round {kept} (test {100 * test[kept - 1]:.1f}); "
                    f"best candidate on test is round {best_test} ({100 * max(test):.1f}); by validation "
                    f"accuracy round {int(np.argmax(val)) + 1}; built-in score range {max(scores) - min(scores):.4f}, "
                    f"test range {100 * (max(test) - min(test)):.1f} pp; within-seed Spearman(score, test) "
                    f"{C.spearman(scores, test):.2f}; built-in's kept mask = recorder's round-{kept} candidate: {same}"
                )
        out += ["", *[f"- {n}" for n in notes], ""]
        if score_g:
            out += [
                "| scorer | Spearman with test acc (pooled, centred per seed) | mean within-seed Spearman | n |",
                "|---|---|---|---|",
                f"| built-in (16 steps, selection loss) | {C.spearman(centred(score_g), centred(test_g)):.2f} | "
                f"{np.nanmean([C.spearman(s, t) for s, t in zip(score_g, test_g)]):.2f} | {sum(map(len, test_g))} |",
                f"| full training, validation accuracy | {C.spearman(centred(val_g), centred(test_g)):.2f} | "
                f"{np.nanmean([C.spearman(v, t) for v, t in zip(val_g, test_g)]):.2f} | {sum(map(len, test_g))} |",
                "",
            ]
    MD.write_text("\n".join(out))
    print(f"wrote {MD}")


if __name__ == "__main__":
    main()
