"""Training-step section: step time, peak memory and optimizer state of FishIRD and its competitors."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, ShiraConfig, get_peft_model

from benchmarks.speed import LORA_TARGETS, TRAIN_METHODS
from benchmarks.speed.harness import as_examples, collate, interleaved, load_model, make_batches, paired_quartiles
from peft_fish_ird import FishIRDConfig
from peft_fish_ird.layer import FishIRDLayer

REPO = Path(__file__).resolve().parents[2]


def build_method(name: str, device: str, keep_ratio: float, examples: list[dict[str, Any]]):
    """(model, optimizer, post_backward hook) for one training method."""
    base = load_model(device)
    hook = None
    if name == "lora":
        model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=8, target_modules=LORA_TARGETS))
    elif name == "shira":
        model = get_peft_model(base, ShiraConfig(task_type="SEQ_CLS", r=8, target_modules=LORA_TARGETS))
    elif name in ("fishird", "fishird_keep", "fishird_reference"):
        config = FishIRDConfig(
            task_type="SEQ_CLS",
            keep_ratio=keep_ratio,
            num_samples=len(examples),
            keep_effective_weight=name == "fishird_keep",
            head_probe_steps=0,  # the step is timed, not the head; no probing in prepare
        )
        model = get_peft_model(base, config)
        model.prepare(examples, data_collator=collate, progress=False)
        for m in model.modules():
            if isinstance(m, FishIRDLayer):
                m.use_fast_path = name != "fishird_reference"
    elif name == "full":
        model = base
    elif name == "fish_dense_mask":
        fish = get_peft_model(
            load_model(device),
            FishIRDConfig(task_type="SEQ_CLS", keep_ratio=keep_ratio, num_samples=len(examples), head_probe_steps=0),
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


def step_fn(model, optimizer, hook, batch, steps: int = 1):
    """``steps`` training steps on ``batch`` (a timing divides by ``steps``: single steps of a few
    hundred ms vary by +-20% on a shared 2-core machine, several in a row average that out)."""

    def step():
        for _ in range(steps):
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
    fns = {m: step_fn(model, opt, hook, batch, args.steps_per_timing) for m, (model, opt, hook, _) in built.items()}
    times = {m: [t / args.steps_per_timing for t in v] for m, v in interleaved(fns, args.repeats_train, device).items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "batch": 16,
        "steps_per_timing": args.steps_per_timing,
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
    out["fishird_strategies_used"] = strategies_used(fishird_model)
    del built, fns
    # fresh processes, methods in turn, the median of --memory-repeats per method
    peaks = {m: [] for m in TRAIN_METHODS}
    for _ in range(args.memory_repeats):
        for m in TRAIN_METHODS:
            peaks[m].append(peak_memory(m, args))
    out["peak_memory_bytes_all"] = peaks
    out["peak_memory_bytes"] = {m: int(statistics.median(v)) for m, v in peaks.items()}
    out["peak_memory_ratio_to_lora"] = {
        m: v / out["peak_memory_bytes"]["lora"] for m, v in out["peak_memory_bytes"].items()
    }
    return out, fishird_model


def strategies_used(model: torch.nn.Module) -> dict[str, int]:
    """How many Linear layers of ``model`` formed their values' gradient by each strategy in the
    timed steps (the autotune's picks at the warm-up step), e.g. {"cols": 20, "sddmm": 12, ...}."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, FishIRDLayer):
            for _, layout in m._layout_cache.values():
                name = getattr(layout, "strategy", None)
                if name is not None:
                    counts[name] = counts.get(name, 0) + 1
    return counts


def peak_memory(method: str, args) -> int:
    """Peak RSS (CPU) or CUDA peak allocation of three training steps after a first one, in a fresh
    process (see ``memory_worker``)."""
    cmd = [sys.executable, "-m", "benchmarks.speed", "--memory-worker", method]
    cmd += ["--device", args.device, "--tokens", str(args.tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker {method} failed:\n{done.stderr[-3000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


def release_free_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc ``malloc_trim``), so that the RSS the
    peak restarts from is memory in use, not what building the method (loading, ``prepare``'s Fisher
    pass) or the first step freed but the allocator kept: the peak is then the steps' own, for every
    method alike. A no-op where glibc is absent."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_worker(method: str, args) -> None:
    """Build ``method``, take one step, then report the peak memory of three more steps (JSON line)."""
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
        release_free_heap()
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS restarts from the RSS now
    for _ in range(3):
        step()
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
        peak = int(line.split()[1]) * 1024
    print(json.dumps({"method": method, "peak_bytes": peak}))
