"""The compared methods: FishIRD (FISH, IRD and controls) prepared, LoRA matched to FISH's count, full."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Optional

from peft import LoraConfig, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

from benchmarks.quality.models import trainable_count
from benchmarks.quality.plan import IRD_METHODS, METHOD_CONFIG, BenchmarkError, Cell, Experiment, task_type_of
from benchmarks.quality.tasks import TaskData
from peft_fish_ird import FishIRDConfig


@dataclass(frozen=True)
class LoraOption:
    """LoRA on one set of target modules: trainable count = head + r * per_rank."""

    targets: Any  # list of module names or "all-linear"
    per_rank: int
    head: int


def lora_options(base: Any, target_sets: Optional[list[Any]], task_type: str = "SEQ_CLS") -> list[LoraOption]:
    """Per-rank and head counts of each candidate target set, measured by building LoRA at r=1 and r=2."""
    if not target_sets:
        default = DEFAULTS.get(base.config.model_type)
        target_sets = ([list(default)] if default else []) + ["all-linear"]
    options = []
    for targets in target_sets:
        counts = []
        for r in (1, 2):
            config = LoraConfig(task_type=task_type, r=r, target_modules=targets)
            model = get_peft_model(copy.deepcopy(base), config)
            counts.append(trainable_count(model))
            del model
        per_rank = counts[1] - counts[0]
        options.append(LoraOption(targets, per_rank, counts[0] - per_rank))
    return options


def match_lora(target_total: int, options: list[LoraOption]) -> tuple[LoraOption, int, int]:
    """The (targets, rank, count) whose LoRA trainable count incl. the head is closest to ``target_total``.

    Ties go to the earlier target set, then to the smaller rank.
    """
    if not options:
        raise BenchmarkError("No LoRA target set to choose from; set settings.lora.target_sets.")
    candidates = []
    for order, option in enumerate(options):
        guess = max(1, round((target_total - option.head) / option.per_rank))
        for rank in {max(1, guess - 1), guess, guess + 1}:
            count = option.head + rank * option.per_rank
            candidates.append((abs(count - target_total), order, rank, option, count))
    _, _, rank, option, count = min(candidates, key=lambda c: c[:3])
    return option, rank, count


def adapter_config(config: Any) -> dict[str, Any]:
    """The run's PEFT config as ``save_pretrained`` writes it to ``adapter_config.json`` (sets as sorted lists)."""
    return json.loads(
        json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v))
    )


def build_fishird(base: Any, cell: Cell, exp: Experiment, data: TaskData) -> tuple[Any, dict[str, Any]]:
    """FishIRD adapter prepared with the cell's selection; returns the model and what the selection did."""
    s = exp.settings
    config = FishIRDConfig(
        task_type=task_type_of(exp),
        keep_ratio=cell.keep_ratio,
        seed=cell.seed,
        # the benchmark probes the head itself, before every method (settings.train.head_probe): never again here
        **{"head_probe_steps": 0, **s["fish"], **s["ird"], **METHOD_CONFIG[cell.method]},  # the method's own win
    )
    model = get_peft_model(base, config)
    selection = data.selection if cell.method in IRD_METHODS else None
    record = model.prepare(data.train, data_collator=data.collator, selection_dataset=selection, progress=False)
    info = {
        "adapter_config": adapter_config(config),
        "selection_seconds": record.seconds,
        "trainable": {
            "count": trainable_count(model),
            "sparse_entries": record.k,
            "head": record.head_params,
            "total_params": record.total_params,
            "budget": int(cell.keep_ratio * record.total_params),
        },
        "selection": {
            "num_samples_used": record.num_samples_used,
            "fisher_seconds": record.fisher_seconds,
            "scoring_seconds": record.scoring_seconds,
            "best_round": record.best_round,
            "per_sample_gradients": record.per_sample_gradients,
            "selection_samples": record.selection_samples,
            "selected_fisher_share": record.score_summary.get("selected_fisher_share"),
            "trace": [row._asdict() for row in record.trace],
        },
    }
    return model, info


def build_lora(base: Any, cell: Cell, exp: Experiment, options: list[LoraOption]) -> tuple[Any, dict[str, Any]]:
    """LoRA whose trainable count (head included) is closest to FISH's budget at this keep ratio."""
    total = sum(p.numel() for p in base.parameters())
    budget = int(cell.keep_ratio * total)
    option, rank, expected = match_lora(budget, options)
    lora = exp.settings["lora"]
    config = LoraConfig(
        task_type=task_type_of(exp),
        r=rank,
        lora_alpha=lora["alpha_over_r"] * rank,
        lora_dropout=lora["dropout"],
        target_modules=option.targets,
    )
    model = get_peft_model(base, config)
    count = trainable_count(model)
    if count != expected:
        raise RuntimeError(f"LoRA trains {count} parameters, the rank matching expected {expected}.")
    info = {
        "adapter_config": adapter_config(config),
        "selection_seconds": 0.0,
        "trainable": {
            "count": count,
            "budget": budget,
            "total_params": total,
            "head": option.head,
            "lora_r": rank,
            "lora_target_modules": option.targets,
            "lora_per_rank": option.per_rank,
            "relative_difference": (count - budget) / budget,
        },
    }
    return model, info


def build_full(base: Any) -> tuple[Any, dict[str, Any]]:
    total = sum(p.numel() for p in base.parameters())
    return base, {"selection_seconds": 0.0, "trainable": {"count": trainable_count(base), "total_params": total}}
