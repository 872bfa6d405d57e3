"""The PEFT-free mask utility: Fisher scores, the FISH mask, and the bridge to PEFT's SHiRA."""

import warnings

import pytest
import torch
from conftest import VOCAB, lm_collate, lm_examples, make_examples, pad_collate, tiny_bert, tiny_gpt2
from transformers import GPT2Config, GPT2LMHeadModel

from peft_fish_ird import fish_mask, fisher_scores, shira_budget, shira_mask_fn
from peft_fish_ird.data import fisher_batches
from peft_fish_ird.fisher import rule_for
from peft_fish_ird.reference import fisher_loop

DRAW = dict(data_collator=pad_collate, num_samples=12, seed=3, batch_size=4, progress=False)


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_gpt2])
def test_scores_of_a_plain_transformers_model_equal_the_batch_size_one_loop(make_model):
    model, data = make_model(), make_examples(20)
    scores = fisher_scores(model, data, **DRAW)
    assert list(scores) == [name for name, _ in model.named_parameters()]  # every parameter, the head included
    drawn = fisher_batches(data, model=model, num_samples=12, seed=3, batch_size=4, data_collator=pad_collate)
    targets = {name: m for name, m in model.named_modules() if rule_for(m) is not None}
    slow = fisher_loop(model, drawn.batches, targets).scores
    for name, param in model.named_parameters():
        assert scores[name].shape == param.shape and scores[name].dtype == torch.float64
        torch.testing.assert_close(scores[name].float(), slow[name], rtol=1e-4, atol=1e-9)


def test_target_modules_restrict_the_scored_parameters():
    model = tiny_bert()
    scores = fisher_scores(model, make_examples(20), target_modules=["query", "classifier"], **DRAW)
    assert sorted(scores) == sorted(
        [f"bert.encoder.layer.{i}.attention.self.query.{p}" for i in (0, 1) for p in ("weight", "bias")]
        + ["classifier.weight", "classifier.bias"]
    )
    regex = fisher_scores(model, make_examples(20), target_modules=r".*layer\.1\..*dense", **DRAW)
    assert regex and all(name.startswith("bert.encoder.layer.1.") for name in regex)


def test_mask_is_the_naive_global_top_k_of_the_scores():
    model, data = tiny_bert(), make_examples(20)
    masks = fish_mask(model, data, keep_ratio=0.02, **DRAW)
    scores = fisher_scores(model, data, **DRAW)
    k = int(0.02 * sum(p.numel() for p in model.parameters()))
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    expected = set(torch.sort(flat, descending=True, stable=True).indices[:k].tolist())
    got, offset = set(), 0
    for name, s in scores.items():
        assert masks[name].dtype == torch.int64 and torch.equal(masks[name], masks[name].sort().values)
        got |= {offset + int(i) for i in masks[name]}
        offset += s.numel()
    assert got == expected and len(got) == k
    again = fish_mask(model, data, keep_ratio=0.02, **DRAW)
    assert all(torch.equal(again[n], masks[n]) for n in masks)


def test_per_parameter_budget_takes_each_parameters_top_entries():
    model, data = tiny_bert(), make_examples(20)
    budget = {"bert.encoder.layer.0.output.dense.weight": 7, "classifier.bias": 1}
    masks = fish_mask(model, data, budget=budget, **DRAW)
    scores = fisher_scores(model, data, target_modules=["layer.0.output.dense", "classifier"], **DRAW)
    assert list(masks) == list(budget)
    for name, count in budget.items():
        top = torch.sort(scores[name].reshape(-1), descending=True, stable=True).indices[:count]
        assert torch.equal(masks[name], top.sort().values)


def weight_name(peft_module_name):
    """``base_model.model.<layer>`` -> ``<layer>.weight``, the key of the FISH mask."""
    return f"{peft_module_name.removeprefix('base_model.model.')}.weight"


def shira_model_from_fish(model, r, targets, masks):
    from peft import ShiraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SHiRA warns that a mask_type other than "random" needs a mask_fn
        config = ShiraConfig(r=r, mask_type="fish", target_modules=targets)
    config.mask_fn = shira_mask_fn(model, masks)
    return get_peft_model(model, config)


def test_shira_trains_exactly_the_fish_entries():
    model, data, targets, r = tiny_bert(), make_examples(20), ["query", "value"], 1
    masks = fish_mask(model, data, budget=shira_budget(model, r, targets), **DRAW)
    assert len(masks) == 4 and all(v.numel() == r * (16 + 16) for v in masks.values())
    peft_model = shira_model_from_fish(model, r, targets, masks)
    layers = {n: m for n, m in peft_model.named_modules() if hasattr(m, "shira_indices")}
    assert sorted(weight_name(n) for n in layers) == sorted(masks)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"{n}.shira_weight.default" for n in layers)
    for name, layer in layers.items():
        rows, cols = layer.shira_indices["default"].long()
        assert torch.equal(rows * layer.in_features + cols, masks[weight_name(name)])
        with torch.no_grad():
            layer.shira_weight["default"].fill_(1.0)
        delta = layer.get_delta_weight("default").to_dense().reshape(-1)
        assert torch.equal(delta.nonzero().squeeze(1), masks[weight_name(name)])


def test_shira_refuses_a_mask_whose_count_is_not_r_times_in_plus_out():
    model, data = tiny_bert(), make_examples(20)
    masks = fish_mask(model, data, keep_ratio=0.05, target_modules=["query"], **DRAW)
    masks = {n: v for n, v in masks.items() if n.endswith(".weight")}
    with pytest.raises(ValueError, match=r"r \* \(in_features \+ out_features\).*r=1, so 1 \* \(16 \+ 16\) = 32"):
        shira_model_from_fish(model, 1, ["query"], masks)


def test_shira_bridge_refuses_entries_shira_would_drop():
    model = tiny_bert()
    with pytest.raises(ValueError, match="only the weights of nn.Linear"):
        shira_mask_fn(model, {"bert.embeddings.LayerNorm.weight": torch.tensor([0])})
    with pytest.raises(ValueError, match="only nn.Linear"):
        shira_budget(model, 1, ["word_embeddings"])


@pytest.mark.parametrize("keep_ratio", [0.0, -0.1, 1.5, True])
def test_keep_ratio_out_of_range_is_refused(keep_ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        fish_mask(tiny_bert(), make_examples(4), keep_ratio=keep_ratio, **DRAW)


def test_budget_larger_than_the_targets_is_refused_before_any_fisher_pass():
    with pytest.raises(ValueError, match="more than the 544 entries"):
        fish_mask(tiny_bert(), None, keep_ratio=0.5, target_modules=["query"], **DRAW)


def test_unknown_target_names_are_refused():
    with pytest.raises(ValueError, match=r"\['qery'\] match no module"):
        fisher_scores(tiny_bert(), make_examples(4), target_modules=["query", "qery"], **DRAW)
    with pytest.raises(ValueError, match="no rule for"):
        fisher_scores(tiny_bert(), make_examples(4), target_modules=["attention"], **DRAW)
    with pytest.raises(ValueError, match="does not have"):
        fish_mask(tiny_bert(), make_examples(4), budget={"bert.nope.weight": 1}, **DRAW)
    with pytest.raises(ValueError, match="not scored"):
        fish_mask(tiny_bert(), make_examples(4), budget={"classifier.bias": 1}, target_modules=["query"], **DRAW)
    with pytest.raises(ValueError, match="budget='top'"):
        fish_mask(tiny_bert(), make_examples(4), budget="top", **DRAW)


def test_data_without_labels_is_refused():
    unlabelled = [{k: v for k, v in e.items() if k != "labels"} for e in make_examples(8)]

    def collate(examples):
        return {k: v for k, v in pad_collate([{**e, "labels": 0} for e in examples]).items() if k != "labels"}

    with pytest.raises(ValueError, match="no 'labels'"):
        fisher_scores(tiny_bert(), unlabelled, **{**DRAW, "data_collator": collate})


def test_tied_gpt2_lm_head_is_scored_once_summing_both_uses_like_the_batch_size_one_loop():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    examples = lm_examples(8)
    scores = fisher_scores(model, examples, data_collator=lm_collate, num_samples=8, batch_size=4, progress=False)
    assert "transformer.wte.weight" in scores and "lm_head.weight" not in scores
    drawn = fisher_batches(examples, model=model, num_samples=8, seed=0, batch_size=1, data_collator=lm_collate)
    targets = {n: m for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    slow = fisher_loop(model, drawn.batches, targets)
    torch.testing.assert_close(
        scores["transformer.wte.weight"].float(), slow.scores["transformer.wte.weight"], rtol=1e-4, atol=1e-9
    )


def test_shira_adapter_from_a_fish_mask_saves_and_reloads_its_entries(tmp_path):
    from peft import PeftModel

    model, targets, r = tiny_bert(), ["query"], 1
    masks = fish_mask(model, make_examples(20), budget=shira_budget(model, r, targets), **DRAW)
    shira_model_from_fish(model, r, targets, masks).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    for name, layer in loaded.named_modules():
        if hasattr(layer, "shira_indices"):
            rows, cols = layer.shira_indices["default"].long()
            assert torch.equal(rows * layer.in_features + cols, masks[weight_name(name)])
