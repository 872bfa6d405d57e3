"""FishIRDConfig: the user-facing settings of FISH-mask / IRD sparse fine-tuning.

Also home of the method's identity in PEFT (``FishIRDPeftType``, the parameter ``PREFIX``), so
that registration, config and tuner all read it from one module without importing each other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union, get_args

from peft.config import PeftConfig

from ._version import __version__, warn_if_newer
from .evaluation import ScorerSettings
from .head_probe import AUTO as HEAD_PROBE_AUTO
from .head_probe import AUTO_STEPS as HEAD_PROBE_AUTO_STEPS
from .head_probe import HeadProbeSettings
from .head_probe import settings_for as head_probe_settings_for
from .ird import IRD_SEARCHES, IRDSearch, IRDSettings
from .layer_types import describe_supported
from .selection import BUDGETS, Budget

PREFIX = "fishird_"  # in every adapter attribute name; PEFT matches on it (device moves, loading)


class FishIRDPeftType(str, enum.Enum):
    """``peft_type`` of FishIRD adapters (saved as the string ``"FISH_IRD"``)."""

    FISH_IRD = "FISH_IRD"

    def __str__(self) -> str:
        return self.value


FisherChoice = Literal["empirical", "expected"]
BudgetChoice = Budget
SelectionChoice = Literal["fish", "ird", "ird_reverse", "ird_random", "random"]
EvalMetricChoice = Literal["loss", "accuracy"]
MaskInitChoice = Literal["fisher", "random", "magnitude"]
FISHER_TYPES = get_args(FisherChoice)
BUDGET_TYPES = BUDGETS
SELECTION_TYPES = get_args(SelectionChoice)
IRD_SELECTIONS = tuple(s for s in SELECTION_TYPES if s.startswith("ird"))
EVAL_METRICS = get_args(EvalMetricChoice)
MASK_INITS = get_args(MaskInitChoice)


@dataclass
class FishIRDConfig(PeftConfig):
    """Configuration of a FishIRD adapter (FISH Mask, Sung et al. 2021; IRD, Dong et al. 2024).

    The adapter trains a fixed sparse set of entries of the base model's weights. Which entries
    is decided by :meth:`FishIRDModel.prepare` from the diagonal Fisher information
    (``F_j = sum_n g_nj^2`` over ``num_samples`` training samples), keeping the top
    ``keep_ratio`` share of all parameters. The task head (``modules_to_save``) is trained densely.
    ``mask_init="random"`` / ``"magnitude"`` instead gives the adapter a data-free mask of the same size
    at ``get_peft_model`` time (trainable at once; ``prepare`` may still replace it).

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
                f"every supported module of the backbone ({describe_supported()}; weights and biases) except "
                "the task head, which is what the FISH reference ranks."
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
    fisher: FisherChoice = field(
        default="empirical",
        metadata={
            "help": (
                "'empirical': squared gradients of the true label's loss (FISH scripts' default). "
                "'expected': exact expectation over the model's predicted class distribution "
                "(classification only)."
            )
        },
    )
    budget: BudgetChoice = field(
        default="global",
        metadata={
            "help": (
                "'global': one top-k over all candidate entries (FISH). 'per_module': each targeted "
                "parameter gets a share of k proportional to its size, then top-k inside it. 'column_capped': "
                "per_module, and no input feature of a Linear/Conv1D weight holds more than its even share."
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
    head_probe_steps: Union[int, Literal["auto"]] = field(
        default=HEAD_PROBE_AUTO,
        metadata={
            "help": (
                "Head probing (LP-FT) before the Fisher pass: AdamW steps training only the head (`modules_to_save`) "
                "so the mask is scored, and training starts, through a trained head. 'auto' (default): "
                f"{HEAD_PROBE_AUTO_STEPS} steps for task_type='SEQ_CLS' with a head in modules_to_save and at least "
                "one batch of data, else off; an int: that many steps; 0: off."
            )
        },
    )
    head_probe_lr: float = field(default=HeadProbeSettings.lr, metadata={"help": "Head probing: constant AdamW rate."})
    head_probe_batch_size: int = field(
        default=HeadProbeSettings.batch_size, metadata={"help": "Head probing: examples per step (seeded by `seed`)."}
    )
    selection: SelectionChoice = field(
        default="fish",
        metadata={
            "help": (
                "How `prepare` picks the mask. 'fish': global top-k Fisher over `num_samples` random samples "
                "(FISH Mask). 'ird': Iterative Range Decreasing - shrink the sample range and the parameter "
                "range toward higher Fisher information, score each round's candidate, keep the best. Controls: "
                "'ird_reverse' (shrinks toward the LOWEST Fisher), 'ird_random' (halves the sample range at "
                "random), 'random' (a uniformly random mask of the same size)."
            )
        },
    )
    ird_shrink: float = field(
        default=IRDSettings.shrink,
        metadata={"help": "IRD: share of the sample range and of the parameter range kept each round (0 < x < 1)."},
    )
    ird_search: IRDSearch = field(
        default=IRDSettings.search,
        metadata={
            "help": (
                "IRD: how the search descends. 'halve' (v1): one candidate per round, both ranges halved "
                "(~2x one FISH Fisher pass). 'branch': after FISH, each level scores the kept (higher-Fisher) part "
                "of the sample range and the rest, and descends into the better one (~3x the Fisher passes, 2x "
                "the scoring). Both are this project's interpretations of the paper."
            )
        },
    )
    ird_rounds: Optional[int] = field(
        default=IRDSettings.rounds,
        metadata={"help": "IRD: maximum number of rounds (None: until `ird_min_samples` or the range reaches k)."},
    )
    ird_min_samples: int = field(
        default=IRDSettings.min_samples,
        metadata={"help": "IRD: stop before the sample range would hold fewer than this many samples."},
    )
    ird_selection_fraction: float = field(
        default=ScorerSettings.selection_fraction,
        metadata={
            "help": (
                "IRD: share of the `prepare` data held out (never used for Fisher or the evaluator's training) to "
                "score candidates with the built-in evaluator, when no `selection_dataset` is passed. Never pass "
                "your test set as selection data."
            )
        },
    )
    ird_eval_steps: int = field(
        default=ScorerSettings.steps,
        metadata={"help": "IRD built-in evaluator: optimizer steps of the short masked fine-tune per candidate."},
    )
    ird_eval_batch_size: int = field(
        default=ScorerSettings.batch_size,
        metadata={"help": "IRD built-in evaluator: batch size of its fine-tune and scoring."},
    )
    ird_eval_lr: float = field(
        default=ScorerSettings.lr,
        metadata={"help": "IRD built-in evaluator: AdamW learning rate of the short fine-tune."},
    )
    ird_eval_metric: EvalMetricChoice = field(
        default=ScorerSettings.metric,
        metadata={"help": "IRD built-in evaluator: 'loss' (minus mean loss) or 'accuracy' on the selection split."},
    )
    seed: int = field(
        default=0,
        metadata={
            "help": (
                "Seed for drawing the Fisher samples (and IRD's random choices). The mask also depends on the "
                "model's weights, including a randomly initialised head: call `transformers.set_seed(seed)` before "
                "loading the model to get the same mask bit for bit."
            )
        },
    )
    mask_init: MaskInitChoice = field(
        default="fisher",
        metadata={
            "help": (
                "The mask an adapter has right after `get_peft_model` / `add_adapter`. 'fisher' (default): none; "
                "`prepare` must select it from data (training or saving before that raises UnpreparedAdapterError). "
                "'random': k uniformly random entries (seeded by `seed`, like SHiRA). 'magnitude': the k entries of "
                "largest |W0| (like Super-Tuning). Both are data-free, of the same size k as `prepare` would pick, "
                "and trainable at once; a later `prepare` may replace them."
            )
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "PEFT's convention. True: the deltas start at zero (the adapter is an identity). False: after a "
                "data-free mask is chosen (`mask_init`), its values are drawn from N(0, 0.1^2) with torch's global "
                "RNG - for tests only."
            )
        },
    )
    keep_effective_weight: bool = field(
        default=False,
        metadata={
            "help": (
                "Training memory vs speed of a Linear/Conv1D's fast path. False (default): backward rebuilds "
                "W0 + delta from the frozen base for the input gradient, so no layer holds a second copy of its "
                "weight between forward and backward. True: keep the copy made in forward - about 3% faster "
                "per step on a small model (MiniLM, 1024 tokens; less with more tokens), at one extra weight of "
                "memory per adapted layer, i.e. the adapted part of the model once more. Same results either way."
            )
        },
    )
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
    fishird_version: Optional[str] = field(
        default=None,
        metadata={"help": "peft_fish_ird version that wrote this config (filled in automatically)."},
    )
    target_parameters: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Not supported by FishIRD (PEFT's LoRA-only option); must stay None."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = FishIRDPeftType.FISH_IRD
        if self.fishird_version is None:
            self.fishird_version = __version__
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, list):
            self.modules_to_save = list(self.modules_to_save)
        self._validate()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """Load a saved config; warns when a newer peft_fish_ird wrote it. Marks it as read from disk,
        so loading can tell a config from the same folder as the weights from a live one."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        warn_if_newer(config.fishird_version)
        config._fishird_loaded = True
        return config

    def ird_settings(self) -> IRDSettings:
        """The IRD search's settings, read off this config (the one place that maps them)."""
        return IRDSettings(
            shrink=self.ird_shrink,
            rounds=self.ird_rounds,
            min_samples=self.ird_min_samples,
            direction="reverse" if self.selection == "ird_reverse" else "top",
            sample_order="random" if self.selection == "ird_random" else "fisher",
            budget=self.budget,
            seed=self.seed,
            search=self.ird_search,
        )

    def scorer_settings(self) -> ScorerSettings:
        """The built-in IRD evaluator's settings, read off this config."""
        return ScorerSettings(
            selection_fraction=self.ird_selection_fraction,
            steps=self.ird_eval_steps,
            batch_size=self.ird_eval_batch_size,
            lr=self.ird_eval_lr,
            metric=self.ird_eval_metric,
        )

    def head_probe_settings(self, steps: Optional[int] = None) -> HeadProbeSettings:
        """How ``prepare`` probes the head (``steps``: the resolved count; see ``head_probe.settings_for``)."""
        return head_probe_settings_for(self, steps)

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
        choices = {
            "fisher": FISHER_TYPES,
            "budget": BUDGET_TYPES,
            "selection": SELECTION_TYPES,
            "ird_search": IRD_SEARCHES,
            "ird_eval_metric": EVAL_METRICS,
            "mask_init": MASK_INITS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported: choose one of {allowed}.")
        for name in ("init_weights", "head_in_budget", "keep_effective_weight"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        _check_fraction("ird_shrink", self.ird_shrink, "e.g. 0.5 to halve the ranges each round")
        _check_fraction("ird_selection_fraction", self.ird_selection_fraction, "e.g. 0.1")
        for name in ("fisher_batch_size", "ird_min_samples", "ird_eval_steps", "ird_eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: pass a positive int, e.g. 16.")
        self.head_probe_settings()  # checks the head_probe_* values ("auto" or a step count among them)
        if self.ird_rounds is not None and (
            isinstance(self.ird_rounds, bool) or not isinstance(self.ird_rounds, int) or self.ird_rounds < 1
        ):
            raise ValueError(f"ird_rounds={self.ird_rounds!r} is invalid: pass a positive int or None.")
        if (
            isinstance(self.ird_eval_lr, bool)
            or not isinstance(self.ird_eval_lr, (int, float))
            or self.ird_eval_lr <= 0
        ):
            raise ValueError(f"ird_eval_lr={self.ird_eval_lr!r} is invalid: pass a positive learning rate, e.g. 1e-3.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}.")
        if self.target_parameters:
            raise ValueError(
                f"target_parameters={self.target_parameters!r} is not supported by FishIRD: use "
                "`target_modules` (FishIRD already selects individual entries of each weight)."
            )
        if self.selection_record is not None and not isinstance(self.selection_record, dict):
            raise TypeError("selection_record is written by `prepare`; leave it as None.")


def _check_fraction(name: str, value: object, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name}={value!r} is out of range: it must be strictly between 0 and 1, {example}.")
