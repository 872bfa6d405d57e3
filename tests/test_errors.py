"""Every bad input gets a clear error (type and message checked), nothing is lost, results repeat."""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import fish_config, make_examples, pad_collate, prepared_tiny_bert, randomize_values, tiny_bert
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader

import peft_fish_ird
from peft_fish_ird import FishIRDConfig, UnpreparedAdapterError
from peft_fish_ird.layer import FishIRDLayer
from peft_fish_ird.selection import select

EXAMPLES = make_examples(24)


def _masks(model):
    return {
        f"{n}.{p}": m.indices(p)["default"].clone()
        for n, m in model.named_modules()
        if isinstance(m, FishIRDLayer)
        for p in m.base_param_names()
    }


# ------------------------------------------------------------------------------------------ config
class TestConfig:
    @pytest.mark.parametrize("value", [0.0, -0.1, 1.01])
    def test_keep_ratio_out_of_range(self, value):
        with pytest.raises(ValueError, match=r"keep_ratio=.*out of range.*\(0, 1\]"):
            FishIRDConfig(keep_ratio=value)

    def test_keep_ratio_below_one_entry(self):
        model = get_peft_model(tiny_bert(), fish_config(keep_ratio=1e-6, head_in_budget=False))
        with pytest.raises(ValueError, match="less than one entry.*raise keep_ratio"):
            model.prepare(EXAMPLES, data_collator=pad_collate, progress=False)

    def test_head_larger_than_budget(self):
        model = get_peft_model(tiny_bert(), fish_config(keep_ratio=0.003))
        with pytest.raises(ValueError, match="head.*already takes.*head_in_budget=False"):
            model.prepare(EXAMPLES, data_collator=pad_collate, progress=False)

    def test_target_modules_matching_nothing_names_what_exists(self):
        with pytest.raises(ValueError, match=r"matches no module.*'query'"):
            get_peft_model(tiny_bert(), fish_config(target_modules=["q_proj"]))

    def test_unsupported_module_type_names_supported_ones(self):
        with pytest.raises(TypeError, match="BertSelfAttention.*Linear, Embedding, LayerNorm"):
            get_peft_model(tiny_bert(), fish_config(target_modules=["attention.self"]))

    @pytest.mark.parametrize("field, value", [("fisher", "kfac"), ("selection", "greedy"), ("budget", "layer")])
    def test_unknown_choice_lists_the_valid_ones(self, field, value):
        with pytest.raises(ValueError, match=f"{field}='{value}' is not supported: choose one of"):
            FishIRDConfig(**{field: value})

    @pytest.mark.parametrize(
        "kwargs", [{"ird_rounds": 0}, {"ird_min_samples": 0}, {"ird_shrink": 1.0}, {"ird_shrink": 0.0}]
    )
    def test_ird_settings_that_allow_no_search(self, kwargs):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            FishIRDConfig(selection="ird", **kwargs)

    def test_negative_num_samples(self):
        with pytest.raises(ValueError, match="num_samples=-5 is invalid"):
            FishIRDConfig(num_samples=-5)


# ------------------------------------------------------------------------------------------ data
class TestData:
    def test_empty_dataset(self):
        model = get_peft_model(tiny_bert(), fish_config())
        with pytest.raises(ValueError, match="empty"):
            model.prepare([], data_collator=pad_collate, progress=False)

    def test_fewer_examples_than_num_samples_uses_all_with_a_warning(self, caplog):
        model = get_peft_model(tiny_bert(), fish_config(num_samples=100))
        with caplog.at_level(logging.WARNING):
            record = model.prepare(EXAMPLES, data_collator=pad_collate, progress=False)
        assert record.num_samples_used == len(EXAMPLES)
        assert "uses all 24" in caplog.text

    def test_examples_without_labels_for_the_empirical_fisher(self):
        unlabeled = [{k: v for k, v in e.items() if k != "labels"} for e in EXAMPLES]

        def collate(examples):
            batch = pad_collate([{**e, "labels": 0} for e in examples])
            batch.pop("labels")
            return batch

        model = get_peft_model(tiny_bert(), fish_config())
        with pytest.raises(ValueError, match="no 'labels'.*fisher='expected'"):
            model.prepare(unlabeled, data_collator=collate, progress=False)

    def test_examples_with_no_model_input(self):
        model = get_peft_model(tiny_bert(), fish_config())
        with pytest.raises(ValueError, match=r"keys \['labels', 'text'\].*Tokenize"):
            model.prepare([{"text": "raw", "labels": 1}] * 4, data_collator=pad_collate, progress=False)

    def test_shuffling_dataloader_without_seed_warns_about_reproducibility(self, caplog):
        model = get_peft_model(tiny_bert(), fish_config())
        loader = DataLoader(EXAMPLES, batch_size=4, shuffle=True, collate_fn=pad_collate)
        with caplog.at_level(logging.WARNING):
            model.prepare(loader, progress=False)
        assert "without a seeded generator" in caplog.text

    def test_sequences_longer_than_the_model_limit(self):
        long = [{"input_ids": list(range(1, 41)), "attention_mask": [1] * 40, "labels": 0}] * 4  # limit is 32
        model = get_peft_model(tiny_bert(), fish_config())
        with pytest.raises(ValueError, match="at most 32.*truncation=True"):
            model.prepare(long, data_collator=pad_collate, progress=False)


# ------------------------------------------------------------------------------------------ numerics
class TestNumerics:
    def test_nan_during_fisher_names_the_sample(self):
        model = get_peft_model(tiny_bert(), fish_config())
        with torch.no_grad():
            model.base_model.model.bert.embeddings.word_embeddings.weight[EXAMPLES[0]["input_ids"][0]] = float("nan")
        with pytest.raises(peft_fish_ird.NonFiniteFisherError, match=r"Fisher sample \d+"):
            model.prepare(EXAMPLES, data_collator=pad_collate, progress=False)

    def test_all_zero_fisher_is_refused(self):
        model = get_peft_model(tiny_bert(), fish_config())
        with torch.no_grad():
            model.base_model.model.classifier.original_module.weight.zero_()
            model.base_model.model.classifier.modules_to_save["default"].weight.zero_()
        with pytest.raises(ValueError, match="Every Fisher score is zero"):
            model.prepare(EXAMPLES, data_collator=pad_collate, progress=False)

    def test_ties_resolve_deterministically(self):
        scores = {"a.weight": torch.zeros(10), "b.weight": torch.ones(3)}
        first = select(scores, 5)
        assert first["b.weight"].tolist() == [0, 1, 2] and first["a.weight"].tolist() == [0, 1]
        assert all(torch.equal(first[k], v) for k, v in select(scores, 5).items())


# ------------------------------------------------------------------------------------------ lifecycle
class TestLifecycle:
    def test_merging_an_unprepared_model(self):
        model = get_peft_model(tiny_bert(), fish_config())
        with pytest.raises(UnpreparedAdapterError, match="prepare"):
            model.merge_and_unload()

    def test_prepare_twice_replaces_the_mask_and_warns_about_the_optimizer(self, caplog):
        model = prepared_tiny_bert()
        with caplog.at_level(logging.WARNING):
            model.prepare(make_examples(24, seed=5), data_collator=pad_collate, progress=False)
        assert "optimizer built before this call is stale" in caplog.text

    def test_prepare_after_merge(self):
        model = prepared_tiny_bert()
        model.merge_adapter()
        with pytest.raises(RuntimeError, match="unmerge_adapter"):
            model.prepare(EXAMPLES, data_collator=pad_collate, progress=False)

    def test_merging_twice_warns_and_adds_the_delta_once(self):
        model = prepared_tiny_bert()
        randomize_values(model)
        model.merge_adapter()
        once = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
        with pytest.warns(UserWarning, match="already merged"):
            model.merge_adapter()
        assert all(torch.equal(v, once[k]) for k, v in model.get_base_model().state_dict().items())

    def test_deleting_the_active_adapter_switches_to_another(self):
        model = prepared_tiny_bert()
        model.add_adapter("other", fish_config(seed=2))
        with pytest.warns(UserWarning, match="Setting active adapter to other"):
            model.delete_adapter("default")
        assert model.active_adapter == "other"


# ------------------------------------------------------------------------------------------ loading
@pytest.fixture
def saved(tmp_path):
    model = prepared_tiny_bert()
    randomize_values(model)
    model.save_pretrained(tmp_path)
    return tmp_path, model


class TestLoading:
    def test_other_base_model_fails_before_anything_is_modified(self, saved):
        path, _ = saved
        from transformers import BertConfig, BertForSequenceClassification

        other = BertForSequenceClassification(
            BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
        )
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match="base model it was trained with"):
            PeftModel.from_pretrained(other, path)
        assert not any(isinstance(m, FishIRDLayer) for m in other.modules())
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())

    @pytest.mark.parametrize("damage", ["out_of_range", "duplicated"])
    def test_bad_indices_in_the_file(self, saved, damage):
        from safetensors.torch import load_file, save_file

        path, _ = saved
        tensors = load_file(path / "adapter_model.safetensors")
        key = next(k for k, t in tensors.items() if k.endswith("weight_indices") and t.numel() > 2)
        idx = tensors[key].clone()
        idx[-1] = 10**9 if damage == "out_of_range" else idx[0]
        tensors[key] = idx
        record = json.loads(bytes(tensors["fishird_selection_record"].tolist()).decode())
        record.pop("mask_sha256")  # without the fingerprint the layer-level checks must still catch it
        tensors["fishird_selection_record"] = torch.frombuffer(
            bytearray(json.dumps(record).encode()), dtype=torch.uint8
        )
        save_file(tensors, path / "adapter_model.safetensors")
        config = json.loads((path / "adapter_config.json").read_text())
        config["selection_record"].pop("mask_sha256")
        (path / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="different shapes|strictly increasing"):
            PeftModel.from_pretrained(tiny_bert(), path)

    def test_truncated_weights_file_fails_and_leaves_the_base_untouched(self, saved):
        path, _ = saved
        data = (path / "adapter_model.safetensors").read_bytes()
        (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
        base = tiny_bert()
        before = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(Exception, match="(?i)safetensor|deserializ|invalid|incomplete"):
            PeftModel.from_pretrained(base, path)
        assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items() if k in before)

    def test_config_from_a_newer_version_warns(self, saved):
        path, _ = saved
        config = json.loads((path / "adapter_config.json").read_text())
        config["fishird_version"] = "99.0.0"
        (path / "adapter_config.json").write_text(json.dumps(config))
        with pytest.warns(UserWarning, match="newer than the installed"):
            FishIRDConfig.from_pretrained(path)

    def test_loading_never_unpickles(self):
        sources = "\n".join(p.read_text() for p in Path(peft_fish_ird.__file__).parent.glob("*.py"))
        assert "pickle" not in sources
        assert "torch.load(" not in sources


# ------------------------------------------------------------------------------------------ saving
class TestSaving:
    def test_saving_into_an_existing_folder_replaces_the_adapter_whole(self, saved):
        path, _ = saved
        other = prepared_tiny_bert(seed=4, keep_ratio=0.08)
        randomize_values(other, seed=9)
        other.save_pretrained(path)
        loaded = PeftModel.from_pretrained(tiny_bert(), path)
        assert all(torch.equal(v, _masks(other)[k]) for k, v in _masks(loaded).items())
        assert loaded.selection.k == other.selection.k

    def test_weights_and_config_from_different_saves_are_refused(self, saved, tmp_path_factory):
        path, _ = saved
        other_dir = tmp_path_factory.mktemp("other")
        other = prepared_tiny_bert(seed=4, keep_ratio=0.08)
        other.save_pretrained(other_dir)
        (path / "adapter_config.json").write_text((other_dir / "adapter_config.json").read_text())  # half a save
        with pytest.raises(ValueError, match="different saves"):
            PeftModel.from_pretrained(tiny_bert(), path)


# ------------------------------------------------------------------------------------------ determinism
def test_same_mask_across_cpu_thread_counts(tmp_path):
    code = textwrap.dedent(f"""
        import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(int(sys.argv[1]))
        from conftest import prepared_tiny_bert
        from peft_fish_ird.layer import FishIRDLayer
        model = prepared_tiny_bert()
        torch.save({{f"{{n}}.{{p}}": m.indices(p)["default"] for n, m in model.named_modules()
                    if isinstance(m, FishIRDLayer) for p in m.base_param_names()}}, sys.argv[2])
        """)
    for threads in (1, 2):
        done = subprocess.run(
            [sys.executable, "-c", code, str(threads), str(tmp_path / f"{threads}.pt")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    a, b = torch.load(tmp_path / "1.pt"), torch.load(tmp_path / "2.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_loaded_config_alone_does_not_make_an_adapter_prepared(tmp_path):
    """A config read from disk carries a record, but the layers still have no entries."""
    model = prepared_tiny_bert()
    model.save_pretrained(tmp_path / "a")
    fresh = get_peft_model(tiny_bert(), FishIRDConfig.from_pretrained(tmp_path / "a"))
    with pytest.raises(UnpreparedAdapterError):
        fresh.save_pretrained(tmp_path / "b")
