"""budget="column_capped": per-module quotas, and no input feature of a matrix holds more than its
even share - the greedy top-k under that cap, checked against a slow obvious loop."""

import math

import pytest
import torch
from conftest import adapter_masks, fish_config, make_examples, pad_collate, tiny_bert, tiny_gpt2
from peft import get_peft_model

from peft_fish_ird.layer import FishIRDLayer
from peft_fish_ird.masks import fish_mask, fisher_scores
from peft_fish_ird.selection import column_capped_top_k, select


def greedy_reference(scores: torch.Tensor, quota: int, axis: int, allowed=None) -> torch.Tensor:
    """Walk the entries from the highest score (ties: lower flat position) and take each one whose
    input feature is not full yet; if the capped walk ends short, take the best of the rest."""
    flat = scores.reshape(-1).tolist()
    allowed = [True] * len(flat) if allowed is None else allowed.reshape(-1).tolist()
    cols = scores.shape[1]
    cap = math.ceil(quota / scores.shape[axis])
    order = sorted((i for i in range(len(flat)) if allowed[i]), key=lambda i: (-flat[i], i))
    used, taken = {}, []
    for i in order:
        feature = i % cols if axis == 1 else i // cols
        if len(taken) < quota and used.get(feature, 0) < cap:
            used[feature] = used.get(feature, 0) + 1
            taken.append(i)
    # ties inside a feature break by position along the feature, which for axis 1 / axis 0 is the flat order
    rest = [i for i in order if i not in set(taken)][: quota - len(taken)]
    return torch.tensor(sorted(taken + rest), dtype=torch.int64)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("quota", [1, 5, 13, 40])
def test_capped_top_k_equals_the_greedy_walk_with_ties_and_ranges(axis, quota):
    g = torch.Generator().manual_seed(quota + 10 * axis)
    scores = torch.randint(0, 6, (7, 9), generator=g).double()  # many ties
    assert torch.equal(column_capped_top_k(scores, quota, axis), greedy_reference(scores, quota, axis))
    allowed = torch.rand(7, 9, generator=g) < 0.6
    if int(allowed.sum()) >= quota:
        masked = torch.where(allowed, scores, torch.tensor(float("-inf"), dtype=torch.float64))
        got = column_capped_top_k(masked, quota, axis)
        assert torch.equal(got, greedy_reference(scores, quota, axis, allowed))
        assert bool(allowed.reshape(-1)[got].all())


def test_a_single_hot_column_is_spread_over_the_others():
    scores = torch.ones(6, 4, dtype=torch.float64)
    scores[:, 2] = 100.0  # one "outlier" input feature dominates, as FISH sees on MiniLM
    plain = select({"w": scores}, 8, "per_module")["w"]
    capped = select({"w": scores}, 8, "column_capped", input_axes={"w": 1})["w"]
    assert torch.bincount(plain % 4, minlength=4).tolist()[2] == 6
    assert torch.bincount(capped % 4, minlength=4).tolist() == [2, 2, 2, 2]


def test_prepare_with_column_capped_keeps_per_module_counts_and_caps_every_linear_column():
    examples = make_examples(24)
    capped = get_peft_model(tiny_bert(0), fish_config(budget="column_capped", keep_ratio=0.1))
    capped.prepare(examples, data_collator=pad_collate, progress=False)
    plain = get_peft_model(tiny_bert(0), fish_config(budget="per_module", keep_ratio=0.1))
    plain.prepare(examples, data_collator=pad_collate, progress=False)
    a, b = adapter_masks(capped), adapter_masks(plain)
    assert {k: v.numel() for k, v in a.items()} == {k: v.numel() for k, v in b.items()}
    layers = {n: m for n, m in capped.base_model.model.named_modules() if isinstance(m, FishIRDLayer)}
    changed = 0
    for key, idx in a.items():
        module, param = key.rsplit(".", 1)
        base = layers[module].get_base_layer()
        if isinstance(base, torch.nn.Linear) and param == "weight" and idx.numel():
            per_column = torch.bincount(idx % base.in_features, minlength=base.in_features)
            assert int(per_column.max()) <= math.ceil(idx.numel() / base.in_features), key
            changed += not torch.equal(idx, b[key])
        else:
            assert torch.equal(idx, b[key]), key  # biases, norms, embeddings: the plain per-module top-k
    assert changed > 0


def test_column_capped_on_gpt2_conv1d_caps_the_rows_of_its_in_by_out_weight():
    examples = make_examples(24)
    model = get_peft_model(tiny_gpt2(0), fish_config(budget="column_capped", keep_ratio=0.1))
    model.prepare(examples, data_collator=pad_collate, progress=False)
    checked = 0
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, FishIRDLayer) and type(module.get_base_layer()).__name__ == "Conv1D":
            idx, (n_in, n_out) = module.indices("weight")["default"], module.get_base_layer().weight.shape
            if idx.numel():
                assert int(torch.bincount(idx // n_out, minlength=n_in).max()) <= math.ceil(idx.numel() / n_in)
                checked += 1
    assert checked > 0


def test_the_ird_mask_under_column_capped_obeys_the_cap():
    config = fish_config(
        budget="column_capped", keep_ratio=0.1, selection="ird", ird_rounds=2, ird_min_samples=4, ird_eval_steps=2
    )
    model = get_peft_model(tiny_bert(0), config)
    record = model.prepare(make_examples(40), data_collator=pad_collate, progress=False)
    assert len(record.trace) == 2
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, FishIRDLayer) and isinstance(module.get_base_layer(), torch.nn.Linear):
            idx, n_in = module.indices("weight")["default"], module.get_base_layer().in_features
            if idx.numel():
                assert int(torch.bincount(idx % n_in, minlength=n_in).max()) <= math.ceil(idx.numel() / n_in)


def test_fish_mask_function_caps_each_linear_column_of_its_per_module_top_k():
    model, data = tiny_bert(), make_examples(20)
    draw = dict(data_collator=pad_collate, num_samples=12, seed=3, batch_size=4, progress=False)
    capped = fish_mask(model, data, keep_ratio=0.05, budget="column_capped", **draw)
    scores = fisher_scores(model, data, **draw)
    plain = fish_mask(model, data, keep_ratio=0.05, budget="per_module", **draw)
    assert {k: v.numel() for k, v in capped.items()} == {k: v.numel() for k, v in plain.items()}
    modules = dict(model.named_modules())
    for name, idx in capped.items():
        module, param = name.rsplit(".", 1)
        if isinstance(modules[module], torch.nn.Linear) and param == "weight":
            assert torch.equal(idx, column_capped_top_k(scores[name], idx.numel(), 1)), name
        else:
            assert torch.equal(idx, plain[name]), name
    with pytest.raises(ValueError, match="column_capped"):
        fish_mask(model, data, budget="per_row", **draw)
