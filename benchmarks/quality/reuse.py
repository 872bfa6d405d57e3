"""Runs a profile takes from an earlier profile whose settings differ only in the learning-rate grids.

A profile may name ``"reuses": "<profile>"`` in ``config.json``. A run's result depends on its own
rate, never on which other rates its grid holds, and the runs are deterministic (seeded data order,
head initialisation and dropout). So when a profile only widens the grids of an earlier one, a run of
the earlier profile at the same rate *is* the new profile's run:

- a grid cell at rate ``r`` is copied from the earlier profile's grid cell at ``r``;
- a main cell is copied from the earlier profile's main cell on the same seed when the earlier grid
  chose the same rate; when the wider grid chooses another rate, the cell runs.

The match is by the earlier profile's fingerprint recomputed from the new experiment's own settings
with only ``train.lr`` replaced, so a record is copied only if every other setting is identical.
Each copy keeps a ``copied_from`` note (profile, file, key, when it ran), gets the new fingerprint,
settings and ``lr_choice``, and is appended like a run, so resuming works as before.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Optional

from benchmarks.quality.plan import GRID_PHASE, REPO, RESULTS_NAME, Cell, Experiment, Profile
from benchmarks.quality.store import ResultStore


class EarlierRuns:
    """The records of the profile named by ``reuses``, looked up by the fingerprint they would carry."""

    def __init__(self, earlier: Profile) -> None:
        self.profile = earlier
        self.path: Path = earlier.output_dir / RESULTS_NAME
        self.by_key = {r["key"]: r for r in ResultStore(self.path).records}
        # every grid setting of the earlier profile (its experiments may override train.lr): a cell of any
        # new experiment matches an earlier run made under identical settings, whatever that experiment's name
        grids = [e.settings["train"]["lr"] for e in earlier.experiments]
        self.grids = [g for i, g in enumerate(grids) if g not in grids[:i]]

    def earlier_record(self, cell: Cell, exp: Experiment) -> Optional[dict[str, Any]]:
        """The earlier profile's run of the same cell under one of its grids (None: it has none)."""
        for lr in self.grids:
            settings = copy.deepcopy(exp.settings)
            settings["train"]["lr"] = copy.deepcopy(lr)
            earlier = dataclasses.replace(cell, settings_id=dataclasses.replace(exp, settings=settings).settings_id)
            if earlier.key in self.by_key:
                return self.by_key[earlier.key]
        return None

    def copy_for(self, cell: Cell, exp: Experiment, rate: float, choice: Optional[dict[str, Any]]) -> Optional[dict]:
        """The earlier run of ``cell`` at ``rate``, relabelled as this profile's record; None when there is none."""
        record = self.earlier_record(cell, exp)
        if record is None or float(record["learning_rate"]) != float(rate):
            return None
        out = copy.deepcopy(record)
        for derived in ("lr_choice", "reused_run"):  # the earlier grid's choice; recomputed for this profile
            out.pop(derived, None)
        out.update(
            key=cell.key,
            settings_id=cell.settings_id,
            experiment=cell.experiment,
            phase=cell.phase,
            settings=copy.deepcopy(exp.settings),
            copied_from={
                "profile": self.profile.name,
                "file": _relative(self.path),
                "key": record["key"],
                "finished_at": record.get("finished_at"),
            },
        )
        if cell.phase != GRID_PHASE and choice is not None and len(choice) > 1:
            out["lr_choice"] = choice
        return out


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
