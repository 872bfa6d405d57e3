"""RMSNorm is a layer type found by behaviour (Llama/Qwen/Mistral each define their own class):
its Fisher rule equals the batch-size-1 loop, and trained entries merge exactly."""

import pytest
import torch
from conftest import lm_batches, lm_collate, lm_examples, tiny_llama
from peft import get_peft_model
from torch import nn

from peft_fish_ird import FishIRDConfig
from peft_fish_ird.fisher import compute_fisher
from peft_fish_ird.layer_types import layer_type_for
from peft_fish_ird.layer_types.generic import GENERIC_NAME
from peft_fish_ird.reference import fisher_loop


class GemmaStyleRMSNorm(nn.Module):
    """(1 + w) * x_hat: looks like an RMSNorm but is a different function, so it must not match
    RMSNorm (the generic fallback takes it, ``test_generic_layer_type.py``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.eps = 1e-6

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_llama_and_torch_rms_norms_are_recognised_and_lookalikes_are_not():
    llama_norm = tiny_llama().model.norm
    assert layer_type_for(llama_norm).name == "RMSNorm"
    assert layer_type_for(nn.RMSNorm(8)).name == "RMSNorm"
    assert layer_type_for(GemmaStyleRMSNorm(8)).name == GENERIC_NAME  # not RMSNorm: the generic torch.func rule
    assert layer_type_for(nn.RMSNorm(8, elementwise_affine=False)) is None  # no weight: nothing to train


def test_rms_norm_fisher_equals_the_batch_size_one_loop():
    model = tiny_llama()
    batches = lm_batches(8, 4)
    targets = {n: m for n, m in model.named_modules() if n and layer_type_for(m) is not None}
    assert any(layer_type_for(m).name == "RMSNorm" for m in targets.values())
    fast = compute_fisher(model, batches, targets, progress=False)
    slow = fisher_loop(model, batches, targets)
    scale = max(float(v.abs().max()) for v in slow.scores.values())
    for key, ref in slow.scores.items():
        assert float((fast.scores[key] - ref).abs().max()) <= 1e-5 * max(float(ref.abs().max()), 1e-9 * scale), key
    assert torch.allclose(fast.sample_scores, slow.sample_scores, rtol=1e-5)


@pytest.mark.parametrize("use_fast_path", [True, False], ids=["fast", "reference"])
def test_trained_rms_norm_entries_merge_into_the_same_model(use_fast_path):
    model = get_peft_model(tiny_llama(), FishIRDConfig(keep_ratio=0.3, num_samples=8, fisher_batch_size=4))
    targets = model.peft_config["default"].target_modules  # PEFT shortens long lists to name suffixes
    assert {"norm", "input_layernorm", "post_attention_layernorm"} <= set(targets)
    model.prepare(lm_examples(8), data_collator=lm_collate, progress=False)
    for module in model.modules():
        if hasattr(module, "use_fast_path"):
            module.use_fast_path = use_fast_path
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fishird_" in name and p.numel():
                p.copy_(torch.randn(p.shape) * 0.1)
    norm_entries = sum(
        m.num_entries("default") for n, m in model.named_modules() if n.endswith("norm") and hasattr(m, "num_entries")
    )
    assert norm_entries > 0, "the case must train some RMSNorm entries"
    batch = lm_batches(4, 4, seed=1)[0]
    adapter_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    merged = model.merge_and_unload()
    merged_logits = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-5)
