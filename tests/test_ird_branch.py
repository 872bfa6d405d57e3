"""IRD's ``branch`` search: two candidates per level (the kept, higher-Fisher part of the sample
range and the rest), descending into the better one; round 1 is still FISH."""

import torch
from conftest import adapter_masks, make_examples, pad_collate
from test_ird import _fake_pass, _ird, _same

from peft_fish_ird.ird import IRDSettings, iterative_range_decreasing, planned_passes


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.rand(64, generator=g), "b.bias": torch.rand(16, generator=g)}, torch.rand(32, generator=g)


def test_branch_scores_both_parts_of_every_split_and_descends_into_the_better():
    scores, sample_scores = _scores()
    log, values = [], iter([0.0, 0.1, 0.5, 0.2, 0.9])  # level 1: the rest wins; level 2: the rest again

    result = iterative_range_decreasing(
        32,
        8,
        _fake_pass(scores, sample_scores, log),
        lambda m: next(values),
        IRDSettings(min_samples=8, search="branch"),
    )
    sizes = [len(samples) for samples, _ in log]
    assert sizes == [32, 16, 16, 8, 8]  # FISH, then (kept, rest) per level
    assert len(result.trace) == planned_passes(32, 80, 8, IRDSettings(min_samples=8, search="branch")) == 5
    level1_kept, level1_rest = set(log[1][0]), set(log[2][0])
    assert level1_kept.isdisjoint(level1_rest) and level1_kept | level1_rest == set(range(32))
    top16 = set(torch.sort(sample_scores, descending=True).indices[:16].tolist())
    assert level1_kept == top16
    assert set(log[3][0]) | set(log[4][0]) == level1_rest  # descended into the better part (the rest)
    assert result.best_round == 5 and result.trace[4].score == 0.9  # the best of all candidates


def test_branch_keeps_the_best_scored_candidate_and_costs_about_3n():
    scores, sample_scores = _scores(1)
    result = iterative_range_decreasing(
        32,
        8,
        _fake_pass(scores, sample_scores, []),
        lambda m: 0.0,
        IRDSettings(min_samples=4, search="branch"),
    )
    assert result.best_round == 1  # ties go to the earlier candidate: FISH
    assert result.per_sample_gradients == 32 + 32 + 16 + 8  # N for round 1, then |S| per level


def test_branch_round_one_is_fish_and_prepare_records_every_candidate():
    fish = _ird(selection="fish")
    fish.prepare(make_examples(80, seed=4), data_collator=pad_collate, progress=False)
    model = _ird(ird_search="branch")
    record = model.prepare(make_examples(80, seed=4), data_collator=pad_collate, progress=False)
    assert record.settings["ird"]["search"] == "branch"
    assert [row.n_samples for row in record.trace][:3] == [32, 16, 16]
    assert all(row.score is not None for row in record.trace)
    if record.best_round == 1:
        assert _same(adapter_masks(model), adapter_masks(fish))
