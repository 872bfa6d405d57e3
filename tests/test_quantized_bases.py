"""bitsandbytes 4-bit / 8-bit bases (QLoRA-style): prepare, exact forward, training, save/load, merge.

A tiny random Llama is saved and re-loaded quantized on CPU (bitsandbytes' CPU backend). The
float "twin" of a quantized model is the same model with every packed layer swapped for a float
Linear holding its dequantized weight (``dequantize_bnb``): the weights the quantized kernels use.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import adamw_steps, adapter_masks, lm_collate, lm_examples, tiny_llama
from peft import PeftModel, get_peft_model
from torch import nn

from peft_fish_ird import FishIRDConfig, dequantize_bnb

pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

QUANT = {
    "nf4": lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    ),
    "fp4": lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32
    ),
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
}


def small_llama():
    """A random Llama whose layer widths bitsandbytes' CPU inference kernel accepts (multiples of 32)."""
    return tiny_llama(seed=0, width=64, heads=4)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("small_llama")
    small_llama().save_pretrained(path)
    return path


def load_quantized(path, kind: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=QUANT[kind](), device_map="cpu").eval()


def config(**kw) -> FishIRDConfig:
    return FishIRDConfig(task_type="CAUSAL_LM", keep_ratio=0.02, num_samples=16, fisher_batch_size=8, **kw)


def prepared(model, **kw):
    peft_model = get_peft_model(model, config(**kw))
    peft_model.prepare(lm_examples(16), data_collator=lm_collate, progress=False)
    return peft_model


def randomise_values(peft_model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "fishird_" in name and p.numel():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def set_fast_path(peft_model, on: bool) -> None:
    for module in peft_model.modules():
        if hasattr(module, "use_fast_path"):
            module.use_fast_path = on


def packed_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_default_targets_cover_the_packed_linears_and_count_logical_parameters(float_dir, kind):
    model = load_quantized(float_dir, kind)
    packed = packed_layers(model)
    assert packed, "the fixture should give bitsandbytes layers"
    total_float = sum(p.numel() for p in small_llama().parameters())
    peft_model = get_peft_model(model, config())
    record = peft_model.prepare(lm_examples(16), data_collator=lm_collate, progress=False)
    assert record.total_params == total_float
    assert record.k == int(0.02 * total_float)
    adapted = {n for n, m in peft_model.base_model.model.named_modules() if type(m).__name__ == "FishIRDModule"}
    assert set(packed) <= adapted
    assert sum(i.numel() for i in adapter_masks(peft_model).values()) == record.k


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_mask_equals_the_mask_of_its_dequantized_float_twin(float_dir, kind):
    quantized = load_quantized(float_dir, kind)
    twin = dequantize_bnb(copy.deepcopy(quantized))
    assert not packed_layers(twin)
    masks_q = adapter_masks(prepared(quantized))
    masks_f = adapter_masks(prepared(twin))
    assert masks_q.keys() == masks_f.keys()
    for key in masks_q:
        assert torch.equal(masks_q[key], masks_f[key]), key


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_fast_sparse_term_matches_dense_reference_in_value_and_gradients(float_dir, kind):
    peft_model = prepared(load_quantized(float_dir, kind))
    randomise_values(peft_model)
    batch = lm_collate(lm_examples(4, seed=3))
    results = []
    for fast in (True, False):
        set_fast_path(peft_model, fast)
        peft_model.zero_grad(set_to_none=True)
        out = peft_model(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None}
        results.append((out.logits.detach(), grads))
    (fast_logits, fast_grads), (slow_logits, slow_grads) = results
    torch.testing.assert_close(fast_logits, slow_logits, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == slow_grads.keys() and fast_grads
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_training_moves_only_the_values_and_leaves_the_packed_base_untouched(float_dir):
    peft_model = prepared(load_quantized(float_dir, "nf4"))
    packed = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.dtype == torch.uint8}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    adamw_steps(peft_model, trainable, lm_collate(lm_examples(8, seed=4)))
    assert packed and all(torch.equal(p, packed[n]) for n, p in peft_model.named_parameters() if n in packed)
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before) if p.numel())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_saved_adapter_reloads_onto_a_fresh_quantized_base_with_identical_logits(float_dir, kind, tmp_path):
    peft_model = prepared(load_quantized(float_dir, kind))
    randomise_values(peft_model)
    batch = lm_collate(lm_examples(4, seed=5))
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_quantized(float_dir, kind), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_is_refused_on_a_packed_base_and_works_after_dequantize_bnb(float_dir, kind):
    # logits with autograd on: under no_grad in eval, bitsandbytes' CPU inference kernel for 4-bit
    # may compute in bfloat16 (AVX512-BF16 CPUs), which no float merge can reproduce
    peft_model = prepared(load_quantized(float_dir, kind))
    randomise_values(peft_model)
    batch = lm_collate(lm_examples(4, seed=6))
    expected = peft_model(**batch).logits.detach()
    with pytest.raises(TypeError, match="dequantize_bnb"):
        peft_model.merge_and_unload()
    dequantize_bnb(peft_model)
    assert not packed_layers(peft_model)
    atol = 1e-5 if kind != "int8" else 5e-2  # the 8-bit kernel also rounds the activations to int8
    unmerged = peft_model(**batch).logits.detach()
    torch.testing.assert_close(unmerged, expected, atol=atol, rtol=0)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged(**batch).logits.detach(), unmerged, atol=1e-5, rtol=0)


def test_other_quantization_methods_are_refused_before_anything_runs():
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "awq", "bits": 4}
    with pytest.raises(ValueError, match="'awq'.*bitsandbytes 4-bit / 8-bit"):
        get_peft_model(model, config())


def test_a_linear_holding_integer_weights_of_an_unknown_kind_is_refused():
    class PackedLinear(nn.Linear):
        pass

    model = nn.Sequential(PackedLinear(4, 4))
    model[0].weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="stored as torch.int8"):
        get_peft_model(model, FishIRDConfig(target_modules=["0"], keep_ratio=0.5))
