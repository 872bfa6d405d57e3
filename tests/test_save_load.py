"""save_pretrained / PeftModel.from_pretrained round trips; bad bases fail clearly."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_examples, pad_collate, prepared_tiny_bert, randomize_values, tiny_bert
from peft import PeftModel
from safetensors.torch import load_file


@pytest.fixture
def saved(tmp_path):
    model = prepared_tiny_bert()
    randomize_values(model)
    model.save_pretrained(tmp_path)
    batch = pad_collate(make_examples(5, seed=11))
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save({"batch": batch, "logits": logits}, tmp_path / "expected.pt")
    return tmp_path, model


def test_saved_folder_holds_config_weights_and_model_card(saved):
    path, model = saved
    assert {p.name for p in path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "FISH_IRD"
    assert config["selection_record"]["k"] == model.selection.k


def test_saved_tensors_are_indices_and_values_of_size_k(saved):
    path, model = saved
    tensors = load_file(path / "adapter_model.safetensors")
    values = sum(t.numel() for k, t in tensors.items() if "_values" in k)
    indices = [t for k, t in tensors.items() if "_indices" in k]
    assert values == model.selection.k == sum(t.numel() for t in indices)
    assert all(t.dtype == torch.int32 for t in indices)  # every index fits: 4 bytes each on disk
    head = sum(t.numel() for k, t in tensors.items() if "classifier" in k)
    assert head == model.selection.head_params
    assert not any("base_layer" in k for k in tensors)


def test_loaded_indices_are_int64_in_memory_again(saved):
    path, model = saved
    loaded = PeftModel.from_pretrained(tiny_bert(), path)
    indices = {n: b for n, b in loaded.named_buffers() if "_indices" in n}
    assert indices and all(b.dtype == torch.int64 for b in indices.values())
    original = dict(model.named_buffers())
    assert all(torch.equal(b, original[n]) for n, b in indices.items())


def test_low_cpu_mem_usage_load_gives_identical_logits(saved):
    path, _ = saved
    expected = torch.load(path / "expected.pt")
    loaded = PeftModel.from_pretrained(tiny_bert(), path, low_cpu_mem_usage=True)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**expected["batch"]).logits, expected["logits"])
    assert all(b.dtype == torch.int64 for n, b in loaded.named_buffers() if "_indices" in n)


def test_indices_beyond_int32_are_saved_as_int64():
    from peft_fish_ird.model import compact_indices

    assert compact_indices(torch.tensor([0, 2**31 - 1])).dtype == torch.int32
    assert compact_indices(torch.tensor([0, 2**31])).dtype == torch.int64
    assert compact_indices(torch.zeros(0, dtype=torch.int64)).dtype == torch.int32


def test_fresh_process_load_gives_identical_logits(saved):
    path, _ = saved
    code = f"""
        import sys, torch; sys.path.insert(0, "tests")
        import peft_fish_ird
        from peft import PeftModel
        from conftest import tiny_bert
        expected = torch.load({str(path / "expected.pt")!r})
        model = PeftModel.from_pretrained(tiny_bert(), {str(path)!r})
        with torch.no_grad():
            logits = model(**expected["batch"]).logits
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        assert model.selection.k == model.peft_config["default"].selection_record["k"]
        print("identical")
        """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "identical" in done.stdout


def test_loaded_adapter_can_keep_training(saved):
    path, _ = saved
    model = PeftModel.from_pretrained(tiny_bert(), path, is_trainable=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("fishird_" in n for n in trainable)
    model.train()
    out = model(**pad_collate(make_examples(4)))
    out.loss.backward()


def test_loading_onto_a_base_with_other_shapes_fails_clearly(saved):
    path, _ = saved
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=97,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    other = BertForSequenceClassification(cfg)
    with pytest.raises(ValueError, match="base model it was trained with"):
        PeftModel.from_pretrained(other, path)


def test_corrupt_indices_fail_clearly(saved, tmp_path_factory):
    path, _ = saved
    from safetensors.torch import save_file

    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k, t in tensors.items() if "_indices" in k and t.numel())
    tensors[key] = tensors[key].clone()
    tensors[key][-1] = 10**9
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="corrupt"):
        PeftModel.from_pretrained(tiny_bert(), path)


def test_push_to_hub_uploads_exactly_the_saved_adapter(saved, tmp_path_factory, monkeypatch):
    """push_to_hub (offline: hub calls replaced) uploads the same adapter files save_pretrained writes."""
    import shutil
    from types import SimpleNamespace

    from transformers.utils import hub

    path, model = saved
    uploaded = tmp_path_factory.mktemp("uploaded")
    monkeypatch.setattr(
        hub, "hf_api", lambda: SimpleNamespace(create_repo=lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    )
    monkeypatch.setattr(
        hub, "create_and_tag_model_card", lambda repo_id, tags=None, token=None: SimpleNamespace(save=lambda p: None)
    )

    def capture(working_dir, repo_id, **kwargs):
        shutil.copytree(working_dir, uploaded, dirs_exist_ok=True)

    monkeypatch.setattr(model, "_upload_modified_files", capture)
    model.push_to_hub("someone/fishird-tiny")
    names = {p.name for p in uploaded.iterdir()}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert (uploaded / "adapter_model.safetensors").read_bytes() == (path / "adapter_model.safetensors").read_bytes()
    assert json.loads((uploaded / "adapter_config.json").read_text()) == json.loads(
        (path / "adapter_config.json").read_text()
    )


def test_saving_values_that_are_only_a_shard_is_refused_and_writes_nothing(tmp_path):
    """What DeepSpeed ZeRO-3 hands save_pretrained outside a gather: an empty local tensor per value."""
    model = prepared_tiny_bert()
    state = model.state_dict()
    key = next(k for k, v in state.items() if ".fishird_weight_values." in k and v.numel())
    state[key] = state[key][:0]
    with pytest.raises(RuntimeError, match="only this rank's shard") as err:
        model.save_pretrained(tmp_path / "adapter", state_dict=state)
    assert "GatheredParameters" in str(err.value)
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
