"""The per-sample GEMMs skip the outer positions where an operand is exactly zero (padding), and
the scores stay those of the batch-size-1 loop."""

import pytest
import torch
from conftest import batches_of, make_examples, tiny_bert
from test_fisher import _max_relative_error, _SeqMLP, _SeqMLPWide, _targets

from peft_fish_ird.fisher import compute_fisher
from peft_fish_ird.fisher import sink as sink_module
from peft_fish_ird.reference import fisher_loop
from peft_fish_ird.zero_positions import live_spans


def test_live_spans_cut_only_outer_all_zero_positions():
    a = torch.randn(4, 6, 3)
    b = torch.randn(4, 6, 2)
    a[0, 4:] = 0  # right padding
    b[1, :2] = 0  # left padding, seen on the other operand
    a[2, 2] = 0  # an inner zero row stays inside the span
    a[3] = 0  # nothing live
    a[1, 5, 1] = -1.0
    a[1, 5, [0, 2]] = 0  # a row whose only nonzero entry is negative is live
    assert live_spans(a, b) == [(0, 4), (2, 6), (0, 6), (6, 0)]


def test_live_spans_count_a_nan_row_as_live():
    a = torch.zeros(1, 3, 2)
    a[0, 2, 1] = float("nan")
    assert live_spans(a, torch.ones(1, 3, 2)) == [(2, 3)]


def _padded_batches(width: int, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Token batches whose inputs are exactly zero at some samples' outer positions (left and right)."""
    batches = []
    for _ in range(2):
        x = torch.randn(5, 7, width, generator=generator)
        x[0, 5:] = 0
        x[1, :3] = 0
        x[2, 1:3] = 0  # inner zeros: kept
        x[3] = 0
        batches.append({"x": x, "labels": torch.randint(0, 3, (5,), generator=generator)})
    return batches


@pytest.mark.parametrize("masked", [False, True], ids=["all", "range"])
@pytest.mark.parametrize("make_model", [_SeqMLP, _SeqMLPWide], ids=["tall", "wide"])
def test_large_weight_path_with_zero_positions_equals_the_loop(masked, make_model):
    model = make_model()
    g = torch.Generator().manual_seed(4)
    batches = _padded_batches(24, g)
    targets = dict(model.named_children())
    masks = {"up.weight": torch.rand(model.up.weight.shape, generator=g) < 0.4} if masked else None
    fast = compute_fisher(model, batches, targets, sample_score_masks=masks, progress=False)
    slow = fisher_loop(model, batches, targets, sample_score_masks=masks)
    assert _max_relative_error(fast.scores, slow.scores) < 1e-5
    assert torch.allclose(fast.sample_scores, slow.sample_scores, rtol=1e-5)


def test_cutting_the_spans_changes_no_score_on_a_padded_bert(monkeypatch):
    model = tiny_bert()
    batches = batches_of(make_examples(12, min_len=3, max_len=16), 6)
    targets = _targets(model)
    monkeypatch.setattr(sink_module, "PER_SAMPLE_GEMM_MIN_ELEMENTS", 1)  # every weight on the per-sample path
    cut = compute_fisher(model, batches, targets, progress=False)
    monkeypatch.setattr(sink_module, "live_spans", lambda a, b: [(0, a.shape[1])] * a.shape[0])
    whole = compute_fisher(model, batches, targets, progress=False)
    assert _max_relative_error(cut.scores, whole.scores) < 1e-6
    assert torch.allclose(cut.sample_scores, whole.sample_scores, rtol=1e-6)
