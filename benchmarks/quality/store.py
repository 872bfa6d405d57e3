"""The quality benchmark's results file: one record per finished run, rewritten atomically per record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import atomic_write_json
from benchmarks.quality.plan import BenchmarkError


class ResultStore:
    """The results JSON (``{"benchmark": "quality", "records": [...]}``), rewritten atomically per record."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = self._read()

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as err:
            raise BenchmarkError(
                f"{self.path} is not valid JSON ({err}); it is never written partially, so it was edited by hand. "
                "Fix or move it away; it is not overwritten."
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise BenchmarkError(f"{self.path} does not hold a quality-benchmark result ({{'records': [...]}}).")
        return data["records"]

    def done(self) -> set[str]:
        return {r["key"] for r in self.records}

    def append(self, record: dict[str, Any]) -> None:
        """Add one record and replace the file in one rename, so a crash never leaves a partial file."""
        self.records.append(record)
        atomic_write_json(self.path, {"benchmark": "quality", "records": self.records})
