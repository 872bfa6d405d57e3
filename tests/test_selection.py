"""Budget arithmetic and deterministic top-k selection."""

import pytest
import torch

from peft_fish_ird.selection import per_module_quota, select, sparse_budget, top_k_positions


def test_budget_subtracts_the_head_when_it_counts():
    assert sparse_budget(10_000, 30, 0.01, head_in_budget=True) == 70
    assert sparse_budget(10_000, 30, 0.01, head_in_budget=False) == 100


def test_budget_with_nothing_left_after_the_head_explains_the_fix():
    with pytest.raises(ValueError, match="head_in_budget=False"):
        sparse_budget(1000, 50, 0.01, head_in_budget=True)


def test_top_k_breaks_ties_by_position():
    values = torch.tensor([0.0, 3.0, 1.0, 1.0, 1.0, 0.0])
    assert top_k_positions(values, 3).tolist() == [1, 2, 3]
    assert top_k_positions(torch.zeros(5), 2).tolist() == [0, 1]


def test_global_selection_takes_the_k_largest_across_parameters():
    scores = {"a.weight": torch.tensor([[5.0, 0.1], [0.2, 4.0]]), "b.bias": torch.tensor([3.0, 0.0, 6.0])}
    masks = select(scores, 3, "global")
    assert masks["a.weight"].tolist() == [0, 3]
    assert masks["b.bias"].tolist() == [2]


def test_global_selection_matches_a_full_sort():
    g = torch.Generator().manual_seed(0)
    scores = {f"m{i}.weight": torch.rand(7, 5, generator=g) for i in range(4)}
    masks = select(scores, 23, "global")
    flat = torch.cat([s.flatten() for s in scores.values()])
    expected = set(torch.sort(flat, descending=True, stable=True).indices[:23].tolist())
    got, offset = set(), 0
    for name, s in scores.items():
        got |= {offset + int(i) for i in masks[name]}
        offset += s.numel()
    assert got == expected


def test_per_module_quota_is_proportional_and_sums_to_k():
    quota = per_module_quota({"a": 100, "b": 300, "c": 7}, 41)
    assert sum(quota.values()) == 41
    assert quota["b"] >= 3 * quota["a"] - 1
    masks = select({"a": torch.rand(100), "b": torch.rand(300), "c": torch.rand(7)}, 41, "per_module")
    assert {k: v.numel() for k, v in masks.items()} == quota


def test_budget_above_candidates_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        select({"a.weight": torch.rand(4)}, 5, "global")
