"""The speed benchmark's bookkeeping (python -m benchmarks.speed): rotated interleaving, paired-ratio
quartiles in the report, and --only-report rebuilding tables and plot from the JSON alone."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "benchmarks" / "results" / "speed.json"


@pytest.fixture(scope="module")
def speed():
    sys.path.insert(0, str(REPO))
    try:
        with warnings.catch_warnings():  # keep any warning filter a benchmark module sets out of the session
            from benchmarks.speed import harness as module
    finally:
        sys.path.remove(str(REPO))
    return module


def run_speed(*args: str) -> subprocess.CompletedProcess:
    """``python -m benchmarks.speed ARGS`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_interleaving_rotates_which_method_runs_first(speed):
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = speed.interleaved(fns, repeats=3, device="cpu")
    assert order[:3] == ["a", "b", "c"]  # warm-up
    assert order[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_only_report_rebuilds_markdown_and_plot_from_the_json(tmp_path):
    shutil.copy(COMMITTED, tmp_path / "speed.json")
    done = run_speed("--only-report", "--output", str(tmp_path / "speed"))
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "speed.md").read_text()
    result = json.loads(COMMITTED.read_text())
    q = result["training"]["step_ratio_to_lora_paired_quartiles"]["fishird"]
    ratio = result["training"]["step_ratio_to_lora"]["fishird"]
    count = result["training"]["trainable"]["fishird"]
    assert f"| fishird | {count:,} | {ratio:.2f} | {q[1]:.2f} [{q[0]:.2f}–{q[2]:.2f}] |" in md
    assert "Values gradient: strategy per layer" in md
    assert (tmp_path / "speed.png").stat().st_size > 10_000


def test_only_report_without_results_names_the_missing_file(tmp_path):
    done = run_speed("--only-report", "--output", str(tmp_path / "none"))
    assert done.returncode == 2
    assert "none.json does not exist" in done.stderr


def test_paired_quartiles_pair_each_repeat_with_the_reference_and_allow_one_repeat(speed):
    times = {"ref": [1.0, 2.0, 4.0, 8.0], "m": [2.0, 2.0, 2.0, 2.0]}  # ratios 2, 1, 0.5, 0.25
    assert speed.paired_quartiles(times, "ref")["m"] == statistics.quantiles([2.0, 1.0, 0.5, 0.25], n=4)
    assert speed.paired_quartiles(times, "ref")["ref"] == [1.0, 1.0, 1.0]
    assert speed.paired_quartiles({"ref": [2.0], "m": [3.0]}, "ref")["m"] == [1.5, 1.5, 1.5]


def test_a_count_flag_below_one_is_refused_before_anything_runs():
    done = run_speed("--memory-repeats", "0")
    assert done.returncode == 2
    assert "--memory-repeats: '0' is not a whole number of at least 1" in done.stderr
    done = run_speed("--repeats-train", "-1")
    assert done.returncode == 2
    assert "--repeats-train: '-1' is not a whole number of at least 1" in done.stderr
