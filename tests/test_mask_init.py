"""Data-free initial masks (mask_init) and PEFT's init_weights convention; the layer contract PEFT's tests expect."""

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

from peft_fish_ird import FishIRDConfig, UnpreparedAdapterError
from peft_fish_ird.layer import FishIRDModule
from peft_fish_ird.selection import random_mask, sparse_budget

X = torch.randn(9, 10, generator=torch.Generator().manual_seed(3))


class MLP(nn.Module):
    """PEFT's test MLP: 262 parameters (lin0 10->20: 220, lin1 20->2: 42)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def config(**kwargs):
    base = {"target_modules": ["lin0"], "keep_ratio": 0.5, "head_in_budget": False, "mask_init": "random"}
    return FishIRDConfig(**{**base, **kwargs})


def entries(model, adapter="default"):
    layer = model.base_model.model.lin0
    return {p: layer.indices(p)[adapter].clone() for p in layer.base_param_names()}


def test_default_mask_init_still_needs_prepare():
    model = get_peft_model(MLP(), config(mask_init="fisher")).train()
    with pytest.raises(UnpreparedAdapterError, match="prepare"):
        model(X)


@pytest.mark.parametrize("mask_init", ["random", "magnitude"])
def test_data_free_mask_has_prepares_budget_and_starts_as_identity(mask_init):
    base_out = MLP()(X)
    model = get_peft_model(MLP(), config(mask_init=mask_init))
    k = sparse_budget(262, 0, 0.5, head_in_budget=False)
    assert sum(t.numel() for t in entries(model).values()) == k == 131
    assert model.get_nb_trainable_parameters()[0] == k
    assert torch.equal(model(X), base_out)
    assert model.selection.method == mask_init and model.selection.fisher == "none" and model.selection.k == k


def test_head_in_budget_shrinks_the_data_free_mask():
    model = get_peft_model(MLP(), config(head_in_budget=True, modules_to_save=["lin1"]))
    assert sum(t.numel() for t in entries(model).values()) == 131 - 42


def test_random_mask_is_the_seeded_draw_of_selection_random():
    model = get_peft_model(MLP(), config(seed=7))
    expected = random_mask({"lin0.weight": 200, "lin0.bias": 20}, 131, seed=7)
    got = entries(model)
    assert torch.equal(got["weight"], expected["lin0.weight"]) and torch.equal(got["bias"], expected["lin0.bias"])


def test_magnitude_mask_is_the_global_top_k_of_abs_weights():
    model = get_peft_model(MLP(), config(mask_init="magnitude"))
    layer = model.base_model.model.lin0.base_layer
    scores = torch.cat([layer.weight.detach().abs().reshape(-1), layer.bias.detach().abs()])
    chosen = set(torch.topk(scores, 131).indices.tolist())
    got = entries(model)
    assert set(got["weight"].tolist()) | {200 + i for i in got["bias"].tolist()} == chosen


def test_init_weights_false_draws_nonzero_values_that_change_outputs():
    base_out = MLP()(X)
    model = get_peft_model(MLP(), config(init_weights=False))
    values = model.base_model.model.lin0.values("weight")["default"]
    assert bool((values != 0).all())
    assert not torch.allclose(model(X), base_out)


def test_prepare_replaces_an_untouched_data_free_mask_but_trained_values_need_overwrite():
    for init_weights in (True, False):
        model = get_peft_model(MLP(), config(mask_init="magnitude", init_weights=init_weights, selection="random"))
        before = entries(model)
        model.prepare([{"x": 0}], progress=False)  # selection="random" reads no data
        assert not torch.equal(entries(model)["weight"], before["weight"])
        assert model.selection.method == "random"
    with torch.no_grad():
        model.base_model.model.lin0.values("weight")["default"].add_(0.5)
    with pytest.raises(RuntimeError, match="overwrite=True"):
        model.prepare([{"x": 0}], progress=False)
    model.prepare([{"x": 0}], progress=False, overwrite=True)


def test_data_free_adapter_saves_and_loads(tmp_path):
    model = get_peft_model(MLP(), config(mask_init="magnitude", init_weights=False)).eval()
    out = model(X)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path).eval()
    assert torch.equal(loaded(X), out)
    assert loaded.selection.method == "magnitude"


def test_multiple_active_adapters_add_their_sparse_deltas():
    model = get_peft_model(MLP(), config(init_weights=False))
    model.add_adapter("other", config(init_weights=False, seed=1))
    model.base_model.set_adapter(["default", "other"])
    layer = model.base_model.model.lin0
    base = layer.base_layer
    weight = base.weight + layer.get_delta_weight("default") + layer.get_delta_weight("other")
    bias = base.bias + layer.get_delta_weight("default", "bias") + layer.get_delta_weight("other", "bias")
    torch.testing.assert_close(layer(X), F.linear(X, weight, bias))
    model.merge_adapter()
    torch.testing.assert_close(base(X), F.linear(X, weight, bias))


def test_slow_path_replaces_views_that_shadow_the_base_parameters():
    """FSDP (use_orig_params) keeps unsharded views in the module's __dict__ during forward."""
    model = get_peft_model(MLP(), config(init_weights=False))
    layer = model.base_model.model.lin0
    expected = layer(X)
    layer.use_fast_path = False
    base = layer.base_layer
    base.__dict__["weight"], base.__dict__["bias"] = base.weight.detach().clone(), base.bias.detach().clone()
    try:
        torch.testing.assert_close(layer(X), expected)
    finally:
        del base.__dict__["weight"], base.__dict__["bias"]


def test_layers_expose_in_and_out_features():
    lin = FishIRDModule(nn.Linear(10, 20), "default")
    emb = FishIRDModule(nn.Embedding(7, 4), "default")
    assert (lin.in_features, lin.out_features) == (10, 20)
    assert (emb.in_features, emb.out_features) == (7, 4)


@pytest.mark.parametrize("autocast", [True, False])
def test_values_dtype_follows_peft_autocast_convention(autocast):
    model = get_peft_model(MLP().to(torch.bfloat16), config(), autocast_adapter_dtype=autocast)
    values = model.base_model.model.lin0.values("weight")["default"]
    assert values.dtype == (torch.float32 if autocast else torch.bfloat16)


@pytest.mark.parametrize(
    "kwargs, error", [({"mask_init": "fish"}, ValueError), ({"init_weights": "no"}, TypeError)], ids=["mask", "init"]
)
def test_config_rejects_bad_mask_init_and_init_weights(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        config(**kwargs)


def test_callback_with_data_replaces_the_data_free_mask():
    from peft_fish_ird import FishIRDCallback

    model = get_peft_model(MLP(), config(mask_init="magnitude", selection="random"))
    FishIRDCallback(train_dataset=[{"x": 0}], progress=False).on_init_end(None, None, None, model=model)
    assert model.selection.method == "random"
