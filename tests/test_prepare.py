"""prepare(): exact FISH mask of the right size, recorded, deterministic, with clear errors."""

import pytest
import torch
from conftest import batches_of, fish_config, make_examples, pad_collate, prepared_tiny_bert, tiny_bert, tiny_gpt2
from datasets import Dataset
from peft import get_peft_model
from torch.utils.data import DataLoader

from peft_fish_ird import SelectionRecord, UnpreparedAdapterError
from peft_fish_ird.layer import FishIRDLayer
from peft_fish_ird.reference import fisher_loop
from peft_fish_ird.selection import select


def _masks(model, adapter="default"):
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, FishIRDLayer):
            for p in module.base_param_names():
                out[f"{name}.{p}"] = module.indices(p)[adapter].clone()
    return out


def _base_param_count(make):
    return sum(p.numel() for p in make().parameters())


def test_mask_size_equals_budget_and_head_is_counted():
    model = prepared_tiny_bert(keep_ratio=0.05)
    total = _base_param_count(tiny_bert)
    head = sum(p.numel() for p in tiny_bert().classifier.parameters())
    rec = model.selection
    assert (rec.total_params, rec.head_params) == (total, head)
    assert rec.k == int(total * 0.05) - head
    assert sum(m.numel() for m in _masks(model).values()) == rec.k
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == int(total * 0.05)


def test_head_outside_budget_adds_k_entries_on_top():
    model = prepared_tiny_bert(keep_ratio=0.05, head_in_budget=False)
    total = _base_param_count(tiny_bert)
    assert sum(m.numel() for m in _masks(model).values()) == int(total * 0.05)


def test_mask_is_the_global_top_k_of_the_batch_size_one_fisher():
    examples = make_examples(24)
    model = get_peft_model(tiny_gpt2(), fish_config(num_samples=12))
    rec = model.prepare(examples, data_collator=pad_collate, progress=False)
    ref_model = tiny_gpt2()
    drawn = [examples[i] for i in rec.sample_indices]
    targets = {n: m for n, m in ref_model.named_modules() if f"{n}.weight" in rec.shapes}
    slow = fisher_loop(ref_model, batches_of(drawn, 1), targets)
    expected = select(slow.scores, rec.k, "global")
    got = _masks(model)
    overlap = sum(len(set(got[k].tolist()) & set(expected[k].tolist())) for k in expected)
    assert overlap >= rec.k - 2  # float ties at the threshold are the only allowed difference


def test_default_targets_cover_embeddings_layernorm_and_linear_but_not_the_head():
    model = get_peft_model(tiny_bert(), fish_config())
    names = {n for n, m in model.base_model.model.named_modules() if isinstance(m, FishIRDLayer)}
    assert "bert.embeddings.word_embeddings" in names
    assert "bert.embeddings.LayerNorm" in names
    assert "bert.encoder.layer.0.attention.self.query" in names
    assert "bert.pooler.dense" in names
    assert not any(n.startswith("classifier") for n in names)


def test_gpt2_conv1d_modules_are_targeted():
    model = get_peft_model(tiny_gpt2(), fish_config())
    names = {n for n, m in model.base_model.model.named_modules() if isinstance(m, FishIRDLayer)}
    assert "transformer.h.0.attn.c_attn" in names and "transformer.wte" in names


def test_explicit_target_modules_restrict_the_candidates():
    model = prepared_tiny_bert(target_modules=["query", "value"], keep_ratio=0.1)
    assert all(".query." in k or ".value." in k for k, m in _masks(model).items() if m.numel())


def test_unsupported_explicit_target_is_refused():
    with pytest.raises(TypeError, match="cannot adapt"):
        get_peft_model(tiny_bert(), fish_config(target_modules=["attention.self"]))


def test_same_seed_same_mask_and_other_seed_other_samples():
    a, b = prepared_tiny_bert(seed=0), prepared_tiny_bert(seed=0)
    ma, mb = _masks(a), _masks(b)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    other = get_peft_model(tiny_bert(), fish_config(seed=7))
    rec = other.prepare(make_examples(24), data_collator=pad_collate, progress=False)
    assert rec.sample_indices != a.selection.sample_indices


def test_record_is_stored_in_the_adapter_config():
    model = prepared_tiny_bert()
    rec = model.selection
    assert isinstance(rec, SelectionRecord)
    assert model.peft_config["default"].selection_record == rec.to_dict()
    assert rec.num_samples_used == 16 and len(rec.sample_indices) == 16
    assert rec.trainable_entries == rec.k
    assert 0 < rec.score_summary["selected_fisher_share"] <= 1


def test_expected_fisher_prepares():
    model = prepared_tiny_bert(fisher="expected")
    assert model.selection.fisher == "expected"


def test_per_module_budget_spreads_entries():
    model = prepared_tiny_bert(budget="per_module")
    counts = [m.numel() for m in _masks(model).values()]
    assert sum(counts) == model.selection.k
    assert sum(c > 0 for c in counts) > len(counts) // 2


def test_dataset_with_text_column_and_dataloader_inputs_work():
    examples = make_examples(24)
    ds = Dataset.from_list([{**e, "text": "raw text the model does not take"} for e in examples])
    a = get_peft_model(tiny_bert(), fish_config())
    a.prepare(ds, data_collator=pad_collate, progress=False)
    b = get_peft_model(tiny_bert(), fish_config(num_samples=10))
    rec = b.prepare(DataLoader(examples, batch_size=4, collate_fn=pad_collate), progress=False)
    assert rec.num_samples_used == 10


def test_variable_length_examples_without_collator_get_a_clear_error():
    model = get_peft_model(tiny_bert(), fish_config())
    with pytest.raises(ValueError, match="DataCollatorWithPadding"):
        model.prepare(make_examples(24), progress=False)


def test_training_an_unprepared_model_raises_the_documented_error():
    model = get_peft_model(tiny_bert(), fish_config())
    model.train()
    with pytest.raises(UnpreparedAdapterError, match="prepare"):
        model(**pad_collate(make_examples(2)))


def test_saving_an_unprepared_model_raises_the_documented_error(tmp_path):
    model = get_peft_model(tiny_bert(), fish_config())
    with pytest.raises(UnpreparedAdapterError, match="prepare"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_evaluating_an_unprepared_model_gives_base_outputs():
    batch = pad_collate(make_examples(3))
    batch.pop("labels")
    base = tiny_bert()
    model = get_peft_model(tiny_bert(), fish_config())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)


def test_prepare_refuses_to_discard_trained_values_without_overwrite():
    model = prepared_tiny_bert()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "fishird_" in n and p.numel()).fill_(0.5)
    with pytest.raises(RuntimeError, match="overwrite=True"):
        model.prepare(make_examples(24), data_collator=pad_collate, progress=False)
    model.prepare(make_examples(24), data_collator=pad_collate, progress=False, overwrite=True)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if "fishird_" in n)


def test_budget_too_small_for_the_head_names_the_fix():
    model = get_peft_model(tiny_bert(), fish_config(keep_ratio=0.001))
    with pytest.raises(ValueError, match="head_in_budget"):
        model.prepare(make_examples(24), data_collator=pad_collate, progress=False)
