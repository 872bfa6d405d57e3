"""IRD search (ird.py) and its wiring into prepare(): rounds, ranges, controls, isolation, trace."""

import pytest
import torch
from conftest import adapter_masks, fish_config, make_examples, pad_collate, tiny_bert
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader

import peft_fish_ird.prepare as prepare_module
from peft_fish_ird.fisher import FisherResult
from peft_fish_ird.ird import IRDSettings, iterative_range_decreasing, mask_jaccard, schedule
from peft_fish_ird.layer import FishIRDLayer

EXAMPLES = make_examples(80, seed=4)


def _ird(**overrides):
    kwargs = dict(selection="ird", num_samples=32, ird_min_samples=4, ird_eval_steps=2, ird_eval_batch_size=4)
    kwargs.update(overrides)
    return get_peft_model(tiny_bert(), fish_config(**kwargs))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class ScoreByCall:
    """Evaluator giving call number ``best`` the highest score; records the mask it saw each call."""

    def __init__(self, best):
        self.best, self.calls, self.seen = best, 0, []

    def __call__(self, tuner):
        self.calls += 1
        self.seen.append(
            {
                f"{n}.{p}": m.indices(p)["default"].clone()
                for n, m in tuner.model.named_modules()
                if isinstance(m, FishIRDLayer)
                for p in m.base_param_names()
            }
        )
        return 1.0 if self.calls == self.best else 0.0


# ---------------------------------------------------------------- the search on synthetic scores
def _fake_pass(scores, sample_scores, log):
    def run(positions, ranges, desc):
        log.append((list(positions), None if ranges is None else {k: v.clone() for k, v in ranges.items()}))
        per = sample_scores[positions]
        if ranges is not None:  # s_n restricted to P: scale by the share of the range kept (monotone stand-in)
            per = per * (1 + sum(int(r.sum()) for r in ranges.values()))
        return FisherResult({k: v.clone() for k, v in scores.items()}, per.clone(), len(positions), 0.0)

    return run


def test_schedule_halves_ranges_and_stops_at_min_samples_or_k():
    s = IRDSettings(shrink=0.5, min_samples=4)
    assert schedule(32, 1000, 10, s) == [(32, 1000), (16, 500), (8, 250), (4, 125)]
    assert schedule(1024, 100, 30, s) == [(1024, 100), (512, 50), (256, 30)]
    assert schedule(32, 1000, 10, IRDSettings(rounds=2, min_samples=4)) == [(32, 1000), (16, 500)]


def test_reverse_keeps_the_lowest_fisher_halves():
    g = torch.Generator().manual_seed(0)
    scores = {"a.weight": torch.rand(40, generator=g), "b.bias": torch.rand(24, generator=g)}
    sample_scores = torch.rand(16, generator=g)
    for direction in ("top", "reverse"):
        log = []
        iterative_range_decreasing(
            16,
            8,
            _fake_pass(scores, sample_scores, log),
            lambda m: 0.0,
            IRDSettings(min_samples=4, rounds=2, direction=direction),
        )
        samples2, ranges2 = log[1]
        flat = torch.cat([scores["a.weight"], scores["b.bias"]])
        kept = torch.cat([ranges2["a.weight"], ranges2["b.bias"]])
        assert int(kept.sum()) == 32 and len(samples2) == 8
        order = torch.sort(sample_scores, descending=direction == "top").indices[:8]
        assert sorted(samples2) == sorted(order.tolist())
        if direction == "top":
            assert float(flat[kept].min()) >= float(flat[~kept].max())
        else:
            assert float(flat[kept].max()) <= float(flat[~kept].min())


def test_random_sample_control_has_ird_sizes_but_other_samples():
    g = torch.Generator().manual_seed(1)
    scores = {"a.weight": torch.rand(64, generator=g)}
    sample_scores = torch.rand(32, generator=g)
    logs = {}
    for order in ("fisher", "random"):
        logs[order] = []
        iterative_range_decreasing(
            32,
            4,
            _fake_pass(scores, sample_scores, logs[order]),
            lambda m: 0.0,
            IRDSettings(min_samples=4, sample_order=order),
        )
    assert [len(s) for s, _ in logs["fisher"]] == [len(s) for s, _ in logs["random"]] == [32, 16, 8, 4]
    assert logs["fisher"][1][0] != logs["random"][1][0]


def test_candidate_of_each_round_is_top_k_inside_its_range():
    g = torch.Generator().manual_seed(2)
    scores = {"a.weight": torch.rand(100, generator=g)}
    seen = []
    result = iterative_range_decreasing(
        16,
        5,
        _fake_pass(scores, torch.rand(16, generator=g), []),
        lambda m: seen.append(m) or 0.0,
        IRDSettings(min_samples=2),
    )
    top5 = torch.sort(scores["a.weight"], descending=True).indices[:5].sort().values
    assert all(torch.equal(m["a.weight"], top5) for m in seen)  # same scores: the top-5 stay in every range
    assert result.best_round == 1 and result.per_sample_gradients == 16 + 8 + 4 + 2


def test_trace_records_each_candidates_jaccard_overlap_with_round_one():
    g = torch.Generator().manual_seed(3)
    seen = []
    result = iterative_range_decreasing(
        16,
        10,
        _fake_pass({"a.weight": torch.rand(60, generator=g)}, torch.rand(16, generator=g), []),
        lambda m: seen.append(m) or 0.0,
        IRDSettings(min_samples=4, direction="reverse"),  # reverse: later candidates move away from round 1
    )
    first = set(seen[0]["a.weight"].tolist())
    for row, mask in zip(result.trace, seen):
        later = set(mask["a.weight"].tolist())
        assert row.jaccard_with_first == pytest.approx(len(first & later) / len(first | later), abs=1e-6)
    assert result.trace[0].jaccard_with_first == 1.0 and min(r.jaccard_with_first for r in result.trace) < 1.0


def test_mask_jaccard_counts_entries_of_every_parameter():
    a = {"w": torch.tensor([0, 1, 2]), "b": torch.tensor([5])}
    b = {"w": torch.tensor([1, 2, 3]), "c": torch.tensor([7])}
    assert mask_jaccard(a, b) == pytest.approx(2 / 6)
    assert mask_jaccard({}, {}) == 1.0


# ---------------------------------------------------------------- prepare(selection="ird", ...)
def test_ird_rounds_1_equals_fish_bit_for_bit():
    fish = get_peft_model(tiny_bert(), fish_config(num_samples=32))
    fish.prepare(EXAMPLES, data_collator=pad_collate, progress=False)
    evaluator = ScoreByCall(best=1)
    ird = _ird(ird_rounds=1)
    rec = ird.prepare(EXAMPLES, data_collator=pad_collate, evaluator=evaluator, progress=False)
    assert _same(adapter_masks(fish), adapter_masks(ird))
    assert evaluator.calls == 0 and len(rec.trace) == 1 and rec.sample_indices == fish.selection.sample_indices


def test_round_one_candidate_equals_fish_even_with_a_held_out_split():
    fish = get_peft_model(tiny_bert(), fish_config(num_samples=32))
    fish.prepare(EXAMPLES, data_collator=pad_collate, progress=False)
    ird = _ird()
    evaluator = ScoreByCall(best=1)
    ird.prepare(EXAMPLES, data_collator=pad_collate, evaluator=evaluator, progress=False)
    assert _same(evaluator.seen[0], adapter_masks(fish))
    assert _same(adapter_masks(ird), adapter_masks(fish))


@pytest.mark.parametrize("best", [2, 3])
def test_evaluator_choice_decides_the_mask(best):
    evaluator = ScoreByCall(best=best)
    model = _ird()
    rec = model.prepare(EXAMPLES, data_collator=pad_collate, evaluator=evaluator, progress=False)
    assert rec.best_round == best
    assert _same(adapter_masks(model), evaluator.seen[best - 1])
    assert not _same(evaluator.seen[0], evaluator.seen[best - 1])


def test_trace_sizes_follow_the_schedule_and_gradient_count_is_bounded():
    model = _ird(num_samples=32, ird_min_samples=4)
    rec = model.prepare(EXAMPLES, data_collator=pad_collate, progress=False)
    candidates = sum(torch.Size(s).numel() for s in rec.shapes.values())
    assert [r.n_samples for r in rec.trace] == [32, 16, 8, 4]
    assert [r.n_params_in_range for r in rec.trace] == [candidates, candidates // 2, candidates // 4, candidates // 8]
    assert rec.per_sample_gradients == 60 <= 2 * 32
    assert all(r.score is not None for r in rec.trace)
    assert sum(m.numel() for m in adapter_masks(model).values()) == rec.k


def test_reverse_and_random_controls_prepare_masks_of_the_same_size():
    sizes = {}
    for selection in ("ird", "ird_reverse", "ird_random", "random"):
        model = _ird(selection=selection)
        evaluator = ScoreByCall(best=99) if selection != "random" else None
        rec = model.prepare(EXAMPLES, data_collator=pad_collate, evaluator=evaluator, progress=False)
        sizes[selection] = sum(m.numel() for m in adapter_masks(model).values())
        assert rec.method == selection
    assert len(set(sizes.values())) == 1


def test_random_selection_is_seeded_and_differs_from_fish():
    a, b = _ird(selection="random"), _ird(selection="random")
    for m in (a, b):
        m.prepare(EXAMPLES, data_collator=pad_collate, progress=False)
    fish = get_peft_model(tiny_bert(), fish_config(num_samples=32))
    fish.prepare(EXAMPLES, data_collator=pad_collate, progress=False)
    assert _same(adapter_masks(a), adapter_masks(b)) and not _same(adapter_masks(a), adapter_masks(fish))


def test_ird_is_deterministic():
    a, b = _ird(), _ird()
    ra = a.prepare(EXAMPLES, data_collator=pad_collate, progress=False)
    rb = b.prepare(EXAMPLES, data_collator=pad_collate, progress=False)
    assert _same(adapter_masks(a), adapter_masks(b))
    assert [r.score for r in ra.trace] == [r.score for r in rb.trace]


def test_each_candidate_starts_from_the_pretrained_state(monkeypatch):
    """Built-in evaluator: the state every candidate sees is the same, and prepare leaves it intact."""
    model = _ird(ird_eval_steps=5)
    head = model.base_model.model.classifier
    head_before = {k: v.clone() for k, v in head.modules_to_save["default"].state_dict().items()}
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "fishird_" not in k}
    snapshots = []
    original = prepare_module.MaskedFineTuneScorer.__call__

    def spy(self):
        values = [p.detach().clone() for n, p in model.named_parameters() if "fishird_" in n]
        snapshots.append(
            (
                all(float(v.abs().sum()) == 0 for v in values),
                all(torch.equal(v, head_before[k]) for k, v in head.modules_to_save["default"].state_dict().items()),
            )
        )
        return original(self)

    monkeypatch.setattr(prepare_module.MaskedFineTuneScorer, "__call__", spy)
    rng = torch.get_rng_state()
    model.prepare(EXAMPLES, data_collator=pad_collate, progress=False)
    assert len(snapshots) == 4 and all(zero and head_same for zero, head_same in snapshots)
    assert all(torch.equal(v, head_before[k]) for k, v in head.modules_to_save["default"].state_dict().items())
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_before.items() if "modules_to_save" not in k)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if "fishird_" in n)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG must not move"


def test_user_evaluator_changes_are_undone_between_candidates():
    model = _ird()
    states = []

    def greedy(tuner):
        values = [p for n, p in tuner.named_parameters() if "fishird_" in n]
        states.append(sum(float(v.detach().abs().sum()) for v in values))
        with torch.no_grad():
            for v in values:
                v.fill_(1.0)
            tuner.model.classifier.modules_to_save["default"].weight.add_(5.0)
        return 0.0

    model.prepare(EXAMPLES, data_collator=pad_collate, evaluator=greedy, progress=False)
    assert states == [0.0] * 4
    clean = tiny_bert().classifier.weight
    assert torch.equal(model.base_model.model.classifier.modules_to_save["default"].weight, clean)


def test_selection_split_is_disjoint_from_fisher_pool_and_evaluator_training(monkeypatch):
    captured = {}
    original_init = prepare_module.MaskedFineTuneScorer.__init__

    def spy(self, model, trainable, train_batches, selection_batches, **kw):
        captured["train"], captured["selection"] = train_batches, selection_batches
        original_init(self, model, trainable, train_batches, selection_batches, **kw)

    monkeypatch.setattr(prepare_module.MaskedFineTuneScorer, "__init__", spy)
    model = _ird()
    rec = model.prepare(EXAMPLES, data_collator=pad_collate, progress=False)

    def rows(batches):
        return {tuple(r[m.bool()].tolist()) for b in batches for r, m in zip(b["input_ids"], b["attention_mask"])}

    selection, train = rows(captured["selection"]), rows(captured["train"])
    pool = {tuple(EXAMPLES[i]["input_ids"]) for i in rec.sample_indices}
    assert selection and train and not (selection & train) and not (selection & pool)
    assert rec.selection_samples == len(selection) == round(0.1 * len(EXAMPLES))


def test_trace_and_settings_round_trip_through_save_and_load(tmp_path):
    model = _ird()
    rec = model.prepare(EXAMPLES, data_collator=pad_collate, progress=False)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert loaded.selection.trace == rec.trace
    assert loaded.selection.settings == rec.settings and loaded.selection.best_round == rec.best_round
    assert _same(adapter_masks(loaded), adapter_masks(model))


def test_ird_end_to_end_with_builtin_evaluator_then_training():
    model = _ird(ird_eval_steps=3, ird_eval_metric="accuracy")
    rec = model.prepare(EXAMPLES, data_collator=pad_collate, progress=False)
    assert len(rec.trace) == 4 and all(0.0 <= r.score <= 1.0 for r in rec.trace)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch = pad_collate(EXAMPLES[:16])
    first = None
    for _ in range(10):
        loss = model(**batch).loss
        first = first if first is not None else float(loss.detach())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(loss.detach()) < first


def test_ird_needs_indexable_data_and_fish_refuses_ird_arguments():
    with pytest.raises(TypeError, match="indexable"):
        _ird().prepare(DataLoader(EXAMPLES, batch_size=4, collate_fn=pad_collate), progress=False)
    fish = get_peft_model(tiny_bert(), fish_config())
    with pytest.raises(ValueError, match="selection='ird'"):
        fish.prepare(EXAMPLES, data_collator=pad_collate, evaluator=lambda m: 0.0, progress=False)


def test_nan_from_evaluator_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        _ird().prepare(EXAMPLES, data_collator=pad_collate, evaluator=lambda m: float("nan"), progress=False)
