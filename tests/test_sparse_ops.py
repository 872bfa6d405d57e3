"""Fast sparse-delta forward/backward equals the slow obvious path (dense effective weight + autograd)."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_fish_ird import sparse_ops
from peft_fish_ird.layer import FishIRDModule


def _module(base, density, seed=0, bias_entries=3):
    torch.manual_seed(seed)
    layer = FishIRDModule(base, "default")
    for p in base.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    w = base.weight
    k = max(1, int(density * w.numel()))
    layer.set_entries("default", "weight", torch.randperm(w.numel(), generator=g)[:k].sort().values)
    if getattr(base, "bias", None) is not None:
        layer.set_entries(
            "default", "bias", torch.randperm(base.bias.numel(), generator=g)[:bias_entries].sort().values
        )
    layer.fishird_prepared["default"] = True
    with torch.no_grad():
        for name in layer.base_param_names():
            v = layer.values(name)["default"]
            v.copy_(torch.randn(v.shape, generator=g))
    return layer


def _run(layer, x, fast):
    layer.use_fast_path = fast
    layer.train()
    x = x.clone().requires_grad_(x.is_floating_point())
    out = layer(x)
    out.float().square().sum().backward()
    grads = {n: layer.values(n)["default"].grad.clone() for n in layer.base_param_names()}
    for n in layer.base_param_names():
        layer.values(n)["default"].grad = None
    return out.detach(), (x.grad if x.is_floating_point() else None), grads


def _close(a, b, rtol):
    scale = max(float(b.abs().max()), 1e-6)
    return float((a.float() - b.float()).abs().max()) / scale <= rtol


CASES = [
    ("linear_tall", lambda: nn.Linear(24, 64), (3, 7, 24)),
    ("linear_wide", lambda: nn.Linear(64, 24), (3, 7, 64)),
    ("conv1d_tall", lambda: Conv1D(64, 24), (3, 7, 24)),
    ("conv1d_wide", lambda: Conv1D(24, 64), (3, 7, 64)),
]


@pytest.mark.parametrize("name, make, shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("density", [0.005, 0.3], ids=["sparse", "dense"])
@pytest.mark.parametrize("strategy", sparse_ops.STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matmul_fast_path_matches_reference(name, make, shape, density, strategy, dtype, monkeypatch):
    monkeypatch.setenv(sparse_ops.AUTOTUNE_ENV, "0")  # the cost model decides: force each strategy through it
    monkeypatch.setattr(sparse_ops, "choose_strategy", lambda *args: strategy)
    layer = _module(make().to(dtype), density)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    fast = _run(layer, x, True)
    slow = _run(layer, x, False)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert _close(fast[0], slow[0], rtol)
    assert _close(fast[1], slow[1], rtol)
    for key in slow[2]:
        assert fast[2][key].dtype == torch.float32
        assert _close(fast[2][key], slow[2][key], rtol), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_embedding_fast_path_matches_reference(dtype):
    layer = _module(nn.Embedding(50, 8, padding_idx=0).to(dtype), 0.1)
    ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(2))
    ids[0, :3] = 0
    ids[1, :4] = ids[1, 5]  # repeated ids
    fast = _run(layer, ids, True)
    slow = _run(layer, ids, False)
    rtol = 1e-6 if dtype == torch.float32 else 2e-2
    assert _close(fast[0], slow[0], rtol)
    assert _close(fast[2]["weight"], slow[2]["weight"], rtol)


def test_fast_path_never_forms_a_dense_weight_gradient(monkeypatch):
    """The SDDMM path computes only the selected entries (no (out x in) gradient product)."""
    monkeypatch.setenv(sparse_ops.AUTOTUNE_ENV, "0")  # the cost model picks SDDMM here (the autotune times all)
    layer = _module(nn.Linear(256, 512), 0.001)
    calls = []
    original = torch.Tensor.__matmul__

    def spy(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return original(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    _run(layer, torch.randn(2, 5, 256), True)
    assert all(shape != ((512, 10), (10, 256)) for shape in calls)


def test_layout_is_rebuilt_when_indices_change():
    layer = _module(nn.Linear(16, 32), 0.1)
    x = torch.randn(2, 16)
    layer(x)
    first = layer._layout_cache["default"][1]
    layer.set_entries("default", "weight", torch.tensor([0, 5, 9]))
    layer.fishird_prepared["default"] = True
    layer(x)
    assert layer._layout_cache["default"][1] is not first
    assert isinstance(layer._layout_cache["default"][1], sparse_ops.MatrixPattern)


@pytest.mark.parametrize(
    "make, shape",
    [(lambda: nn.Linear(24, 64), (3, 7, 24)), (lambda: Conv1D(64, 24), (3, 7, 24))],
    ids=["linear", "conv1d"],
)
def test_fast_path_under_cpu_autocast_matches_reference(make, shape):
    layer = _module(make(), 0.01)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    results = []
    for fast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_run(layer, x, fast))
    (fo, fx, fg), (so, sx, sg) = results
    assert fo.dtype == so.dtype and fx.dtype == torch.float32
    assert _close(fo, so, 2e-2) and _close(fx, sx, 2e-2)
    assert all(_close(fg[k], sg[k], 3e-2) for k in sg)


def _clustered_columns(rows, cols, used_cols, per_col, seed=0):
    g = torch.Generator().manual_seed(seed)
    chosen_cols = torch.randperm(cols, generator=g)[:used_cols]
    flat = torch.cat([torch.randperm(rows, generator=g)[:per_col] * cols + c for c in chosen_cols])
    return flat.sort().values


def test_gradient_strategy_follows_where_the_entries_sit(monkeypatch):
    """The cost model (the fallback without the autotune): column-clustered masks (BERT's outlier
    features) get a product over those columns only; scattered sparse masks get SDDMM; dense masks
    the full product; the transpose picks rows."""
    monkeypatch.setenv(sparse_ops.AUTOTUNE_ENV, "0")
    clustered = _clustered_columns(384, 384, used_cols=4, per_col=100)
    assert sparse_ops.MatrixPattern.build(clustered, 384, 384).strategy == "cols"
    rows_clustered = (clustered % 384) * 384 + clustered // 384
    assert sparse_ops.MatrixPattern.build(rows_clustered.sort().values, 384, 384).strategy == "rows"
    scattered = torch.randperm(384 * 1536, generator=torch.Generator().manual_seed(1))[:500].sort().values
    assert sparse_ops.MatrixPattern.build(scattered, 384, 1536).strategy == "sddmm"
    dense = torch.randperm(384 * 384, generator=torch.Generator().manual_seed(2))[: 384 * 384 // 2].sort().values
    assert sparse_ops.MatrixPattern.build(dense, 384, 384).strategy == "dense"


def test_unknown_gradient_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy='csr'"):
        sparse_ops.MatrixPattern.build(torch.tensor([0, 3]), 2, 2, strategy="csr")


@pytest.mark.parametrize("strategy", ["rows", "cols"])
def test_subset_strategies_match_the_dense_gather_on_clustered_masks(strategy):
    flat = _clustered_columns(48, 40, used_cols=3, per_col=7)
    if strategy == "rows":
        flat = ((flat % 40) * 48 + flat // 40).sort().values  # the same shape of mask on a (40, 48) matrix
        shape = (40, 48)
    else:
        shape = (48, 40)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(30, shape[0], generator=g), torch.randn(30, shape[1], generator=g)
    fast = sparse_ops.MatrixPattern.build(flat, *shape, strategy=strategy).sampled(a, b)
    assert torch.allclose(fast, (a.t() @ b).reshape(-1)[flat], rtol=1e-5, atol=1e-6)


def _operands(rows, cols, tokens=64, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, rows, generator=g), torch.randn(tokens, cols, generator=g)


def test_autotune_times_every_strategy_once_keeps_the_fastest_and_caches_it(monkeypatch):
    sparse_ops.clear_autotune_cache()
    flat = _clustered_columns(96, 80, used_cols=5, per_col=9)
    pattern = sparse_ops.MatrixPattern.build(flat, 96, 80)
    assert pattern.strategy == sparse_ops.AUTOTUNE_STRATEGY
    original = sparse_ops.MatrixPattern.sampled
    clock = [0.0]  # a virtual clock: "cols" the fastest whatever this machine's (or its load's) real speeds

    def slow_unless_cols(self, a, b):
        if self.strategy != sparse_ops.AUTOTUNE_STRATEGY:
            clock[0] += 0.001 if self.strategy == "cols" else 0.005
        return original(self, a, b)

    monkeypatch.setattr(sparse_ops.MatrixPattern, "sampled", slow_unless_cols)
    monkeypatch.setattr(sparse_ops, "time", type("VirtualTime", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    a, b = _operands(96, 80)
    got = pattern.sampled(a, b)
    assert pattern.strategy == "cols" and set(pattern.timings) == set(sparse_ops.STRATEGIES)
    assert torch.allclose(got, (a.t() @ b).reshape(-1)[flat], rtol=1e-5, atol=1e-5)
    twin = sparse_ops.MatrixPattern.build(flat, 96, 80)  # the same kind of pattern: no second timing
    twin.sampled(a, b)
    assert twin.strategy == "cols" and twin.timings is None


def test_an_explicit_auto_pattern_is_tuned_even_with_the_autotune_off(monkeypatch):
    monkeypatch.setenv(sparse_ops.AUTOTUNE_ENV, "0")
    flat = _clustered_columns(48, 40, used_cols=3, per_col=7)
    pattern = sparse_ops.MatrixPattern.build(flat, 48, 40, sparse_ops.AUTOTUNE_STRATEGY)
    a, b = _operands(48, 40)
    assert pattern.tune(a, b) in sparse_ops.STRATEGIES and pattern.strategy in sparse_ops.STRATEGIES


def test_autotune_off_uses_the_cost_model(monkeypatch):
    monkeypatch.setenv(sparse_ops.AUTOTUNE_ENV, "0")
    flat = _clustered_columns(384, 384, used_cols=4, per_col=100)
    assert sparse_ops.MatrixPattern.build(flat, 384, 384).strategy == "cols"


@pytest.mark.parametrize("name, make, shape", CASES, ids=[c[0] for c in CASES])
def test_autotuned_fast_path_matches_reference(name, make, shape):
    sparse_ops.clear_autotune_cache()
    layer = _module(make(), 0.05)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    fast, slow = _run(layer, x, True), _run(layer, x, False)
    for key in slow[2]:
        assert _close(fast[2][key], slow[2][key], 1e-5), key


def _saved_weight_copies(layer, x):
    """Tensors of the base weight's shape that the fast path saves for backward, other than the base itself."""
    weight = layer.get_base_layer().weight
    copies = []

    def pack(t):
        if t.shape == weight.shape and t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            copies.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x.clone().requires_grad_(True)).sum().backward()
    return copies


@pytest.mark.parametrize("name, make, shape", CASES, ids=[c[0] for c in CASES])
def test_fast_path_keeps_no_copy_of_the_weight_unless_asked_and_gives_the_same_bits(name, make, shape):
    layer = _module(make(), 0.05)
    layer.use_fast_path = True
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    assert layer.keep_effective_weight.get("default", False) is False  # the default: rebuild in backward
    assert _saved_weight_copies(layer, x) == []
    rebuilt = _run(layer, x, True)
    layer.keep_effective_weight["default"] = True
    assert len(_saved_weight_copies(layer, x)) == 1
    kept = _run(layer, x, True)
    assert torch.equal(rebuilt[0], kept[0]) and torch.equal(rebuilt[1], kept[1])
    for key in kept[2]:
        assert torch.equal(rebuilt[2][key], kept[2][key]), key
