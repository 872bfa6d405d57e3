"""FishIRDConfig: the user-facing settings of FISH-mask / IRD sparse fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from ._registration import FishIRDPeftType

FISHER_TYPES = ("empirical", "expected")
BUDGET_TYPES = ("global", "per_module")


@dataclass
class FishIRDConfig(PeftConfig):
    """Configuration of a FishIRD adapter (FISH Mask, Sung et al. 2021; IRD, Dong et al. 2024).

    The adapter trains a fixed sparse set of entries of the base model's weights. Which entries
    is decided by :meth:`FishIRDModel.prepare` from the diagonal Fisher information
    (``F_j = sum_n g_nj^2`` over ``num_samples`` training samples), keeping the top
    ``keep_ratio`` share of all parameters. The task head (``modules_to_save``) is trained densely.

    Example::

        cfg = FishIRDConfig(task_type="SEQ_CLS", keep_ratio=0.005, num_samples=1024)
        model = get_peft_model(base, cfg)
        model.prepare(train_dataset, data_collator=collator)
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Modules whose parameters are candidates for the sparse mask: a list of module names "
                "(exact names or name suffixes) or one regex matched against full names. Default (None): "
                "every supported module of the backbone - Linear (weight and bias), Embedding, LayerNorm "
                "and GPT-2 Conv1D - except the task head, which is what the FISH reference ranks."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (or one regex) never to target, applied after `target_modules`."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Modules trained densely and saved with the adapter, e.g. the task head. For "
                "task_type='SEQ_CLS' PEFT adds `classifier` / `score` itself."
            )
        },
    )
    keep_ratio: float = field(
        default=0.005,
        metadata={
            "help": (
                "Share of ALL parameters of the base model that is trained (0 < keep_ratio <= 1). The "
                "sparse budget is k = int(keep_ratio * total parameters), minus the head's size when "
                "`head_in_budget` is True. FISH's default is 0.005 (0.5%)."
            )
        },
    )
    head_in_budget: bool = field(
        default=True,
        metadata={
            "help": (
                "Count the densely trained head (`modules_to_save`) against the budget, as the FISH "
                "reference code does. False: k sparse entries come on top of the head."
            )
        },
    )
    num_samples: int = field(
        default=1024,
        metadata={"help": "Training samples drawn (with `seed`) to estimate the Fisher information (FISH: 1024)."},
    )
    fisher: Literal["empirical", "expected"] = field(
        default="empirical",
        metadata={
            "help": (
                "'empirical': squared gradients of the true label's loss (FISH scripts' default). "
                "'expected': exact expectation over the model's predicted class distribution "
                "(classification only)."
            )
        },
    )
    budget: Literal["global", "per_module"] = field(
        default="global",
        metadata={
            "help": (
                "'global': one top-k over all candidate entries (FISH). 'per_module': each targeted "
                "parameter gets a share of k proportional to its size, then top-k inside it."
            )
        },
    )
    fisher_batch_size: int = field(
        default=16,
        metadata={
            "help": (
                "Samples per batch of the Fisher pass. Bounds peak memory (per-layer per-sample gradients "
                "are formed one layer at a time); does not change the result beyond float rounding."
            )
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for drawing the Fisher samples; same seed and data give the same mask."})
    selection_record: Optional[dict[str, Any]] = field(
        default=None,
        metadata={
            "help": (
                "Written by `prepare`, not by users: what the mask selection did (samples used, entries "
                "per module, score summary, time, parameter shapes). Saved with the adapter so a mask can "
                "be audited and rebuilt; a loaded adapter with a record counts as prepared."
            )
        },
    )
    target_parameters: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Not supported by FishIRD (PEFT's LoRA-only option); must stay None."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = FishIRDPeftType.FISH_IRD
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, list):
            self.modules_to_save = list(self.modules_to_save)
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)):
            raise TypeError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}.")
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise ValueError(
                f"keep_ratio={self.keep_ratio!r} is out of range: it must be in (0, 1], e.g. 0.005 to train "
                "0.5% of the parameters."
            )
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(
                f"num_samples={self.num_samples!r} is invalid: pass a positive int, e.g. 1024 (FISH's default)."
            )
        if isinstance(self.fisher_batch_size, bool) or not isinstance(self.fisher_batch_size, int) or (
            self.fisher_batch_size < 1
        ):
            raise ValueError(f"fisher_batch_size={self.fisher_batch_size!r} is invalid: pass a positive int, e.g. 16.")
        if self.fisher not in FISHER_TYPES:
            raise ValueError(f"fisher={self.fisher!r} is not supported: choose one of {FISHER_TYPES}.")
        if self.budget not in BUDGET_TYPES:
            raise ValueError(f"budget={self.budget!r} is not supported: choose one of {BUDGET_TYPES}.")
        if not isinstance(self.head_in_budget, bool):
            raise TypeError(f"head_in_budget must be True or False, got {self.head_in_budget!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}.")
        if self.target_parameters:
            raise ValueError(
                f"target_parameters={self.target_parameters!r} is not supported by FishIRD: use "
                "`target_modules` (FishIRD already selects individual entries of each weight)."
            )
        if self.selection_record is not None and not isinstance(self.selection_record, dict):
            raise TypeError("selection_record is written by `prepare`; leave it as None.")
