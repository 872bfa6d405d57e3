"""The bounded-memory global top-k equals the concatenating reference, bit for bit."""

import threading

import pytest
import torch

from peft_fish_ird.reference import select_global_concat
from peft_fish_ird.selection import (
    float64_from_order_key,
    float64_order_key,
    restrict,
    select_global,
    shrink_range,
)


def assert_same_masks(got, expected):
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == torch.int64
        assert torch.equal(got[name], expected[name]), name


def tied_scores(seed: int) -> dict[str, torch.Tensor]:
    """Few distinct values (heavy ties), zeros, -inf (outside an IRD range), huge and tiny magnitudes."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor(
        [0.0, -0.0, float("-inf"), 1e-300, 5e-324, 1e300, 1.0, 1.0 + 2**-52, 3.5, -2.0, float("inf")],
        dtype=torch.float64,
    )
    shapes = [(7, 5), (13,), (3, 4, 2), (1,), (40,)]
    return {f"m{i}.weight": palette[torch.randint(0, palette.numel(), s, generator=g)] for i, s in enumerate(shapes)}


def continuous_scores(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.rand(30, 20, generator=g, dtype=torch.float64),
        "a.bias": torch.zeros(20, dtype=torch.float64),  # structurally zero gradients, e.g. key.bias
        "b.weight": torch.rand(50, generator=g, dtype=torch.float64).pow(40),  # tiny magnitudes
        "c.weight": torch.rand(9, 9, generator=g).float() * 1e20,  # float32 input, huge magnitudes
    }


def test_order_key_is_monotone_and_inverts():
    values = [float("-inf"), -1e300, -1.0, -5e-324, -0.0, 0.0, 5e-324, 1e-300, 1.0, 1e300, float("inf")]
    keys = [float64_order_key(v) for v in values]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert [float64_from_order_key(k) for k in keys] == values


@pytest.mark.parametrize("seed", range(6))
def test_bounded_selection_equals_the_concatenating_reference_under_heavy_ties(seed):
    scores = tied_scores(seed)
    total = sum(s.numel() for s in scores.values())
    for k in sorted({1, 2, 3, 10, total // 3, total // 2, total - 1, total}):
        assert_same_masks(select_global(scores, k), select_global_concat(scores, k))


@pytest.mark.parametrize("seed", range(3))
def test_bounded_selection_equals_the_concatenating_reference_on_continuous_scores(seed):
    scores = continuous_scores(seed)
    total = sum(s.numel() for s in scores.values())
    for k in (1, 7, 100, 600, 700, total - 20, total):
        assert_same_masks(select_global(scores, k), select_global_concat(scores, k))


def test_all_equal_scores_take_the_first_entries_in_dict_order():
    scores = {"a": torch.zeros(3, 2), "b": torch.zeros(5)}
    masks = select_global(scores, 8)
    assert masks["a"].tolist() == list(range(6)) and masks["b"].tolist() == [0, 1]


def test_restricted_range_with_minus_inf_takes_ties_at_minus_inf_in_order():
    inf = float("-inf")
    scores = {"a": torch.tensor([inf, 2.0, inf], dtype=torch.float64), "b": torch.tensor([inf, 1.0, inf])}
    assert_same_masks(select_global(scores, 3), {"a": torch.tensor([0, 1]), "b": torch.tensor([1])})


def test_bounded_selection_refuses_nan_and_oversized_budgets():
    with pytest.raises(ValueError, match="NaN"):
        select_global({"a": torch.tensor([1.0, float("nan"), 0.0])}, 1)
    with pytest.raises(ValueError, match="exceeds"):
        select_global({"a": torch.rand(4)}, 5)


def test_bisection_needs_at_most_64_counting_passes():
    calls = []

    def counting(counts):
        calls.append(counts.numel())
        return counts

    select_global(tied_scores(0), 17, all_reduce_counts=counting)
    passes = sum(1 for n in calls if n == 1)
    assert passes <= 65  # <= 64 bisection steps + the count above the threshold


def renamed(scores, prefix):
    return {f"{prefix}.{name}": s for name, s in scores.items()}


@pytest.mark.parametrize("seed", range(3))
def test_count_hook_on_a_duplicated_dict_selects_each_copys_share(seed):
    """Two ranks holding the same scores: a hook that doubles every count (what an all-reduce
    would return) must give each rank its part of the global top-2k of the two copies."""
    g = torch.Generator().manual_seed(seed)
    scores = {"a": torch.rand(6, 5, generator=g, dtype=torch.float64), "b": torch.rand(11, generator=g)}
    k = 13
    reference = select_global_concat({**renamed(scores, "r0"), **renamed(scores, "r1")}, 2 * k)
    for rank in (0, 1):
        got = select_global(scores, 2 * k, all_reduce_counts=lambda c: 2 * c, rank=rank, world_size=2)
        assert_same_masks(renamed(got, f"r{rank}"), {n: v for n, v in reference.items() if n.startswith(f"r{rank}")})
        assert_same_masks(got, select_global(scores, k))


def thread_all_reduce(world_size):
    """A real (in-process) sum over ranks: each thread contributes, all wait, all read the sum."""
    barrier = threading.Barrier(world_size)
    slots: dict[int, torch.Tensor] = {}
    lock = threading.Lock()

    def make(rank):
        def reduce(counts):
            with lock:
                slots[rank] = counts.clone()
            barrier.wait()
            total = sum(slots[r] for r in range(world_size))
            barrier.wait()
            return total

        return reduce

    return make


@pytest.mark.parametrize("seed", range(3))
def test_sharded_selection_breaks_ties_in_rank_order(seed):
    shards = [tied_scores(seed), tied_scores(seed + 10), {"x": torch.zeros(9, dtype=torch.float64)}]
    merged = {f"r{r}.{n}": s for r, shard in enumerate(shards) for n, s in shard.items()}
    total = sum(s.numel() for s in merged.values())
    for k in (1, 5, total // 2, total - 3):
        reference = select_global_concat(merged, k)
        make = thread_all_reduce(len(shards))
        results: dict[int, dict] = {}

        def run(rank):
            results[rank] = select_global(shards[rank], k, all_reduce_counts=make(rank), rank=rank, world_size=3)

        threads = [threading.Thread(target=run, args=(r,)) for r in range(len(shards))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = {f"r{r}.{n}": v for r in range(len(shards)) for n, v in results[r].items()}
        assert_same_masks(got, reference)


def test_shrink_range_keeps_the_highest_entries_of_the_current_range():
    scores = {"a": torch.tensor([5.0, 1.0, 4.0, 4.0]), "b": torch.tensor([[4.0, 0.0], [9.0, 2.0]])}
    ranges = {"a": torch.tensor([True, True, False, True]), "b": torch.tensor([[True, True], [False, True]])}
    masks = shrink_range(scores, ranges, 3)
    assert masks["a"].tolist() == [True, False, False, True]
    assert masks["b"].tolist() == [True, False, False, False]
    lowest = shrink_range(scores, ranges, 2, lowest=True)
    assert lowest["a"].tolist() == [False, True, False, False] and lowest["b"].tolist() == [False, True, False, False]


class CountingScores(dict):
    """A score dict that counts how often each parameter's tensor is read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads = 0

    def __getitem__(self, name):
        self.reads += 1
        return super().__getitem__(name)


def test_range_restriction_is_a_view_read_one_parameter_at_a_time():
    g = torch.Generator().manual_seed(3)
    scores = CountingScores({f"p{i}": torch.rand(50, generator=g, dtype=torch.float64) for i in range(4)})
    ranges = {name: torch.rand(50, generator=g) < 0.5 for name in scores}
    view = restrict(scores, ranges, lowest=True)
    assert scores.reads == 0  # nothing is copied up front
    eager = {
        n: torch.where(ranges[n], -dict.__getitem__(scores, n), torch.tensor(float("-inf"), dtype=torch.float64))
        for n in scores
    }
    for name in scores:
        assert torch.equal(view[name], eager[name])
    assert_same_masks(select_global(view, 30), select_global_concat(eager, 30))
