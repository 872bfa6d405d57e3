"""SelectionRecord: what a mask selection did, saved with the adapter (in adapter_config.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional


@dataclass
class SelectionRecord:
    """Audit trail of ``prepare``: enough to check, compare and rebuild a mask.

    Entry keys are ``"<module>.<param>"`` names relative to the base model.
    """

    method: str
    adapter_name: str
    fisher: str
    budget: str
    keep_ratio: float
    head_in_budget: bool
    seed: int
    num_samples_requested: int
    num_samples_used: int
    sample_indices: list[int]
    total_params: int
    head_params: int
    k: int
    entries_per_param: dict[str, int]
    shapes: dict[str, list[int]]
    score_summary: dict[str, float]
    fisher_seconds: float
    seconds: float
    versions: dict[str, str] = field(default_factory=dict)
    trace: Optional[list[list[Any]]] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SelectionRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def trainable_entries(self) -> int:
        """Sparse entries in the mask (the head, trained densely, is extra)."""
        return sum(self.entries_per_param.values())
