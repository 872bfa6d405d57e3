"""Importing the package registers FISH_IRD with PEFT, without breaking built-in methods."""

import json
import subprocess
import sys
import textwrap

import torch
from conftest import fish_config, tiny_bert
from peft import LoraConfig, PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_fish_ird
from peft_fish_ird import FishIRDConfig, FishIRDModel


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_import_in_fresh_process_registers_method_and_get_peft_model_works():
    done = _run(
        """
        import sys; sys.path.insert(0, "tests")
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
        assert "FISH_IRD" not in PEFT_TYPE_TO_TUNER_MAPPING
        import peft_fish_ird
        from peft import get_peft_model, PeftModel
        from conftest import tiny_bert, fish_config
        model = get_peft_model(tiny_bert(), fish_config())
        assert isinstance(model, PeftModel)
        assert type(model.base_model).__name__ == "FishIRDModel"
        print(str(model.peft_config["default"].peft_type))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("FISH_IRD")


def test_registration_is_idempotent_and_fills_the_three_tables():
    peft_fish_ird.register()
    peft_fish_ird.register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["FISH_IRD"] is FishIRDConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["FISH_IRD"] is FishIRDModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["FISH_IRD"] == "fishird_"


def test_registration_refuses_a_conflicting_class(monkeypatch):
    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, peft_fish_ird.FishIRDPeftType.FISH_IRD, dict)
    try:
        peft_fish_ird.register()
    except KeyError as err:
        assert "already registered" in str(err)
    else:
        raise AssertionError("a conflicting registration was accepted")


def test_peft_config_from_pretrained_returns_fish_config(tmp_path):
    cfg = fish_config(keep_ratio=0.01)
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FISH_IRD"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, FishIRDConfig)
    assert loaded.keep_ratio == 0.01
    assert loaded.peft_type.value == "FISH_IRD"


def test_lora_still_trains_after_import():
    model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable)
    ids = torch.randint(1, 90, (2, 5))
    out = model(input_ids=ids, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_missing_import_gives_peft_keyerror_naming_the_type(tmp_path):
    fish_config().save_pretrained(tmp_path)
    done = _run(f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})")
    assert done.returncode != 0
    assert "FISH_IRD" in done.stderr
