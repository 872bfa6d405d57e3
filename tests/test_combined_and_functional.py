"""add_weighted_adapter (a weighted sum of sparse deltas) and the functional path for models built
with PEFT's inject_adapter_in_model."""

import pytest
import torch
from conftest import fish_config, make_examples, pad_collate, randomize_values, tiny_bert
from peft import get_peft_model, inject_adapter_in_model

import peft_fish_ird
from peft_fish_ird.layer import FishIRDLayer


def _two_adapter_model():
    model = get_peft_model(tiny_bert(), fish_config(seed=0))
    model.add_adapter("other", fish_config(seed=1, num_samples=8))
    for name in ("default", "other"):
        model.set_adapter(name)
        model.prepare(make_examples(24, seed=3 if name == "other" else 0), data_collator=pad_collate, progress=False)
    randomize_values(model, seed=5)
    return model


def test_weighted_adapter_delta_is_the_weighted_sum_of_the_deltas():
    model = _two_adapter_model()
    record = model.add_weighted_adapter(["default", "other"], [0.7, -0.4], "mix")
    assert record.method == "weighted"
    layers = [m for m in model.modules() if isinstance(m, FishIRDLayer)]
    for layer in layers:
        for param in layer.base_param_names():
            expected = 0.7 * layer.get_delta_weight("default", param) - 0.4 * layer.get_delta_weight("other", param)
            assert torch.allclose(layer.get_delta_weight("mix", param), expected, atol=1e-7)
    union = sum(
        int(torch.unique(torch.cat([lay.indices("weight")[a] for a in ("default", "other")])).numel()) for lay in layers
    )
    assert sum(int(lay.indices("weight")["mix"].numel()) for lay in layers) == union


def test_weighted_adapter_output_equals_the_model_with_combined_weights():
    model = _two_adapter_model()
    model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    model.set_adapter("mix")
    model.eval()
    batch = pad_collate(make_examples(4, seed=9))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        adapter_logits = model(**inputs).logits
        merged_logits = model.merge_and_unload(adapter_names=["mix"])(**inputs).logits
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-5)


@pytest.mark.parametrize(
    ("adapters", "weights", "name", "message"),
    [
        (["default", "missing"], [1.0, 1.0], "mix", "No adapters named"),
        (["default"], [1.0, 2.0], "mix", "one weight per adapter"),
        (["default"], [float("nan")], "mix", "finite"),
        (["default"], [1.0], "other", "already exists"),
    ],
)
def test_weighted_adapter_refuses_bad_requests(adapters, weights, name, message):
    model = _two_adapter_model()
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(adapters, weights, name)


def test_weighted_adapter_needs_prepared_adapters():
    model = get_peft_model(tiny_bert(), fish_config())
    with pytest.raises(ValueError, match="no mask yet"):
        model.add_weighted_adapter(["default"], [1.0], "mix")


def test_injected_model_prepares_like_get_peft_model():
    config = fish_config(modules_to_save=None, task_type=None)
    reference = get_peft_model(tiny_bert(), fish_config(modules_to_save=None, task_type=None))
    expected = reference.prepare(make_examples(24), data_collator=pad_collate, progress=False)
    injected = inject_adapter_in_model(config, tiny_bert())
    record = peft_fish_ird.prepare_model(injected, config, make_examples(24), data_collator=pad_collate, progress=False)
    assert record.mask_sha256 == expected.mask_sha256
    assert config.selection_record["mask_sha256"] == record.mask_sha256


def test_prepare_model_refuses_a_model_without_the_adapter():
    with pytest.raises(ValueError, match="inject_adapter_in_model"):
        peft_fish_ird.prepare_model(tiny_bert(), fish_config(), make_examples(8), data_collator=pad_collate)
