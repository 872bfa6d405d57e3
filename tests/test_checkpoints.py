"""GGUF checkpoints become float model folders that load with from_pretrained and train.

The GGUF files are written here with gguf's own writer from the tiny Llama (llama.cpp's tensor
names and its Q/K row permutation), so the test needs no download.
"""

import json
import os

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

from peft_fish_ird.checkpoints import SOURCE_FILE, dequantize_gguf

gguf = pytest.importorskip("gguf")

LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


def _permute(w, n_head):  # llama.cpp's rotary layout of q/k rows (transformers undoes it on load)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path, quantize: bool = False):
    """Write a Llama causal LM as GGUF (F32; with ``quantize``, tensors whose rows fit Q8_0 blocks as Q8_0)."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(c.vocab_size)
    for key, tensor in model.state_dict().items():
        value = tensor.detach().numpy()
        if key == "lm_head.weight":
            if c.tie_word_embeddings:
                continue  # a tied head is not stored: its absence tells loaders it is tied
            name = "output.weight"
        elif key in TOP_NAMES:
            name = TOP_NAMES[key]
        else:
            _, _, layer, *module, _ = key.split(".")
            module = ".".join(module)
            name = f"blk.{layer}.{LAYER_NAMES[module]}.weight"
            heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}
            if module in heads:
                value = _permute(value, heads[module])
        if quantize and value.ndim == 2 and value.shape[-1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(value, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, value.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


IDS = torch.tensor([[5, 17, 3, 44, 9, 61, 2], [8, 8, 30, 1, 72, 15, 40]])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_dequantized_gguf_folder_loads_as_the_same_float_model(tmp_path, tied):
    original = tiny_llama(tied=tied)
    source = write_tiny_gguf(original, tmp_path / "tiny.gguf")
    folder = dequantize_gguf(source, tmp_path / "float")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temporary folder left behind"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is tied
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert getattr(model, "hf_quantizer", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight if tied else True
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, original(IDS).logits)


def test_quantized_tensors_are_dequantized_like_gguf_does(tmp_path):
    original = tiny_llama()
    source = write_tiny_gguf(original, tmp_path / "q8.gguf", quantize=True)
    model = AutoModelForCausalLM.from_pretrained(dequantize_gguf(source, tmp_path / "float", dtype="bfloat16"))
    assert model.dtype == torch.bfloat16
    weight = original.model.layers[0].mlp.down_proj.weight.detach().numpy()
    q8 = gguf.GGMLQuantizationType.Q8_0
    expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight, q8), q8)).reshape(weight.shape)
    got = model.model.layers[0].mlp.down_proj.weight.float()
    assert not torch.equal(expected, torch.from_numpy(weight)), "the case must be lossy"
    assert torch.allclose(got, expected.bfloat16().float())


def test_an_existing_copy_is_reused_and_only_overwrite_replaces_it(tmp_path):
    source = write_tiny_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    folder = dequantize_gguf(source, tmp_path / "float")
    stamp = (folder / SOURCE_FILE).stat().st_mtime_ns
    assert dequantize_gguf(source, folder) == folder and (folder / SOURCE_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="overwrite=True"):
        dequantize_gguf(source, folder, dtype="float16")
    dequantize_gguf(source, folder, dtype="float16", overwrite=True)
    assert json.loads((folder / SOURCE_FILE).read_text())["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "tiny.gguf"]


def test_missing_file_non_gguf_file_and_missing_gguf_package_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="No GGUF file"):
        dequantize_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"\x08\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match="not a GGUF file"):
        dequantize_gguf(fake, tmp_path / "out")
    source = write_tiny_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match="pip install gguf"):
        dequantize_gguf(source, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
