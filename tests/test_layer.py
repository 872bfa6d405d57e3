"""Sparse-delta layer behaves like PEFT's LoRA layers: merge, unmerge, disable, several adapters."""

import pytest
import torch
from conftest import fish_config, make_examples, pad_collate, prepared_tiny_bert, randomize_values, tiny_bert
from peft import get_peft_model

from peft_fish_ird.layer import FishIRDLayer


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.fixture
def trained():
    model = prepared_tiny_bert()
    randomize_values(model)
    return model


@pytest.fixture
def batch():
    return pad_collate(make_examples(6, seed=5))


def test_zero_values_give_the_base_model_outputs(batch):
    base = _logits(tiny_bert(), batch)
    model = prepared_tiny_bert()
    assert torch.equal(_logits(model, batch), base)


def test_merged_forward_equals_adapter_forward(trained, batch):
    adapter = _logits(trained, batch)
    trained.merge_adapter()
    assert torch.allclose(_logits(trained, batch), adapter, atol=1e-6)


def test_merge_then_unmerge_restores_base_weights_bit_for_bit(trained):
    before = {k: v.clone() for k, v in trained.get_base_model().state_dict().items() if "base_layer" in k}
    trained.merge_adapter()
    changed = [
        k for k, v in trained.get_base_model().state_dict().items() if k in before and not torch.equal(v, before[k])
    ]
    assert changed, "merge must write the base tensors"
    trained.unmerge_adapter()
    after = trained.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_merge_and_unload_returns_plain_model_with_same_outputs(trained, batch):
    adapter = _logits(trained, batch)
    plain = trained.merge_and_unload()
    assert not any(isinstance(m, FishIRDLayer) for m in plain.modules())
    assert torch.allclose(_logits(plain, batch), adapter, atol=1e-6)


def test_unload_returns_the_base_model(trained, batch):
    base = _logits(tiny_bert(), batch)
    plain = trained.unload()
    assert torch.equal(_logits(plain, batch), base)


def test_disable_adapter_gives_base_outputs(trained, batch):
    base = _logits(tiny_bert(), batch)
    assert not torch.equal(_logits(trained, batch), base)
    with trained.disable_adapter():
        assert torch.equal(_logits(trained, batch), base)
    assert not torch.equal(_logits(trained, batch), base)


def test_only_selected_entries_of_effective_weights_change(trained):
    for name, module in trained.named_modules():
        if isinstance(module, FishIRDLayer):
            for p in module.base_param_names():
                base = getattr(module.get_base_layer(), p)
                eff = module.effective_param(p, ["default"])
                diff = (eff != base).reshape(-1).nonzero().squeeze(1)
                assert set(diff.tolist()) <= set(module.indices(p)["default"].tolist()), name


def test_two_adapters_switch_and_delete(batch):
    model = get_peft_model(tiny_bert(), fish_config())
    model.prepare(make_examples(24), data_collator=pad_collate, progress=False)
    randomize_values(model, seed=1)
    model.add_adapter("other", fish_config(seed=3, keep_ratio=0.08))
    model.base_model.prepare(make_examples(24, seed=9), data_collator=pad_collate, adapter_name="other", progress=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fishird_" in name and name.endswith(".other") and p.numel():
                p.fill_(0.05)
    out_default = _logits(model, batch)
    model.set_adapter("other")
    out_other = _logits(model, batch)
    assert not torch.equal(out_default, out_other)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "fishird_" in n}
    assert trainable and all(n.endswith(".other") for n in trainable)
    model.set_adapter("default")
    assert torch.equal(_logits(model, batch), out_default)
    model.delete_adapter("other")
    assert not any(n.endswith(".other") for n, _ in model.named_parameters())
    assert torch.equal(_logits(model, batch), out_default)


def test_safe_merge_refuses_non_finite_values(trained):
    with torch.no_grad():
        next(p for n, p in trained.named_parameters() if "fishird_" in n and p.numel()).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        trained.merge_adapter(safe_merge=True)
