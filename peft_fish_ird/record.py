"""SelectionRecord: what a mask selection did, saved with the adapter (in adapter_config.json)."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .ird import IRDRound
from .layer_types import layer_type_for

logger = logging.getLogger(__name__)


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


def mask_fingerprint(masks: dict[str, torch.Tensor]) -> str:
    """sha256 over ``"<module>.<param>"`` names and their int64 indices: identifies a mask."""
    digest = hashlib.sha256()
    for key in sorted(masks):
        digest.update(key.encode())
        digest.update(masks[key].to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest()


# ``<module>.fishird_<param>_indices``, in a checkpoint, or with ``.<adapter>`` in a live state dict
_INDICES_KEY = re.compile(r"^(?P<module>.+)\.fishird_(?P<param>weight|bias)_indices(?:\.[^.]+)?$")


def indices_key_target(key: str) -> Optional[str]:
    """``"<module>.<param>"`` when ``key`` holds a FishIRD layer's entry indices, else ``None``."""
    match = _INDICES_KEY.match(key)
    if match is None:
        return None
    return f"{match['module'].removeprefix('base_model.model.')}.{match['param']}"


def mask_fingerprint_of_checkpoint(state_dict: dict[str, torch.Tensor]) -> str:
    """The fingerprint of the indices stored in a checkpoint's state dict."""
    masks = {}
    for key, value in state_dict.items():
        target = indices_key_target(key)
        if target is not None:
            masks[target] = value
    return mask_fingerprint(masks)


def reconcile_records(config: Any, weights_record: dict[str, Any], weights_fingerprint: str) -> None:
    """Check the weights file against its own record and against the config it is loaded with.

    * The indices must match the fingerprint the weights file carries (else it is corrupt).
    * A config read from the same folder must describe the same mask (else config and weights come
      from different saves, e.g. an interrupted save into an existing folder).
    * A live config (HF Trainer resume into an existing adapter) takes the checkpoint's record.
    """
    saved = weights_record.get("mask_sha256")
    if saved and saved != weights_fingerprint:
        raise ValueError(
            "The adapter weights file is corrupt: its indices do not match the mask fingerprint stored with them. "
            "Re-save the adapter from the trained model."
        )
    current = config.selection_record
    if current is None:
        config.selection_record = weights_record
        return
    if current.get("mask_sha256") == saved:
        return
    if getattr(config, "_fishird_loaded", False):
        raise ValueError(
            "adapter_config.json and adapter_model.safetensors in this folder describe different masks: they come "
            "from different saves (was a save interrupted?). Save the adapter again from the trained model."
        )
    logger.warning("Loaded checkpoint has a different mask than the adapter's current one; using the checkpoint's.")
    config.selection_record = weights_record


def check_record_shapes(model: nn.Module, record: dict[str, Any]) -> None:
    """Fail early, with the parameter named, when a saved mask does not fit this base model."""
    for key, shape in record.get("shapes", {}).items():
        module_name, param_name = key.rsplit(".", 1)
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(
                f"The FishIRD adapter was made for a model with a module {module_name!r}, which this base model "
                "lacks: load the adapter onto the base model it was trained with."
            ) from None
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        entry = layer_type_for(module)
        param = entry.specs_of(module).get(param_name) if entry is not None else getattr(module, param_name, None)
        if param is None or list(param.shape) != list(shape):
            raise ValueError(
                f"The FishIRD adapter expects {key} of shape {list(shape)}, but this base model has "
                f"{None if param is None else list(param.shape)}: load it onto the base model it was trained with."
            )
