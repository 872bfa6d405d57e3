"""Does IRD's search have anything to choose between, and can its scorer choose? (issue 12, item 3)

Commands (repository root, one process at a time, 1 thread; resumes):
    OMP_NUM_THREADS=1 python benchmarks/diagnostics/ird_diagnostics.py run [--recipe base] [--seeds 0,1,2]
    python benchmarks/diagnostics/ird_diagnostics.py report

Per seed s (head init, Fisher draw and training order all s, as in benchmarks/quality.py), movie
task, MiniLM, keep_ratio 0.005, the quality benchmark's IRD settings (128-sample pool, shrink 0.5,
min 32 samples, built-in scorer: 16 AdamW steps at lr 1e-3 then minus the loss on the
128-sentence selection split):

1. ``builtin``: ``prepare(selection="ird")`` with the built-in scorer: its trace (one score per
   round) and the round it keeps.
2. ``recorder``: the same search again with ``evaluator=fn``; the Fisher passes (hence the
   candidates) do not depend on the scorer, so ``fn`` sees the same candidate masks. ``fn``
   reads each candidate off the layers, then trains it fully with the main recipe (``--recipe``)
   and records validation and test accuracy; the tuner is restored after each call.

Reported: Jaccard overlap of each round's candidate with round 1 (= the FISH mask) and with the
previous round; Spearman rank correlation between the built-in score and the fully trained
candidate's test accuracy (within each seed, and pooled after centring per seed); the same for
the full-training validation accuracy as a scorer.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402

OUT = C.RESULTS / "ird_diagnostics.json"
MASKS = C.RESULTS / "masks"
KEEP_RATIO = 0.005
NUM_SAMPLES = 128
IRD = {
    "ird_shrink": 0.5,
    "ird_min_samples": 32,
    "ird_rounds": None,
    "ird_eval_steps": 16,
    "ird_eval_batch_size": 16,
    "ird_eval_lr": 1e-3,
    "ird_eval_metric": "loss",
}
RECIPES = {  # the main training each candidate gets in the recorder
    "base": {"lr": 1e-3, "steps": 48},
    "lr1e-2": {"lr": 1e-2, "steps": 48},
    "lr1e-2_steps300": {"lr": 1e-2, "steps": 300},
    "steps144": {"lr": 1e-3, "steps": 144},  # the fixed recipe of fish_stability.py
}


def meta() -> dict:
    return {
        "script": "benchmarks/diagnostics/ird_diagnostics.py",
        "model": "all-MiniLM-L6-v2",
        "task": "movie",
        "splits": C.SIZES,
        "keep_ratio": KEEP_RATIO,
        "num_samples": NUM_SAMPLES,
        "ird": IRD,
        "recipes": RECIPES,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **C.provenance(),
    }


def builtin_run(store: C.Store, data: C.Data, seed: int, shrink: float) -> None:
    key = f"builtin|shrink{shrink}|s{seed}"
    if key in store.done():
        return
    t = time.perf_counter()
    base = C.load_base(data, seed)
    cfg = {**IRD, "ird_shrink": shrink}
    model, record = C.fishird_model(
        base, data, KEEP_RATIO, NUM_SAMPLES, seed, selection_dataset=data.selection, selection="ird", **cfg
    )
    masks = C.layer_masks(model.base_model)
    C.save_masks(MASKS / f"ird_{key.replace('|', '_')}.npz", masks)
    store.append(
        {
            "key": key,
            "kind": "builtin",
            "seed": seed,
            "shrink": shrink,
            "trace": [list(r) for r in record.trace],
            "best_round": record.best_round,
            "mask_sha256": record.mask_sha256,
            "seconds": round(time.perf_counter() - t, 1),
        }
    )
    print(f"{key}: best round {record.best_round}, scores {[r[3] for r in record.trace]}", flush=True)


def candidate_params(tuner) -> list[torch.nn.Parameter]:
    params = [
        p
        for n, p in tuner.named_parameters()
        if ("fishird_" in n and n.endswith("_values.default")) or ".modules_to_save.default." in n
    ]
    for p in params:
        p.requires_grad_(True)
    return params


def recorder_run(store: C.Store, data: C.Data, seed: int, recipe: str, shrink: float) -> None:
    key = f"recorder|{recipe}|shrink{shrink}|s{seed}"
    if key in store.done():
        return
    r = RECIPES.get(recipe, {})
    rounds: list[dict] = []
    first: dict = {}
    prev: dict = {}

    def evaluator(tuner) -> float:
        masks = C.layer_masks(tuner)
        t = len(rounds) + 1
        C.save_masks(MASKS / f"ird_{key.replace('|', '_')}_round{t}.npz", masks)
        if not first:
            first.update(masks)
        row = {
            "round": t,
            "entries": int(sum(v.size for v in masks.values())),
            "jaccard_round1": round(C.jaccard(masks, first), 4),
            "jaccard_prev": round(C.jaccard(masks, prev), 4) if prev else None,
            "group_shares": C.shares(masks, C.module_group),
        }
        prev.clear()
        prev.update(masks)
        if recipe == "none":  # overlap only: no training
            rounds.append(row)
            return 0.0
        start = time.perf_counter()
        params = candidate_params(tuner)
        losses = C.train_loop(tuner, params, data.train, data.collator, r["lr"], r["steps"], seed)
        row.update(
            val=C.evaluate(tuner, data.val, data.collator),
            test=C.evaluate(tuner, data.test, data.collator),
            final_losses=losses[-8:],
            train_seconds=round(time.perf_counter() - start, 1),
        )
        rounds.append(row)
        print(f"  round {t}: J(round1) {row['jaccard_round1']:.3f} test {row['test']['accuracy']:.3f}", flush=True)
        return row["val"]["accuracy"]

    t0 = time.perf_counter()
    base = C.load_base(data, seed)
    cfg = {**IRD, "ird_shrink": shrink}
    _, record = C.fishird_model(
        base,
        data,
        KEEP_RATIO,
        NUM_SAMPLES,
        seed,
        selection_dataset=data.selection,
        evaluator=evaluator,
        selection="ird",
        **cfg,
    )
    store.append(
        {
            "key": key,
            "kind": "recorder",
            "seed": seed,
            "recipe": recipe,
            "shrink": shrink,
            "rounds": rounds,
            "trace_n": [[row[0], row[1], row[2]] for row in record.trace],
            "best_round_by_val_accuracy": record.best_round,
            "seconds": round(time.perf_counter() - t0, 1),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    print(f"{key}: {time.perf_counter() - t0:.0f}s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["run", "report"])
    p.add_argument("--recipe", default="base", choices=sorted(RECIPES) + ["none"], help="none: candidate masks only")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--shrink", type=float, default=0.5)
    args = p.parse_args(argv)
    if args.stage == "report":
        import ird_report

        ird_report.main()
        return 0
    store = C.Store(OUT, meta())
    data = C.load_data("movie")
    for s in [int(x) for x in args.seeds.split(",")]:
        if args.recipe != "none":
            builtin_run(store, data, s, args.shrink)
        recorder_run(store, data, s, args.recipe, args.shrink)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
