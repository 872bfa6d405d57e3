"""Command line of the quality benchmark (``python -m benchmarks.quality``; the docstring of ``__init__``)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Optional

from benchmarks.quality import __doc__ as DOC
from benchmarks.quality.plan import (
    DEFAULT_CONFIG,
    GRID_PHASE,
    METHODS,
    OFFLINE_TASKS,
    RESULTS_NAME,
    BenchmarkError,
    Cell,
    Experiment,
    apply_flags,
    load_profile,
    needs_hub,
    plan,
    reuses_grid,
)
from benchmarks.quality.report import write_report as report
from benchmarks.quality.reuse import EarlierRuns
from benchmarks.quality.store import ResultStore

logger = logging.getLogger("quality")


def csv_list(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality", description=DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="JSON file with the profiles")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--profile", default=None, help="profile of the config to run (default: 'default')")
    which.add_argument("--smoke", action="store_true", help="the 'smoke' profile: tiny slice, about a minute")
    which.add_argument("--full", action="store_true", help="the 'full' profile: paper scale, GPU and internet")
    p.add_argument(
        "--output-dir", type=Path, default=None, help="where quality.json/.md and plots go (default: the profile's)"
    )
    p.add_argument("--experiments", type=csv_list(str), default=None, help="keep only these experiments of the profile")
    p.add_argument("--model", default=None, help="a configured model key (keep its experiments) or a path / hub name")
    p.add_argument(
        "--tasks",
        "--task",
        type=csv_list(str),
        default=None,
        help=f"replace the task lists: {', '.join(OFFLINE_TASKS)}, glue/<name> (online)",
    )
    p.add_argument(
        "--methods", type=csv_list(str), default=None, help=f"replace the method lists: {', '.join(METHODS)}"
    )
    p.add_argument("--keep-ratios", type=csv_list(float), default=None, help="replace the budgets, e.g. 0.002,0.005")
    p.add_argument("--seeds", type=csv_list(int), default=None, help="replace the seeds, e.g. 0,1,2")
    p.add_argument("--only-report", action="store_true", help="rebuild quality.md and plots from the JSON; run nothing")
    p.add_argument("--list", action="store_true", help="log the planned runs (and which are done); run nothing")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"], help="logging detail")
    return p.parse_args(argv)


def profile_name(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "full" if args.full else args.profile or "default"


def copy_note(earlier: EarlierRuns, cell: Cell, exp: Experiment) -> str:
    """For --list: whether the cell can be copied from the earlier profile (a main cell: if its rate is kept)."""
    if cell.phase == GRID_PHASE:
        found = earlier.copy_for(cell, exp, float(cell.learning_rate), None) is not None
        return f" (copied from {earlier.profile.name})" if found else ""
    record = earlier.earlier_record(cell, exp)
    if record is None:
        return ""
    return f" (copied from {earlier.profile.name} if the grid keeps lr {record['learning_rate']:g})"


def write_report(store: ResultStore, output_dir: Path) -> None:
    written = report(store.records, output_dir)
    logger.info("report: %s", ", ".join(str(p) for p in written))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        profile = load_profile(args.config, profile_name(args))
        output_dir = (args.output_dir or profile.output_dir).resolve()
        store = ResultStore(output_dir / RESULTS_NAME)
        if args.only_report:
            write_report(store, output_dir)
            return 0
        experiments = apply_flags(profile, args)
        cells = plan(experiments)
        earlier = EarlierRuns(load_profile(args.config, profile.reuses)) if profile.reuses else None
        if args.list:
            done = store.done()
            for cell, exp in cells:
                reuse = " (the grid's run at the chosen rate)" if reuses_grid(cell, exp) else ""
                if earlier is not None and not reuses_grid(cell, exp) and cell.key not in done:
                    reuse += copy_note(earlier, cell, exp)
                logger.info("%s %s%s", "done" if cell.key in done else "todo", cell.label(), reuse)
            grid = sum(c.phase == GRID_PHASE for c, _ in cells)
            copies = sum(reuses_grid(c, e) for c, e in cells)
            logger.info(
                "%d records: %d learning-rate grid runs, %d main runs, %d main records copied from the grid",
                len(cells),
                grid,
                len(cells) - grid - copies,
                copies,
            )
            return 0
        if not needs_hub(experiments):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing needs the hub: never wait on the network
        # imported here, after HF_HUB_OFFLINE is set: huggingface_hub reads it once, when transformers is imported
        from benchmarks.quality.phases import run_all

        failed = run_all(cells, store, earlier)
        write_report(store, output_dir)
    except BenchmarkError as err:
        logger.error("error: %s", err)
        return 2
    if failed:
        logger.error("%d run(s) failed (see above); rerun the same command to retry them: %s", len(failed), failed)
        return 1
    return 0
