"""Command line of the speed benchmark (``python -m benchmarks.speed``; see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from benchmarks.common import atomic_write_json
from benchmarks.speed import __doc__ as DOC
from benchmarks.speed.report import write_markdown, write_plot


def positive_int(value: str) -> int:
    """An argparse type: a whole number of at least 1 (every count and size of the benchmark)."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return n


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.speed", description=DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--tokens", type=positive_int, default=64)
    p.add_argument("--fisher-samples", type=positive_int, default=128)
    p.add_argument("--fisher-batch", type=positive_int, default=32)
    p.add_argument("--repeats-fisher", type=positive_int, default=5)
    p.add_argument("--repeats-train", type=positive_int, default=15)
    p.add_argument("--steps-per-timing", type=positive_int, default=3, help="training steps per timed call")
    p.add_argument("--memory-repeats", type=positive_int, default=3, help="fresh processes per method for peak memory")
    p.add_argument("--repeats-strategy", type=positive_int, default=7)
    p.add_argument(
        "--prepare-samples",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[128, 1024],
        help="sample counts of the prepare section, comma-separated",
    )
    p.add_argument("--repeats-prepare", type=positive_int, default=3)
    p.add_argument("--ird-samples", type=positive_int, default=128)
    p.add_argument("--ird-eval-steps", type=positive_int, default=10)
    p.add_argument("--skip-loop", action="store_true", help="skip the batch-size-1 Fisher loop")
    p.add_argument("--output", default="benchmarks/results/speed", help="path prefix of the .json/.md/.png results")
    p.add_argument(
        "--only-report", action="store_true", help="rebuild the .md and .png from the .json; measure nothing"
    )
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.output)
    if args.only_report:
        if not out.with_suffix(".json").exists():
            p.error(f"--only-report: {out.with_suffix('.json')} does not exist; run the benchmark first.")
        write_report(json.loads(out.with_suffix(".json").read_text()), out)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline model; read once, when transformers is imported below
    warnings.simplefilter("ignore")  # transformers' and peft's notices, once per model built
    # the measuring modules import torch and transformers: imported only now, after the two lines above
    from benchmarks.speed.fisher import bench_fisher, bench_prepare
    from benchmarks.speed.harness import environment, quiet_transformers
    from benchmarks.speed.strategies import bench_ird_and_size, bench_strategies
    from benchmarks.speed.training import bench_training, memory_worker

    quiet_transformers()
    if args.memory_worker:
        memory_worker(args.memory_worker, args)
        return
    result = {
        "command": " ".join(["python -m benchmarks.speed", *sys.argv[1:]]),
        "environment": environment(args.device),
    }
    result["fisher"] = bench_fisher(args)
    result["prepare"] = bench_prepare(args)
    result["training"], fishird_model = bench_training(args)
    result["strategies"] = bench_strategies(args, fishird_model)
    del fishird_model
    result["ird_and_size"] = bench_ird_and_size(args)
    atomic_write_json(out.with_suffix(".json"), result, indent=2)
    write_report(result, out)


def write_report(result: dict, out: Path) -> None:
    write_markdown(result, out.with_suffix(".md"))
    write_plot(result, out.with_suffix(".png"))
