"""Why does FISH swing between seeds? Controlled experiments on the movie task (issue 12, item 2).

Commands (run from the repository root, one at a time, 1 thread; each resumes where it stopped):
    OMP_NUM_THREADS=1 python benchmarks/diagnostics/fish_stability.py masks
    OMP_NUM_THREADS=1 python benchmarks/diagnostics/fish_stability.py train --conditions base,decomp,lr3e-4,...
    python benchmarks/diagnostics/fish_stability.py report

``masks``: Fisher passes only. Jaccard overlap of FISH masks across Fisher seeds (head fixed) at
num_samples 128 / 512 / 768 (= the whole training split), across head-init seeds (Fisher draw
fixed), with a random head and with a linear-probe head; where the budget goes (module types,
layers). ``train``: per-seed accuracy (validation and test) and per-step training loss of the
conditions in ``CONDITIONS``. ``report``: Markdown tables and PNG loss curves from the JSON.

Choices are made on the validation split (400 sentences carved from the training pool, see
common.py); the test split is reported, never chosen on.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

OUT = C.RESULTS / "fish_stability.json"
MASKS = C.RESULTS / "masks"
SEEDS = [0, 1, 2, 3]
DECOMP_SEEDS = [0, 1, 2]


@dataclass(frozen=True)
class Cond:
    method: str = "fish"  # fish | lora
    lr: float = 1e-3
    steps: int = 48
    num_samples: int = 128
    head: str = "random"  # random | probe
    keep_ratio: float = 0.005
    warmup_ratio: float = 0.1
    exclude_pooler: bool = False  # exclude_modules=["pooler.dense"]: the budget goes to the encoder
    budget: str = "global"  # global | per_module


BASE = Cond()
CONDITIONS: dict[str, Cond] = {
    "base": BASE,
    "lr3e-4": replace(BASE, lr=3e-4),
    "lr3e-3": replace(BASE, lr=3e-3),
    "lr1e-2": replace(BASE, lr=1e-2),
    "lr3e-2": replace(BASE, lr=3e-2),
    "ns512": replace(BASE, num_samples=512),
    "probe": replace(BASE, head="probe"),
    "steps300": replace(BASE, steps=300),
    "nowarmup": replace(BASE, warmup_ratio=0.0),
    "lora": replace(BASE, method="lora", lr=2e-3),
    "lora_steps300": replace(BASE, method="lora", lr=2e-3, steps=300),
    "probe_lr3e-3": replace(BASE, head="probe", lr=3e-3),
    "probe_lr1e-2": replace(BASE, head="probe", lr=1e-2),
    "lr1e-2_steps300": replace(BASE, lr=1e-2, steps=300),
    "lr3e-3_steps300": replace(BASE, lr=3e-3, steps=300),
    "probe_lr3e-3_steps300": replace(BASE, head="probe", lr=3e-3, steps=300),
    "probe_lr1e-2_steps300": replace(BASE, head="probe", lr=1e-2, steps=300),
    "nopooler": replace(BASE, exclude_pooler=True),
    "nopooler_lr1e-2": replace(BASE, exclude_pooler=True, lr=1e-2),
    "permodule": replace(BASE, budget="per_module"),
    "steps144": replace(BASE, steps=144),
    "lr3e-4_steps144": replace(BASE, lr=3e-4, steps=144),
    "nopooler_steps144": replace(BASE, exclude_pooler=True, steps=144),
    "lora_steps144": replace(BASE, method="lora", lr=2e-3, steps=144),
    "kr002": replace(BASE, keep_ratio=0.002),
    "kr002_probe_lr1e-2": replace(BASE, keep_ratio=0.002, head="probe", lr=1e-2),
    "kr002_lr1e-2": replace(BASE, keep_ratio=0.002, lr=1e-2),
}


def seed_triples(name: str) -> list[tuple[int, int, int]]:
    """(head, fisher, order) seeds of a condition; 'decomp_*' vary one factor with the others at 0."""
    if name == "decomp_head":
        return [(s, 0, 0) for s in DECOMP_SEEDS]
    if name == "decomp_fisher":
        return [(0, s, 0) for s in DECOMP_SEEDS]
    if name == "decomp_order":
        return [(0, 0, s) for s in DECOMP_SEEDS]
    return [(s, s, s) for s in SEEDS]


def cond_of(name: str) -> Cond:
    return BASE if name.startswith("decomp_") else CONDITIONS[name]


def meta() -> dict:
    return {
        "script": "benchmarks/diagnostics/fish_stability.py",
        "model": "all-MiniLM-L6-v2",
        "task": "movie",
        "splits": C.SIZES,
        "split_seed": 0,
        "max_length": C.MAX_LENGTH,
        "batch_size": C.BATCH,
        "recipe": "plain torch loop = HF Trainer defaults: AdamW wd 0, linear warm-up/decay, clip 1.0",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **C.provenance(),
    }


# ------------------------------------------------------------------------------------------- masks
def mask_key(hs: int, fs: int, ns: int, head: str, kr: float) -> str:
    return f"mask|kr{kr}|ns{ns}|head-{head}|hs{hs}|fs{fs}"


def make_base(data: C.Data, head: str, hs: int) -> tuple[torch.nn.Module, dict]:
    base = C.load_base(data, hs)
    info = C.linear_probe(base, data) if head == "probe" else {}
    return base, info


def mask_run(store: C.Store, data: C.Data, hs: int, fs: int, ns: int, head: str, kr: float) -> None:
    key = mask_key(hs, fs, ns, head, kr)
    if key in store.done():
        return
    t = time.perf_counter()
    base, info = make_base(data, head, hs)
    model, record = C.fishird_model(base, data, kr, ns, fs)
    masks = C.layer_masks(model.base_model)
    C.save_masks(MASKS / f"{key.replace('|', '_')}.npz", masks)
    store.append(
        {
            "key": key,
            "kind": "mask",
            "head_seed": hs,
            "fisher_seed": fs,
            "num_samples": ns,
            "head": head,
            "keep_ratio": kr,
            "k": record.k,
            "selected_fisher_share": record.score_summary.get("selected_fisher_share"),
            "threshold": record.score_summary.get("threshold"),
            "max_score": record.score_summary.get("max"),
            "group_shares": C.shares(masks, C.module_group),
            "layer_shares": C.shares(masks, C.layer_of),
            **info,
            "seconds": round(time.perf_counter() - t, 1),
        }
    )
    print(f"{key}: {time.perf_counter() - t:.0f}s", flush=True)


def masks_plan(kr: float) -> list[tuple[int, int, int, str]]:
    plan = [(0, f, 128, "random") for f in range(4)]  # Fisher draw varies, head fixed
    plan += [(h, 0, 128, "random") for h in range(1, 4)]  # head varies, Fisher draw fixed
    plan += [(h, 0, 128, "probe") for h in range(4)]  # head varies, probe head
    plan += [(0, f, 512, "random") for f in range(4)]  # larger Fisher sample
    plan += [(0, 0, 768, "random")]  # the whole training split: no draw left
    plan += [(h, 0, 768, "random") for h in range(1, 3)]  # head varies with no draw at all
    return plan


# ------------------------------------------------------------------------------------------- train
def train_key(name: str, hs: int, fs: int, os_: int) -> str:
    c = cond_of(name)
    return f"train|{name}|{c.method}|kr{c.keep_ratio}|hs{hs}|fs{fs}|os{os_}"


def lora_model(base):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(task_type="SEQ_CLS", r=12, lora_alpha=24, target_modules=["query", "value"], lora_dropout=0.0)
    return get_peft_model(base, cfg)


def train_run(store: C.Store, data: C.Data, name: str, hs: int, fs: int, os_: int) -> None:
    if name.startswith("decomp_") and hs == fs == os_:
        name = "base"  # the all-equal triple of a decomposition is the base run itself
    key = train_key(name, hs, fs, os_)
    if key in store.done():
        return
    c = cond_of(name)
    t = time.perf_counter()
    base, info = make_base(data, c.head, hs)
    rec: dict = {}
    if c.method == "lora":
        model = lora_model(base)
    else:
        extra = {"exclude_modules": ["pooler.dense"]} if c.exclude_pooler else {}
        model, record = C.fishird_model(base, data, c.keep_ratio, c.num_samples, fs, budget=c.budget, **extra)
        masks = C.layer_masks(model.base_model)
        C.save_masks(MASKS / f"{key.replace('|', '_')}.npz", masks)
        rec = {"group_shares": C.shares(masks, C.module_group), "k": record.k}
    params = C.trainable_params(model)
    losses = C.train_loop(model, params, data.train, data.collator, c.lr, c.steps, os_, c.warmup_ratio)
    store.append(
        {
            "key": key,
            "kind": "train",
            "condition": name,
            "cond": asdict(c),
            "head_seed": hs,
            "fisher_seed": fs,
            "order_seed": os_,
            "trainable": sum(p.numel() for p in params),
            "val": C.evaluate(model, data.val, data.collator),
            "test": C.evaluate(model, data.test, data.collator),
            "losses": losses,
            **rec,
            **info,
            "seconds": round(time.perf_counter() - t, 1),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    r = store.get(key)
    print(f"{key}: val {r['val']['accuracy']:.3f} test {r['test']['accuracy']:.3f} {r['seconds']:.0f}s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["masks", "train", "report"])
    p.add_argument("--conditions", default="base", help="comma list of CONDITIONS names or decomp_head/fisher/order")
    p.add_argument("--keep-ratio", type=float, default=0.005, help="masks stage")
    p.add_argument("--seeds", default=None, help="comma list overriding the default seeds 0..4")
    args = p.parse_args(argv)
    if args.stage == "report":
        import fish_stability_report

        fish_stability_report.main()
        return 0
    if args.seeds:
        SEEDS[:] = [int(s) for s in args.seeds.split(",")]
    store = C.Store(OUT, meta())
    data = C.load_data("movie")
    if args.stage == "masks":
        for hs, fs, ns, head in masks_plan(args.keep_ratio):
            mask_run(store, data, hs, fs, ns, head, args.keep_ratio)
    else:
        for name in args.conditions.split(","):
            for hs, fs, os_ in seed_triples(name):
                train_run(store, data, name, hs, fs, os_)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
