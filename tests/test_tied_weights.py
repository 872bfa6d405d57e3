"""Weights shared by two modules (a causal LM's tied embeddings and output head) are never adapted
silently: targeting one is refused before anything trains, and the defaults leave them out."""

import logging

import pytest
import torch
from conftest import tiny_llama
from peft import get_peft_model
from torch import nn

from peft_fish_ird import FishIRDConfig


class Scale(nn.Module):
    """A parametrised module type FishIRD has no rule for."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gain


@pytest.mark.parametrize(("target", "other"), [("lm_head", "model.embed_tokens"), ("embed_tokens", "lm_head")])
def test_targeting_a_tied_weight_is_refused_naming_both_uses(target, other):
    with pytest.raises(ValueError, match=rf"cannot target .*{target}.*shared with '{other}'"):
        get_peft_model(tiny_llama(tied=True), FishIRDConfig(target_modules=[target]))


def test_untied_embeddings_can_be_targeted():
    model = get_peft_model(tiny_llama(tied=False), FishIRDConfig(target_modules=["lm_head", "embed_tokens"]))
    assert sorted(model.peft_config["default"].target_modules) == ["embed_tokens", "lm_head"]


def test_default_targets_leave_out_tied_modules(caplog):
    with caplog.at_level(logging.WARNING, logger="peft_fish_ird"):
        model = get_peft_model(tiny_llama(tied=True), FishIRDConfig())
    targets = model.peft_config["default"].target_modules
    assert "lm_head" not in targets and "model.embed_tokens" not in targets
    assert "tied weights" in caplog.text


def test_default_targets_name_parametrised_types_without_a_rule(caplog):
    model = nn.Sequential(nn.Linear(4, 4), Scale(4), Scale(4), nn.Linear(4, 2))
    with caplog.at_level(logging.WARNING, logger="peft_fish_ird"):
        peft_model = get_peft_model(model, FishIRDConfig())
    assert sorted(peft_model.peft_config["default"].target_modules) == ["0", "3"]
    assert "Scale (2 modules)" in caplog.text
