"""FishIRD vs QLoRA on a bitsandbytes-quantized SmolLM2-135M: training step time and memory.

    python -m benchmarks.quantized                 # nf4, int8 and float32, 2 rounds, ~15 minutes on 2 CPU cores
    python -m benchmarks.quantized --quant nf4 --rounds 1 --steps 6

Both methods train the same quantized base (LoRA: PEFT's QLoRA recipe, r=8 on every linear
layer; FishIRD: its default targets at the same trainable count, mask from 64 samples); the
``float32`` base makes the same comparison on the unquantized model (plain LoRA). Every
(method, quantization) measurement runs in a fresh subprocess, alternating the methods round by
round, so one method's allocations never inflate the other's. Per run:

* FishIRD's mask is prepared once per quantization in its own process and saved; its training runs
  load that adapter, so neither method's process holds memory from anything but training;
* ``step_s``: median wall time of a training step (forward, backward, AdamW step) after 2 warm-up
  steps, batch 8 x 64 tokens of the movie sentences as causal-LM text;
* ``train_peak_mib``: peak resident memory during the warm-up and timed steps, minus the resident
  memory just before the first step (what training adds on top of the loaded model and adapter),
  sampled every 2 ms; ``rss_mib``: the resident memory before the first step;
* FishIRD also reports ``prepare_s`` and ``prepare_peak_mib`` (Fisher pass and selection, on 64
  samples, in the prepare process).

Ratios are FishIRD / LoRA within a round, then the median over rounds. Results are appended to
``benchmarks/results/quantized.json`` and summarised in ``quantized.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
QUANTS = ("nf4", "int8", "float32")  # float32: the same comparison on the unquantized model (plain LoRA)
METHODS = ("lora", "fishird")
LORA_R = 8


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """Highest resident memory seen while the block runs, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def __enter__(self) -> "PeakSampler":
        self.peak = rss_mib()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def one_run(method: str, quant: str, steps: int, adapter_dir: str) -> dict[str, Any]:
    """Load the quantized base, build the adapter, time ``steps`` training steps (in this process).

    ``method="prepare"``: FishIRD's prepare only, saved to ``adapter_dir``; ``"fishird"`` loads that
    adapter (trainable), so its process holds no memory left from the Fisher pass."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from benchmarks.quality.models import smollm2_folder
    from peft_fish_ird import FishIRDConfig
    from peft_fish_ird.offline_data import load_hutto

    torch.manual_seed(0)
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if quant == "float32":
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    else:
        if quant == "int8":
            qconfig = BitsAndBytesConfig(load_in_8bit=True)
        else:
            qconfig = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_compute_dtype=torch.float32
            )
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qconfig, device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    texts = [row.text for row in load_hutto("movie")[: 8 * (steps + 2) + 64]]
    enc = tokenizer(texts, max_length=64, truncation=True, padding="max_length", return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    rows = [
        {"input_ids": i, "attention_mask": a, "labels": y}
        for i, a, y in zip(enc["input_ids"], enc["attention_mask"], labels)
    ]
    lora = LoraConfig(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=2 * LORA_R, target_modules="all-linear")
    out: dict[str, Any] = {"method": method, "quant": quant, "steps": steps}
    if method == "lora":
        model = get_peft_model(model, lora)
    elif method == "fishird":
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    else:
        count, n_all = lora_count(model), logical_parameters(model)
        config = FishIRDConfig(task_type="CAUSAL_LM", keep_ratio=(count + 0.5) / n_all, num_samples=64)
        model = get_peft_model(model, config)  # k = int(keep_ratio * n_all) = LoRA's count
        before = rss_mib()
        start = time.perf_counter()
        with PeakSampler() as peak:
            model.prepare(
                rows[-64:], data_collator=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]}, progress=False
            )
        out["prepare_s"] = time.perf_counter() - start
        out["prepare_peak_mib"] = peak.peak - before
        model.save_pretrained(adapter_dir)
        return out
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = [{k: torch.stack([r[k] for r in rows[i : i + 8]]) for k in rows[0]} for i in range(0, 8 * (steps + 2), 8)]

    def step(batch: dict[str, torch.Tensor]) -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out["rss_mib"] = rss_mib()
    times = []
    with PeakSampler() as peak:
        for batch in batches[:2]:  # warm-up, inside the memory window: its allocations are training's
            step(batch)
        for batch in batches[2:]:
            start = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - start)
    out["step_s"] = statistics.median(times)
    out["train_peak_mib"] = peak.peak - out["rss_mib"]
    out["peak_rss_mib"] = peak.peak
    return out


def lora_count(model: Any) -> int:
    """LoRA's trainable count at r=LORA_R on every linear layer but the output head (PEFT's "all-linear")."""
    from torch import nn

    out = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not out]
    return sum(LORA_R * (m.in_features + m.out_features) for m in linears)


def logical_parameters(model: Any) -> int:
    """All parameters with packed 4-bit weights counted at their unpacked size (what FishIRD's budget uses)."""
    from peft_fish_ird.layer_types.bnb import packed_numel

    return sum(packed_numel(p) or p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantized", description=__doc__.split("\n")[0])
    p.add_argument("--quant", choices=QUANTS, action="append", help="quantizations to run (default: all)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--one", nargs=3, metavar=("METHOD", "QUANT", "ADAPTER_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:  # the subprocess
        print("RESULT " + json.dumps(one_run(*args.one[:2], args.steps, args.one[2])))
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        prepares = {q: subprocess_run("prepare", q, args.steps, f"{tmp}/{q}") for q in args.quant or QUANTS}
        for round_ in range(args.rounds):
            for quant in args.quant or QUANTS:
                order = METHODS if round_ % 2 == 0 else METHODS[::-1]
                for method in order:
                    run = {**subprocess_run(method, quant, args.steps, f"{tmp}/{quant}"), "round": round_}
                    if method == "fishird":
                        run.update({k: v for k, v in prepares[quant].items() if k.startswith("prepare")})
                    print(json.dumps(run), flush=True)
                    runs.append(run)
    write(runs)


def subprocess_run(method: str, quant: str, steps: int, adapter_dir: str) -> dict[str, Any]:
    """``one_run`` in a fresh Python process (its memory is its own)."""
    cmd = [sys.executable, "-m", "benchmarks.quantized", "--one", method, quant, adapter_dir, "--steps", str(steps)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{method} {quant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def write(runs: list[dict[str, Any]]) -> None:
    import torch

    from benchmarks.common import atomic_write_json, atomic_write_text

    path = RESULTS / "quantized.json"
    old = json.loads(path.read_text())["sessions"] if path.exists() else []
    env = {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M")}
    sessions = [*old, {"env": env, "runs": runs}]
    atomic_write_json(path, {"sessions": sessions})
    atomic_write_text(RESULTS / "quantized.md", report(sessions[-1]))


def report(session: dict[str, Any]) -> str:
    runs = session["runs"]
    lines = [
        "# FishIRD vs (Q)LoRA on SmolLM2-135M: quantized (bitsandbytes) and float32 bases",
        "",
        f"Built by `python -m benchmarks.quantized` ({session['env']['when']}, torch {session['env']['torch']}, "
        f"{session['env']['cpu_threads']} CPU threads). Batch 8 x 64 tokens, AdamW; LoRA r={LORA_R} on all linear "
        "layers (PEFT's QLoRA recipe), FishIRD at the same trainable count. Each number is the median over "
        "rounds; ratios are FishIRD / LoRA within a round, then the median.",
        "",
        "| base | method | trainable | step s | training memory MiB | resident MiB before training | prepare s "
        "(peak MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for quant in dict.fromkeys(r["quant"] for r in runs):
        for method in METHODS:
            sel = [r for r in runs if r["quant"] == quant and r["method"] == method]
            if not sel:
                continue
            med = {k: statistics.median(r[k] for r in sel) for k in ("step_s", "train_peak_mib", "rss_mib")}
            prep = f"{sel[0]['prepare_s']:.1f} ({sel[0]['prepare_peak_mib']:.0f})" if method == "fishird" else ""
            lines.append(
                f"| {quant} | {method} | {sel[0]['trainable']:,} | {med['step_s']:.3f} | {med['train_peak_mib']:.0f} | "
                f"{med['rss_mib']:.0f} | {prep} |"
            )
        pairs = [
            (f, lo)
            for f in runs
            for lo in runs
            if f["quant"] == lo["quant"] == quant
            and f["round"] == lo["round"]
            and (f["method"], lo["method"]) == METHODS[::-1]
        ]
        if pairs:
            step = statistics.median(f["step_s"] / lo["step_s"] for f, lo in pairs)
            mem = statistics.median(f["train_peak_mib"] / max(lo["train_peak_mib"], 1e-9) for f, lo in pairs)
            ratios.append(
                f"* {quant}: step time FishIRD / LoRA = {step:.2f}x, training memory = {mem:.2f}x ({len(pairs)} rounds)"
            )
    return "\n".join(lines + ["", *ratios, ""])


if __name__ == "__main__":
    main()
