"""Positions whose output gradient is zero for the whole batch are cut from the sparse layers'
backward, and the gradients stay those of the slow obvious path."""

import pytest
import torch
from test_sparse_ops import CASES, _close, _module

from peft_fish_ird import sparse_ops
from peft_fish_ird.zero_positions import batch_live_span


def _run_with_weights(layer, x, fast, weights):
    """Forward, then backward of sum(out * weights): positions where ``weights`` is 0 get a zero output gradient."""
    layer.use_fast_path = fast
    layer.train()
    x = x.clone().requires_grad_(True)
    (layer(x) * weights).sum().backward()
    grads = {n: layer.values(n)["default"].grad.clone() for n in layer.base_param_names()}
    for n in layer.base_param_names():
        layer.values(n)["default"].grad = None
    return x.grad, grads


def test_batch_live_span_finds_the_outer_positions_zero_for_every_sample():
    g = torch.randn(3, 6, 4)
    assert batch_live_span(g) is None  # both ends live: nothing to cut
    g[:, 4:] = 0
    g[:, 0] = 0
    g[1, 2] = 0  # an inner zero position stays
    assert batch_live_span(g) == (1, 4)
    g[2, 4, 3] = float("nan")  # a NaN makes its position live
    assert batch_live_span(g) == (1, 5)
    assert batch_live_span(torch.zeros(2, 5, 3)) == (0, 0)
    assert batch_live_span(torch.randn(6, 4)) is None  # 2-D: positions are not known


@pytest.mark.parametrize("name, make, shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("live", [(0, 1), (2, 5), (0, 0)], ids=["first_only", "middle", "none"])
def test_cut_positions_give_the_reference_gradients(name, make, shape, live):
    layer = _module(make(), 0.3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    weights = torch.zeros(shape[0], shape[1], 1)
    weights[:, live[0] : live[1]] = torch.rand(shape[0], live[1] - live[0], 1, generator=g) + 0.5
    fast_x, fast_w = _run_with_weights(layer, x, True, weights)
    slow_x, slow_w = _run_with_weights(layer, x, False, weights)
    assert torch.equal(fast_x[:, : live[0]], torch.zeros_like(fast_x[:, : live[0]]))
    assert _close(fast_x, slow_x, 1e-5) or not slow_x.abs().max()
    for n in fast_w:
        assert _close(fast_w[n], slow_w[n], 1e-5) or not slow_w[n].abs().max()


def test_the_cut_is_taken(monkeypatch):
    seen = []
    original = sparse_ops.batch_live_span
    monkeypatch.setattr(sparse_ops, "batch_live_span", lambda g: seen.append(original(g)) or seen[-1])
    layer = _module(CASES[0][1](), 0.3)
    weights = torch.zeros(3, 7, 1)
    weights[:, 0] = 1.0
    _run_with_weights(layer, torch.randn(3, 7, 24), True, weights)
    assert seen == [(0, 1)]
