"""SelectionRecord: what a mask selection did, saved with the adapter (in adapter_config.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .ird import IRDRound


@dataclass
class SelectionRecord:
    """Audit trail of ``prepare``: enough to check, compare and rebuild a mask.

    Entry keys are ``"<module>.<param>"`` names relative to the base model. ``trace`` has one
    ``IRDRound(round, n_samples, n_params_in_range, score, seconds)`` per Fisher round (FISH: one
    round, unscored); ``best_round`` is the round whose candidate became the mask;
    ``per_sample_gradients`` counts samples back-propagated over all rounds.
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
    trace: list[IRDRound] = field(default_factory=list)
    best_round: int = 1
    per_sample_gradients: int = 0
    scoring_seconds: float = 0.0
    selection_samples: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    mask_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["trace"] = [list(row) for row in self.trace]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SelectionRecord":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["trace"] = [IRDRound(*row) for row in kwargs.get("trace") or []]
        return cls(**kwargs)

    @property
    def trainable_entries(self) -> int:
        """Sparse entries in the mask (the head, trained densely, is extra)."""
        return sum(self.entries_per_param.values())
