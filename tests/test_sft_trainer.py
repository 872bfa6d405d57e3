"""TRL's SFTTrainer: the LoRA -> FishIRD switch of examples/sft_*.py is two lines, and the FishIRD script
trains only its masked entries (tiny Llama, 3 steps)."""

import difflib
import runpy
import sys
from pathlib import Path

import pytest
import torch
from test_trainer_integration import _code_lines

from peft_fish_ird.layer import FishIRDLayer

pytest.importorskip("trl")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_fishird_sft_script_differs_from_the_lora_sft_script_by_two_lines():
    lora, fish = _code_lines(EXAMPLES / "sft_lora.py"), _code_lines(EXAMPLES / "sft_fishird.py")
    diff = [
        ln
        for ln in difflib.unified_diff(lora, fish, lineterm="", n=0)
        if ln[:1] in "+-" and ln[:3] not in ("+++", "---")
    ]
    removed, added = [ln for ln in diff if ln.startswith("-")], [ln for ln in diff if ln.startswith("+")]
    assert len(removed) <= 2 and len(added) <= 2, diff
    assert any("FishIRDConfig" in ln for ln in added)


def _masks(model):
    return {
        f"{name}.{p}": module.indices(p)["default"].clone()
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, FishIRDLayer)
        for p in module.base_param_names()
    }


def test_fishird_sft_script_trains_only_the_masked_entries(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    out = tmp_path / "sft"
    monkeypatch.setattr(sys, "argv", ["sft_fishird.py", "--tiny", "--max-steps", "3", "--output-dir", str(out)])
    script = runpy.run_path(str(EXAMPLES / "sft_fishird.py"), run_name="__main__")
    trainer, model = script["trainer"], script["model"]
    assert trainer.state.global_step == 3
    assert (out / "adapter_model.safetensors").exists()
    masks = _masks(model)
    assert "lm_head.weight" not in masks  # TRL's fused head reads lm_head.weight directly: excluded
    merged = model.merge_and_unload()
    from sft_common import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(tiny=True)  # the same seeded random weights
    moved = 0
    for name, param in base.named_parameters():
        changed = torch.nonzero((merged.get_parameter(name) != param).reshape(-1)).reshape(-1)
        allowed = set(masks.get(name, torch.empty(0, dtype=torch.long)).tolist())
        assert set(changed.tolist()) <= allowed, name
        moved += changed.numel()
    assert moved > 0
