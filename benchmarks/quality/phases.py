"""The two phases of a quality run: every learning-rate grid cell, then the main cells at the chosen rates.

A main cell whose method has a grid trains at the rate with the best validation accuracy of its grid
(``stats.choose_rate``: searched on the grid seed, then used for every seed). The main cell on the
grid seed itself is the grid's run at that rate: its record is copied (``reused_run``), not rerun.
A profile that ``reuses`` an earlier one copies that profile's runs at the same rate (``reuse.py``).
Records are appended one at a time, so an interrupted run resumes in either phase.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
import warnings
from typing import Any, Optional

import torch
import transformers

from benchmarks.quality.plan import GRID_PHASE, BenchmarkError, Cell, Experiment, learning_rates, reuses_grid
from benchmarks.quality.reuse import EarlierRuns
from benchmarks.quality.run import Context, run_cell
from benchmarks.quality.stats import choose_rate
from benchmarks.quality.store import ResultStore

logger = logging.getLogger("quality")


class Progress:
    """Logs each run with an ETA from the mean time of finished runs of the same model and method."""

    def __init__(self, todo: list[Cell]) -> None:
        self.todo, self.done, self.seconds = todo, 0, {}

    def eta(self) -> float:
        every = [s for times in self.seconds.values() for s in times]
        if not every:
            return float("nan")
        mean = sum(every) / len(every)
        rest = self.todo[self.done :]
        by_kind = {k: sum(v) / len(v) for k, v in self.seconds.items()}
        return sum(by_kind.get((c.model, c.method), mean) for c in rest)

    def skip(self, cell: Cell) -> None:
        """A planned run that needs no training after all (copied from an earlier profile)."""
        if cell in self.todo[self.done :]:
            self.todo.remove(cell)

    def finish(self, cell: Cell, seconds: float, accuracy: Optional[float]) -> None:
        self.done += 1
        self.seconds.setdefault((cell.model, cell.method), []).append(seconds)
        result = "FAILED" if accuracy is None else f"accuracy {accuracy:.4f}"
        eta = self.eta()
        eta_text = "" if math.isnan(eta) else f", about {eta / 60:.1f} min left"
        logger.info("[%d/%d] %s: %s in %.0fs%s", self.done, len(self.todo), cell.label(), result, seconds, eta_text)


def rate_choice(cell: Cell, exp: Experiment, store: ResultStore) -> Optional[dict[str, Any]]:
    """``{"chosen": rate, ...}``: the grid cell's rate, the fixed rate, or the grid's best (None: grid incomplete)."""
    rates = learning_rates(exp.settings, cell.method)
    if cell.phase == GRID_PHASE:
        return {"chosen": cell.learning_rate}
    if len(rates) == 1:
        return {"chosen": rates[0]}
    grid = [r for r in store.records if r.get("phase") == GRID_PHASE and group_of(r) == cell.group]
    return choose_rate(grid, rates)


def group_of(record: dict[str, Any]) -> tuple[Any, ...]:
    return record["settings_id"], record["model"], record["task"], record["method"], record["keep_ratio"]


def reused_record(cell: Cell, choice: dict[str, Any], store: ResultStore) -> dict[str, Any]:
    """The main record of the grid seed: the grid's run at the chosen rate, relabelled."""
    run = next(
        r
        for r in store.records
        if r.get("phase") == GRID_PHASE and group_of(r) == cell.group and r["learning_rate"] == choice["chosen"]
    )
    relabel = {"key": cell.key, "experiment": cell.experiment, "phase": cell.phase, "lr_choice": choice}
    return {**run, **relabel, "reused_run": run["key"]}


def run_all(
    cells: list[tuple[Cell, Experiment]], store: ResultStore, earlier: Optional[EarlierRuns] = None
) -> list[str]:
    """Run every cell not in the store yet, grid cells first; returns the labels of cells that failed.

    With ``earlier`` (the profile named by ``reuses``), a cell whose run at its rate is in the earlier
    profile's results is copied from there instead of trained.
    """
    done = store.done()
    todo = [(c, e) for c, e in cells if c.key not in done]
    logger.info(
        "%d runs planned, %d already in %s, %d to run", len(cells), len(cells) - len(todo), store.path, len(todo)
    )
    if not todo:
        return []
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, once per run
    use_cpu = all(exp.settings["train"]["use_cpu"] for _, exp in todo)
    ctx = Context(device="cuda" if torch.cuda.is_available() and not use_cpu else "cpu")
    progress, failed = Progress([c for c, e in todo if not reuses_grid(c, e)]), []
    for cell, exp in todo:
        choice = rate_choice(cell, exp, store)
        if choice is None:
            logger.error("%s: its learning-rate grid is incomplete (a grid run failed); rerun to retry", cell.label())
            failed.append(cell.label())
            continue
        if reuses_grid(cell, exp):
            store.append(reused_record(cell, choice, store))
            logger.info("%s: the grid's run at the chosen lr %g", cell.label(), choice["chosen"])
            continue
        copied = earlier.copy_for(cell, exp, choice["chosen"], choice) if earlier is not None else None
        if copied is not None:
            store.append(copied)
            progress.skip(cell)
            logger.info("%s: copied at lr %g from %s", cell.label(), choice["chosen"], copied["copied_from"]["key"])
            continue
        start = time.perf_counter()
        try:
            record = run_cell(cell, exp, ctx, choice["chosen"])
        except BenchmarkError:
            raise
        except Exception:  # noqa: BLE001 - one failed run must not lose the others; it is retried on rerun
            logger.error("run %s failed:\n%s", cell.label(), traceback.format_exc())
            failed.append(cell.label())
            progress.finish(cell, time.perf_counter() - start, None)
            continue
        if cell.phase != GRID_PHASE and len(choice) > 1:
            record["lr_choice"] = choice
        store.append(record)
        progress.finish(cell, time.perf_counter() - start, record["metrics"]["accuracy"])
    return failed
